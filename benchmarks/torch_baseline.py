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
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from benchmarks import common

log = logging.getLogger("torch_baseline")
MODULE = "benchmarks.torch_baseline"
METRICS = ("balanced_accuracy", "accuracy", "within1_accuracy")
NUM_STAGES, FLIP_PROBABILITY = 12, 2.0 / 3.0


# --- data ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Split:
    paths: tuple[Path, ...]
    labels: np.ndarray  # int64 class ids, aligned with paths


def read_split(root: str | Path, split: str) -> Split:
    """One split of a study-layout folder; labels from the file names."""
    root = Path(root)
    names, files = ([x.strip() for x in (root / f).read_text().splitlines() if x.strip()]
                    for f in ("label_list.txt", f"split_list/{split}.txt"))  # fmt: skip
    labels = []
    for f in files:
        stage = f[f.rfind("_") + 1 : f.rfind("-")]
        if stage not in names:
            raise ValueError(f"{root / 'images' / f}: stage {stage!r} is not in label_list.txt")
        labels.append(names.index(stage))
    return Split(tuple(root / "images" / f for f in files), np.asarray(labels, np.int64))


def decode(path: Path) -> np.ndarray:
    """uint8 HxWx3."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def crop_origin(size: int, crop_size: int, shift: int) -> int:
    """Centred start shifted by ``shift``; 0 when that crop would leave the image."""
    start = (size - crop_size) // 2 + shift
    return start if 0 <= start <= size - crop_size else 0


def train_view(
    image: np.ndarray, crop_size: int, crop_range: int, rng: np.random.Generator
) -> np.ndarray:
    """The study's train augmentation on uint8 HWC: shifted crop, rot90 by k in
    {0..4} (4 = none, so no rotation is twice as likely), vertical flip p=2/3."""
    h, w = image.shape[:2]
    dy, dx = rng.integers(-crop_range, crop_range + 1, size=2)
    top, left = crop_origin(h, crop_size, int(dy)), crop_origin(w, crop_size, int(dx))
    out = image[top : top + crop_size, left : left + crop_size]
    out = np.rot90(out, int(rng.integers(0, 5)) % 4)
    if rng.random() < FLIP_PROBABILITY:
        out = out[::-1]
    return np.ascontiguousarray(out)


def center_view(image: np.ndarray, crop_size: int) -> np.ndarray:
    top, left = (image.shape[0] - crop_size) // 2, (image.shape[1] - crop_size) // 2
    return np.ascontiguousarray(image[top : top + crop_size, left : left + crop_size])


def min_max(x: torch.Tensor) -> torch.Tensor:
    """Per image ([C,H,W] or [B,C,H,W]) over all channels to [0, 1]; constant -> 0."""
    flat = x.reshape(x.shape[0], -1) if x.dim() == 4 else x.reshape(1, -1)
    shape = (-1, 1, 1, 1) if x.dim() == 4 else ()
    lo = flat.min(dim=1).values.reshape(shape)
    span = flat.max(dim=1).values.reshape(shape) - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-12), torch.zeros_like(x))


class TubuleImages(torch.utils.data.Dataset):
    """Train items are ``(record, position)``: the position in the sample stream
    seeds that sample's crop, so the data do not depend on the worker count.
    Eval items are record indices. Yields float32 CHW in [0, 1] (host min-max,
    as the study) or, with ``host_normalize=False``, the uint8 HWC crop."""

    def __init__(self, split: Split, crop_size: int, crop_range: int, train: bool, seed: int,
                 host_normalize: bool = True):  # fmt: skip
        self.split, self.crop_size, self.crop_range = split, crop_size, crop_range
        self.train, self.seed, self.host_normalize = train, seed, host_normalize

    def __len__(self) -> int:
        return len(self.split.paths)

    def __getitem__(self, item):
        record, position = item if self.train else (item, 0)
        image = decode(self.split.paths[record])
        if self.train:
            rng = np.random.default_rng((self.seed, position))
            image = train_view(image, self.crop_size, self.crop_range, rng)
        else:
            image = center_view(image, self.crop_size)
        x, label = torch.from_numpy(image), int(self.split.labels[record])
        return (min_max(x.permute(2, 0, 1).float()) if self.host_normalize else x), label


class BalancedBatches(torch.utils.data.Sampler):
    """The study's balanced batches: ``n = batch_size / 12`` images of each stage,
    each stage's images taken from its own shuffled list without replacement;
    when fewer than ``n`` remain the list is reshuffled and restarts (a stage
    with fewer than ``n`` images repeats some within the batch). The state
    carries over between epochs. Yields lists of ``(record, position)``."""

    def __init__(self, labels: np.ndarray, batch_size: int, seed: int, num_batches: int):
        if batch_size % NUM_STAGES:
            raise ValueError(f"batch_size: {batch_size} is not a multiple of {NUM_STAGES}")
        self.per_stage, self.num_batches = batch_size // NUM_STAGES, num_batches
        self._rng = np.random.default_rng(seed)
        members = [np.flatnonzero(np.asarray(labels) == s) for s in range(NUM_STAGES)]
        for s, m in enumerate(members):
            if m.size == 0:
                raise ValueError(f"labels: stage {s + 1} has no training images")
        self._pools = [self._rng.permutation(m) for m in members]
        self._next, self._position = [0] * NUM_STAGES, 0

    def __len__(self) -> int:
        return self.num_batches

    def _take(self, s: int) -> list[int]:
        taken: list[int] = []
        while len(taken) < self.per_stage:
            pool = self._pools[s]
            want = min(self.per_stage - len(taken), pool.size)
            if self._next[s] + want > pool.size:
                self._pools[s] = pool = self._rng.permutation(pool)
                self._next[s] = 0
            taken += pool[self._next[s] : self._next[s] + want].tolist()
            self._next[s] += want
        return taken

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for _ in range(self.num_batches):
            records = [r for s in range(NUM_STAGES) for r in self._take(s)]
            yield [(r, self._position + j) for j, r in enumerate(records)]
            self._position += len(records)


class StagejaxBatches(torch.utils.data.Sampler):
    """stagejax's `StageBalancedSampler` order, so both frameworks see the same
    images in the same batches (the crops still come from this module)."""

    def __init__(self, labels: np.ndarray, batch_size: int, seed: int, num_batches: int):
        from stagejax.data.sampler import StageBalancedSampler

        self._sampler = StageBalancedSampler(np.asarray(labels, np.int32), batch_size, seed)
        self.batch_size, self.num_batches, self._batch = batch_size, num_batches, 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for _ in range(self.num_batches):
            g, b = self.batch_size, self._batch
            yield [(self._sampler.record_key(i), i) for i in range(b * g, (b + 1) * g)]
            self._batch += 1


def make_sampler(
    kind: str, labels: np.ndarray, batch_size: int, seed: int, num_batches: int
) -> torch.utils.data.Sampler:
    samplers = {"reference": BalancedBatches, "stagejax": StagejaxBatches}
    if kind not in samplers:
        raise ValueError(f"sampler: {kind!r} is not one of 'reference', 'stagejax'")
    return samplers[kind](labels, batch_size, seed, num_batches)


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


def create_model(name: str, num_classes: int = NUM_STAGES) -> torch.nn.Module:
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
            x = min_max(x.permute(0, 3, 1, 2).float())
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
    split: Split, crop_size: int, crop_range: int, sampler, tuning: Tuning, seed: int
) -> torch.utils.data.DataLoader:
    ds = TubuleImages(split, crop_size, crop_range, True, seed, not tuning.device_normalize)
    w = tuning.num_workers
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=w,
                                       pin_memory=tuning.pin_memory, persistent_workers=w > 0,
                                       prefetch_factor=2 if w else None)  # fmt: skip


def eval_loader(
    split: Split, crop_size: int, batch_size: int, tuning: Tuning
) -> torch.utils.data.DataLoader:
    ds = TubuleImages(split, crop_size, 0, False, 0, not tuning.device_normalize)
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


def evaluate(trainer: Trainer, split: Split, crop_size: int, batch_size: int) -> dict:
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
    train, val, test = (read_split(data_dir, s) for s in ("train", "validation", "test"))
    trainer = Trainer(recipe.model, tuning, device, lr=recipe.learning_rate,
                      weight_decay=recipe.weight_decay, seed=recipe.seed)  # fmt: skip
    steps = max(1, len(train.labels) // recipe.batch_size)
    sampler = make_sampler(recipe.sampler, train.labels, recipe.batch_size, recipe.seed, steps)
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
