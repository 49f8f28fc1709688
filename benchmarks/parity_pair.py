"""The two halves of `benchmarks.parity`: one torchvision init in both frameworks, the
shared batches, the paired training loop, and torch float64 as the noise floor.

Why a float64 reference: float32 training is chaotic (Adam's first steps move every
weight by about ``lr`` along its gradient's sign, and rounding sets the smallest
gradients' signs), so two correct float32 implementations part after a few steps. The
torch model trained in float64 on the same batches shows how far float32 itself is
from the exact trajectory; a stagejax defect would show as stagejax much farther from
it than torch float32.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import statistics
import time
from collections.abc import Iterator

import jax
import numpy as np

log = logging.getLogger("parity")

# The mismatches between the frameworks that would break parity, and how each is handled.
CONVENTIONS = (
    "BatchNorm momentum: torch weighs the new batch by 0.1, flax's nnx.BatchNorm weighs the "
    "old statistics by 0.9; stagejax's own BatchNorm (models/layers.py) uses torch's "
    "convention; momentum and eps (1e-5) are checked equal layer by layer",
    "BatchNorm running_var: torch normalises with the biased batch variance and stores the "
    "unbiased one; stagejax's BatchNorm does the same (it matters in eval only); the running "
    "statistics are compared after step 1",
    "Adam eps: both add eps=1e-8 outside the square root of the bias-corrected second "
    "moment (torch: sqrt(v)/sqrt(1-b2^t) + eps; optax: sqrt(v_hat + eps_root=0) + eps); "
    "betas (0.9, 0.999) on both",
    "L2: torch Adam(weight_decay=5e-4) adds 5e-4*w to every parameter's gradient (BatchNorm "
    "and biases included) before the moments; stagejax: optax.add_decayed_weights(5e-4), "
    "unmasked, then optax.adam",
    "loss: mean over the batch of the softmax cross-entropy, no label smoothing, on both",
    "input: uint8 -> float32 /255 -> per-image min-max over all channels on both "
    "(stagejax.model.preprocess with every device augmentation off; torch: the same "
    "maths on NCHW); the constant-image thresholds (torch 0, stagejax 1e-6) never differ "
    "on uint8 input, whose smallest span is 1/255",
    "precision: float32; TF32 off in torch and 'highest' matmul precision in JAX (they "
    "matter on a GPU only)",
)


class ParityError(RuntimeError):
    """The two frameworks do not start from the same network: the comparison is void."""


@contextlib.contextmanager
def float32_everywhere() -> Iterator[None]:
    """True float32 matmuls and convolutions in both frameworks (TF32 would differ on GPUs)."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with jax.default_matmul_precision("highest"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --- the shared inputs -----------------------------------------------------------------


