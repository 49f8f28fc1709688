"""ResNeXt-50 32x4d, one of the study's four models."""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "resnext50_32x4d"
    return config
