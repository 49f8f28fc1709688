"""The GPU suite's report: the parts read off the training runs (loader share, MFU),
each part's status and the markdown, every part's figures and the targets
(`gpu_suite_targets`) with met / NOT met / not measured (`benchmarks.gpu_suite`).

Every function here takes the suite's report dict as it stands, also halfway
through a run, so the markdown can be rewritten after every child.
"""

from __future__ import annotations

from benchmarks import common, predict_speed, throughput_report
from benchmarks.gpu_suite_targets import GIB, LOADER_GOAL, MFU_GOAL, fmt_target, memory_pairs
from benchmarks.gpu_suite_targets import results_of as _results


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


def _feeds_lines(part: dict) -> list[str]:
    res = part["results"]
    table = common.markdown_table(
        ["training feed", "images/s (median)", "loader wait, share of the step", "rounds"],
        [
            [
                name,
                common.fmt(r["images_per_s"], 1),
                f"{100 * r['loader_wait_fraction']:.1f}%",
                str(len(r["rounds"])),
            ]
            for name, r in res.items()
        ],
    )
    ratio = ""
    if {"grain", "on_device"} <= set(res):
        speedup = res["on_device"]["images_per_s"] / res["grain"]["images_per_s"]
        ratio = f"; on device / Grain {speedup:.2f}x"
    return [
        "## Training feeds: Grain against the split on the device",
        "",
        f"{part['batch']} images a step, {part['timed_steps_per_round']} timed steps a round "
        f"after the warm-up, Grain with {part['num_workers']} workers; {part['train_images']} "
        f"training images decoded and uploaded once in {part['decode_and_upload_s']:.1f} s "
        f"({part['resident_bytes'] / GIB:.2f} GiB on the device){ratio}.",
        "",
        table,
        "",
    ]


def _gib(n) -> str:
    return "n/a" if n is None else f"{n / GIB:.2f}"


def _memory_lines(report: dict) -> list[str]:
    rows = []
    for batch, (off, on) in memory_pairs(report).items():
        for name, r in (("off", off), ("on", on)):
            rows.append(
                [
                    str(batch),
                    name,
                    _gib(r.get("temp_bytes")),
                    _gib(r.get("need_bytes")),
                    _gib(r.get("peak_device_bytes")),
                    common.fmt(r.get("step_s", {}).get("median"), 3),
                    common.fmt(r.get("compile_s"), 1),
                    f"`{r.get('xla_flags') or '(none)'}`",
                    r.get("error", "")[:80],
                ]
            )
    job = next(iter(_results(report, "memory_remat").values()))["job"]
    return [
        "## Train-step memory, remat off and on",
        "",
        f"{job['model']} at {job['size']} px, {job['precision']}; temporaries and the "
        "step's need (arguments + temporaries + outputs not aliased to the donated state) "
        "from XLA's memory analysis of the compiled step; peak: the device's "
        f"peak_bytes_in_use after {job['time_steps']} timed steps (n/a on a CPU).",
        "",
        common.markdown_table(
            [
                "batch",
                "remat",
                "temp GiB",
                "need GiB",
                "peak GiB",
                "s/step",
                "compile s",
                "XLA_FLAGS",
                "error",
            ],
            rows,
        ),
        "",
    ]


def _section_lines(report: dict) -> list[str]:
    part = report["parts"]["section"]
    render = report["parts"].get("section_render", {})
    rows = []
    for name, r in part["results"].items():
        sec = r["seconds"]
        rows.append(
            [name, str(r["tubules"])]
            + [common.fmt(sec.get(k), 2) for k in ("read_and_detect", "stain", "cut", "stage")]
            + [common.fmt(sec.get("write"), 2), common.fmt(r["total_seconds"], 1)]
            + [common.fmt(r["tubules_per_second"], 2), f"{r['peak_rss_mb']:.0f}"]
        )
    lines = [
        "## Section staging",
        "",
        f"SIMULATED section {part['section_px'][0]:,} x {part['section_px'][1]:,} px "
        f"({part['size_mm'][0]} x {part['size_mm'][1]} mm), {part['model']} at "
        f"{part['crop_size']} px, random weights (time only), {part['precision']}, eval "
        f"batch {part['eval_batch']}; model saved and loaded in {part['model_setup_s']:.1f} s. "
        "The first pass compiles the eval step; the second, where the time allowed, "
        "does not.",
    ]
    if "render_s" in render:
        lines.append(
            f"Rendered in {render['render_s']:.0f} s ({render['num_workers']} tubule "
            f"processes; 0 when cached) in the background while the parts between "
            f"section_render and section ran; section waited {render['waited_for_s']:.0f} s "
            "for it."
        )
    header = ["pass", "tubules", "read + detect s", "stain s", "cut s", "stage s"]
    header += ["write s", "total s", "tubules/s", "peak RSS MB"]
    return [*lines, "", common.markdown_table(header, rows), ""]


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


def _parts_and_targets(report: dict) -> list[str]:
    parts = report["parts"]
    lines = [
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
                ["target", "value", "goal", "status"], [fmt_target(t) for t in report["targets"]]
            ),
            "",
        ]
    return lines


def markdown(report: dict) -> str:
    parts = report["parts"]
    lines = _header(report) + _parts_and_targets(report)
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
    if parts.get("data_on_device", {}).get("results"):
        lines += _feeds_lines(parts["data_on_device"])
    if _results(report, "memory_remat"):
        lines += _memory_lines(report)
    pred = parts.get("predict", {})
    if "results" in pred:
        lines += [
            "## Prediction",
            "",
            predict_speed.markdown(pred["results"], pred.get("ratios", {})),
            "",
        ]
    if _results(report, "section"):
        lines += _section_lines(report)
    return "\n".join(lines).rstrip() + "\n"
