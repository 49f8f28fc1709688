"""The GPU suite's report: the parts read off the training runs (loader share, MFU),
each part's status, the issue's targets and the markdown (`benchmarks.gpu_suite`).

Every function here takes the suite's report dict as it stands, also halfway
through a run, so the markdown can be rewritten after every child.
"""

from __future__ import annotations

from benchmarks import common, predict_speed, throughput_report

LOADER_GOAL = 0.05  # loader wait <= 5% of the stagejax end-to-end step
MFU_GOAL = 0.35


def _train_results(ctx) -> dict:
    return ctx.part("train_throughput").get("results", {})


def loader_share(ctx, _deadline: float) -> dict:
    """Per stagejax run: the fraction of the end-to-end wall time spent waiting for
    the next batch, and how much slower end to end is than model only."""
    out = {}
    for key, r in _train_results(ctx).items():
        if throughput_report.framework_of(key) != "stagejax" or "error" in r:
            continue
        e2e = r["end_to_end"]["images_per_s"]["median"]
        model = r["model_only"]["images_per_s"]["median"]
        out[key] = {
            "loader_wait_fraction": r["end_to_end"]["loader_wait_fraction"],
            "end_to_end_slowdown": max(0.0, 1.0 - e2e / model),
            "num_workers": r["num_workers"],
        }
    return {"results": out, "goal": f"loader wait <= {LOADER_GOAL:.0%} of the step"}


def mfu(ctx, _deadline: float) -> dict:
    """Per training run with a FLOP count: FLOPs per step, MFU model only and end to end."""
    out = {key: r["mfu"] for key, r in _train_results(ctx).items() if "mfu" in r}
    return {"results": out, "goal": f"stagejax model-only MFU >= {MFU_GOAL:.0%} (reported)"}


def status_of(name: str, out: dict) -> str:
    """ok, partial (some children failed or were not run) or failed."""
    if name == "prepare":
        return "ok" if "data_dir" in out else "failed"
    results = out.get("results", {})
    bad = [k for k, r in results.items() if "error" in r]
    if not results or len(bad) == len(results):
        return "failed"
    return "partial" if bad else "ok"


def _ratio(report: dict, a: str, b: str) -> float | None:
    return report["parts"].get("train_throughput", {}).get("ratios", {}).get(f"{a}/{b} end_to_end")


def targets(report: dict) -> list[dict]:
    """The issue's targets, each with this run's value (None: not measured)."""
    h = report["sizes"]["headline"]
    sj = h["stagejax"]
    parts = report["parts"]
    share = parts.get("loader_share", {}).get("results", {}).get(sj, {})
    util = parts.get("mfu", {}).get("results", {}).get(sj, {})
    rows = [
        (
            f"{sj} / {h['study']} (study recipe), end to end",
            _ratio(report, sj, h["study"]),
            ">= 3x",
            lambda v: v >= 3,
        ),
        (
            f"{sj} / {h['tuned']} (tuned PyTorch), end to end",
            _ratio(report, sj, h["tuned"]),
            ">= 1.2x",
            lambda v: v >= 1.2,
        ),
        (
            f"loader wait, share of the {sj} end-to-end step",
            share.get("loader_wait_fraction"),
            f"<= {LOADER_GOAL:.0%}",
            lambda v: v <= LOADER_GOAL,
        ),
        (
            f"MFU of the {sj} step, model only",
            util.get("model_only"),
            f">= {MFU_GOAL:.0%} (goal; reported)",
            lambda v: v >= MFU_GOAL,
        ),
    ]
    return [
        {
            "target": name,
            "value": value,
            "goal": goal,
            "met": None if value is None else bool(ok(value)),
        }
        for name, value, goal, ok in rows
    ]


def _fmt_target(t: dict) -> list[str]:
    v = t["value"]
    text = "n/a" if v is None else (f"{v:.2f}x" if "x" in t["goal"] else f"{100 * v:.1f}%")
    met = {None: "not measured", True: "met", False: "NOT met"}[t["met"]]
    return [t["target"], text, t["goal"], met]


