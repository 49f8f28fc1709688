"""Blocks of a SIMULATED section: interstitium, tunica, glass and tubules composited.

``SectionRenderer.region(x, y, w, h)`` is the ``render`` callable of
``slides.writer.write_pyramidal_tiff``: it serves any region from fixed 512 px blocks
(``section_render.BLOCK``), rendering each block once from the global layout. The
tubules are rendered by worker processes in the order of their top row, a bounded
window ahead of the block row being written, and dropped once that row has passed them.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import multiprocessing
import signal

import numpy as np

from stagejax.simulate import cells, render
from stagejax.simulate.cells import smoothstep
from stagejax.simulate.section_layout import Layout
from stagejax.simulate.section_render import (
    _BLOCKS,
    BLOCK,
    LatticeNoise,
    Look,
    Patch,
    patch_box,
    render_patch,
)

_FIELDS = 23  # SeedSequence stream of the global fields and interstitial nuclei.


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Only the parent reacts to Ctrl-C.


def _render_job(job) -> Patch:
    return render_patch(*job)


class _Patches:
    """Tubule patches, rendered ahead in top-row order by a pool (or here, on demand)."""

    def __init__(self, layout: Layout, look: Look, num_workers: int, window: int = 12):
        self.look = look
        self.cuts = {c.index: c for c in layout.tubules}
        boxes = {i: patch_box(c, look) for i, c in self.cuts.items()}
        self.boxes = boxes
        self.order = sorted(boxes, key=lambda i: (boxes[i][1], i))
        self.live: dict[int, Patch] = {}
        self.pending: collections.deque = collections.deque()
        self.next = 0  # Next position in `order` to submit.
        self.consumed = 0  # Patches of `order` taken from the pool so far.
        self.window = window
        self.pool = None
        if num_workers > 1 and len(self.order) > 2:
            ctx = multiprocessing.get_context("spawn")
            self.pool = ctx.Pool(num_workers, initializer=_ignore_sigint)
            self._fill()

    def _fill(self) -> None:
        while self.next < len(self.order) and len(self.pending) < self.window:
            i = self.order[self.next]
            self.pending.append(
                (i, self.pool.apply_async(_render_job, ((self.cuts[i], self.look),)))
            )
            self.next += 1

    def overlapping(self, x0: int, y0: int, x1: int, y1: int) -> list[Patch]:
        """The patches overlapping [x0, x1) x [y0, y1), in tubule order."""
        while self.pool is not None and self.pending and self.boxes[self.pending[0][0]][1] < y1:
            i, res = self.pending.popleft()
            self.live[i] = res.get()
            self._fill()
        out = []
        for i, (bx, by, bw, bh) in self.boxes.items():
            if bx < x1 and bx + bw > x0 and by < y1 and by + bh > y0:
                if i not in self.live:
                    self.live[i] = render_patch(self.cuts[i], self.look)
                out.append(self.live[i])
        return sorted(out, key=lambda p: p.index)

    def drop_above(self, y: int) -> None:
        """Forget patches that end above row y (the writer goes down row by row)."""
        for i in [i for i, p in self.live.items() if p.y1 <= y]:
            del self.live[i]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


class SectionRenderer:
    """Renders regions of one section from its layout and look; see the module doc."""

    def __init__(self, layout: Layout, look: Look, num_workers: int = 1):
        self.layout = layout
        self.width = int(round(layout.width / look.mpp))
        self.height = int(round(layout.height / look.mpp))
        # Drawn `k` times finer than level 0 and box-reduced (Look.supersampling):
        # everything below works in render px of `self.look`.
        self.k = look.supersampling
        self.look = look = dataclasses.replace(look, mpp=look.mpp / self.k)
        rng = np.random.default_rng(np.random.SeedSequence([look.seed, _FIELDS]))
        w, h, r_um = layout.width, layout.height, look.nucleus_um
        self.tissue_noise = LatticeNoise(rng, w, h, 6 * r_um)
        self.fibre_noise = LatticeNoise(rng, w, h, 0.8 * r_um)
        self.thick_noise = LatticeNoise(rng, w, h, 600.0)
        self.vignette = (rng.uniform(*look.params.vignette_range) * 0.3, rng.normal(0, 0.2, 2))
        self.field_um = rng.uniform(400, 900)  # Scanner field (stitching) shading period.
        self.field_amp = rng.uniform(0.0, 0.03)
        self.tiles = render.texture_tiles(look.r_px, rng, blur=look.blur_um / look.mpp)
        self.nuclei = _interstitial_groups(layout, look, rng)
        self.patches = _Patches(layout, look, num_workers)
        self.blocks: dict[tuple[int, int], np.ndarray] = {}

    def close(self) -> None:
        self.patches.close()

    def region(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """uint8 (h, w, 3) RGB of level 0 at (x, y); the writer's ``render`` callable."""
        out = np.empty((h, w, 3), np.uint8)
        by0, by1 = y // BLOCK, (y + h - 1) // BLOCK
        for key in [k for k in self.blocks if k[1] < by0]:
            del self.blocks[key]  # Rows above this request: the writer is past them.
        self.patches.drop_above(by0 * BLOCK * self.k)
        for by in range(by0, by1 + 1):
            for bx in range(x // BLOCK, (x + w - 1) // BLOCK + 1):
                if (bx, by) not in self.blocks:
                    self.blocks[bx, by] = self.block(bx, by)
                blk = self.blocks[bx, by]
                sx, sy = max(x, bx * BLOCK), max(y, by * BLOCK)
                ex = min(x + w, bx * BLOCK + blk.shape[1])
                ey = min(y + h, by * BLOCK + blk.shape[0])
                out[sy - y : ey - y, sx - x : ex - x] = blk[
                    sy - by * BLOCK : ey - by * BLOCK, sx - bx * BLOCK : ex - bx * BLOCK
                ]
        return out

    def block(self, bx: int, by: int) -> np.ndarray:
        """RGB of block (bx, by) of level 0, from the layout alone."""
        k = self.k
        w, h = (
            min(self.width, (bx + 1) * BLOCK) - bx * BLOCK,
            min(self.height, (by + 1) * BLOCK) - by * BLOCK,
        )
        rng = np.random.default_rng(np.random.SeedSequence([self.look.seed, _BLOCKS, bx, by]))
        # Sensor noise after the reduction, as the tubule simulator adds it.
        rgb = self._render(bx * BLOCK * k, by * BLOCK * k, w * k, h * k, rng if k == 1 else None)
        return rgb if k == 1 else render.reduce(rgb, (w, h), self.look.noise, rng)

    def _render(self, x0: int, y0: int, w: int, h: int, rng) -> np.ndarray:
        """RGB of render px [x0, x0 + w) x [y0, y0 + h); sensor noise from ``rng`` if given."""
        x1, y1 = x0 + w, y0 + h
        mpp = self.look.mpp
        xs = ((np.arange(x0, x1) + 0.5) * mpp).astype(np.float32)
        ys = ((np.arange(y0, y1) + 0.5) * mpp).astype(np.float32)
        kind, depth, phi = self._where(xs, ys)
        shape = (y1 - y0, x1 - x0)
        if kind == "glass":
            h_od, p_od = np.zeros(shape, np.float32), np.full(shape, 0.004, np.float32)
        else:
            h_od, p_od = self._tissue(xs, ys, depth, phi)
            for p in self.patches.overlapping(x0, y0, x1, y1):
                _composite(h_od, p_od, p, x0, y0)
            hs, ps = self._nuclei(x0, y0, shape)
            h_od += hs
            p_od += ps
            if depth is not None:
                mask = np.clip(depth / 1.5 + 0.5, 0.0, 1.0)
                h_od *= mask
                p_od = mask * p_od + (1 - mask) * 0.004
        n_od = self._illumination(xs, ys)
        look = self.look
        stain = render.Stain(
            look.stain.h_vec,
            look.stain.p_vec,
            look.stain.h_scale,
            look.stain.p_scale,
            look.stain.tint_od,
            look.noise,
        )
        return render.compose(h_od, p_od, n_od, stain, rng)

    def _where(self, xs, ys):
        """('glass' | 'inside' | 'border', depth um or None, phi or None) of a block."""
        o = self.layout.outline
        cx = np.array([xs[0], xs[-1], xs[0], xs[-1], xs.mean()])
        cy = np.array([ys[0], ys[0], ys[-1], ys[-1], ys.mean()])
        d, _ = o.depth(cx, cy)
        half = 0.5 * math.hypot(xs[-1] - xs[0], ys[-1] - ys[0]) + 20.0
        if d.max() < -half:
            return "glass", None, None
        if d.min() > o.tunica + half + 10:
            return "inside", None, None
        depth, phi = o.depth(xs[None, :], ys[:, None])
        return "border", depth.astype(np.float32), phi

    def _tissue(self, xs, ys, depth, phi):
        """Interstitium (loose pink connective tissue, white spaces), tunica, vessels."""
        loose = smoothstep(self.tissue_noise(xs, ys), -0.5, 0.6).astype(np.float32)
        fib = self.fibre_noise(xs, ys)
        p_od = loose * (0.2 + 0.07 * fib) + 0.015
        h_od = loose * (0.05 + 0.02 * fib) + 0.005
        if depth is not None:
            o = self.layout.outline
            band = np.clip(depth / 1.5 + 0.5, 0, 1) * (
                1 - smoothstep(depth, o.tunica - 5, o.tunica + 5)
            )
            band = (band * o.intact(phi)).astype(np.float32)
            p_od += band * (0.32 + 0.06 * fib - p_od)
            h_od += band * (0.06 + 0.01 * fib - h_od)
        for v in self.layout.vessels:
            if not (xs[0] - 30 < v.cx < xs[-1] + 30 and ys[0] - 30 < v.cy < ys[-1] + 30):
                continue
            d = np.hypot(xs[None, :] - v.cx, ys[:, None] - v.cy)
            lumen = np.clip(v.radius - d + 0.5, 0, 1).astype(np.float32)
            p_od += lumen * (0.05 - p_od) + 0.35 * np.exp(-(((d - v.radius) / 2.0) ** 2))
            h_od += lumen * (0.01 - h_od)
        return h_od, p_od

    def _nuclei(self, x0: int, y0: int, shape) -> tuple[np.ndarray, np.ndarray]:
        """Interstitial, tunica and vessel nuclei of one block (global sprites)."""
        size = max(shape)
        margin = 3 * self.look.r_px + 4
        groups = []
        for g in self.nuclei:
            m = (g.x > x0 - margin) & (g.x < x0 + size + margin)
            m &= (g.y > y0 - margin) & (g.y < y0 + size + margin)
            if m.any():
                s = g.select(m)
                groups.append(cells.Nuclei(s.name, s.kind, s.x - x0, s.y - y0, s.fields, s.extent))
        if not groups:
            return 0.0, 0.0
        edge = max(0.8, 2.2 * self.look.blur_um / self.look.mpp)
        h_sp, p_sp = render.splat_nuclei(groups, size, self.tiles, edge=edge)
        return h_sp[: shape[0], : shape[1]], p_sp[: shape[0], : shape[1]]

    def _illumination(self, xs, ys) -> np.ndarray:
        """Neutral density: a broad vignette and the faint shading of scanner fields."""
        strength, off = self.vignette
        w, h = self.layout.width, self.layout.height
        u = ((xs / w - 0.5 - off[0]) ** 2)[None, :]
        v = ((ys / h - 0.5 - off[1]) ** 2)[:, None]
        fx = (((xs % self.field_um) / self.field_um - 0.5) ** 2)[None, :]
        fy = (((ys % self.field_um) / self.field_um - 0.5) ** 2)[:, None]
        return (strength * (u + v) + self.field_amp * 4 * (fx + fy)).astype(np.float32)


def _composite(h_od: np.ndarray, p_od: np.ndarray, p: Patch, x0: int, y0: int) -> None:
    """Lay tubule patch p over the block at (x0, y0) (premultiplied 'over')."""
    hb, wb = h_od.shape
    sx, sy = max(p.x0, x0), max(p.y0, y0)
    ex, ey = min(p.x1, x0 + wb), min(p.y1, y0 + hb)
    if ex <= sx or ey <= sy:
        return
    dst = (slice(sy - y0, ey - y0), slice(sx - x0, ex - x0))
    src = (slice(sy - p.y0, ey - p.y0), slice(sx - p.x0, ex - p.x0))
    keep = 1.0 - p.cover[src].astype(np.float32)
    h_od[dst] = h_od[dst] * keep + p.h_od[src]
    p_od[dst] = p_od[dst] * keep + p.p_od[src]


def _interstitial_groups(layout: Layout, look: Look, rng) -> list[cells.Nuclei]:
    """Global nuclei groups in level-0 px: Leydig, fibroblasts, tunica, vessels."""
    r, mpp = look.r_px, look.mpp
    groups = []

    def px(kind):
        p = layout.nuclei[kind]
        return p[:, 0] / mpp - 0.5, p[:, 1] / mpp - 0.5, len(p)

    x, y, n = px("leydig")
    groups.append(
        cells.nuclei(
            "leydig",
            cells.TEX_FINE,
            x,
            y,
            a=rng.uniform(0.8, 1.0, n) * r,
            b=rng.uniform(0.7, 0.9, n) * r,
            theta=rng.uniform(0, 2 * math.pi, n),
            h=0.55,
            tex=0.6,
            rim=0.4,
            dot=0.5,
            halo=0.3,
            extent=1.9,
        )
    )
    x, y, n = px("fibroblast")
    groups.append(
        cells.nuclei(
            "fibroblast",
            cells.TEX_FINE,
            x,
            y,
            a=rng.uniform(1.2, 1.8, n) * r,
            b=rng.uniform(0.25, 0.4, n) * r,
            theta=rng.uniform(0, 2 * math.pi, n),
            h=0.8,
            tex=0.3,
        )
    )
    for kind, length in (("tunica", (1.6, 2.4)), ("endothelial", (0.9, 1.2))):
        x, y, n = px(kind)
        groups.append(
            cells.nuclei(
                kind,
                cells.TEX_FINE,
                x,
                y,
                a=rng.uniform(*length, n) * r,
                b=rng.uniform(0.22, 0.32, n) * r,
                theta=layout.angles[kind] + rng.normal(0, 0.1, n),
                h=0.85,
                tex=0.2,
            )
        )
    x, y, n = px("rbc")
    groups.append(
        cells.nuclei(
            "rbc",
            cells.TEX_FINE,
            x,
            y,
            a=0.8 * r,
            b=0.75 * r,
            theta=rng.uniform(0, 2 * math.pi, n),
            h=0.02,
            pas=0.4,
        )
    )
    return [cells.individualise(g, rng) for g in groups if len(g)]
