"""ResNet-50 (torchvision v1.5 layout), the study's main model.

The ``demo`` variant (simulated data, minutes on a CPU) trains ResNet-18 instead,
by measurement (benchmarks/RESULTS.md, "The demo"): with the demo's augmentation
it reached 62.1% balanced accuracy in 2 min where ResNet-50 reached 40.8% in 6.
"""

from stagejax import recipe


def get_config(variant=None):
    config = recipe.get_config(variant)
    config.model = "resnet18" if config.variant == "demo" else "resnet50"
    return config
