"""MobileNetV3-Large and -Small exactly as torchvision builds them (width 1.0).

The study's MobileNetV3-Large is torchvision's, so the block table, channel
rounding (``make_divisible``), squeeze-excitation (ReLU then hard-sigmoid),
BatchNorm settings (eps 0.001, torch momentum 0.01), classifier (Linear,
hard-swish, Dropout 0.2, Linear) and initialisation (``layers.init_weights``)
are torchvision's.
``features`` is indexed like torchvision's ``features`` Sequential and each
inverted residual keeps its ``block`` list, so PyTorch weights map by name;
``hidden`` and ``head`` are torchvision's ``classifier.0`` and ``classifier.3``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
from flax import nnx

from stagejax.models.layers import ConvBN, Layers, apply_block, example_dropout, global_avg_pool


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round ``v`` to a multiple of ``divisor``, never going below 90% of ``v``."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class BlockConfig(NamedTuple):
    in_ch: int
    kernel: int
    expanded: int
    out_ch: int
    use_se: bool
    hard_swish: bool  # torchvision's "HS" (else "RE": ReLU)
    stride: int


_LARGE = (
    BlockConfig(16, 3, 16, 16, False, False, 1),
    BlockConfig(16, 3, 64, 24, False, False, 2),
    BlockConfig(24, 3, 72, 24, False, False, 1),
    BlockConfig(24, 5, 72, 40, True, False, 2),
    BlockConfig(40, 5, 120, 40, True, False, 1),
    BlockConfig(40, 5, 120, 40, True, False, 1),
    BlockConfig(40, 3, 240, 80, False, True, 2),
    BlockConfig(80, 3, 200, 80, False, True, 1),
    BlockConfig(80, 3, 184, 80, False, True, 1),
    BlockConfig(80, 3, 184, 80, False, True, 1),
    BlockConfig(80, 3, 480, 112, True, True, 1),
    BlockConfig(112, 3, 672, 112, True, True, 1),
    BlockConfig(112, 5, 672, 160, True, True, 2),
    BlockConfig(160, 5, 960, 160, True, True, 1),
    BlockConfig(160, 5, 960, 160, True, True, 1),
)
_SMALL = (
    BlockConfig(16, 3, 16, 16, True, False, 2),
    BlockConfig(16, 3, 72, 24, False, False, 2),
    BlockConfig(24, 3, 88, 24, False, False, 1),
    BlockConfig(24, 5, 96, 40, True, True, 2),
    BlockConfig(40, 5, 240, 40, True, True, 1),
    BlockConfig(40, 5, 240, 40, True, True, 1),
    BlockConfig(40, 5, 120, 48, True, True, 1),
    BlockConfig(48, 5, 144, 48, True, True, 1),
    BlockConfig(48, 5, 288, 96, True, True, 2),
    BlockConfig(96, 5, 576, 96, True, True, 1),
    BlockConfig(96, 5, 576, 96, True, True, 1),
)
# name -> (inverted residual blocks, width of the classifier's hidden layer)
CONFIGS = {
    "mobilenet_v3_large": (_LARGE, 1280),
    "mobilenet_v3_small": (_SMALL, 1024),
}


class SqueezeExcitation(nnx.Module):
    """Channel gate: pool -> 1x1 conv -> ReLU -> 1x1 conv -> hard-sigmoid -> scale."""

    def __init__(self, layers: Layers, channels: int, squeeze: int):
        self.fc1 = layers.conv(channels, squeeze, 1, use_bias=True)
        self.fc2 = layers.conv(squeeze, channels, 1, use_bias=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        s = global_avg_pool(x)[:, None, None, :]
        s = nnx.hard_sigmoid(self.fc2(nnx.relu(self.fc1(s))))
        return x * s


class InvertedResidual(nnx.Module):
    """[1x1 expand] -> depthwise kxk -> [squeeze-excitation] -> 1x1 project (+ input)."""

    def __init__(self, layers: Layers, cfg: BlockConfig):
        act = nnx.hard_swish if cfg.hard_swish else nnx.relu
        block: list[nnx.Module] = []
        if cfg.expanded != cfg.in_ch:
            block.append(ConvBN(layers, cfg.in_ch, cfg.expanded, 1, activation=act))
        block.append(
            ConvBN(
                layers,
                cfg.expanded,
                cfg.expanded,
                cfg.kernel,
                cfg.stride,
                groups=cfg.expanded,
                activation=act,
            )
        )
        if cfg.use_se:
            block.append(
                SqueezeExcitation(layers, cfg.expanded, make_divisible(cfg.expanded // 4, 8))
            )
        block.append(ConvBN(layers, cfg.expanded, cfg.out_ch, 1))
        self.block = nnx.List(block)
        self.use_res_connect = cfg.stride == 1 and cfg.in_ch == cfg.out_ch

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x
        for layer in self.block:
            y = layer(y)
        return x + y if self.use_res_connect else y


class MobileNetV3(nnx.Module):
    """torchvision's MobileNetV3; ``embed`` = pool -> Linear -> hard-swish -> dropout.

    ``remat``: recompute each inverted residual block in the backward pass
    (less memory per train step); no effect on the parameters or the results.
    """

    def __init__(
        self,
        blocks: tuple[BlockConfig, ...],
        last_channel: int,
        num_classes: int,
        in_channels: int,
        layers: Layers,
        dropout: float = 0.2,
        remat: bool = False,
    ):
        self.num_classes = num_classes
        self.remat = remat
        self.in_channels = in_channels
        features: list[nnx.Module] = [
            ConvBN(layers, in_channels, blocks[0].in_ch, 3, 2, activation=nnx.hard_swish)
        ]
        features += [InvertedResidual(layers, cfg) for cfg in blocks]
        last_conv = 6 * blocks[-1].out_ch
        features.append(ConvBN(layers, blocks[-1].out_ch, last_conv, 1, activation=nnx.hard_swish))
        self.features = nnx.List(features)
        self.hidden = layers.linear(last_conv, last_channel)
        self.dropout = nnx.Dropout(dropout, rngs=layers.rngs)
        self.head = layers.linear(last_channel, num_classes)
        self.embed_dim = last_channel

    def backbone(self, x: jax.Array) -> jax.Array:
        """Input [B, H, W, C] -> last 1x1 conv's output [B, H/32, W/32, 960 or 576]."""
        for layer in self.features:
            x = apply_block(layer, x, self.remat and isinstance(layer, InvertedResidual))
        return x

    def embed(self, fmap: jax.Array, dropout_keys: jax.Array | None = None) -> jax.Array:
        """Penultimate features. In train mode ``dropout_keys`` (one key per example)
        draw the dropout masks; without them the module's own 'dropout' stream does."""
        h = nnx.hard_swish(self.hidden(global_avg_pool(fmap)))
        if dropout_keys is not None and not self.dropout.deterministic:
            return example_dropout(h, dropout_keys, self.dropout.rate)
        return self.dropout(h)

    def classify(self, emb: jax.Array) -> jax.Array:
        return self.head(emb)

    def __call__(self, x: jax.Array, dropout_keys: jax.Array | None = None) -> jax.Array:
        return self.classify(self.embed(self.backbone(x), dropout_keys))
