"""The simulator's command line (python -m stagejax.simulate): the dataset it writes,
bad arguments and usage errors as one line, a non-empty --out left untouched, an
interrupted render leaving no partial dataset."""

import json
import signal
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from stagejax.runtime.files import TMP_PREFIX
from stagejax.simulate import (
    tubules,
)
from tests.conftest import REPO, cli_command, run_cli, tree_bytes

# Cheap rendering for layout tests: appearance does not matter there.
# --- command line --------------------------------------------------------------------


def test_cli_writes_dataset(tmp_path):
    res = run_cli(
        "stagejax.simulate",
        "tubules",
        "--out",
        str(tmp_path / "d"),
        "--num_images",
        "18",
        "--image_size",
        "32",
        "--seed",
        "5",
        "--num_workers",
        "1",
        "--num_slides",
        "3",
        "--phase_jitter",
        "0.5",
        "--acrosome_contrast",
        "0.7",
    )
    assert res.returncode == 0, res.stderr
    meta = json.loads((tmp_path / "d" / "SIMULATED.json").read_text())
    assert meta["scene_params"]["phase_jitter"] == 0.5 and meta["num_slides"] == 3
    assert meta["scene_params"]["acrosome_contrast"] == 0.7 and meta["seed"] == 5
    assert meta["scene_params"]["hand_cut"] is True
    assert len(list((tmp_path / "d" / "images").iterdir())) == 18
    assert "Traceback" not in res.stderr


def test_cli_hand_cut_flag_reaches_the_files(tmp_path):
    args = ["--num_images", "24", "--image_size", "32", "--seed", "3", "--num_workers", "1"]
    res = run_cli(
        "stagejax.simulate", "tubules", "--out", str(tmp_path / "uncut"), "--hand_cut=false", *args
    )
    assert res.returncode == 0, res.stderr
    meta = json.loads((tmp_path / "uncut" / "SIMULATED.json").read_text())
    assert meta["scene_params"]["hand_cut"] is False
    cut = tubules.generate(tmp_path / "cut", 24, 32, seed=3, num_workers=1)
    names = sorted(p.name for p in (cut / "images").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "uncut" / "images").iterdir())
    white = {}
    for kind in ("cut", "uncut"):
        imgs = [np.asarray(Image.open(tmp_path / kind / "images" / n)) for n in names]
        white[kind] = np.mean([(im == 255).all(-1).mean() for im in imgs])
    assert white["cut"] > 0.2 and white["uncut"] < 0.02, white


def test_cli_help_lists_the_commands():
    res = run_cli("stagejax.simulate", "--help")
    assert "tubules" in res.stdout + res.stderr and "--num_images" in res.stdout + res.stderr


@pytest.mark.parametrize(
    "args, names",
    [
        (["--num_images", "0"], "num_images"),
        (["--image_size", "8"], "image_size"),
        (["--num_slides", "2"], "num_slides"),
        (["--num_workers", "0"], "--num_workers"),
        (["--split_by", "mouse"], "--split_by"),
        (["--num_images", "many"], "--num_images"),
        (["--colour", "1"], "colour"),
        (["--reference", "{tmp}/nowhere.png", "--contact_sheet", "{tmp}/s.png"], "--reference"),
        (["--reference", "{tmp}/nowhere.png"], "--reference"),
        (["--hand_cut=maybe"], "--hand_cut"),
    ],
)
def test_cli_bad_arguments_are_one_line(tmp_path, args, names):
    args = [a.format(tmp=tmp_path) for a in args]
    res = run_cli(
        "stagejax.simulate", "tubules", "--out", str(tmp_path / "d"), "--image_size", "32", *args
    )
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and names in lines[0], lines
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize(
    "args, says",
    [
        (["tubules"], "--out"),  # no --out (and no --contact_sheet)
        ([], "name a command"),
        (["tubule", "--out", "{tmp}/d"], "unknown command"),
        (["tubules", "extra", "--out", "{tmp}/d"], "unexpected"),
    ],
)
def test_cli_usage_errors_are_one_line(tmp_path, args, says):
    res = run_cli("stagejax.simulate", *[a.format(tmp=tmp_path) for a in args])
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and says in lines[0], res.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_a_non_empty_out_and_leaves_it_untouched(tmp_path):
    out = tmp_path / "mine"
    (out / "images").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    before = tree_bytes(tmp_path)
    args = ("tubules", "--out", out, "--num_images", "18", "--image_size", "32")
    for _ in range(2):  # the retry gets the same answer, not another one
        res = run_cli("stagejax.simulate", *args)
        assert res.returncode == 2 and res.stderr.strip().splitlines() == [
            f"error: out: {out} is not empty; name a new or empty folder"
        ], res.stderr
    assert tree_bytes(tmp_path) == before


def test_cli_sigterm_mid_render_leaves_no_partial_dataset(tmp_path):
    out = tmp_path / "d"
    proc = subprocess.Popen(
        cli_command(
            "stagejax.simulate",
            "tubules",
            "--out",
            str(out),
            "--num_images",
            "400",
            "--image_size",
            "32",
            "--num_workers",
            "2",
        ),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not any(
            len(list((p / "images").glob("*.png"))) >= 4
            for p in tmp_path.glob(f"{TMP_PREFIX}d.*")
            if (p / "images").is_dir()
        ):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted: no partial dataset"), err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
