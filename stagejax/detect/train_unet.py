"""Training the learned detector: targets from outlines, augmented crops, a jitted Adam step.

Targets are rasterised from tubule polygons (a lab's QuPath GeoJSON, or a
simulated section's ground truth) on the detector's coarse grid: foreground
(tubule, lumen included) and each tubule's distance to its own border divided
by its largest (so a small grazing cut peaks at 1 as a large one does, and
touching tubules are separated by the 0 of their seam). Pixels outside an
annotated "Region" do not count.

Why augmentation inside the step: stain variety in optical-density space
(channel mixing, strength, tint), a little noise, flips and quarter turns cost
nothing on the device and keep the held-out staining out of the training data.
The step is a pure function of (parameters, optimiser state, batch, key),
compiled once: every batch has the same shape.
"""

import dataclasses
import datetime
import functools
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from scipy import ndimage
from shapely.geometry import Polygon
from skimage import draw

from stagejax.detect import fit, learned, metrics, segment, unet, weights
from stagejax.detect.params import DetectParams
from stagejax.detect.unet import UNet
from stagejax.errors import ConfigError, DatasetError
from stagejax.simulate import packed, section

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """How the U-Net is trained (crop side in coarse px, a multiple of 8)."""

    steps: int = 1500
    batch: int = 8
    crop: int = 128
    learning_rate: float = 2e-3
    seed: int = 0
    stain_mix: float = 0.08  # sd of the optical-density channel mixing
    stain_scale: float = 0.2  # sd of log stain strength
    tint: float = 0.02  # sd of the per-channel optical-density offset
    noise: float = 2.0  # sd of pixel noise (0-255 scale)


@dataclasses.dataclass
class Example:
    """One section at the coarse resolution with its targets."""

    rgb: np.ndarray  # uint8 (H, W, 3)
    fg: np.ndarray  # float32 (H, W): 1 on tubules
    dist: np.ndarray  # float32 (H, W): normalised distance to the tubule's border
    weight: np.ndarray  # float32 (H, W): 1 where the annotations count
    centres: np.ndarray  # int (K, 2): pixels crops are centred on (tissue inside the region)


def rasterise(polygons: Sequence, shape: tuple[int, int], scale: tuple[float, float]) -> np.ndarray:
    """int32 labels 1..N of `polygons` (level-0 px; lumens filled) on a coarse grid whose
    pixel (i, j) covers level-0 [j*sx, (j+1)*sx) x [i*sy, (i+1)*sy); a pixel is inside
    when its centre is. Later polygons win where they overlap."""
    labels = np.zeros(shape, np.int32)
    for i, poly in enumerate(polygons, start=1):
        for part in getattr(poly, "geoms", [poly]):
            x, y = np.asarray(part.exterior.coords).T
            rr, cc = draw.polygon(y / scale[1] - 0.5, x / scale[0] - 0.5, shape)
            labels[rr, cc] = i
    return labels


def region_mask(region, shape: tuple[int, int], scale: tuple[float, float]) -> np.ndarray:
    """bool mask of a Region (level-0 px) on the coarse grid of `rasterise`, its holes
    (e.g. outlines set aside, or a QuPath region with a hole) left out."""
    mask = np.zeros(shape, bool)
    for part in getattr(region, "geoms", [region]):
        mask |= rasterise([part], shape, scale) > 0
        holes = [Polygon(ring) for ring in part.interiors]
        if holes:
            mask &= rasterise(holes, shape, scale) == 0
    return mask


