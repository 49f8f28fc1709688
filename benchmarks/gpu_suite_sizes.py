"""The GPU suite's two modes: what each measures and how long each child may take
(`benchmarks.gpu_suite`'s docstring says how the GPU budget is split)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one mode measures, and how long each child may take."""

    mode: str
    model: str
    crop_size: int
    crop_range: int
    num_images: int
    train: tuple[str, ...]  # throughput specs, NAME@BATCH, in running order
    headline: dict[str, str]  # role -> spec: stagejax, study, tuned (for the targets)
    steps: int
    warmup: int
    window: int
    rounds: int
    precision: str
    torch_compile: str
    predict_batch: int
    predict_steps: int
    predict_warmup: int
    # data_on_device: batch (the headline stagejax batch: the same compiled step),
    # timed steps per round, rounds, warm-up steps per round
    feed_batch: int
    feed_batches: int
    feed_trials: int
    feed_warmup: int
    memory_batches: tuple[int, ...]  # memory_remat, in running order
    memory_steps: int
    memory_per_process: bool  # one child per configuration (peaks on a GPU do not mix)
    section_mm: tuple[float, float]
    render_workers: int  # the section simulator's tubule processes
    child_cap_s: dict[str, float]  # per framework, and per part's child
    budget_s: float  # whole run, counted from the shell script's start

    @property
    def image_size(self) -> int:
        return self.crop_size + 2 * self.crop_range


GPU = Sizes(
    mode="gpu",
    model="resnet50",
    crop_size=896,
    crop_range=128,
    num_images=96,
    train=("stagejax@48", "torch@12", "torch_tuned@48", "stagejax@12"),
    headline={"stagejax": "stagejax@48", "study": "torch@12", "tuned": "torch_tuned@48"},
    steps=30,
    warmup=5,
    window=5,
    rounds=1,
    precision="bfloat16",
    torch_compile="on",
    predict_batch=64,
    predict_steps=5,
    predict_warmup=2,
    feed_batch=48,
    feed_batches=10,
    feed_trials=2,
    feed_warmup=2,
    memory_batches=(12, 48),
    memory_steps=5,
    memory_per_process=True,
    section_mm=(4.4, 3.5),  # the study's scale: 20,275 x 16,128 px
    render_workers=4,
    child_cap_s={
        "stagejax": 70,
        "torch": 45,
        "torch_tuned": 110,
        "predict": 30,
        "feed": 70,
        "memory": 45,
        "section": 70,
    },
    budget_s=520,
)
SMOKE = Sizes(
    mode="smoke",
    model="resnet18",
    crop_size=72,
    crop_range=10,
    num_images=36,
    train=("stagejax@24", "torch@12", "torch_tuned@24"),
    headline={"stagejax": "stagejax@24", "study": "torch@12", "tuned": "torch_tuned@24"},
    steps=1,
    warmup=0,
    window=1,
    rounds=1,
    precision="float32",
    torch_compile="off",
    predict_batch=4,
    predict_steps=2,
    predict_warmup=1,
    feed_batch=24,
    feed_batches=1,
    feed_trials=1,
    feed_warmup=1,
    memory_batches=(12,),
    memory_steps=1,
    memory_per_process=False,
    section_mm=(0.8, 0.6),
    render_workers=1,
    child_cap_s={
        "stagejax": 90,
        "torch": 60,
        "torch_tuned": 60,
        "predict": 60,
        "feed": 90,
        "memory": 60,
        "section": 90,
    },
    budget_s=480,
)
