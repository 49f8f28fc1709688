"""Peak memory of writing and reading a large pyramidal slide (stagejax.slides).

Writes a SIZE x SIZE tiled pyramidal OME-TIFF (BigTIFF, JPEG tiles) tile by
tile from a cheap synthetic pattern, then, in a fresh process, opens it and
reads: random 2048 px regions of level 0, a whole low level, a thumbnail,
every tile of level 1, and a downsampled image as if the file had no pyramid
(streamed from level 0). Each phase runs in its own child process; peak RSS
(`ru_maxrss`) is recorded after each step, so the steps' costs are visible.

    python -m benchmarks.slide_memory --size 40000 --out /tmp/slide_bench [--keep]

Target (issue 13): peak RSS at most about 3 GB for a 40,000 x 40,000 slide.
Times are indicative only; on a shared machine they move with the load.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULT_PREFIX = "SLIDE_MEMORY "


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _render(x: int, y: int, w: int, h: int) -> np.ndarray:
    """Stripes, a gradient and a checkerboard: cheap, but not constant (JPEG has work)."""
    cols = np.arange(x, x + w)
    rows = np.arange(y, y + h)[:, None]
    tile = np.empty((h, w, 3), np.uint8)
    tile[..., 0] = 140 + 60 * ((cols // 37) % 2)
    tile[..., 1] = (rows * 7 + cols * 3) % 200 + 30
    tile[..., 2] = 90 + 100 * (((rows // 256) + (cols // 256)) % 2)
    return tile


def child_write(path: Path, size: int) -> dict:
    from stagejax.slides import write_pyramidal_tiff

    t0 = time.perf_counter()
    write_pyramidal_tiff(path, _render, 0.25, size=(size, size), tile_size=512, quality=80)
    return {"step": "write", "seconds": time.perf_counter() - t0, "peak_rss_mb": _peak_mb(),
            "file_mb": path.stat().st_size / 2**20}  # fmt: skip


def child_read(path: Path) -> list[dict]:
    from stagejax.slides import open_slide

    steps = [{"step": "imports", "seconds": 0.0, "peak_rss_mb": _peak_mb()}]

    def step(name, fn):
        t0 = time.perf_counter()
        out = fn()
        steps.append({"step": name, "seconds": time.perf_counter() - t0,
                      "peak_rss_mb": _peak_mb(), "result": out})  # fmt: skip

    with open_slide(path) as slide:
        w, h = slide.dimensions
        rng = np.random.default_rng(0)
        low = next(i for i, lv in enumerate(slide.levels) if max(lv.dimensions) <= 5000)

        def regions():
            for _ in range(20):
                x, y = rng.integers(0, w - 2048), rng.integers(0, h - 2048)
                region = slide.read_region(int(x), int(y), 2048, 2048)
            return list(region.shape)

        def level1_tiles():
            return sum(t.image.shape[0] * t.image.shape[1] for t in slide.tiles(1024, level=1))

        def no_pyramid():
            slide.levels = slide.levels[:1]  # as if the file had level 0 only
            return list(slide.read_downsampled(16).shape)

        step("open", lambda: [lv.dimensions for lv in slide.levels])
        step("20 regions of 2048 px, level 0", regions)
        step(f"read_level({low})", lambda: list(slide.read_level(low).shape))
        step("thumbnail(2048)", lambda: list(slide.thumbnail(2048).shape))
        step("all tiles of level 1 (1024 px)", level1_tiles)
        step("read_downsampled(16) from level 0 only", no_pyramid)
    return steps


def run_child(args: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "benchmarks.slide_memory", *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [json.loads(line[len(RESULT_PREFIX) :]) for line in out.splitlines()
            if line.startswith(RESULT_PREFIX)]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=40000, help="slide width = height, pixels")
    p.add_argument("--out", type=Path, default=Path("/tmp/slide_memory"))
    p.add_argument("--keep", action="store_true", help="keep the slide file afterwards")
    p.add_argument("--child", choices=("write", "read"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    path = args.out / f"slide_{args.size}.tif"
    if args.child == "write":
        print(RESULT_PREFIX + json.dumps(child_write(path, args.size)))
        return
    if args.child == "read":
        for s in child_read(path):
            print(RESULT_PREFIX + json.dumps(s))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    common = ["--size", str(args.size), "--out", str(args.out)]
    results = run_child([*common, "--child", "write"]) + run_child([*common, "--child", "read"])
    print(f"slide {args.size} x {args.size} px, JPEG q80 tiles of 512 px\n")
    print("| step | seconds | peak RSS so far (MB) | result |\n|---|---:|---:|---|")
    for r in results:
        extra = f"{r['file_mb']:.0f} MB file" if "file_mb" in r else json.dumps(r.get("result", ""))
        print(f"| {r['step']} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {extra} |")
    print("\n" + json.dumps(results))
    if not args.keep:
        path.unlink()


if __name__ == "__main__":
    main()