def targets(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, normalised distance) float32 maps of instance labels."""
    dist = np.zeros(labels.shape, np.float32)
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        sl = segment.grow_slice(sl, labels.shape, 1)
        own = labels[sl] == i
        d = ndimage.distance_transform_edt(np.pad(own, 1))[1:-1, 1:-1]
        dist[sl][own] = (d[own] / d.max()).astype(np.float32)
    return (labels > 0).astype(np.float32), dist


def example_from_section(section: fit.Section, work_mpp: float, normalise: bool = False) -> Example:
    """The targets of one annotated section at `work_mpp` (region outside: weight 0)."""
    rgb, mpp, scale, _ = section.coarse(work_mpp)
    rgb = learned.normalise_stain(rgb) if normalise else rgb
    labels = rasterise([o.geometry for o in section.truth], rgb.shape[:2], scale)
    fg, dist = targets(labels)
    if section.region is not None:
        weight = region_mask(section.region, rgb.shape[:2], scale).astype(np.float32)
    else:
        weight = np.ones(fg.shape, np.float32)
    tissue = segment.tissue_mask(segment.optical_density(rgb), mpp, DetectParams())
    centres = np.argwhere((tissue | (fg > 0)) & (weight > 0))
    if not len(centres):
        raise DatasetError(f"{section.path}: no annotated tissue to train the U-Net on")
    return Example(rgb, fg, dist, weight, centres)


def packed_examples(seeds: Sequence[int], work_mpp: float, normalise: bool) -> list[Example]:
    """SIMULATED packed sections (`stagejax.simulate.packed`, each its own look) as examples."""
    out = []
    start = time.monotonic()
    for k, seed in enumerate(seeds):
        sec = packed.render_packed(int(seed), PACKED_SIZE_MM, work_mpp)
        rgb = learned.normalise_stain(sec.rgb) if normalise else sec.rgb
        fg, dist = targets(sec.labels)
        tissue = segment.tissue_mask(segment.optical_density(rgb), work_mpp, DetectParams())
        out.append(Example(rgb, fg, dist, np.ones(fg.shape, np.float32),
                           np.argwhere(tissue | (fg > 0))))  # fmt: skip
        if (k + 1) % 10 == 0 or k + 1 == len(seeds):
            log.info("packed sections: %d/%d rendered (%.0f s)", k + 1, len(seeds),
                     time.monotonic() - start)  # fmt: skip
    return out


def sample_batch(rng: np.random.Generator, examples: Sequence[Example], spec: TrainSpec) -> dict:
    """`spec.batch` random crops (mostly centred on tissue), each flipped and turned."""
    sizes = np.array([e.rgb.shape[0] * e.rgb.shape[1] for e in examples], float)
    c = spec.crop
    out = {k: [] for k in ("rgb", "fg", "dist", "weight")}
    for _ in range(spec.batch):
        e = examples[rng.choice(len(examples), p=sizes / sizes.sum())]
        h, w = e.fg.shape
        cy, cx = e.centres[rng.integers(len(e.centres))] if rng.random() < 0.9 else (
            rng.integers(h), rng.integers(w))  # fmt: skip
        y0, x0 = int(cy) - c // 2, int(cx) - c // 2
        turns, flip = int(rng.integers(4)), bool(rng.integers(2))
        for key in out:
            crop = _crop(getattr(e, key), y0, x0, c, 255 if key == "rgb" else 0)
            crop = np.rot90(crop, turns)
            out[key].append(crop[:, ::-1] if flip else crop)
    return {k: np.ascontiguousarray(np.stack(v)) for k, v in out.items()}


def _crop(a: np.ndarray, y0: int, x0: int, c: int, fill) -> np.ndarray:
    """a[y0:y0+c, x0:x0+c], filled with `fill` (glass for RGB) outside the image."""
    out = np.full((c, c) + a.shape[2:], fill, a.dtype)
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + c, a.shape[0]), min(x0 + c, a.shape[1])
    if ye > ys and xe > xs:
        out[ys - y0 : ye - y0, xs - x0 : xe - x0] = a[ys:ye, xs:xe]
    return out


def augment(key: jax.Array, rgb: jnp.ndarray, spec: TrainSpec) -> jnp.ndarray:
    """float32 RGB (0-255) of a uint8 batch with its staining varied in optical density."""
    n = rgb.shape[0]
    k_mix, k_scale, k_tint, k_noise = jax.random.split(key, 4)
    od = -jnp.log10(jnp.maximum(rgb.astype(jnp.float32), 1.0) / 255.0)
    mix = jnp.eye(3) + spec.stain_mix * jax.random.normal(k_mix, (n, 3, 3))
    od = jnp.einsum("nhwc,ncd->nhwd", od, mix)
    od = od * jnp.exp(spec.stain_scale * jax.random.normal(k_scale, (n, 1, 1, 1)))
    od = jnp.maximum(od + spec.tint * jax.random.normal(k_tint, (n, 1, 1, 3)), 0.0)
    noisy = 255.0 * 10.0 ** (-od) + spec.noise * jax.random.normal(k_noise, od.shape)
    return jnp.clip(noisy, 1.0, 255.0)


def loss_of(logits: jnp.ndarray, batch: dict) -> jnp.ndarray:
    """Weighted mean of the foreground and distance binary cross-entropies (soft targets)."""
    fg = optax.sigmoid_binary_cross_entropy(logits[..., 0], batch["fg"])
    dist = optax.sigmoid_binary_cross_entropy(logits[..., 1], batch["dist"])
    w = batch["weight"]
    return jnp.sum((fg + dist) * w) / jnp.maximum(jnp.sum(w), 1.0)


def make_train_step(graphdef, tx: optax.GradientTransformation, spec: TrainSpec):
    """The jitted pure step (params, opt_state, batch, key) -> (params, opt_state, loss)."""

    def step(params, opt_state, batch, key):
        def objective(p):
            model = nnx.merge(graphdef, jax.tree.map(lambda x: x, p))
            return loss_of(model(augment(key, batch["rgb"], spec)), batch)

        loss, grads = jax.value_and_grad(objective)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step)


@functools.partial(jax.jit, static_argnums=0)
def _plain_loss(graphdef, params, batch):
    return loss_of(nnx.merge(graphdef, params)(batch["rgb"]), batch)


def batch_loss(model: UNet, batch: dict) -> float:
    """The loss of `model` on a batch, without augmentation (for checks and logs)."""
    return float(_plain_loss(*nnx.split(model, nnx.Param), batch))


def train(model: UNet, examples: Sequence[Example], spec: TrainSpec) -> dict:
    """Trains `model` in place for `spec.steps` Adam steps; returns a record of the run."""
    if spec.crop % model.multiple:
        raise ValueError(f"crop {spec.crop} is not a multiple of {model.multiple}")
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, spec.learning_rate, min(100, spec.steps // 10 + 1), max(spec.steps, 2),
        end_value=spec.learning_rate * 0.02,
    )  # fmt: skip
    tx = optax.adam(schedule)
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = tx.init(params)
    step = make_train_step(graphdef, tx, spec)
    rng, key = np.random.default_rng(spec.seed), jax.random.key(spec.seed)
    losses, start = [], time.monotonic()
    every = max(1, min(100, spec.steps // 20))  # progress about every 5%
    for i in range(spec.steps):
        batch = sample_batch(rng, examples, spec)
        params, opt_state, loss = step(params, opt_state, batch, jax.random.fold_in(key, i))
        losses.append(loss)
        if (i + 1) % every == 0 or i + 1 == spec.steps:
            recent = float(np.mean(jax.device_get(losses[-every:])))
            took = time.monotonic() - start
            log.info("step %d/%d: loss %.4f, %.0f s, about %.0f s left", i + 1, spec.steps,
                     recent, took, took / (i + 1) * (spec.steps - i - 1))  # fmt: skip
    nnx.update(model, params)
    losses = [float(v) for v in jax.device_get(losses)]
    return {
        "steps": spec.steps,
        "spec": dataclasses.asdict(spec),
        "loss_first_100": float(np.mean(losses[:100])),
        "loss_last_100": float(np.mean(losses[-100:])),
        "seconds": round(time.monotonic() - start, 1),
        "device": str(jax.devices()[0].platform),
    }


TRAIN_SHIFTS = (0.0, 0.3, -0.3, 0.5, -0.5)  # Stainings of the training sections (not 1.0).
TRAIN_SIZE_MM = (3.0, 2.4)
PACKED_SIZE_MM = (2.5, 2.5)
RENDER_MPP = 1.25  # Rendered finer than work_mpp and box-averaged, as real scans are read.
HELD_OUT_SEEDS = {100, 101, 102, 1000}  # benchmarks/detect.py and section mode's demo


def simulated_about(seeds: Sequence[int]) -> dict:
    """What a record says about the SIMULATED training sections of `seeds`."""
    shifts = [TRAIN_SHIFTS[k % len(TRAIN_SHIFTS)] for k in range(len(seeds))]
    return {"simulated": True, "seeds": list(seeds), "stain_shifts": shifts,
            "render_mpp": RENDER_MPP, "size_mm": list(TRAIN_SIZE_MM)}  # fmt: skip


def simulated_sections(seeds: Sequence[int], cache_dir) -> list[fit.Section]:
    """SIMULATED training sections (rendered once into `cache_dir`), staining cycling
    through TRAIN_SHIFTS, as annotated sections."""
    root = Path(cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    slides, truths = [], []
    for k, seed in enumerate(seeds):
        shift = TRAIN_SHIFTS[k % len(TRAIN_SHIFTS)]
        out = root / section.render_name(seed, RENDER_MPP, shift, TRAIN_SIZE_MM)
        if not (out / "section.tif").exists():
            section.render_section(out, int(seed), mpp=RENDER_MPP, stain_shift=shift,
                                   size_mm=TRAIN_SIZE_MM)  # fmt: skip
        slides.append(str(out / "section.tif"))
        truths.append(str(out / "ground_truth.geojson"))
    return fit.load_sections(slides, truths, None)


def parse_seeds(text: str, flag: str = "--simulated_seeds") -> list[int]:
    """'0-15' or '0,3,7' -> seeds; one-line ConfigError otherwise."""
    try:
        seeds = []
        for part in str(text).split(","):
            lo, _, hi = part.strip().partition("-")
            seeds.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError:
        raise ConfigError(f"{flag}: {text!r} is not like 0-15 or 0,3,7") from None
    if not seeds or min(seeds) < 0 or HELD_OUT_SEEDS & set(seeds):
        raise ConfigError(
            f"{flag}: {text!r} must be seeds >= 0, none of the held-out {sorted(HELD_OUT_SEEDS)}"
        )
    return seeds


def weights_target(out: str | None) -> Path:
    """The .npz that `--out` names: itself, or DIR/unet.npz for a folder."""
    if not out:
        raise ConfigError("--out: required (the U-Net weights .npz, or a folder for unet.npz)")
    path = Path(out).expanduser()
    if path.suffix.lower() == ".json":
        raise ConfigError(
            f"--out: {out!r} is a PARAMS.json; the U-Net writes a .npz file or a folder "
            "(pass --method=classical to fit the classical detector's parameters)"
        )
    return path if path.suffix.lower() == ".npz" else path / weights.SHIPPED_NAME


def _start(init: str, seed: int) -> learned.UNetDetector:
    """The detector --init names: a new U-Net (stain-normalised input), or loaded weights."""
    if init == "none":
        meta = {"normalise_stain": True}
        return learned.UNetDetector(unet.create(seed=seed), DetectParams().work_mpp,
                                    learned.Postprocess(), "none (random)", meta)  # fmt: skip
    return weights.load_weights(None if init == "shipped" else init)


def _pooled_score(detector, sections: Sequence[fit.Section]) -> dict:
    return metrics.pooled([s.score(detector) for s in sections])["all"]


def _check_held_out(record: dict, tuned, check: Sequence[fit.Section]) -> None:
    """F1 of the new weights on the held-out outlines; a warning when below --init's."""
    scores = _pooled_score(tuned, check)
    record.update(held_out_f1_after=scores["f1"], held_out_tubules=scores["num_truth"])
    before = record.get("held_out_f1_before")
    if before is not None and scores["f1"] < before:
        log.warning(
            "the new weights score worse than --init on the %d held-out outlines (F1 %.3f, "
            "was %.3f): keep the old weights, or outline more tubules and train again",
            scores["num_truth"], scores["f1"], before,
        )  # fmt: skip


