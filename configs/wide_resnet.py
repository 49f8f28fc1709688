"""Wide-ResNet-50-2, one of the study's four models."""

from stagejax.config import load_sibling

default = load_sibling(__file__, "default")


def get_config(variant=None):
    config = default.get_config(variant)
    config.model = "wide_resnet50_2"
    return config
