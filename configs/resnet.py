"""ResNet-50 (torchvision v1.5 layout), the study's main model."""

from configs import default


def get_config(variant=None):
    config = default.get_config(variant)
    config.model = "resnet50"
    return config
