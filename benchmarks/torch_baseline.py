"""The study's training recipe in PyTorch: the baseline stagejax is measured against.

Written from the recipe (shared/reference/reference-recipe.md), not from the study's
code, in two variants of the same maths on the same layout folder (the files
stagejax's cache is built from): ``study`` as the study ran it (a torchvision model
from scratch, float32, NCHW, host min-max, no loader workers, batches of ``n`` images
of each stage, ``Adam(lr=1e-3, weight_decay=5e-4)``: L2 added to the gradient), and
``tuned``, what a careful PyTorch user changes without touching the recipe (bf16
autocast where native, channels_last, ``torch.compile`` where it works, fused Adam,
uint8 batches through loader workers, min-max on the device).

    python -m benchmarks.torch_baseline --data_dir DIR --model resnet18 --crop_size 64 \\
        --crop_range 8 --batch_size 24 --num_epochs 8 --variant study
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from benchmarks import common
from benchmarks import torch_data as td

log = logging.getLogger("torch_baseline")
MODULE = "benchmarks.torch_baseline"
METRICS = ("balanced_accuracy", "accuracy", "within1_accuracy")


# --- variants --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tuning:
    name: str = "study"
    bf16: bool = False  # autocast
    channels_last: bool = False
    compile: bool = False
    fused_adam: bool = False
    num_workers: int = 0
    pin_memory: bool = False
    device_normalize: bool = False  # uint8 to the device, min-max there
    notes: tuple[str, ...] = ()


STUDY = Tuning()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether bf16 autocast is worth it here, and why."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name(device)}: bf16 {'yes' if ok else 'no'}"
    flags = ""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
    for flag in ("amx_bf16", "avx512_bf16"):
        if f" {flag}" in flags:
            return True, f"CPU has {flag}"
    return False, "CPU without avx512_bf16/amx_bf16: bf16 would be emulated (slower)"


def tuned(device: torch.device, num_workers: int = 2, compile_mode: str = "auto") -> Tuning:
    """The tuned variant for ``device``; ``compile_mode`` auto|on|off (auto: on for
    CUDA; off on a CPU, where inductor compiles a ResNet train step for minutes)."""
    bf16, why = native_bf16(device)
    notes = [f"bf16 autocast {'on' if bf16 else 'off'} ({why})"]
    do_compile = compile_mode == "on" or (compile_mode == "auto" and device.type == "cuda")
    if compile_mode == "auto" and not do_compile:
        notes.append("torch.compile off: auto mode skips it on a CPU (compile time, see "
                     "RESULTS.md); --torch_compile on to force")  # fmt: skip
    return Tuning(name="tuned", bf16=bf16, channels_last=True, compile=do_compile,
                  fused_adam=True, num_workers=num_workers, pin_memory=device.type == "cuda",
                  device_normalize=True, notes=tuple(notes))  # fmt: skip


def create_model(name: str, num_classes: int = td.NUM_STAGES) -> torch.nn.Module:
    """A torchvision architecture from scratch (torchvision's own initialisation)."""
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def create_optimizer(
    params, lr: float, weight_decay: float, fused: bool = False
) -> tuple[torch.optim.Optimizer, str]:
    """``torch.optim.Adam``: ``weight_decay`` is an L2 term added to the gradient."""
    params = list(params)
    if fused:
        try:
            return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True), "fused"
        except (RuntimeError, ValueError) as e:
            log.warning("fused Adam unavailable (%s); using the default", e)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay), "default"


