"""The learned detector's network: a small Flax NNX U-Net on coarse H-PAS images.

Input: uint8 RGB tiles at the detector's coarse resolution (about 2.5 um/px),
turned into optical density inside the network so that glass is 0 and the
padding of tiles and image borders (white) is the same as the convolutions'
zero padding. Output per pixel, as logits: tubule foreground and the
normalised distance to the tubule's own border (1 at its centre, 0 at its
outline and outside), which dips to 0 on the seam between two touching
tubules and so separates them (`stagejax.detect.learned`).

No normalisation layers: every pixel's output depends only on the pixels
around it, the same in a tile as in the whole image, so tiled inference gives
the untiled result.
"""

import jax
import jax.numpy as jnp
from flax import nnx

CHANNELS = (16, 32, 64, 128)  # per level; ~0.47 M parameters (1.9 MB as float32)
OUTPUTS = ("foreground", "distance")
OD_SCALE = 2.0  # Optical densities of H-PAS tissue are 0-1; this makes them ~unit.


def optical_density(rgb: jnp.ndarray) -> jnp.ndarray:
    """float32 optical density (log10) of uint8 RGB, scaled by OD_SCALE; glass is ~0."""
    x = jnp.maximum(rgb.astype(jnp.float32), 1.0) / 255.0
    return -jnp.log10(x) * OD_SCALE


class _Block(nnx.Module):
    """Two 3x3 convolutions with ReLU."""

    def __init__(self, cin: int, cout: int, rngs: nnx.Rngs):
        self.a = nnx.Conv(cin, cout, (3, 3), padding="SAME", rngs=rngs)
        self.b = nnx.Conv(cout, cout, (3, 3), padding="SAME", rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.b(nnx.relu(self.a(x))))


class UNet(nnx.Module):
    """U-Net of len(channels) levels; input sides must be multiples of 2**(levels - 1)."""

    def __init__(self, channels: tuple[int, ...] = CHANNELS, *, rngs: nnx.Rngs):
        self.channels = tuple(int(c) for c in channels)
        self.down = nnx.List(
            [_Block(3 if i == 0 else channels[i - 1], c, rngs) for i, c in enumerate(channels)]
        )
        self.up = nnx.List(
            [
                nnx.ConvTranspose(channels[i + 1], channels[i], (2, 2), strides=(2, 2), rngs=rngs)
                for i in range(len(channels) - 1)
            ]
        )
        self.merge = nnx.List(
            [_Block(2 * channels[i], channels[i], rngs) for i in range(len(channels) - 1)]
        )
        self.head = nnx.Conv(channels[0], len(OUTPUTS), (1, 1), rngs=rngs)

    @property
    def multiple(self) -> int:
        """Tile sides and offsets must be multiples of this (the pooling grid)."""
        return 2 ** (len(self.channels) - 1)

    def __call__(self, rgb: jnp.ndarray) -> jnp.ndarray:
        """(N, H, W, 3) uint8 RGB -> (N, H, W, 2) logits (foreground, distance)."""
        x = optical_density(rgb)
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
            x = block(x)
            skips.append(x)
        for i in reversed(range(len(self.up))):
            x = self.merge[i](jnp.concatenate([self.up[i](x), skips[i]], axis=-1))
        return self.head(x)


def create(channels: tuple[int, ...] = CHANNELS, seed: int = 0) -> UNet:
    """A randomly initialised U-Net, its initialisers compiled as one function (built
    eagerly, each initialiser compiles on its own: seconds on a CPU)."""

    def build():
        return UNet(channels, rngs=nnx.Rngs(seed))

    graphdef, _ = nnx.split(nnx.eval_shape(build))
    return nnx.merge(graphdef, jax.jit(lambda: nnx.state(build()))())


def abstract(channels: tuple[int, ...] = CHANNELS) -> UNet:
    """A U-Net of shapes only, to be filled with loaded weights."""
    return nnx.eval_shape(lambda: UNet(channels, rngs=nnx.Rngs(0)))


def num_params(model: UNet) -> int:
    return sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
