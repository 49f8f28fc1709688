"""Wide-ResNet-50-2, one of the study's four models."""

from stagejax import recipe


def get_config(variant=None):
    config = recipe.get_config(variant)
    config.model = "wide_resnet50_2"
    return config
