"""ResNeXt-50 32x4d, one of the study's four models."""

from stagejax.config import load_sibling

default = load_sibling(__file__, "default")


def get_config(variant=None):
    config = default.get_config(variant)
    config.model = "resnext50_32x4d"
    return config
