"""Section throughput on a SIMULATED study-scale section: the host side alone, by
the number of cutting threads, and end to end with a model.

Host side (issue 26): the tubules that section mode detects, cut as it cuts them
(read the pyramid level the model needs, resample, white outside the outline,
centre crop) by ``--workers`` threads, with a model that costs nothing: tubules/s
for each count, and per core (tubules/s over the threads the cores can run).
End to end: ``benchmarks.section.time_section`` with a random-weights model
(``--model``, ``--image_size``/``--crop_size`` as the study's 1152/896 px by
default, at its pixel size): seconds per part, and the share of staging time the
model waited for crops (``device_wait_share``; on a CPU the model and the threads
share the cores). Detection is timed once and left out of the host-side rate.
A folder (``--folder=N``): N copies of the section through ``--mode=section``,
where the next slide is detected and the last one written while one is staged,
against a folder of one: the seconds each further slide adds.

    python -m benchmarks.section_throughput [--workers=1,2] [--model=resnet18] \
        [--image_size=1152 --crop_size=896] [--size_mm=4.4,3.5] [--folder=3] [--json=...]
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks import common
from benchmarks import section as section_bench
from stagejax.data.augment import CenterCrop
from stagejax.detect import choose
from stagejax.detect import pipeline as detect_lib
from stagejax.section import run as section_run
from stagejax.section.crops import cut_tubules, default_workers
from stagejax.section.model import load_stage_model
from stagejax.section.options import SectionOptions
from stagejax.simulate import section as section_sim
from stagejax.slides import open_slide

MODULE = "benchmarks.section_throughput"
FLAGS: common.Flags = {
    "workers": (["1", "2"], "Cutting threads to time the host side with."),
    "model": ("resnet18", "End-to-end model (random weights); none: host side only."),
    "image_size": (1152, "The model's image side (the study's 1152 px cut)."),
    "crop_size": (896, "The model's centre crop (the study's 896 px)."),
    "size_mm": ("4.4,3.5", "Section width,height in mm (the study's scale: 4.4,3.5)."),
    "folder": (3, "Slides in the timed folder run (copies of the section); 0: none."),
    "out": ("/tmp/stagejax_section_bench", "Render cache."),
    "json": ("benchmarks/results/section_throughput_cpu.json", "Where to write results."),
}  # fmt: skip


def host_side(path: Path, mpp: float, image: int, crop: int, workers: list[int]) -> dict:
    """Detect once; then cut and centre-crop every tubule with each thread count, each
    from a newly opened slide (its tile cache empty, as section mode starts a slide)."""
    centre = CenterCrop(crop)
    with open_slide(path) as slide:
        t = time.perf_counter()
        det = detect_lib.detect_slide(slide, choose.from_config("unet"))
        detect_s = time.perf_counter() - t
    outlines = [o.geometry for o in det.objects]
    rows = {}
    for w in workers:
        load = os.getloadavg()[0]
        with open_slide(path) as slide:
            t = time.perf_counter()
            for c in cut_tubules(slide, outlines, mpp, image, w):
                centre.map({"image": c})
            seconds = time.perf_counter() - t
            rate = len(outlines) / seconds
            cores = min(w, default_workers())
            rows[str(w)] = {
                "seconds": round(seconds, 2),
                "tubules_per_second": round(rate, 1),
                "per_core": round(rate / cores, 1),
                "load_avg_1min_before": load,
            }
    return {"tubules": len(outlines), "detect_seconds": round(detect_s, 2), "by_workers": rows}


def folder_run(path: Path, config, slides: int, workers: int, tmp: Path) -> dict:
    """Folders of one and of ``slides`` copies of the section through ``--mode=section``
    (each run loads and compiles its model once): the seconds each further slide adds,
    with its detection and writing beside the staging of another."""

    def timed(n: int) -> float:
        folder = tmp / f"folder{n}"
        folder.mkdir()
        for k in range(n):
            (folder / f"s{k}.tif").symlink_to(path)
        opts = SectionOptions(slides=str(folder), cut_workers=workers)
        t = time.perf_counter()
        section_run.stage_sections(config, tmp / f"w{n}", opts)
        return time.perf_counter() - t

    load = os.getloadavg()[0]
    one, many = timed(1), timed(slides)
    return {
        "slides": slides,
        "one_slide_seconds": round(one, 2),
        "folder_seconds": round(many, 2),
        "seconds_per_further_slide": round((many - one) / max(slides - 1, 1), 2),
        "load_avg_1min_before": load,
    }


def run(args) -> None:
    workers = common.integers(args.workers, "workers", low=1)
    size_mm = tuple(float(v) for v in args.size_mm.split(","))
    folder = section_bench.render(args.out, 1000, section_sim.DEFAULT_MPP, 0.0, size_mm)
    path = folder / "section.tif"
    with open_slide(path) as slide:
        px = slide.dimensions
    mpp = section_sim.DEFAULT_MPP * 1152 / args.image_size  # the study's field of view
    result = {"simulated": True, "section_px": list(px), "cores": default_workers()}
    result["host_side"] = host_side(path, mpp, args.image_size, args.crop_size, workers)
    if args.model != "none":
        with tempfile.TemporaryDirectory() as tmp:
            config = section_bench.study_config(
                Path(tmp), args.model, args.crop_size, args.image_size
            )
            sm = load_stage_model(config, Path(tmp) / "none")
            end = section_bench.time_section(path, sm, SectionOptions(cut_workers=max(workers)))
            result["end_to_end"] = {"model": args.model, "cut_workers": max(workers), **end}
            if args.folder > 1:
                result["folder"] = folder_run(path, config, args.folder, max(workers), Path(tmp))
    common.finish(MODULE, result, _table(result, args.model), args.json)


def _table(result: dict, model: str) -> str:
    rows = [[f"host side, {w} thread(s)", r["tubules_per_second"], r["per_core"], r["seconds"]]
            for w, r in result["host_side"]["by_workers"].items()]  # fmt: skip
    if "end_to_end" in result:
        e = result["end_to_end"]
        waited = f"device waited {100 * e['device_wait_share']:.0f}%"
        rows.append([f"end to end, {model}", e["tubules_per_second"], waited, e["total_seconds"]])
    if "folder" in result:
        f = result["folder"]
        per = f["seconds_per_further_slide"]
        rate = round(result["end_to_end"]["tubules"] / max(per, 1e-9), 1)
        rows.append([f"folder of {f['slides']}, each further slide", rate, "", per])
    return common.markdown_table(["", "tubules/s", "per core (or wait)", "seconds"], rows)


def main(argv: Sequence[str] | None = None) -> None:
    common.main(FLAGS, run, argv)


if __name__ == "__main__":
    main()
