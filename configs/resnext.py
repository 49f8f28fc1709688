"""ResNeXt-50 32x4d, one of the study's four models."""

from stagejax import recipe


def get_config(variant=None):
    config = recipe.get_config(variant)
    config.model = "resnext50_32x4d"
    return config
