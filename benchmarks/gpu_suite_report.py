"""The GPU suite's report: the parts read off the training runs (loader share, MFU),
the targets (the issues' goals, met / NOT met / not measured), each part's status
and the markdown (`benchmarks.gpu_suite`).

Every function here takes the suite's report dict as it stands, also halfway
through a run, so the markdown can be rewritten after every child.
"""

from __future__ import annotations

from benchmarks import common, predict_speed, throughput_report

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
        (f"{sj} / {h['study']} (study recipe), end to end", _ratio(report, sj, h["study"]),
         ">= 3x", lambda v: v >= 3, "x"),
        (f"{sj} / {h['tuned']} (tuned PyTorch), end to end", _ratio(report, sj, h["tuned"]),
         ">= 1.2x", lambda v: v >= 1.2, "x"),
        (f"loader wait, share of the {sj} end-to-end step", share.get("loader_wait_fraction"),
         f"<= {LOADER_GOAL:.0%}", lambda v: v <= LOADER_GOAL, "%"),
        (f"MFU of the {sj} step, model only", util.get("model_only"),
         f">= {MFU_GOAL:.0%} (goal; reported)", lambda v: v >= MFU_GOAL, "%"),
    ]  # fmt: skip


def _feed_targets(report: dict) -> list[tuple]:
    feeds = results_of(report, "data_on_device")
    batch = report["parts"].get("data_on_device", {}).get("batch", "?")
    return [(f"loader wait, share of the step, training split on the device (batch {batch})",
             feeds.get("on_device", {}).get("loader_wait_fraction"), f"<= {LOADER_GOAL:.0%}",
             lambda v: v <= LOADER_GOAL, "%")]  # fmt: skip


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
    rows, batches = [], report["sizes"].get("memory_batches", [12])
    for batch in batches:
        off, on = memory_pairs(report).get(batch, ({}, {}))
        rows += [
            (f"remat: temporaries on / off, batch {batch}", _quotient(on, off, "temp_bytes"),
             "<= 0.33x (a third)", lambda v: v <= 1 / 3, "x"),
            (f"remat: seconds per step on / off, batch {batch}", _quotient(on, off, "step_s"),
             "<= 1.35x", lambda v: v <= 1.35, "x"),
        ]  # fmt: skip
    on = memory_pairs(report).get(min(batches), ({}, {}))[1]
    need = on.get("peak_device_bytes") or on.get("need_bytes")
    what = "peak device memory" if on.get("peak_device_bytes") else "compiled step's need"
    rows.append((f"{report['sizes'].get('precision', '?')} with remat, batch {min(batches)}: "
                 f"{what}", None if need is None else need / GIB, f"<= {FIT_GOAL_GIB} GiB",
                 lambda v: v <= FIT_GOAL_GIB, "GiB"))  # fmt: skip
    return rows


def _section_targets(report: dict) -> list[tuple]:
    part = report["parts"].get("section", {})
    first = part.get("results", {}).get("first_pass", {})
    px = "x".join(f"{v:,}" for v in part.get("section_px", [])) or "study-scale"
    return [(f"section ({px} px) staged end to end, first pass (compile included)",
             first.get("total_seconds"), f"< {SECTION_GOAL_S} s", lambda v: v < SECTION_GOAL_S,
             "s")]  # fmt: skip


def targets(report: dict) -> list[dict]:
    """The issues' targets, each with this run's value (None: not measured)."""
    rows = _train_targets(report) + _feed_targets(report)
    rows += _memory_targets(report) + _section_targets(report)
    return [{"target": name, "value": value, "goal": goal, "unit": unit,
             "met": None if value is None else bool(ok(value))}
            for name, value, goal, ok, unit in rows]  # fmt: skip


def fmt_target(t: dict) -> list[str]:
    v, unit = t["value"], t["unit"]
    text = "n/a"
    if v is not None:
        text = {"x": f"{v:.2f}x", "%": f"{100 * v:.1f}%", "s": f"{v:.1f} s"}.get(unit)
        text = text or f"{v:.2f} {unit}"
    met = {None: "not measured", True: "met", False: "NOT met"}[t["met"]]
    return [t["target"], text, t["goal"], met]


def loader_share(report: dict) -> dict:
    """Per stagejax run: the fraction of the end-to-end wall time spent waiting for
    the next batch, and how much slower end to end is than model only."""
    out = {}
    for key, r in results_of(report, "train_throughput").items():
        if throughput_report.framework_of(key) != "stagejax" or "error" in r:
            continue
        e2e = r["end_to_end"]["images_per_s"]["median"]
        model = r["model_only"]["images_per_s"]["median"]
        out[key] = {"loader_wait_fraction": r["end_to_end"]["loader_wait_fraction"],
                    "end_to_end_slowdown": max(0.0, 1.0 - e2e / model),
                    "num_workers": r["num_workers"]}  # fmt: skip
    return {"results": out, "goal": f"loader wait <= {LOADER_GOAL:.0%} of the step"}


def mfu(report: dict) -> dict:
    """Per training run with a FLOP count: FLOPs per step, MFU model only and end to end."""
    out = {k: r["mfu"] for k, r in results_of(report, "train_throughput").items() if "mfu" in r}
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


