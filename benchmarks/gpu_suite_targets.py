"""The GPU suite's targets (the issues' goals), each with the run's value or None
(not measured); `gpu_suite_report` puts them in the markdown. Each function takes
the suite's report dict as it stands, also halfway through a run."""

from __future__ import annotations

LOADER_GOAL = 0.05  # loader wait <= 5% of the stagejax end-to-end step
MFU_GOAL = 0.35
FIT_GOAL_GIB = 12  # bf16 with remat fits a 12 GB card
SECTION_GOAL_S = 30  # a study-scale section, ResNet-50 at 896 px, on an H100/H200
GIB = 2**30


def _ratio(report: dict, a: str, b: str) -> float | None:
    return report["parts"].get("train_throughput", {}).get("ratios", {}).get(f"{a}/{b} end_to_end")


def results_of(report: dict, part: str) -> dict:
    return report["parts"].get(part, {}).get("results", {})


def _train_targets(report: dict) -> list[tuple]:
    h = report["sizes"]["headline"]
    sj = h["stagejax"]
    share = results_of(report, "loader_share").get(sj, {})
    util = results_of(report, "mfu").get(sj, {})
    return [
        (
            f"{sj} / {h['study']} (study recipe), end to end",
            _ratio(report, sj, h["study"]),
            ">= 3x",
            lambda v: v >= 3,
            "x",
        ),
        (
            f"{sj} / {h['tuned']} (tuned PyTorch), end to end",
            _ratio(report, sj, h["tuned"]),
            ">= 1.2x",
            lambda v: v >= 1.2,
            "x",
        ),
        (
            f"loader wait, share of the {sj} end-to-end step",
            share.get("loader_wait_fraction"),
            f"<= {LOADER_GOAL:.0%}",
            lambda v: v <= LOADER_GOAL,
            "%",
        ),
        (
            f"MFU of the {sj} step, model only",
            util.get("model_only"),
            f">= {MFU_GOAL:.0%} (goal; reported)",
            lambda v: v >= MFU_GOAL,
            "%",
        ),
    ]


def _feed_targets(report: dict) -> list[tuple]:
    feeds = results_of(report, "data_on_device")
    batch = report["parts"].get("data_on_device", {}).get("batch", "?")
    return [
        (
            f"loader wait, share of the step, training split on the device (batch {batch})",
            feeds.get("on_device", {}).get("loader_wait_fraction"),
            f"<= {LOADER_GOAL:.0%}",
            lambda v: v <= LOADER_GOAL,
            "%",
        )
    ]


def memory_pairs(report: dict) -> dict[int, tuple[dict, dict]]:
    """memory_remat's results as batch -> (remat off, remat on); {} for one not run."""
    pairs: dict[int, list[dict]] = {}
    for r in results_of(report, "memory_remat").values():
        pair = pairs.setdefault(r["job"]["batch"], [{}, {}])
        pair[int(r["job"]["remat"])] = r
    return {b: (off, on) for b, (off, on) in pairs.items()}


def _quotient(a: dict, b: dict, field: str) -> float | None:
    x, y = a.get(field), b.get(field)
    if isinstance(x, dict):  # a timing summary
        x, y = x.get("median"), (y or {}).get("median")
    return x / y if x and y else None


def _memory_targets(report: dict) -> list[tuple]:
    rows = []
    for batch in report["sizes"].get("memory_batches", []):
        off, on = memory_pairs(report).get(batch, ({}, {}))
        rows += [
            (
                f"remat: temporaries on / off, batch {batch}",
                _quotient(on, off, "temp_bytes"),
                "<= 0.33x (a third)",
                lambda v: v <= 1 / 3,
                "x",
            ),
            (
                f"remat: seconds per step on / off, batch {batch}",
                _quotient(on, off, "step_s"),
                "<= 1.35x",
                lambda v: v <= 1.35,
                "x",
            ),
        ]
    batch = min(report["sizes"].get("memory_batches", [12]))
    on = memory_pairs(report).get(batch, ({}, {}))[1]
    need = on.get("peak_device_bytes") or on.get("need_bytes")
    what = "peak device memory" if on.get("peak_device_bytes") else "compiled step's need"
    rows.append(
        (
            f"{report['sizes'].get('precision', '?')} with remat, batch {batch}: {what}",
            None if need is None else need / GIB,
            f"<= {FIT_GOAL_GIB} GiB",
            lambda v: v <= FIT_GOAL_GIB,
            "GiB",
        )
    )
    return rows


def _section_targets(report: dict) -> list[tuple]:
    part = report["parts"].get("section", {})
    first = part.get("results", {}).get("first_pass", {})
    px = "x".join(f"{v:,}" for v in part.get("section_px", [])) or "study-scale"
    return [
        (
            f"section ({px} px) staged end to end, first pass (compile included)",
            first.get("total_seconds"),
            f"< {SECTION_GOAL_S} s",
            lambda v: v < SECTION_GOAL_S,
            "s",
        )
    ]


def targets(report: dict) -> list[dict]:
    """The issues' targets, each with this run's value (None: not measured)."""
    rows = (
        _train_targets(report)
        + _feed_targets(report)
        + _memory_targets(report)
        + _section_targets(report)
    )
    return [
        {
            "target": name,
            "value": value,
            "goal": goal,
            "unit": unit,
            "met": None if value is None else bool(ok(value)),
        }
        for name, value, goal, ok, unit in rows
    ]


def fmt_target(t: dict) -> list[str]:
    v, unit = t["value"], t.get("unit", "x" if "x" in t["goal"] else "%")
    if v is None:
        text = "n/a"
    else:
        text = {"x": f"{v:.2f}x", "%": f"{100 * v:.1f}%", "s": f"{v:.1f} s"}.get(
            unit, f"{v:.2f} {unit}"
        )
    met = {None: "not measured", True: "met", False: "NOT met"}[t["met"]]
    return [t["target"], text, t["goal"], met]