def train_arrays(split, config, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Steps ``0..num_steps-1`` of stagejax's train loader, made once:
    uint8 ``[S, B, crop, crop, 3]`` and int32 labels ``[S, B]``."""
    from stagejax.data import input_pipeline

    batches = input_pipeline.train_batches(split, config)
    taken = [next(batches) for _ in range(num_steps)]
    return np.stack([b["image"] for b in taken]), np.stack([b["label"] for b in taken])


def torch_input(images: np.ndarray):
    """uint8 NHWC -> float32 NCHW /255, per-image min-max: stagejax's maths."""
    import torch

    from benchmarks import torch_data as td

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return td.min_max(x)


def by_torch_name(tree) -> dict[str, np.ndarray]:
    """stagejax weights (an nnx State) keyed by torch names, in torch layout."""
    from flax import nnx

    from stagejax import convert

    return {convert.torch_name(path): convert.to_torch_layout(np.asarray(var[...]))
            for path, var in nnx.to_flat_state(tree)}  # fmt: skip


def tensor_rel_diffs(jax_named: dict[str, np.ndarray], torch_model) -> dict[str, float]:
    """Per tensor max|a - b| / max|b| (over the names stagejax has): max and median."""
    ref = {k: v.detach().cpu().numpy() for k, v in torch_model.state_dict().items()}
    rel = [float(np.max(np.abs(v - ref[k])) / max(float(np.max(np.abs(ref[k]))), 1e-12))
           for k, v in jax_named.items()]  # fmt: skip
    return {"max": max(rel), "median": statistics.median(rel)}


# --- the pair --------------------------------------------------------------------------


@dataclasses.dataclass
class Pair:
    """Both frameworks' models, optimisers and steps, from one torchvision init."""

    trainer: object  # benchmarks.torch_baseline.Trainer, study variant
    initial: object  # a copy of the untrained torch model
    model: object  # stagejax.model.Model (the untrained weights)
    train_step: object
    state: object  # stagejax TrainState on the device, updated by train_paired


def build_pair(model_name: str, seed: int, config, steps_per_epoch: int) -> Pair:
    """A torchvision model (torchvision's init under torch seed ``seed``) and its
    stagejax import, each with the study's optimiser."""
    import torch

    from benchmarks import torch_baseline as tb
    from stagejax import convert
    from stagejax import model as model_lib
    from stagejax.train import step as step_lib  # training's public step and optimizer

    trainer = tb.Trainer(model_name, tb.STUDY, torch.device("cpu"), lr=config.learning_rate,
                         weight_decay=config.weight_decay, seed=seed)  # fmt: skip
    weights = {k: v.detach().cpu().numpy() for k, v in trainer.model.state_dict().items()}
    module = convert.convert_state_dict(weights, model_name, num_classes=config.num_classes)
    check_batchnorm_conventions(module, trainer.model)
    parallel = model_lib.make_parallel(config)
    model = model_lib.Model(config, parallel, *model_lib.split_model(module))
    tx = step_lib.create_optimizer(config, steps_per_epoch)
    step = parallel.compile_train_step(step_lib.make_train_step(model.modeldef, tx, config,
                                                                parallel))  # fmt: skip
    state = parallel.put_state(model.state(tx))
    return Pair(trainer, copy.deepcopy(trainer.model), model, step, state)


def check_batchnorm_conventions(module, torch_model) -> None:
    """Every BatchNorm's momentum and eps equal torch's, layer for layer."""
    import torch
    from flax import nnx

    from stagejax.models.layers import BatchNorm

    ours = [(m.momentum, m.epsilon) for _, m in nnx.iter_modules(module)
            if isinstance(m, BatchNorm)]  # fmt: skip
    theirs = [(m.momentum, m.eps) for m in torch_model.modules()
              if isinstance(m, torch.nn.BatchNorm2d)]  # fmt: skip
    if sorted(ours) != sorted(theirs):
        raise ParityError(f"BatchNorm (momentum, eps): stagejax {set(ours)}, torch {set(theirs)}")


def _torch_logits(model, images: np.ndarray, train: bool, dtype) -> np.ndarray:
    import torch

    model = copy.deepcopy(model).to(dtype).train(train)  # train mode moves running stats
    with torch.no_grad():
        return model(torch_input(images).to(dtype)).double().numpy()


def stagejax_first_batch(pair: Pair, images: np.ndarray, labels: np.ndarray) -> dict:
    """stagejax's untrained network on the first batch, from one compiled function:
    train- and eval-mode logits, the step-1 gradient (by torch name), its branches."""
    import optax

    from benchmarks import parity_branches as pb
    from stagejax import model as model_lib

    md = pair.model.modeldef

    @jax.jit
    def run(params, stats, x, y):
        def loss_fn(p):
            relu_inputs = []
            with pb.recording_jax_relus(relu_inputs):
                logits = md.merge(p, stats, train=True)(x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, (logits, relu_inputs)

        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return aux, md.merge(params, stats, train=False)(x), grads

    x = model_lib.preprocess(images, pair.model.config)
    (train, relu_inputs), eval_, grads = run(pair.model.params, pair.model.batch_stats, x, labels)
    return {"train": np.asarray(train, np.float64), "eval": np.asarray(eval_, np.float64),
            "grads": by_torch_name(grads),
            "branches": pb.jax_branches(relu_inputs) if relu_inputs else None}  # fmt: skip


def initial_logits(
    pair: Pair, images: np.ndarray, labels: np.ndarray, tolerance: float
) -> tuple[dict, dict]:
    """Both untrained networks on the first batch: (the logit report, `stagejax_first_batch`).
    ParityError unless the weights are bitwise equal and stagejax's logits agree with
    torch's float64 forward to ``tolerance`` (eval mode, whose logits grow with depth:
    relative to the largest). Why float64: torch's float32 CPU BatchNorm statistics are
    themselves off by up to ~4e-5 relative (96 px, batch 24)."""
    import torch

    weight_diff = tensor_rel_diffs(by_torch_name(pair.model.params), pair.initial)["max"]
    if weight_diff != 0.0:
        raise ParityError(f"imported weights differ from torch's (max rel. diff {weight_diff})")
    first, out = stagejax_first_batch(pair, images, labels), {}
    for mode, train in (("train", True), ("eval", False)):
        got = first[mode]
        ref64 = _torch_logits(pair.initial, images, train, torch.float64)
        ref32 = _torch_logits(pair.initial, images, train, torch.float32)
        scale = float(np.max(np.abs(ref64)))
        out[mode] = {"stagejax_vs_torch64": float(np.max(np.abs(got - ref64))),
                     "stagejax_vs_torch32": float(np.max(np.abs(got - ref32))),
                     "torch32_vs_torch64": float(np.max(np.abs(ref32 - ref64))),
                     "max_abs_logit": scale}  # fmt: skip
        allowed = tolerance * (1.0 if train else max(1.0, scale))
        if not out[mode]["stagejax_vs_torch64"] <= allowed:
            raise ParityError(
                f"initial {mode}-mode logits: stagejax differs from torch float64 by "
                f"{out[mode]['stagejax_vs_torch64']:.3g} (allowed {allowed:.3g}, largest logit "
                f"{scale:.3g}): the import or the forward pass does not match"
            )
    return out, first


# --- training --------------------------------------------------------------------------


def train_paired(pair: Pair, images: np.ndarray, labels: np.ndarray, window: int) -> tuple:
    """Both frameworks step by step over the same batches (never re-synchronised):
    (per-step losses, checks of the state after step 1 and ``window``, seconds each)."""
    import torch

    trainer, parallel = pair.trainer, pair.model.parallel
    trainer.model.train()
    steps, checks, wall = [], {}, {"stagejax": 0.0, "torch": 0.0}
    for i in range(len(images)):
        t0 = time.perf_counter()
        batch = parallel.put_batch({"image": images[i], "label": labels[i]})
        pair.state, metrics = pair.train_step(pair.state, batch)
        loss_jax = float(metrics["loss"])
        t1 = time.perf_counter()
        y = torch.from_numpy(labels[i].astype(np.int64))
        loss_torch = float(trainer.train_step(torch_input(images[i]), y))
        wall["stagejax"] += t1 - t0
        wall["torch"] += time.perf_counter() - t1
        rel = abs(loss_jax - loss_torch) / abs(loss_torch)
        steps.append({"step": i + 1, "loss_jax": loss_jax, "loss_torch": loss_torch,
                      "rel_diff": rel})  # fmt: skip
        for step, what, tree in ((1, "batch_stats", pair.state.batch_stats),
                                 (window, "params", pair.state.params)):  # fmt: skip
            if i + 1 == step:
                key = f"{what}_after_step_{step}_rel_diff"
                checks[key] = tensor_rel_diffs(by_torch_name(tree), trainer.model)
        if (i + 1) % 10 == 0 or i + 1 == len(images):
            log.info("step %d/%d: loss stagejax %.6f torch %.6f (rel. diff %.2e)", i + 1,
                     len(images), loss_jax, loss_torch, rel)  # fmt: skip
    return steps, checks, wall


def float64_losses(pair: Pair, images: np.ndarray, labels: np.ndarray, lr: float, wd: float):
    """Per-step losses of the untrained torch model trained in float64 on the same
    batches and optimiser (not `torch_baseline.Trainer`: its loss is on float32 logits)."""
    import torch
    import torch.nn.functional as F

    from benchmarks import torch_baseline as tb

    model = copy.deepcopy(pair.initial).double().train()
    optimizer, losses = tb.create_optimizer(model.parameters(), lr, wd)[0], []
    for x, y in zip(images, labels, strict=True):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(torch_input(x).double()), torch.from_numpy(y.astype(np.int64)))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _tensor_errors(g: dict, ref: dict, weights: dict, wd: float) -> dict:
    """Median and max over tensors of max|g - ref| / max|ref| and the share of
    components whose sign differs, both with the L2 term ``wd * w`` added."""
    g = {n: g[n].astype(np.float64) + wd * w for n, w in weights.items()}
    ref = {n: ref[n] + wd * w for n, w in weights.items()}
    rel = [float(np.max(np.abs(g[n] - r)) / max(float(np.max(np.abs(r))), 1e-30))
           for n, r in ref.items()]  # fmt: skip
    flips = sum(int(np.sum(np.sign(g[n]) != np.sign(r))) for n, r in ref.items())
    return {"median_tensor_rel_error": statistics.median(rel), "max_tensor_rel_error": max(rel),
            "sign_flip_share": flips / sum(r.size for r in ref.values())}  # fmt: skip


def gradient_check(
    pair: Pair, first: dict, images: np.ndarray, labels: np.ndarray, wd: float
) -> dict:
    """How far each float32 step-1 gradient (plus the L2 term: Adam's first step takes
    its sign) is from float64's (`_tensor_errors`; ``first``: `stagejax_first_batch`),
    against float64 on its own branch and, as ``branch_matched``, forced onto that
    side's ReLU masks and max-pool choices (`parity_branches`: why only the latter
    measures the backward pass), with how many choices float64 made otherwise."""
    import torch

    from benchmarks import parity_branches as pb

    x, y = torch_input(images), torch.from_numpy(labels.astype(np.int64))
    weights = {n: p.detach().double().numpy() for n, p in pair.initial.named_parameters()}
    b32, b64 = pb.Branches([], []), pb.Branches([], [])
    torch32 = pb.torch_gradients(pair.initial, x, y, torch.float32, record=b32)
    grads = {"stagejax": first["grads"], "torch32": torch32}
    ref = pb.torch_gradients(pair.initial, x, y, torch.float64, record=b64)
    branches = {"stagejax": first.get("branches"), "torch32": b32}
    out = {}
    for side, g in grads.items():
        out[side] = _tensor_errors(g, ref, weights, wd)
        taken = branches[side]
        if taken is None or not pb.comparable(taken, b64):
            out[side]["branch_matched"] = None  # not a ResNet: no branch record
            continue
        forced = pb.torch_gradients(pair.initial, x, y, torch.float64, force=taken)
        out[side]["branch_matched"] = {**_tensor_errors(g, forced, weights, wd),
                                       "choices_unlike_float64": pb.flips(taken, b64)}  # fmt: skip
    return out