def run(
    sections: Sequence[fit.Section],
    init: str,
    spec: TrainSpec,
    out: Path,
    about=None,
    packed_seeds: Sequence[int] = (),
    check: Sequence[fit.Section] = (),
) -> dict:
    """Trains from `init` on `sections` (and SIMULATED packed sections `packed_seeds`),
    writes `out` (and its .json); returns the record (`about` added), with F1 at
    IoU >= 0.5 on `sections` before (unless from scratch) and after, and on the held-out
    outlines `check` (never trained on) before and after."""
    start = _start(init, spec.seed)
    model, work_mpp, post, norm = start.model, start.work_mpp, start.post, start.normalise
    record: dict = {"init": start.source, **(about or {})}
    if init != "none" and sections:
        record["f1_before"] = _pooled_score(start, sections)["f1"]
    if init != "none" and check:
        record["held_out_f1_before"] = _pooled_score(start, check)["f1"]
    examples = [example_from_section(s, work_mpp, norm) for s in sections]
    examples += packed_examples(packed_seeds, work_mpp, norm)
    record.update(train(model, examples, spec))
    meta = {"work_mpp": work_mpp, "postprocess": dataclasses.asdict(post), "normalise_stain": norm}
    tuned = learned.UNetDetector(model, work_mpp, post, str(out), meta)
    if check:
        _check_held_out(record, tuned, check)
    if sections:
        after = _pooled_score(tuned, sections)
        record.update(f1_after=after["f1"], mean_iou_after=after["mean_iou"])
        if "f1_before" in record and after["f1"] <= record["f1_before"]:
            log.warning(
                "F1 on the annotated sections did not improve (%.3f before, %.3f after): "
                "check the annotations (every tubule inside each Region outlined?) or try "
                "more --steps; the weights were written to %s",
                record["f1_before"], after["f1"], out,
            )  # fmt: skip
    record.update(
        command=shlex.join(["python", "-m", "stagejax.detect", *sys.argv[1:]]),
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        sections=[str(s.path) for s in sections],
        scores_on="the training sections (in-sample)",
    )
    weights.save_weights(out, model, {**meta, "training": record})
    return record
