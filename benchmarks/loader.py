"""Host loader throughput: what it costs to feed 896 px crops from 1152 px PNGs.

Decides what runs where (augment.py): each host step on one image in this process (PNG
decode, uint8 crop + rot90 + flip, and, the alternative to device-side normalisation,
float32 min-max in numpy), the jitted `device_preprocess`, and the Grain train loader
for several worker counts, on PNGs of the tubule simulator (one per stage):

    python -m benchmarks.loader --workers 0,1,2 [--num_batches 4 --trials 3] [--json out.json]

``--train_paths``: instead, train a model (``--model``) on those images through both
training feeds, Grain and the split kept on the devices (`stagejax.data.on_device`),
interleaved over ``--trials`` rounds: images/s and the share of the step spent waiting
for a batch (`compare_feeds`; the GPU suite calls it with a time cap):

    python -m benchmarks.loader --train_paths --model resnet18 --image_size 304 \
        --crop_size 256 --num_images 48 --global_batch 12 --num_batches 6 --trials 3
"""

from __future__ import annotations

import io
import os
import time
import types
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from benchmarks import common
from stagejax.data import augment, input_pipeline, on_device
from stagejax.images import decode_image

MODULE = "benchmarks.loader"
FLAGS: common.Flags = {
    "workers": ("0,1,2", "Grain worker counts."),
    "image_size": (1152, "Image size (px)."),
    "crop_size": (896, "Crop size (px)."),
    "num_images": (12, "Images."),
    "num_batches": (4, "Timed batches of 12."),
    "trials": (3, "Timed runs per worker count (the median is reported)."),
    "repeats": (5, "Per component timing."),
    "train_paths": (False, "Instead: train through both training feeds."),
    "model": ("resnet18", "--train_paths: the model."),
    "global_batch": (12, "--train_paths: the batch."),
    "json": ("", "Also write the results here."),
}  # fmt: skip


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def benchmark_pngs(num_images: int, size: int) -> list[bytes]:
    """PNGs of the tubule simulator, one per stage in turn."""
    from stagejax import simulate

    per_stage = simulate.render_stage_examples(size, seed=0)
    return [png_bytes(per_stage[i % len(per_stage)]) for i in range(num_images)]


def per_image_ms(fn, repeats: int) -> float:
    fn()  # warm-up (and jit compile)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1e3 * (time.perf_counter() - t0) / repeats


def host_float_min_max(image: np.ndarray) -> np.ndarray:
    x = image.astype(np.float32) / 255.0
    lo, hi = x.min(), x.max()
    return (x - lo) / max(hi - lo, 1e-6)


def component_timings(data: bytes, crop: int, crop_range: int, repeats: int) -> dict:
    image = decode_image(data, "bench.png")
    crop_t = augment.TrainCrop(crop, crop_range)
    rng = np.random.default_rng(0)
    cropped = crop_t.random_map({"image": image}, rng)["image"]
    aug = ml_collections.ConfigDict(dict(rot90=True, flip=True, stain_jitter=0.05,
                                         brightness=0.1, contrast=0.1))  # fmt: skip
    batch = jnp.asarray(np.stack([cropped] * 12))
    device_fn = jax.jit(lambda im, k: augment.device_preprocess(im, k, aug, True, False))
    key = jax.random.key(0)
    device_ms = per_image_ms(lambda: device_fn(batch, key).block_until_ready(), 2) / 12

    def plain_pil():
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))

    return {
        "png_bytes": len(data),
        "decode_image_ms": per_image_ms(lambda: decode_image(data, "bench.png"), repeats),
        "pil_decode_without_verify_ms": per_image_ms(plain_pil, repeats),
        "crop_rot90_flip_uint8_ms": per_image_ms(
            lambda: crop_t.random_map({"image": image}, rng), repeats
        ),  # fmt: skip
        "host_float32_min_max_ms": per_image_ms(lambda: host_float_min_max(cropped), repeats),
        f"device_preprocess_{jax.default_backend()}_ms": device_ms,
        "bytes_per_crop_uint8": cropped.nbytes,
        "bytes_per_crop_float32": cropped.size * 4,
    }


def loader_images_per_s(split, config, num_batches: int, trials: int) -> list[float]:
    """Images/s of ``trials`` timed runs of ``num_batches`` batches each."""
    batches = input_pipeline.train_batches(split, config, process_index=0, process_count=1)
    next(batches)  # Worker start-up and the first batch are not throughput.
    rates = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(num_batches):
            next(batches)
        rates.append(num_batches * config.global_batch_size / (time.perf_counter() - t0))
    del batches
    return rates


def _feed_round(run, initial, batches, num_batches: int, warmup: int) -> dict:
    """Images/s and loader-wait share of ``num_batches`` steps after ``warmup``."""
    state = run.parallel.put_state(initial)
    for _ in range(warmup):  # the first call of a round also compiles (first round only)
        state, _ = run.train_step(state, next(batches))
    jax.block_until_ready(state)
    waited, t0 = 0.0, time.perf_counter()
    for _ in range(num_batches):
        t = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - t
        state, _ = run.train_step(state, batch)
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - t0
    b = run.config.global_batch_size
    return {"images_per_s": num_batches * b / elapsed, "loader_wait_fraction": waited / elapsed}