def _part_note(entry: dict) -> str:
    if entry.get("why"):
        return entry["why"]
    if entry.get("error") or entry.get("skipped"):
        return f"error: {entry.get('error') or entry['skipped']}"
    if entry.get("traceback"):
        return entry["traceback"].strip().splitlines()[-1][:300]
    bad = [f"{k}: {r['error']}" for k, r in entry.get("results", {}).items() if "error" in r]
    return "; ".join(bad)[:300]


def _share_table(results: dict) -> str:
    return common.markdown_table(
        [
            "stagejax run",
            "loader workers",
            "loader wait (share of the e2e step)",
            "end to end slower than model only by",
        ],
        [
            [
                k,
                str(r["num_workers"]),
                f"{100 * r['loader_wait_fraction']:.1f}%",
                f"{100 * r['end_to_end_slowdown']:.1f}%",
            ]
            for k, r in results.items()
        ],
    )


def _header(report: dict) -> list[str]:
    m = report["machine"]
    v = m["versions"]
    lines = [f"# GPU suite ({report['mode']} mode), {report['date']}", ""]
    if report["mode"] == "smoke":
        lines += [
            "**SMOKE MODE: toy sizes on a CPU, to check the script runs. The numbers "
            "mean nothing.**",
            "",
        ]
    lines += [
        f"- command: `{report['command']}`",
        f"- GPU: {m.get('gpu') or 'none (nvidia-smi absent)'}; CPU: {m['cpu']}, "
        f"{m['cpu_count']} cores",
        "- versions: " + ", ".join(f"{k} {v[k]}" for k in sorted(v) if v[k] != "not installed"),
        f"- budget {report['budget_s']:.0f} s (setup before Python: "
        f"{report['setup_s']:.0f} s); loader workers {report['num_workers']}",
        "- images: SIMULATED tubules (not real data)",
    ]
    if "wall_s" in report:
        lines.append(f"- wall time {report['wall_s']:.0f} s")
    return [*lines, ""]


def markdown(report: dict) -> str:
    parts = report["parts"]
    lines = _header(report)
    lines += [
        "## Parts",
        "",
        common.markdown_table(
            ["part", "status", "wall s", "note"],
            [[name, e["status"], e.get("wall_s"), _part_note(e)] for name, e in parts.items()],
        ),
        "",
    ]
    if "targets" in report:
        lines += [
            "## Targets",
            "",
            common.markdown_table(
                ["target", "value", "goal", "status"], [_fmt_target(t) for t in report["targets"]]
            ),
            "",
        ]
    prep = parts.get("prepare", {})
    if "render_s" in prep:
        lines += [
            f"Prepare: {prep['num_images']} simulated images of {prep['image_size']} px "
            f"rendered in {prep['render_s']:.1f} s on {prep['render_workers']} processes "
            f"(0 when cached); ArrayRecord cache {prep['cache_s']:.1f} s; "
            f"{prep['train_images']} training images.",
            "",
        ]
    train = parts.get("train_throughput", {})
    if "results" in train:
        lines += [
            "## Training throughput",
            "",
            throughput_report.markdown(train["results"], train.get("ratios", {})),
            "",
        ]
    elif train.get("rounds"):
        lines += [
            "## Training throughput (in progress)",
            "",
            ", ".join(f"{k}: {len(v)} round(s) done" for k, v in train["rounds"].items()),
            "",
        ]
    if parts.get("loader_share", {}).get("results"):
        lines += ["## Loader share", "", _share_table(parts["loader_share"]["results"]), ""]
    pred = parts.get("predict", {})
    if "results" in pred:
        lines += [
            "## Prediction",
            "",
            predict_speed.markdown(pred["results"], pred.get("ratios", {})),
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"
