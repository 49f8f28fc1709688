"""Step-1 gradients against float64 on the branch each float32 forward pass took.

Why: a ResNet is piecewise linear; its gradient jumps where a ReLU input crosses zero or
a max pool's largest input changes, and float32 rounding moves activations by ~1e-5
against float64, so a ReLU input nearer zero lands on either side by luck (on the CI
batch of ``benchmarks.parity --tiny`` one does, in torch float32 and stagejax alike,
and both then differ from float64's gradient by 4e-3 to 5e-2 although each backward
pass is exact to ~1e-5). Against float64 forced onto the float32 pass's ReLU masks and
max-pool choices the error measures the backward pass itself. ResNets only.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator

import jax
import numpy as np


@dataclasses.dataclass
class Branches:
    """One forward pass's choices, in call order: ReLU masks (bool, NCHW) and
    max-pool argmax indices (torch's flat per-plane indices)."""

    relu: list[np.ndarray]
    pool: list[object]  # torch int64 tensors


@contextlib.contextmanager
def recording_jax_relus(inputs: list) -> Iterator[None]:
    """While tracing, every ``nnx.relu`` call appends its input (no gradient) to
    ``inputs``; the traced function returns them (as aux) from the same
    compiled program as the gradients, so the masks are the gradients' own."""
    from flax import nnx

    original = nnx.relu

    def relu(x):
        inputs.append(jax.lax.stop_gradient(x))
        return original(x)

    nnx.relu = relu
    try:
        yield
    finally:
        nnx.relu = original


def jax_branches(relu_inputs: list) -> Branches:
    """stagejax's choices from its recorded ReLU inputs (NHWC): the masks, and the
    max pool's argmax computed on the stem ReLU's float32 output."""
    import torch
    import torch.nn.functional as F

    nchw = [np.moveaxis(np.asarray(x), -1, 1) for x in relu_inputs]
    if nchw[0].ndim != 4:  # not a ResNet stem: `comparable` refuses these branches
        return Branches([x > 0 for x in nchw], [])
    stem = torch.from_numpy(np.maximum(nchw[0], 0.0))
    _, idx = F.max_pool2d(stem, 3, 2, 1, return_indices=True)
    return Branches([x > 0 for x in nchw], [idx])


def _patch(model, relu, pool) -> None:
    """Route every ReLU and MaxPool2d call of ``model`` (a private copy) through
    ``relu(x)`` and ``pool(module, x)``."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.ReLU):
            m.forward = relu
        elif isinstance(m, torch.nn.MaxPool2d):
            m.forward = lambda x, m=m: pool(m, x)


def _recorder(model, into: Branches) -> None:
    import torch
    import torch.nn.functional as F

    def relu(x):
        into.relu.append((x > 0).detach().cpu().numpy())
        return torch.relu(x)

    def pool(m, x):
        out, idx = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, return_indices=True)
        into.pool.append(idx)
        return out

    _patch(model, relu, pool)


def _forcer(model, taken: Branches) -> None:
    """The same piecewise-linear branch as ``taken``: ReLU as a fixed 0/1 mask,
    max pool as a gather of the taken argmax (the gradient follows both)."""
    import torch

    relus, pools = iter(taken.relu), iter(taken.pool)

    def relu(x):
        return x * torch.from_numpy(next(relus)).to(x.dtype)

    def pool(_, x):
        idx = next(pools)
        return x.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)

    _patch(model, relu, pool)


def torch_gradients(
    initial, x, y, dtype, record: Branches | None = None, force: Branches | None = None
) -> dict[str, np.ndarray]:
    """Loss gradients of a copy of ``initial`` in ``dtype`` on ``(x, y)``, by name;
    recording its branches into ``record`` or taking those of ``force``."""
    import torch.nn.functional as F

    model = copy.deepcopy(initial).to(dtype).train()
    if record is not None:
        _recorder(model, record)
    if force is not None:
        _forcer(model, force)
    F.cross_entropy(model(x.to(dtype)), y).backward()
    return {n: p.grad.double().numpy() for n, p in model.named_parameters()}


def flips(a: Branches, b: Branches) -> dict[str, int]:
    """How many ReLU masks and max-pool choices differ between two passes."""
    return {
        "relu": sum(int(np.sum(u != v)) for u, v in zip(a.relu, b.relu, strict=True)),
        "max_pool": sum(int((u != v).sum()) for u, v in zip(a.pool, b.pool, strict=True)),
    }


def comparable(a: Branches, b: Branches) -> bool:
    """Same nonlinearities, same shapes: the branches of one architecture."""
    return len(a.relu) == len(b.relu) and all(
        u.shape == v.shape for u, v in zip(a.relu, b.relu, strict=True)
    )