def train_paths(split, args) -> dict:
    """Both training feeds through the trainer's own step, interleaved over rounds."""
    from stagejax.train import loop as trainer  # training's public entry

    config = common.stagejax_config(
        model=args.model, crop_size=args.crop_size,
        crop_range=common.scaled_crop_range(args.crop_size), global_batch_size=args.global_batch,
        eval_batch_size=args.global_batch, num_workers=int(args.workers.split(",")[0]),
        data_on_device="true")  # fmt: skip
    run = trainer.Run(config, types.SimpleNamespace(splits={"train": split}))
    return compare_feeds(run, split, args.trials, args.num_batches)


def compare_feeds(
    run, split, trials: int, num_batches: int, warmup: int = 2, deadline: float | None = None
) -> dict:
    """Images/s and loader-wait share of the Grain feed and the on-device feed of
    ``run`` (a ``train.loop.Run`` with ``data_on_device`` allowed), interleaved over
    ``trials`` rounds. With a ``deadline`` (``time.perf_counter()``), a round is not
    started when less time is left than the previous one took (the first also
    compiles): a run cut short keeps the rounds it finished (``rounds_done``)."""
    config = run.config
    initial = jax.device_get(run.initial_state)
    t0 = time.perf_counter()
    resident = on_device.load(split, config, run.parallel, run.data_on_device.sizes)
    load_s = time.perf_counter() - t0
    feeds = {"grain": lambda: run.parallel.prefetch(input_pipeline.train_batches(split, config)),
             "on_device": resident.batches}  # fmt: skip
    rounds: dict[str, list[dict]] = {name: [] for name in feeds}
    last = dict.fromkeys(feeds, 0.0)
    for _ in range(trials):
        if deadline is not None and deadline - time.perf_counter() < sum(last.values()):
            break
        for name, feed in feeds.items():
            t = time.perf_counter()
            rounds[name].append(_feed_round(run, initial, feed(), num_batches, warmup))
            last[name] = time.perf_counter() - t
    keys = ("images_per_s", "loader_wait_fraction")
    summary = {name: {**{k: float(np.median([r[k] for r in rs])) for k in keys}, "rounds": rs}
               for name, rs in rounds.items() if rs}  # fmt: skip
    return {"decode_and_upload_s": load_s, "num_workers": config.num_workers,
            "rounds_done": min(len(rs) for rs in rounds.values()), "paths": summary}  # fmt: skip


FEED_COLUMNS = {"images/s (median)": lambda r: f"{r['images_per_s']:.2f}",
                "loader wait, share of step time": lambda r: common.pct(r["loader_wait_fraction"]),
                "rounds": lambda r: str(len(r["rounds"]))}  # fmt: skip


def train_paths_table(t: dict) -> str:
    return (f"{t['num_workers']} Grain workers; decode + upload once: "
            f"{t['decode_and_upload_s']:.1f} s\n\n"
            + common.results_table(t["paths"], FEED_COLUMNS, "training feed"))  # fmt: skip


def loader_table(result: dict) -> str:
    c = result["components"]
    rows = [[k[:-3], f"{v:.1f}"] for k, v in c.items() if k.endswith("_ms")]
    text = common.markdown_table(["host step (one image, main process)", "ms"], rows)
    text += (f"\n\ncrop bytes: uint8 {c['bytes_per_crop_uint8'] / 1e6:.1f} MB, "
             f"float32 {c['bytes_per_crop_float32'] / 1e6:.1f} MB\n\n")  # fmt: skip
    rows = [[str(r["workers"]), f"{r['images_per_s']:.1f}", f"{r['images_per_s_best']:.1f}",
             f"{r['images_per_s_per_worker']:.1f}"] for r in result["loader"]]  # fmt: skip
    header = ["grain workers", "images/s (median)", "best", "images/s per worker"]
    return text + common.markdown_table(header, rows)


def make_split(args) -> types.SimpleNamespace:
    labels = np.arange(args.num_images, dtype=np.int32) % 12
    images = benchmark_pngs(args.num_images, args.image_size)
    source = [dict(image=im, label=int(lb), file_name=f"bench_{i}_{lb + 1}-{i}.png")
              for i, (im, lb) in enumerate(zip(images, labels, strict=True))]  # fmt: skip
    names = [f"bench_{i}.png" for i in range(args.num_images)]
    return types.SimpleNamespace(source=source, labels=labels, file_names=names)


def run(args) -> None:
    input_pipeline.ensure_absl_flags_parsed()
    workers = common.integers(args.workers, "workers")
    split = make_split(args)
    keys = ("image_size", "crop_size", "num_images")
    result = {k: getattr(args, k) for k in keys} | {"jax_backend": jax.default_backend()}
    if args.train_paths:
        result["train_paths"] = train_paths(split, args)
        result["load_avg_1min_after"] = os.getloadavg()[0]
        common.finish(MODULE, result, train_paths_table(result["train_paths"]), args.json)
        return
    result["components"] = component_timings(split.source[0]["image"], args.crop_size, 128,
                                              args.repeats)  # fmt: skip
    result["loader"] = []
    for w in workers:
        config = ml_collections.ConfigDict(dict(
            crop_size=args.crop_size, crop_range=128, global_batch_size=12, seed=0, num_workers=w,
            augment=dict(rot90=True, flip=True)))  # fmt: skip
        rates = loader_images_per_s(split, config, args.num_batches, args.trials)
        rate = float(np.median(rates))
        result["loader"].append({"workers": w, "images_per_s": rate,
                                 "images_per_s_best": max(rates),
                                 "images_per_s_per_worker": rate / max(w, 1)})  # fmt: skip
    common.finish(MODULE, result, loader_table(result), args.json)


def main(argv: Sequence[str] | None = None) -> None:
    common.main(FLAGS, run, argv)


if __name__ == "__main__":
    main()
