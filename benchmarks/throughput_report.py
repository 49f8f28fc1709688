"""The throughput benchmark's report: same-run ratios, model FLOP utilisation and
the markdown tables (`benchmarks.throughput` measures; this reads the results).
"""

from __future__ import annotations

from benchmarks import common

TORCH_FRAMEWORKS = ("torch", "torch_tuned")


def framework_of(key: str) -> str:
    """``stagejax@48`` -> ``stagejax``."""
    return key.split("@", 1)[0]


def _rate(r: dict, phase: str) -> float | None:
    return r.get(phase, {}).get("images_per_s", {}).get("median")


def add_mfu(results: dict[str, dict]) -> None:
    """Model FLOP utilisation of every result with a FLOP count: the step's FLOPs
    times steps/s over the device's peak (`common.peak_flops`), per phase. Where
    XLA's count of the compiled step is missing or under half of its count of the
    HLO before optimisation, the latter is used and the result says so."""
    for r in results.values():
        flops = r.get("step_flops")
        if "error" in r or not (flops or r.get("step_flops_hlo")):
            continue
        source = r.get("flops_source", "")
        hlo = r.get("step_flops_hlo")
        if hlo and (not flops or flops < 0.5 * hlo):
            source = (
                f"XLA cost analysis of the step's HLO before optimisation (the "
                f"compiled step counted {flops or 0:.3g})"
            )
            flops = hlo
        peak, peak_source = common.peak_flops(r.get("device", ""))
        mfu = {
            "step_flops": flops,
            "flops_source": source,
            "peak_flops": peak,
            "peak_source": peak_source,
        }
        for phase in ("model_only", "end_to_end"):
            rate = _rate(r, phase)
            achieved = flops * rate / r["batch"] if rate else None
            mfu[f"achieved_flops_per_s_{phase}"] = achieved
            mfu[phase] = achieved / peak if (achieved and peak) else None
        r["mfu"] = mfu


def ratios(results: dict[str, dict]) -> dict[str, float]:
    """Each stagejax result's images/s over each torch result's, from this run."""
    out = {}
    sj_keys = [k for k in results if framework_of(k) == "stagejax"]
    others = [k for k in results if framework_of(k) in TORCH_FRAMEWORKS]
    for sj in sj_keys:
        for other in others:
            for phase in ("end_to_end", "model_only"):
                a, b = _rate(results[sj], phase), _rate(results[other], phase)
                if a and b:
                    out[f"{sj}/{other} {phase}"] = a / b
    return out


def _notes_line(name: str, r: dict) -> str:
    """What each framework actually ran with (rounds, torch.compile, bf16, Adam)."""
    parts = [f"{r.get('rounds', 1)} round(s)"]
    if r.get("skipped_rounds"):
        parts.append(f"{r['skipped_rounds']} more skipped (time budget)")
    if "torch_compile" in r:
        parts.append(f"torch.compile {r['torch_compile']}")
    parts += list(r.get("notes", []))
    return f"- {name}: " + "; ".join(parts)


def _range(summary: dict) -> str:
    return f"{summary['median']:.2f} ({summary['min']:.2f}-{summary['max']:.2f})"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def mfu_table(results: dict[str, dict]) -> str:
    rows = [
        [
            name,
            f"{r['mfu']['step_flops'] / 1e9:.1f}",
            _pct(r["mfu"]["model_only"]),
            _pct(r["mfu"]["end_to_end"]),
            r["mfu"]["flops_source"],
            r["mfu"]["peak_source"],
        ]
        for name, r in results.items()
        if "mfu" in r
    ]
    if not rows:
        return ""
    return common.markdown_table(
        ["framework", "GFLOP per step", "MFU model only", "MFU end to end", "FLOPs from", "peak"],
        rows,
    )


def markdown(results: dict[str, dict], ratio: dict[str, float]) -> str:
    rows = []
    for name, r in results.items():
        if name == "stagejax_profile":
            continue
        if "error" in r:
            rows.append([name] + [f"error: {r['error']}"] + [""] * 9)
            continue
        e, m = r["end_to_end"], r["model_only"]
        mem = r["peak_device_memory_mb"]
        rows.append(
            [
                name,
                str(r.get("batch", "")),
                r["precision"],
                str(r["num_workers"]),
                _range(e["images_per_s"]),
                _range(m["images_per_s"]),
                e["step_time_ms"]["median"],
                m["step_time_ms"]["median"],
                f"{100 * e['loader_wait_fraction']:.1f}%",
                r["first_step_s"],
                f"{mem:.0f} (device)" if mem is not None else f"{r['peak_rss_mb']:.0f} (RSS)",
            ]
        )
    text = common.markdown_table(
        [
            "framework",
            "batch",
            "precision",
            "loader workers",
            "end-to-end images/s (min-max)",
            "model-only images/s (min-max)",
            "e2e step ms",
            "model step ms",
            "loader wait",
            "first step s",
            "peak MB",
        ],
        rows,
    )
    if ratio:
        text += "\n\n" + common.markdown_table(
            ["same-run ratio (median images/s)", "value"],
            [[k, f"{v:.2f}x"] for k, v in ratio.items()],
        )
    if table := mfu_table(results):
        text += "\n\n" + table
    notes = [
        _notes_line(name, r)
        for name, r in results.items()
        if "error" not in r and name != "stagejax_profile"
    ]
    if notes:
        text += "\n\n" + "\n".join(notes)
    prof = results.get("stagejax_profile")
    if prof and "parts_ms" in prof:
        text += "\n\n" + common.markdown_table(
            ["stagejax step part (timed alone)", "ms (median)"],
            [[k, v] for k, v in prof["parts_ms"].items()],
        )
        if isinstance(prof.get("step_gflops"), float):
            text += (
                f"\n\nXLA cost analysis: {prof['step_gflops']:.1f} GFLOP per step, "
                f"{prof['achieved_gflops_per_s']:.1f} GFLOP/s achieved."
            )
    return text
