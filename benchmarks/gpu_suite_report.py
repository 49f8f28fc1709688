"""The GPU suite's report (`benchmarks.gpu_suite`): the issues' targets (met / NOT met /
not measured) and the markdown, from the suite's report dict as it stands, also halfway
through a run: the parts' tables are their benchmarks' own markdown (`common.finish`),
or `common.results_table` of a child's results.
"""

from __future__ import annotations

from benchmarks import common


def _results(report: dict, part: str) -> dict | list:
    return report["parts"].get(part, {}).get("results", {})


def memory_pair(report: dict, batch: int) -> tuple[dict, dict]:
    """``memory_remat``'s (remat off, remat on) at ``batch``; {} where not measured."""
    pick = {r["job"]["remat"]: r for r in _results(report, "memory_remat") or []
            if r["job"]["batch"] == batch}  # fmt: skip
    return pick.get(False, {}), pick.get(True, {})


def _quotient(a: dict, b: dict, field: str) -> float | None:
    x, y = a.get(field), b.get(field)
    if isinstance(x, dict):  # a timing summary
        x, y = x.get("median"), (y or {}).get("median")
    return x / y if x and y else None


def targets(report: dict) -> list[dict]:
    """The issues' targets, each with this run's value (None: not measured)."""
    s, parts = report["sizes"], report["parts"]
    sj, study, tuned = f"stagejax@{s['batch']}", "torch@12", f"torch_tuned@{s['batch']}"
    ratio = parts.get("train_throughput", {}).get("ratios", {})
    train = _results(report, "train_throughput").get(sj, {})
    feeds = _results(report, "data_on_device").get("on_device", {})
    rows = [
        (f"{sj} / {study} (study recipe), end to end", ratio.get(f"{sj}/{study} end_to_end"),
         ">= 3x", lambda v: v >= 3, "x"),
        (f"{sj} / {tuned} (tuned PyTorch), end to end", ratio.get(f"{sj}/{tuned} end_to_end"),
         ">= 1.2x", lambda v: v >= 1.2, "x"),
        (f"loader wait, share of the {sj} end-to-end step",
         train.get("end_to_end", {}).get("loader_wait_fraction"), "<= 5%", lambda v: v <= 0.05,
         "%"),
        (f"MFU of the {sj} step, model only", train.get("mfu", {}).get("model_only"),
         ">= 35% (goal; reported)", lambda v: v >= 0.35, "%"),
        (f"loader wait, share of the step, training split on the device (batch {s['batch']})",
         feeds.get("loader_wait_fraction"), "<= 5%", lambda v: v <= 0.05, "%"),
    ]  # fmt: skip
    for batch in s["memory_batches"]:
        off, on = memory_pair(report, batch)
        rows += [(f"remat: temporaries on / off, batch {batch}", _quotient(on, off, "temp_bytes"),
                  "<= 0.33x (a third)", lambda v: v <= 1 / 3, "x"),
                 (f"remat: seconds per step on / off, batch {batch}",
                  _quotient(on, off, "step_s"), "<= 1.35x", lambda v: v <= 1.35, "x")]  # fmt: skip
    on = memory_pair(report, min(s["memory_batches"]))[1]
    need = on.get("peak_device_bytes") or on.get("need_bytes")
    what = "peak device memory" if on.get("peak_device_bytes") else "compiled step's need"
    rows.append((f"{s['precision']} with remat, batch {min(s['memory_batches'])}: {what}",
                 None if need is None else need / common.GIB, "<= 12 GiB", lambda v: v <= 12,
                 "GiB"))  # fmt: skip
    first = _results(report, "section").get("first_pass", {})
    px = "x".join(f"{v:,}" for v in first.get("section_px", [])) or "study-scale"
    second = _results(report, "section").get("second_pass", {})
    folder = report["parts"].get("section", {}).get("folder", {})
    rows += [(f"section ({px} px) staged end to end, first pass (compile included)",
              first.get("total_seconds"), "< 30 s", lambda v: v < 30, "s"),
             ("the same section again (compiled)", second.get("total_seconds"), "< 5 s",
              lambda v: v < 5, "s"),
             ("share of staging the device waited for crops (compiled)",
              second.get("device_wait_share"), "< 10%", lambda v: v < 0.1, "%"),
             ("each further slide of a folder (100 in 10 min)",
              folder.get("seconds_per_further_slide"), "< 6 s", lambda v: v < 6, "s")]  # fmt: skip
    return [{"target": name, "value": value, "goal": goal, "unit": unit,
             "met": None if value is None else bool(ok(value))}
            for name, value, goal, ok, unit in rows]  # fmt: skip


