"""MobileNetV3-Large, the study's smallest model."""

from configs import default


def get_config(variant=None):
    config = default.get_config(variant)
    config.model = "mobilenet_v3_large"
    return config