def _block(title: str, *body: str) -> list[str]:
    """A markdown section: its heading, then each paragraph or table."""
    return [f"## {title}", "", *(x for b in body for x in (b, ""))]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _share_table(results: dict) -> str:
    header = ["stagejax run", "loader workers", "loader wait (share of the e2e step)",
              "end to end slower than model only by"]  # fmt: skip
    rows = [[k, str(r["num_workers"]), _pct(r["loader_wait_fraction"]),
             _pct(r["end_to_end_slowdown"])] for k, r in results.items()]  # fmt: skip
    return common.markdown_table(header, rows)


def _feeds_lines(part: dict) -> list[str]:
    res = part["results"]
    rows = [[name, common.fmt(r["images_per_s"], 1), _pct(r["loader_wait_fraction"]),
             str(len(r["rounds"]))] for name, r in res.items()]  # fmt: skip
    header = ["training feed", "images/s (median)", "loader wait, share of the step", "rounds"]
    ratio = ""
    if {"grain", "on_device"} <= set(res):
        speedup = res["on_device"]["images_per_s"] / res["grain"]["images_per_s"]
        ratio = f"; on device / Grain {speedup:.2f}x"
    return _block(
        "Training feeds: Grain against the split on the device",
        f"{part['batch']} images a step, {part['timed_steps_per_round']} timed steps a round "
        f"after the warm-up, Grain with {part['num_workers']} workers; {part['train_images']} "
        f"training images decoded and uploaded once in {part['decode_and_upload_s']:.1f} s "
        f"({part['resident_bytes'] / GIB:.2f} GiB on the device){ratio}.",
        common.markdown_table(header, rows),
    )


def _gib(n) -> str:
    return "n/a" if n is None else f"{n / GIB:.2f}"


def _memory_lines(report: dict) -> list[str]:
    rows = [[str(batch), name, _gib(r.get("temp_bytes")), _gib(r.get("need_bytes")),
             _gib(r.get("peak_device_bytes")), common.fmt(r.get("step_s", {}).get("median"), 3),
             common.fmt(r.get("compile_s"), 1), f"`{r.get('xla_flags') or '(none)'}`",
             r.get("error", "")[:80]]
            for batch, pair in memory_pairs(report).items()
            for name, r in zip(("off", "on"), pair, strict=True)]  # fmt: skip
    header = ["batch", "remat", "temp GiB", "need GiB", "peak GiB", "s/step", "compile s",
              "XLA_FLAGS", "error"]  # fmt: skip
    job = next(iter(results_of(report, "memory_remat").values()))["job"]
    return _block(
        "Train-step memory, remat off and on",
        f"{job['model']} at {job['size']} px, {job['precision']}; temporaries and the "
        "step's need (arguments + temporaries + outputs not aliased to the donated state) "
        "from XLA's memory analysis of the compiled step; peak: the device's "
        f"peak_bytes_in_use after {job['time_steps']} timed steps (n/a on a CPU).",
        common.markdown_table(header, rows),
    )


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
    text = (
        f"SIMULATED section {part['section_px'][0]:,} x {part['section_px'][1]:,} px "
        f"({part['size_mm'][0]} x {part['size_mm'][1]} mm), {part['model']} at "
        f"{part['crop_size']} px, random weights (time only), {part['precision']}, eval "
        f"batch {part['eval_batch']}; model saved and loaded in {part['model_setup_s']:.1f} s. "
        "The first pass compiles the eval step; the second, where the time allowed, does not."
    )
    if "render_s" in render:
        text += (
            f"\nRendered in {render['render_s']:.0f} s ({render['num_workers']} tubule "
            f"processes; 0 when cached) in the background while the parts between "
            f"section_render and section ran; section waited {render['waited_for_s']:.0f} s "
            "for it."
        )
    header = ["pass", "tubules", "read + detect s", "stain s", "cut s", "stage s"]
    header += ["write s", "total s", "tubules/s", "peak RSS MB"]
    return _block("Section staging", text, common.markdown_table(header, rows))


def _header(report: dict) -> list[str]:
    m = report["machine"]
    v = m["versions"]
    lines = [f"# GPU suite ({report['mode']} mode), {report['date']}", ""]
    if report["mode"] == "smoke":
        lines += ["**SMOKE MODE: toy sizes on a CPU, to check the script runs. The numbers "
                  "mean nothing.**", ""]  # fmt: skip
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
    rows = [[name, e["status"], e.get("wall_s"), _part_note(e)] for name, e in parts.items()]
    lines = _header(report) + _block("Parts", common.markdown_table(
        ["part", "status", "wall s", "note"], rows))  # fmt: skip
    if "targets" in report:
        rows = [fmt_target(t) for t in report["targets"]]
        header = ["target", "value", "goal", "status"]
        lines += _block("Targets", common.markdown_table(header, rows))
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
        text = throughput_report.markdown(train["results"], train.get("ratios", {}))
        lines += _block("Training throughput", text)
    elif train.get("rounds"):
        lines += _block("Training throughput (in progress)", ", ".join(
            f"{k}: {len(v)} round(s) done" for k, v in train["rounds"].items()))  # fmt: skip
    if parts.get("loader_share", {}).get("results"):
        lines += _block("Loader share", _share_table(parts["loader_share"]["results"]))
    if parts.get("data_on_device", {}).get("results"):
        lines += _feeds_lines(parts["data_on_device"])
    if results_of(report, "memory_remat"):
        lines += _memory_lines(report)
    pred = parts.get("predict", {})
    if "results" in pred:
        lines += _block(
            "Prediction", predict_speed.markdown(pred["results"], pred.get("ratios", {}))
        )
    if results_of(report, "section"):
        lines += _section_lines(report)
    return "\n".join(lines).rstrip() + "\n"
