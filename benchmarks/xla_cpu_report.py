"""Ratios, the recommendation and the markdown tables of `benchmarks.xla_cpu`.

Ratios are against the median of the PyTorch rounds of the same run:
prediction over channels_last PyTorch (the issue's target, >= 1.0x) and over
eager NCHW PyTorch; training over the tuned trainer (target >= 1.0x).
"""

from __future__ import annotations

import math
import statistics

from benchmarks import common

PREDICT_BASE, TRAIN_BASE = "channels_last", "tuned"
LOADS = ("load_before", "load_after")


def torch_medians(rounds: list[dict]) -> dict:
    """{("predict", size, name) or ("train", batch, name): median images/s over rounds}."""
    values: dict[tuple, list[float]] = {}
    for r in rounds:
        if "error" in r or "skipped" in r:
            continue
        for kind in ("predict", "train"):
            for key, per_name in r.get(kind, {}).items():
                for name, m in per_name.items():
                    if m.get("images_per_s"):
                        values.setdefault((kind, key, name), []).append(m["images_per_s"])
    return {k: statistics.median(v) for k, v in values.items()}


def cells(result: dict) -> dict[str, float]:
    """A JAX variant's images/s per cell ("predict_224", "train_24")."""
    out = {}
    for kind in ("predict", "train"):
        for key, m in result.get(kind, {}).items():
            if m.get("images_per_s"):
                out[f"{kind}_{key}"] = m["images_per_s"]
    return out


def ratios(models: dict) -> dict:
    """{model: {variant: {cell: ratio}}}: prediction vs channels_last (and
    ``..._vs_eager``), training vs the tuned trainer."""
    out: dict = {}
    for model, m in models.items():
        base = torch_medians(m.get("torch_rounds", []))
        per: dict = {}
        for name, r in m.get("variants", {}).items():
            row = {}
            for cell, rate in cells(r).items():
                kind, key = cell.split("_", 1)
                ref = base.get((kind, key, PREDICT_BASE if kind == "predict" else TRAIN_BASE))
                if ref:
                    row[cell] = rate / ref
                eager = base.get((kind, key, "eager"))
                if kind == "predict" and eager:
                    row[f"{cell}_vs_eager"] = rate / eager
            per[name] = row
        out[model] = per
    return out


def summary(data: dict, min_gain: float = 0.05) -> dict:
    """Per variant: correct on every model, and the geometric mean of its speed over
    the default's across all cells; the fastest correct variant XLA_FLAGS can set,
    if it beats the default by more than ``min_gain`` (else the default: a few
    percent is within the noise of a shared 2-core machine)."""
    models, variants = data.get("models", {}), data.get("variants", {})
    out: dict = {"per_variant": {}}
    for name in variants:
        measured = [m["variants"].get(name, {}) for m in models.values()]
        ok = [r for r in measured if "logits_pass" in r]
        # Unknown (None) unless every model was measured.
        correct = all(r["logits_pass"] for r in ok) if ok and len(ok) == len(measured) else None
        speedups = []
        for m, r in zip(models.values(), measured, strict=True):
            base = cells(m["variants"].get("default", {}))
            speedups += [v / base[c] for c, v in cells(r).items() if base.get(c)]
        gm = math.exp(statistics.fmean(math.log(s) for s in speedups)) if speedups else None
        out["per_variant"][name] = {"correct": correct, "speed_vs_default_geomean": gm}
    adoptable = [
        n
        for n, s in out["per_variant"].items()
        if s["correct"] and s["speed_vs_default_geomean"] and variants[n]["cores"] is None
    ]
    speed = {n: out["per_variant"][n]["speed_vs_default_geomean"] for n in adoptable}
    best = max(adoptable, key=speed.get, default=None)
    if best is not None and speed[best] <= 1 + min_gain and "default" in speed:
        best = "default"
    out["fastest_correct"] = best
    out["fastest_correct_flags"] = list(variants[best]["flags"]) if best else None
    return out


def _fmt_rate(rate: float | None, ratio: float | None) -> str:
    if rate is None:
        return "n/a"
    return f"{rate:.2f}" + (f" ({ratio:.2f}x)" if ratio else "")


