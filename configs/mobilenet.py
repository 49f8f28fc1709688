"""MobileNetV3-Large, the study's smallest model."""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "mobilenet_v3_large"
    return config