def _value(t: dict) -> str:
    v, unit = t["value"], t["unit"]
    text = {"x": "{:.2f}x", "%": "{:.1%}", "s": "{:.1f} s"}.get(unit, "{:.2f} " + unit)
    return "n/a" if v is None else text.format(v)


def _note(e: dict) -> str:
    """Why a part did not run, or its error (its measurements' errors are in its table)."""
    if e.get("why") or e.get("error"):
        return e.get("why") or f"error: {e['error']}"
    return e.get("traceback", "").strip().split("\n")[-1][:300]


TABLES = {  # part -> (heading, first column, its results' columns): a child's results
    "data_on_device": ("Training feeds: Grain against the split on the device", "feed", {
        "images/s (median)": lambda r: r["images_per_s"],
        "loader wait, share of the step": lambda r: common.pct(r["loader_wait_fraction"]),
        "rounds": lambda r: str(len(r["rounds"]))}),
    "section": ("Section staging (SIMULATED, random weights: time only)", "pass", {
        "px": lambda r: "x".join(map(str, r["section_px"])), "tubules": lambda r: str(r["tubules"]),
        "seconds by step": lambda r: ", ".join(f"{k} {v}" for k, v in r["seconds"].items()),
        "total s": lambda r: r["total_seconds"], "tubules/s": lambda r: r["tubules_per_second"],
        "peak RSS MB": lambda r: r["peak_rss_mb"]}),
}  # fmt: skip
HEADINGS = {"train_throughput": "Training throughput", "memory_remat": "Train-step memory",
            "predict": "Prediction"}  # fmt: skip


def markdown(report: dict) -> str:
    m, v, parts = report["machine"], report["machine"]["versions"], report["parts"]
    smoke = "**SMOKE MODE: toy sizes on a CPU, to check the script runs. The numbers mean "
    lines = [f"# GPU suite ({report['mode']} mode), {report['date']}\n",
             *[smoke + "nothing.**\n"] * (report["mode"] == "smoke"),
             f"- command: `{report['command']}`",
             f"- GPU: {m['gpu'] or 'none (nvidia-smi absent)'}; CPU: {m['cpu']}, "
             f"{m['cpu_count']} cores",
             "- versions: " + ", ".join(f"{k} {v[k]}" for k in sorted(v) if v[k][0].isdigit()),
             f"- budget {report['budget_s']:.0f} s (setup before Python: {report['setup_s']:.0f} "
             f"s), wall time {report.get('wall_s', 0):.0f} s; loader workers "
             f"{report['num_workers']}", "- images: SIMULATED tubules (not real data)"]  # fmt: skip
    rows = [[k, e["status"], e.get("wall_s"), _note(e)] for k, e in parts.items()]
    body = [("Parts", common.markdown_table(["part", "status", "wall s", "note"], rows))]
    rows = [[t["target"], _value(t), t["goal"],
             {None: "not measured", True: "met", False: "NOT met"}[t["met"]]]
            for t in report.get("targets", [])]  # fmt: skip
    body.append(("Targets", common.markdown_table(["target", "value", "goal", "status"], rows)))
    if "render_s" in (p := parts["prepare"]):
        body.append(("Prepared images", f"{p['num_images']} SIMULATED images of {p['image_size']} "
                     f"px, rendered in {p['render_s']:.1f} s on {p['render_workers']} processes "
                     f"(0 when cached), ArrayRecord cache in {p['cache_s']:.1f} s."))  # fmt: skip
    for name, e in parts.items():
        if e.get("markdown"):
            body.append((HEADINGS[name], e["markdown"]))
        elif name in TABLES and "results" in e:
            heading, first, columns = TABLES[name]
            body.append((heading, common.results_table(e["results"], columns, first)))
    return "\n".join(lines) + "".join(f"\n\n## {h}\n\n{text}" for h, text in body) + "\n"
