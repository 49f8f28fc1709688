"""The section-level benchmarks' command lines (benchmarks.detect's simulated mode,
benchmarks.section, benchmarks.section_throughput), each run once with every flag at
toy sizes: small held-out sections and, for section, a random-weights ResNet-18 in a
workdir of its own
instead of a trained one. No score thresholds: the detectors and the model are
not what is tested here, the benchmarks' plumbing is."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import common, detect, section, section_throughput
from stagejax import models
from stagejax.detect import DetectParams
from stagejax.detect.params import save_params
from stagejax.detect.weights import shipped_path
from stagejax.model import saved
from stagejax.runtime import workdir as workdir_lib
from stagejax.simulate import tubules

IMAGE, CROP = 64, 48  # a coarse, quick scale (3.9 um/px), as tests/test_section_mode.py
MPP = tubules.image_mpp(IMAGE)  # the tubule simulator's at that size: a reference is drawn


def _flags_used(module, *argvs: list[str]) -> None:
    used = {a.split("=")[0].lstrip("-").removeprefix("no") for v in argvs for a in v}
    assert set(module.FLAGS) <= used, set(module.FLAGS) - used


@pytest.mark.slow
def test_detect_command_scores_held_out_sections(tmp_path, capsys):
    params = save_params(tmp_path / "params.json", DetectParams())
    out = tmp_path / "d.json"
    base = [f"--out={tmp_path / 'renders'}", "--seeds=100", "--stain_shift=1.0", "--mpp=2.0",
            "--size_mm=0.8,0.6", "--no_timing", f"--json={out}"]  # fmt: skip
    classical = [*base, "--method=classical", f"--params={params}"]
    unet = [*base, f"--weights={shipped_path()}"]
    # --real, --overlays and the fine-tuning curve's flags: tests/test_real_sections.py.
    used = {a.split("=")[0][2:] for a in [*classical, *unet, "--real", "--overlays"]}
    assert set(detect.FLAGS) - used == {"finetune_steps", "finetune_tubules"}
    for argv, method in ((classical, "classical"), (unet, "unet")):
        detect.main(argv)
        result = json.loads(out.read_text())
        assert result["method"] == method and result["simulated"]
        assert set(result["accuracy"]) == {"stain_shift=0", "stain_shift=1"}
        assert [s["seed"] for s in result["per_section"]] == [100, 100]
        assert "timing" not in result
    assert "| stain_shift=1 |" in capsys.readouterr().out


@pytest.fixture(scope="module")
def random_workdir(tmp_path_factory):
    """A workdir as training leaves it, holding a random-weights ResNet-18."""
    workdir = tmp_path_factory.mktemp("section") / "w"
    config = common.stagejax_config(model="resnet18", crop_size=CROP, crop_range=4,
                                    eval_batch_size=12)  # fmt: skip
    workdir_lib.prepare_workdir(workdir, config)
    saved.save_model_weights(workdir / "best_model", models.create("resnet18"), "resnet18",
                             mpp=MPP, image_size=IMAGE)  # fmt: skip
    return workdir


@pytest.mark.slow
def test_section_command_scores_and_times_nothing_it_was_not_asked_to(
    random_workdir, tmp_path, capsys
):
    out = tmp_path / "s.json"
    argv = [f"--workdir={random_workdir}", f"--out={tmp_path / 'renders'}", "--seeds=3",
            "--stain_shift=1.0", "--size_mm=1.4,1.1", "--notiming", "--detector=classical",
            "--reference_images=17", f"--json={out}"]  # fmt: skip
    _flags_used(section, argv)
    section.main(argv)
    result = json.loads(out.read_text())
    assert result["stage_model"]["mpp"] == MPP and result["detector"]
    for shift in ("stain_shift=0", "stain_shift=1"):
        row = result["accuracy"][shift]["per_section"][0]
        assert row["seed"] == 3 and row["auto_cut"]["matched_stageable"] > 0, row
        assert 0 <= row["truth_cut"]["balanced_accuracy"] <= 1
        # The per-stage confusion (true stage by row, I first) holds every matched tubule,
        # its diagonal the correct ones; the mean row sums it over the sections.
        confusion = np.array(row["auto_cut"]["confusion"])
        assert confusion.shape == (12, 12)
        assert confusion.sum() == row["auto_cut"]["matched_stageable"]
        assert np.trace(confusion) == round(row["auto_cut"]["accuracy"] * confusion.sum())
        mean = result["accuracy"][shift]["mean"]
        assert mean["auto_cut_confusion"] == confusion.tolist()
        ref = result["accuracy"][shift]["reference_tubules"]  # fresh tubule images beside
        assert ref["images"] == 17 == np.sum(ref["confusion"])
        lo, hi = ref["balanced_accuracy_95"]
        assert 0 <= lo <= ref["balanced_accuracy"] <= hi <= 1
    assert result["timing"] == {}
    out = capsys.readouterr().out
    assert "| stain_shift=1 |" in out and "| recall (auto cut) | I | II |" in out
    assert "| stain_shift=1, 17 fresh tubule images |" in out
    with pytest.raises(SystemExit, match="error: --workdir"):
        section.main([])


@pytest.mark.slow
def test_section_throughput_command_times_the_host_side_and_end_to_end(tmp_path, capsys):
    out = tmp_path / "t.json"
    argv = ["--workers=1,2", "--model=resnet18", "--image_size=96", "--crop_size=64",
            "--size_mm=0.6,0.5", "--folder=2", f"--out={tmp_path / 'renders'}",
            f"--json={out}"]  # fmt: skip
    _flags_used(section_throughput, argv)
    section_throughput.main(argv)
    result = json.loads(out.read_text())
    host = result["host_side"]
    assert result["simulated"] and host["tubules"] > 0 and set(host["by_workers"]) == {"1", "2"}
    assert all(r["tubules_per_second"] > 0 for r in host["by_workers"].values())
    assert host["by_workers"]["2"]["per_core"] <= host["by_workers"]["2"]["tubules_per_second"]
    end = result["end_to_end"]
    assert end["tubules"] == host["tubules"] and end["cut_workers"] == 2
    assert 0 <= end["device_wait_share"] <= 1
    folder = result["folder"]
    assert folder["slides"] == 2 and folder["folder_seconds"] > folder["seconds_per_further_slide"]
    text = capsys.readouterr().out
    assert "| host side, 2 thread(s) |" in text and "| folder of 2, each further slide |" in text