class Trainer:
    """Model, optimizer and one train step for a variant on a device."""

    def __init__(self, model_name: str, tuning: Tuning, device: torch.device, *,
                 lr: float = 1e-3, weight_decay: float = 5e-4, seed: int = 109):  # fmt: skip
        torch.manual_seed(seed)
        self.tuning, self.device, self.notes = tuning, device, list(tuning.notes)
        self.model = model = create_model(model_name).to(device)
        if tuning.channels_last:
            model.to(memory_format=torch.channels_last)
        self.optimizer, kind = create_optimizer(model.parameters(), lr, weight_decay,
                                                tuning.fused_adam)  # fmt: skip
        if tuning.fused_adam:
            self.notes.append(f"Adam: {kind}")
        self._forward = torch.compile(model) if tuning.compile else model
        self._check_compile = tuning.compile  # until the first step has run
        # What actually ran: "off", "on" (compiled step ran) or "failed, eager".
        self.compile_status = "pending" if tuning.compile else "off"

    def autocast(self):
        if not self.tuning.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def to_device(self, images: torch.Tensor, labels: torch.Tensor):
        nb = self.tuning.pin_memory
        x = images.to(self.device, non_blocking=nb)
        if self.tuning.device_normalize:  # uint8 NHWC -> float NCHW view (channels_last)
            x = td.min_max(x.permute(0, 3, 1, 2).float())
        if self.tuning.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, labels.to(self.device, non_blocking=nb)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            logits = self._forward(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One step (asynchronous on CUDA). A torch.compile failure on the first
        call falls back to eager mode and is noted."""
        if not self._check_compile:
            return self._step(x, y)
        try:
            loss = self._step(x, y)
            float(loss)  # surface compile/runtime errors here
        except Exception as e:  # noqa: BLE001 -- any inductor failure means: run eager
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            log.warning("torch.compile failed (%s); falling back to eager", reason)
            self.notes.append(f"torch.compile failed ({reason}); eager")
            self.compile_status = "failed, eager"
            self._forward = self.model
            loss = self._step(x, y)
        else:
            self.compile_status = "on"
            self.notes.append("torch.compile on (inductor; the first step compiled and ran)")
        self._check_compile = False
        return loss

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self._forward(x).float()


def train_step_flops(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> float:
    """FLOPs of one forward + backward pass over ``(x, y)`` (eager, under the
    variant's autocast), counted by ``torch.utils.flop_counter``: matrix products
    and convolutions at 2 FLOPs per multiply-add, as XLA counts them. The
    optimizer is not stepped; the gradients are dropped."""
    from torch.utils.flop_counter import FlopCounterMode  # only the FLOP count needs it

    with FlopCounterMode(display=False) as counter:
        with trainer.autocast():
            logits = trainer.model(x)
        F.cross_entropy(logits.float(), y).backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def train_loader(
    split: td.Split, crop_size: int, crop_range: int, sampler, tuning: Tuning, seed: int
) -> torch.utils.data.DataLoader:
    ds = td.TubuleImages(split, crop_size, crop_range, True, seed, not tuning.device_normalize)
    w = tuning.num_workers
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=w,
                                       pin_memory=tuning.pin_memory, persistent_workers=w > 0,
                                       prefetch_factor=2 if w else None)  # fmt: skip


def eval_loader(
    split: td.Split, crop_size: int, batch_size: int, tuning: Tuning
) -> torch.utils.data.DataLoader:
    ds = td.TubuleImages(split, crop_size, 0, False, 0, not tuning.device_normalize)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=tuning.num_workers,
                                       pin_memory=tuning.pin_memory)  # fmt: skip


# --- evaluation ------------------------------------------------------------------------


def stage_metrics(labels: Sequence[int], preds: Sequence[int]) -> dict:
    """Accuracy, balanced accuracy (mean recall over the stages present) and
    +/-1-stage accuracy (stage order, not cyclic, as the study)."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    recalls = [float(np.mean(preds[labels == s] == s)) for s in np.unique(labels)]
    return {"num_examples": int(labels.size), "accuracy": float(np.mean(preds == labels)),
            "balanced_accuracy": float(np.mean(recalls)),
            "within1_accuracy": float(np.mean(np.abs(preds - labels) <= 1))}  # fmt: skip


def evaluate(trainer: Trainer, split: td.Split, crop_size: int, batch_size: int) -> dict:
    trainer.model.eval()
    preds = [trainer.predict(trainer.to_device(*b)[0]).argmax(-1).cpu().numpy()
             for b in eval_loader(split, crop_size, batch_size, trainer.tuning)]  # fmt: skip
    trainer.model.train()
    return stage_metrics(split.labels, np.concatenate(preds))


# --- the recipe ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recipe:
    model: str = "resnet50"
    crop_size: int = 896
    crop_range: int = 128
    batch_size: int = 12  # 12 x images per stage
    eval_batch_size: int = 12  # the study used 1; eval mode makes results batch-independent
    learning_rate: float = 1e-3
    weight_decay: float = 5e-4
    num_epochs: int = 10
    seed: int = 109
    sampler: str = "reference"  # reference | stagejax


def train_and_evaluate(
    data_dir: str | Path, recipe: Recipe, tuning: Tuning = STUDY, device: torch.device | None = None
) -> dict:
    """Train, keep the epoch with the best validation balanced accuracy (ties: the
    later epoch), and return its test metrics with the wall time."""
    device = device or default_device()
    t0 = time.perf_counter()
    train, val, test = (td.read_split(data_dir, s) for s in ("train", "validation", "test"))
    trainer = Trainer(recipe.model, tuning, device, lr=recipe.learning_rate,
                      weight_decay=recipe.weight_decay, seed=recipe.seed)  # fmt: skip
    steps = max(1, len(train.labels) // recipe.batch_size)
    sampler = td.make_sampler(recipe.sampler, train.labels, recipe.batch_size, recipe.seed, steps)
    loader = train_loader(train, recipe.crop_size, recipe.crop_range, sampler, tuning, recipe.seed)
    best, best_epoch, best_state, history = -1.0, 0, None, []
    trainer.model.train()
    for epoch in range(1, recipe.num_epochs + 1):
        losses = [trainer.train_step(*trainer.to_device(*batch)) for batch in loader]
        val_metrics = evaluate(trainer, val, recipe.crop_size, recipe.eval_batch_size)
        history.append({"epoch": epoch, "train_loss": float(torch.stack(losses).mean()),
                        **{f"val_{k}": v for k, v in val_metrics.items()}})  # fmt: skip
        log.info("epoch %d/%d: loss %.4f, validation balanced accuracy %.4f", epoch,
                 recipe.num_epochs, history[-1]["train_loss"],
                 val_metrics["balanced_accuracy"])  # fmt: skip
        if val_metrics["balanced_accuracy"] >= best:
            best, best_epoch = val_metrics["balanced_accuracy"], epoch
            best_state = copy.deepcopy(trainer.model.state_dict())
    trainer.model.load_state_dict(best_state)
    result = evaluate(trainer, test, recipe.crop_size, recipe.eval_batch_size)
    result.update(best_epoch=best_epoch, best_val_balanced_accuracy=best, history=history,
                  wall_s=time.perf_counter() - t0, steps_per_epoch=steps, variant=tuning.name,
                  notes=trainer.notes, device=str(device))  # fmt: skip
    return result


FLAGS: common.Flags = {
    "data_dir": ("", "Study-layout folder (required)."),
    **{f.name: (f.default, f"The recipe's {f.name}.") for f in dataclasses.fields(Recipe)},
    "variant": ("study", "The study's run or tuned PyTorch.", ("study", "tuned")),
    "num_workers": (2, "Loader workers (tuned variant only)."),
    "torch_compile": ("auto", "torch.compile (tuned; auto: on CUDA).", ("auto", "on", "off")),
    "json": ("", "Also write the result here."),
}  # fmt: skip


def run(args) -> None:
    if not args.data_dir:
        raise ValueError("--data_dir: a study-layout folder is required")
    recipe = Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})
    device = default_device()
    tuned_ = args.variant == "tuned"
    tuning = tuned(device, args.num_workers, args.torch_compile) if tuned_ else STUDY
    result = train_and_evaluate(args.data_dir, recipe, tuning, device)
    table = common.markdown_table(["variant", *METRICS, "best epoch", "wall s"],
                                  [[tuning.name, *(result[k] for k in METRICS),
                                    str(result["best_epoch"]), result["wall_s"]]])  # fmt: skip
    common.finish(MODULE, {"recipe": dataclasses.asdict(recipe), **result}, table, args.json)


def main(argv: Sequence[str] | None = None) -> None:
    common.main(FLAGS, run, argv)


if __name__ == "__main__":
    main()
