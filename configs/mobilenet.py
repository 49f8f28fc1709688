"""MobileNetV3-Large, the study's smallest model."""

from stagejax import recipe


def get_config(variant=None):
    config = recipe.get_config(variant)
    config.model = "mobilenet_v3_large"
    return config