def probe_table(probes: dict) -> str:
    rows = []
    for name, p in probes.items():
        differ = p.get("conv_results_differ_from_default")
        rows.append(
            [
                name,
                f"`{p['xla_flags']}`" if p["xla_flags"] else "",
                p["status"] + (f", {p['cores']} core(s)" if p.get("cores") else ""),
                "n/a" if differ is None else ("yes" if differ else "no (bit-identical)"),
                "; ".join(p.get("warnings", [])) or p.get("reason", ""),
            ]
        )
    header = ["variant", "XLA_FLAGS", "probe", "conv results differ from default", "XLA says"]
    return common.markdown_table(header, rows)


def model_table(m: dict, ratio: dict) -> str:
    """One model: torch medians first, then every JAX variant."""
    base = torch_medians(m.get("torch_rounds", []))
    keys = {c for r in m["variants"].values() for c in cells(r)}
    keys = sorted(keys | {f"{kind}_{key}" for kind, key, _ in base}, key=_cell_order)
    per_torch: dict[str, dict[str, float]] = {}
    for (kind, key, name), rate in base.items():
        per_torch.setdefault(name, {})[f"{kind}_{key}"] = rate
    ok_rounds = [r for r in m.get("torch_rounds", []) if "channels_last_logits" in r]
    cl = ok_rounds[0]["channels_last_logits"]["logits_max_abs_diff"] if ok_rounds else None
    rows = [
        [f"torch {name}", f"{cl:.1e} (vs NCHW)" if name == PREDICT_BASE and cl else "", ""]
        + [_fmt_rate(rates.get(c), None) for c in keys]
        + [""]
        for name, rates in per_torch.items()
    ]
    for name, r in m["variants"].items():
        if "error" in r:
            rows.append([name, f"error: {r['error'][:120]}", ""] + [""] * len(keys) + [""])
            continue
        diff = f"{r['logits_max_abs_diff']:.1e} ({'pass' if r['logits_pass'] else 'FAIL'})"
        vs_default = r.get("logits_max_abs_diff_vs_default")
        loads = [v[x] for k in ("predict", "train") for v in r[k].values() for x in LOADS]
        row = [name, diff, "n/a" if vs_default is None else f"{vs_default:.1e}"]
        row += [_fmt_rate(cells(r).get(c), ratio.get(name, {}).get(c)) for c in keys]
        rows.append(row + [f"{min(loads):.1f}-{max(loads):.1f}"])
    header = ["variant", "logits vs torch", "vs default"]
    header += [_cell_title(c) for c in keys] + ["load"]
    return common.markdown_table(header, rows)


def _cell_order(cell: str) -> tuple:
    kind, key = cell.split("_", 1)
    return (kind != "predict", -int(key))


def _cell_title(cell: str) -> str:
    kind, key = cell.split("_", 1)
    if kind == "predict":
        return f"predict {key} px img/s (x channels_last)"
    return f"train batch {key} img/s (x tuned)"


def markdown(data: dict) -> str:
    parts = [f"warning: {w}" for w in data.get("warnings", [])]
    parts += ["### Probe", probe_table(data.get("probes", {}))]
    for model, m in data.get("models", {}).items():
        prep = m.get("prepare", {})
        parts.append(
            f"### {model}\n\nlogits check: max |logit| "
            f"{common.fmt(prep.get('logits_abs_max'), 3)}, PyTorch float32 vs float64 "
            f"{common.fmt(prep.get('torch_float32_vs_float64'), 8)}"
        )
        if "error" in prep:
            parts.append(f"prepare failed: {prep['error']}")
            continue
        parts.append(model_table(m, data.get("ratios", {}).get(model, {})))
    s = data.get("summary")
    if s:
        rows = [
            [n, common.fmt(v["correct"]), common.fmt(v["speed_vs_default_geomean"], 3)]
            for n, v in s["per_variant"].items()
        ]
        parts += [
            "### Summary",
            common.markdown_table(["variant", "correct", "speed vs default (geomean)"], rows),
            f"fastest correct setting XLA_FLAGS can carry (by more than the noise margin, "
            f"else the default): {s['fastest_correct']} "
            f"({' '.join(s['fastest_correct_flags'] or []) or 'no flags'})",
        ]
    return "\n\n".join(parts)
