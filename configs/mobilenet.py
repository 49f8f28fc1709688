"""MobileNetV3-Large, the study's smallest model."""

from stagejax.config import load_sibling

default = load_sibling(__file__, "default")


def get_config(variant=None):
    config = default.get_config(variant)
    config.model = "mobilenet_v3_large"
    return config
