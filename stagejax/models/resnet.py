"""ResNet-18/34/50/101/152, ResNeXt-50 32x4d and Wide-ResNet-50-2, as torchvision builds them.

The study trained torchvision's models (and a from-scratch ResNet-50 equal to
torchvision's), so the architectures here match torchvision layer for layer:
ResNet v1.5 (the bottleneck's stride sits on its 3x3 conv), torch's explicit
padding, a max pool padded by one, and torchvision's initialisation
(``layers.init_weights``). Attribute
names follow torchvision's (``conv1``, ``bn1``, ``layer1``..``layer4``,
``downsample``, ``fc``) so PyTorch weights map onto them by name.

ResNeXt and Wide-ResNet are the bottleneck network with another width per
group: ``width = int(planes * width_per_group / 64) * groups``.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from stagejax.models.layers import (
    ConvBN,
    Layers,
    apply_block,
    global_avg_pool,
    max_pool_3x3_s2,
)


class BasicBlock(nnx.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(self, layers: Layers, in_ch: int, planes: int, stride: int, **_):
        self.conv1 = layers.conv(in_ch, planes, 3, stride)
        self.bn1 = layers.batch_norm(planes)
        self.conv2 = layers.conv(planes, planes, 3)
        self.bn2 = layers.batch_norm(planes)
        self.downsample = _shortcut(layers, in_ch, planes, stride)

    def __call__(self, x: jax.Array) -> jax.Array:
        identity = x if self.downsample is None else self.downsample(x)
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return nnx.relu(y + identity)


class Bottleneck(nnx.Module):
    """1x1 reduce, 3x3 (strided, grouped), 1x1 expand by 4 (ResNet-50 and up)."""

    expansion = 4

    def __init__(
        self,
        layers: Layers,
        in_ch: int,
        planes: int,
        stride: int,
        *,
        groups: int = 1,
        width_per_group: int = 64,
    ):
        width = int(planes * (width_per_group / 64.0)) * groups
        out_ch = planes * self.expansion
        self.conv1 = layers.conv(in_ch, width, 1)
        self.bn1 = layers.batch_norm(width)
        self.conv2 = layers.conv(width, width, 3, stride, groups=groups)
        self.bn2 = layers.batch_norm(width)
        self.conv3 = layers.conv(width, out_ch, 1)
        self.bn3 = layers.batch_norm(out_ch)
        self.downsample = _shortcut(layers, in_ch, out_ch, stride)

    def __call__(self, x: jax.Array) -> jax.Array:
        identity = x if self.downsample is None else self.downsample(x)
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return nnx.relu(y + identity)


def _shortcut(layers: Layers, in_ch: int, out_ch: int, stride: int) -> ConvBN | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return ConvBN(layers, in_ch, out_ch, 1, stride)


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    block: type[BasicBlock] | type[Bottleneck]
    stage_sizes: tuple[int, int, int, int]
    groups: int = 1
    width_per_group: int = 64


CONFIGS = {
    "resnet18": ResNetConfig(BasicBlock, (2, 2, 2, 2)),
    "resnet34": ResNetConfig(BasicBlock, (3, 4, 6, 3)),
    "resnet50": ResNetConfig(Bottleneck, (3, 4, 6, 3)),
    "resnet101": ResNetConfig(Bottleneck, (3, 4, 23, 3)),
    "resnet152": ResNetConfig(Bottleneck, (3, 8, 36, 3)),
    "resnext50_32x4d": ResNetConfig(Bottleneck, (3, 4, 6, 3), groups=32, width_per_group=4),
    "wide_resnet50_2": ResNetConfig(Bottleneck, (3, 4, 6, 3), width_per_group=128),
}


class ResNet(nnx.Module):
    """torchvision's ResNet on NHWC input; ``embed`` is the global average pool.

    ``remat``: recompute each residual block in the backward pass (less memory
    per train step, about one more forward pass of compute); no effect on the
    parameters or the results.
    """

    def __init__(
        self,
        config: ResNetConfig,
        num_classes: int,
        in_channels: int,
        layers: Layers,
        remat: bool = False,
    ):
        self.num_classes = num_classes
        self.remat = remat
        self.in_channels = in_channels
        self.conv1 = layers.conv(in_channels, 64, 7, 2)
        self.bn1 = layers.batch_norm(64)
        in_ch = 64
        widths = (64, 128, 256, 512)
        for i, (planes, size) in enumerate(zip(widths, config.stage_sizes, strict=True)):
            blocks = []
            for j in range(size):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(
                    config.block(
                        layers,
                        in_ch,
                        planes,
                        stride,
                        groups=config.groups,
                        width_per_group=config.width_per_group,
                    )
                )
                in_ch = planes * config.block.expansion
            setattr(self, f"layer{i + 1}", nnx.List(blocks))
        self.embed_dim = in_ch
        self.fc = layers.linear(in_ch, num_classes)

    def backbone(self, x: jax.Array) -> jax.Array:
        """Input [B, H, W, C] -> layer4 output [B, H/32, W/32, 512 * expansion]."""
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = max_pool_3x3_s2(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = apply_block(block, x, self.remat)
        return x

    def embed(self, fmap: jax.Array) -> jax.Array:
        return global_avg_pool(fmap)

    def classify(self, emb: jax.Array) -> jax.Array:
        return self.fc(emb)

    def __call__(self, x: jax.Array, dropout_keys: jax.Array | None = None) -> jax.Array:
        del dropout_keys  # no dropout; accepted so every model is called the same way
        return self.classify(self.embed(self.backbone(x)))
