"""Every config value is checked before any data is read or anything compiled.

Unit tests of `stagejax.config.validate`, then the command line: a bad value is
exit status 2 and one ``error:`` line naming the field, no traceback, and
neither the workdir nor the dataset cache is touched.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from stagejax import config as config_lib
from stagejax import recipe
from stagejax.errors import ConfigError, WorkdirError
from tests.conftest import REPO, error_line, run_cli, run_main

sys.path.insert(0, str(REPO))
CONFIGS = ["resnet", "resnext", "wide_resnet", "mobilenet"]


def _config(name: str = "resnet", variant: str = "demo", **overrides) -> ml_collections.ConfigDict:
    config = importlib.import_module(f"configs.{name}").get_config(variant)
    for field, value in overrides.items():
        *parents, leaf = field.split("__")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_are_valid(name):
    config_lib.validate(_config(name), num_devices=1)
    config_lib.validate(_config(name, "study", data_dir="/data"), num_devices=4)


BAD = [  # (field as ConfigDict path with __, value, text the message must contain)
    ("model", "resnet", "one of resnet18,"),
    ("optimizer", "lamb", "one of adam, adamw, sgd"),
    ("schedule", "linear", "one of constant, cosine"),
    ("precision", "float16", "one of float32, bfloat16"),
    ("parallelism", "pjit", "one of jit, pmap"),
    ("eval_split", "val", "one of train, validation, test"),
    ("global_batch_size", 0, ">= 12"),
    ("global_batch_size", 6, ">= 12 (every batch holds every stage)"),
    ("eval_batch_size", 0, ">= 1"),
    ("learning_rate", -1.0, "> 0"),
    ("learning_rate", 0.0, "> 0"),
    ("learning_rate", float("nan"), "finite"),
    ("weight_decay", -1e-4, ">= 0"),
    ("num_epochs", 0, ">= 1"),
    ("crop_size", 8, ">= 16 (below 16 px"),
    ("crop_range", -1, ">= 0"),
    ("label_smoothing", 1.0, "in [0, 1)"),
    ("momentum", 1.0, "in [0, 1)"),
    ("momentum", -0.1, "in [0, 1)"),
    ("warmup_epochs", -0.5, ">= 0"),
    ("log_every_steps", 0, ">= 1"),
    ("checkpoint_every_steps", 0, ">= 1"),
    ("num_workers", -1, ">= 0"),
    ("seed", -3, ">= 0"),
    ("device_memory_gb", -1.0, ">= 0"),
    ("augment__stain_jitter", -0.05, ">= 0"),
    ("augment__contrast", -0.1, ">= 0"),
    ("simulated__num_images", 10, ">= 18"),
    ("simulated__image_size", 8, ">= 16"),
    ("simulated__image_size", 64, ">= config.crop_size (96)"),
]


@pytest.mark.parametrize("field,value,must", BAD, ids=[f"{f}={v}" for f, v, _ in BAD])
def test_bad_value_is_refused_naming_the_field(field, value, must):
    with pytest.raises(ConfigError) as err:
        config_lib.validate(_config(**{field: value}), num_devices=1)
    message = str(err.value)
    assert message.startswith(f"config.{field.replace('__', '.')}: {value!r}; must be "), message
    assert must in message and "\n" not in message, message


def test_batch_sizes_must_divide_by_the_devices():
    config_lib.validate(_config(eval_batch_size=8), num_devices=8)  # demo: batch 24
    with pytest.raises(
        ConfigError,
        match=r"^config\.global_batch_size: 24; must be "
        r"a multiple of the 16 devices",
    ):
        config_lib.validate(_config(eval_batch_size=16), num_devices=16)
    study = dict(variant="study", data_dir="/data")
    with pytest.raises(ConfigError, match=r"^config\.global_batch_size: 12; .*of the 8 devices"):
        config_lib.validate(_config(eval_batch_size=8, **study), num_devices=8)
    with pytest.raises(ConfigError, match=r"^config\.eval_batch_size: 12; .*of the 8 devices"):
        config_lib.validate(_config(global_batch_size=16, **study), num_devices=8)
    config_lib.validate(_config(global_batch_size=16, eval_batch_size=8, **study), num_devices=8)


def test_absent_fields_are_skipped():
    """Older configs (a run's config.json) and fields others add still validate."""
    config = ml_collections.ConfigDict(
        {"model": "resnet18", "learning_rate": 0.1, "augment": {"rot90": True}}
    )
    config_lib.validate(config, num_devices=1)
    config.learning_rate = -0.1
    with pytest.raises(ConfigError, match="config.learning_rate"):
        config_lib.validate(config, num_devices=1)


def _model_dir(
    path: Path, arch: str = "resnet18", num_classes: int = 12, in_channels: int = 3
) -> Path:
    """What validate reads of a model directory: its model.json."""
    path.mkdir()
    (path / "model.json").write_text(
        json.dumps({"arch": arch, "num_classes": num_classes, "in_channels": in_channels})
    )
    return path


def test_init_from_must_fit_the_config(tmp_path):
    ok = _model_dir(tmp_path / "ok")
    config_lib.validate(_config(model="resnet18", init_from=str(ok)), num_devices=1)

    imagenet = _model_dir(tmp_path / "imagenet", num_classes=1000)
    with pytest.raises(ConfigError) as err:
        config_lib.validate(_config(model="resnet18", init_from=str(imagenet)), num_devices=1)
    message = str(err.value)
    assert message.startswith(f"config.init_from: {imagenet} holds a resnet18 with 1000 classes")
    assert "config.num_classes is 12" in message and "--new_head" in message
    assert "python -m stagejax.convert" in message

    with pytest.raises(
        ConfigError,
        match=r"holds a resnet18 .* but config.model is 'resnet50'; "
        r"pass --config.model=resnet18",
    ):
        config_lib.validate(_config(model="resnet50", init_from=str(ok)), num_devices=1)
    with pytest.raises(ConfigError, match=r"3 input channel\(s\), but config.grayscale is True"):
        config_lib.validate(
            _config(model="resnet18", grayscale=True, init_from=str(ok)), num_devices=1
        )
    gray = _model_dir(tmp_path / "gray", in_channels=1)
    config_lib.validate(
        _config(model="resnet18", grayscale=True, init_from=str(gray)), num_devices=1
    )
    with pytest.raises(ConfigError, match="config.init_from: .*absent: no such model directory"):
        config_lib.validate(_config(init_from=str(tmp_path / "absent")), num_devices=1)


@pytest.mark.parametrize(
    "flag,field",
    [
        ("--config.global_batch_size=0", "config.global_batch_size: 0"),
        ("--config.learning_rate=-1", "config.learning_rate: -1.0"),
        ("--config.model=resnet", "config.model: 'resnet'"),
    ],
)
def test_bad_value_on_the_command_line(flag, field, tmp_path):
    """Checked before the data: the data folder does not even exist here, and the
    error is about the field, not the folder."""
    workdir = tmp_path / "workdir"
    overrides = {
        "data_dir": str(tmp_path / "no_such_data"),
        "cache_dir": str(tmp_path / "c"),
        "model": "resnet18",
        "crop_size": 32,
    }
    res = run_main(workdir, flag, overrides=overrides)
    line = error_line(res)
    assert res.returncode == 2 and line.startswith(f"error: {field}; must be "), line
    assert not workdir.exists() and not (tmp_path / "c").exists()


def test_init_from_with_another_head_on_the_command_line(tmp_path):
    model = _model_dir(tmp_path / "imagenet_r18", num_classes=1000)
    overrides = {"cache_dir": str(tmp_path / "c"), "model": "resnet18", "init_from": model}
    res = run_main(tmp_path / "workdir", overrides=overrides)
    line = error_line(res)
    assert res.returncode == 2 and "1000 classes" in line and "--new_head" in line, line
    assert "training resnet18" not in res.stderr and not (tmp_path / "c").exists()


# -- the config rule: the command line wins, the variant only picks the defaults ------

RESNET = str(REPO / "configs" / "resnet.py")


def _spec(*args: str) -> str:
    """The ``--config`` that ``complete_argv`` makes of a command line."""
    argv = config_lib.complete_argv(["prog", *args])
    assert sum(a.startswith("--config=") for a in argv) == 1, argv
    return next(a.split("=", 1)[1] for a in argv if a.startswith("--config="))


def _record(workdir: Path, **fields) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    config = _config("resnet", "demo")
    config.update(fields)
    (workdir / "config.json").write_text(config.to_json())
    return workdir / "config.json"


def test_variant_is_chosen_by_data_unless_named(tmp_path):
    assert _spec(f"--config={RESNET}", "--workdir=w") == f"{RESNET}:demo"
    assert _spec(f"--config={RESNET}", "--config.data_dir=/data") == f"{RESNET}:study"
    assert _spec("--config", RESNET, "--config.data_dir", "/data") == f"{RESNET}:study"
    # Named variants are used as named; predicting reads no dataset: the study's recipe.
    assert _spec(f"--config={RESNET}:demo", "--config.data_dir=/data") == f"{RESNET}:demo"
    assert _spec(f"--config={RESNET}", "--mode=predict") == f"{RESNET}:study"
    demo, study = recipe.get_config("demo"), recipe.get_config("study")
    assert (demo.crop_size, demo.num_epochs, demo.global_batch_size) == (96, 14, 24)
    assert (study.crop_size, study.num_epochs, study.global_batch_size) == (896, 10, 12)
    with pytest.raises(ConfigError, match=r"^--config=\.\.\.:full: unknown variant"):
        recipe.get_config("full")


def test_a_trained_workdir_brings_its_recipe(tmp_path):
    """eval/predict/section on a trained workdir run W/config.json's recipe, with or
    without --config; training there keeps the file the command line names."""
    record = _record(tmp_path / "w", num_epochs=3)
    wanted = f"{Path(recipe.__file__).absolute()}:{record}"
    for mode in ("eval", "predict", "section"):
        assert _spec(f"--workdir={tmp_path / 'w'}", f"--mode={mode}") == wanted
        assert _spec(f"--config={RESNET}", "--workdir", str(tmp_path / "w"), f"--mode={mode}") == (
            wanted
        )
    assert _spec(f"--config={RESNET}", f"--workdir={tmp_path / 'w'}") == f"{RESNET}:demo"
    # No trained run there and no --config: nothing to complete (main says what is missing).
    argv = config_lib.complete_argv(["prog", f"--workdir={tmp_path / 'none'}", "--mode=eval"])
    assert not any(arg.startswith("--config") for arg in argv)


def test_recorded_recipe_fills_new_fields_drops_old_and_the_command_line_wins(tmp_path):
    """An older config.json (before stage_order, with the retired predict_dir/section
    fields) loads through the one loader; ``--config.X`` applies on top, as absl's
    config_flags applies it to a config file."""
    from absl import flags
    from ml_collections import config_flags

    record = _record(tmp_path / "w", num_epochs=3)
    old = json.loads(record.read_text())
    del old["stage_order"]
    old.update(predict_dir="/x", tta=True, section={"detector": "classical"})
    record.write_text(json.dumps(old))
    loaded = recipe.recorded(record)
    assert loaded.num_epochs == 3 and loaded.stage_order == "" and loaded.variant == "demo"
    assert "predict_dir" not in loaded and "section" not in loaded and "tta" not in loaded
    argv = ["prog", f"--workdir={tmp_path / 'w'}", "--mode=eval", "--config.eval_split=validation"]
    argv = config_lib.complete_argv(argv)
    fv = flags.FlagValues()  # config_flags reads the overrides from sys_argv (sys.argv in main)
    config_flags.DEFINE_config_file("config", None, "", fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "", flag_values=fv)
    flags.DEFINE_string("mode", "train", "", flag_values=fv)
    fv(argv)
    assert fv.config.eval_split == "validation" and fv.config.num_epochs == 3
    assert fv.config.crop_size == 96  # the run's own, not the study's


def test_unknown_override_is_refused_before_parsing():
    config_lib.check_overrides(
        ["prog", f"--config={RESNET}", "--config.augment.flip=False", "--noconfig.remat"]
    )
    with pytest.raises(
        ConfigError,
        match=r"^--config\.num_epoch: no such config field; "
        r"did you mean 'num_epochs'\?$",
    ):
        config_lib.check_overrides(["prog", f"--config={RESNET}:study", "--config.num_epoch=2"])
    with pytest.raises(ConfigError, match=r"^--config\.simulated\.crop_size: no such config"):
        config_lib.check_overrides(["prog", f"--config={RESNET}", "--config.simulated.crop_size=8"])
    with pytest.raises(
        ConfigError, match=r"^--config\.predict_dir: no longer a config field.*--images"
    ):
        config_lib.check_overrides(["prog", f"--config={RESNET}", "--config.predict_dir=/x"])


def test_demo_run_does_what_the_command_line_says(tmp_path):
    """``--config.num_epochs=1`` on the simulated demo (no data_dir, no variant): the
    demo's sizes, but one epoch, in config.json and in what ran."""
    workdir = tmp_path / "w"
    overrides = {
        "num_epochs": 1,
        "model": "resnet18",
        "cache_dir": tmp_path / "cache",
        "simulated.num_images": 36,
        "eval_batch_size": 24,
    }
    res = run_main(workdir, overrides=overrides)
    assert res.returncode == 0, res.stderr[-3000:]
    ran = json.loads((workdir / "config.json").read_text())
    assert (ran["variant"], ran["num_epochs"], ran["crop_size"], ran["global_batch_size"]) == (
        "demo",
        1,
        96,
        24,
    )
    epochs = [
        r["train/epoch"]
        for r in map(json.loads, (workdir / "metrics.jsonl").open())
        if "train/epoch" in r
    ]
    assert epochs and max(epochs) == 1.0
    assert json.loads((workdir / "eval_test" / "metrics.json").read_text())["num_examples"] > 0


def test_old_workdir_without_newer_fields_still_resumes(tmp_path):
    """A config.json written before stage_order, device_memory_gb (and variant) existed,
    holding fields that have since left the recipe: the missing fields count as the
    defaults, the retired ones are dropped, so the run resumes; a field it does have
    still has to match."""
    from stagejax.runtime import workdir as workdir_lib

    config = _config("resnet", "study", data_dir=str(tmp_path / "data"))
    old = json.loads(config.to_json())
    for field in ("stage_order", "device_memory_gb", "variant"):
        del old[field]
    old.update(predict_dir="", strict=False, overwrite=False, section={"seed": 1000})
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "config.json").write_text(json.dumps(old))
    workdir_lib.prepare_workdir(tmp_path / "w", config, write=False)
    recorded = json.loads(workdir_lib.load_run_config(tmp_path / "w").to_json())
    assert workdir_lib.config_differences(recorded, json.loads(config.to_json())) == []
    # Given on this command line and absent there: compared with the default, not skipped.
    changed = _config("resnet", "study", data_dir=str(tmp_path / "data"), stage_order="a,b")
    assert workdir_lib.config_differences(recorded, json.loads(changed.to_json())) == [
        "stage_order"
    ]
    old["model"] = "resnet18"
    (tmp_path / "w" / "config.json").write_text(json.dumps(old))
    with pytest.raises(WorkdirError, match=r"model: 'resnet18' there, 'resnet50' now"):
        workdir_lib.prepare_workdir(tmp_path / "w", config, write=False)


def test_a_missing_config_file_is_one_line(tmp_path):
    res = run_cli("stagejax.main", "--config=configs/nope.py", f"--workdir={tmp_path / 'w'}")
    line = error_line(res)
    assert "--config: configs/nope.py: no such config file" in line


def test_shipped_configs_work_from_any_directory(tmp_path):
    """An absolute --config from outside the checkout (configs/*.py import the recipe
    from the package); there, section mode on a workdir without a model names that first."""
    paths = [str(REPO / "configs" / f"{n}.py") for n in CONFIGS]
    code = "import runpy, sys; [runpy.run_path(p)['get_config']('demo') for p in sys.argv[1:]]"
    res = subprocess.run([sys.executable, "-c", code, *paths], cwd=tmp_path, capture_output=True)
    assert res.returncode == 0, res.stderr[-3000:]
    w = tmp_path / "w"
    args = (f"--config={paths[0]}", f"--workdir={w}", "--mode=section")
    line = error_line(run_cli("stagejax.main", *args, cwd=tmp_path, env={"PYTHONPATH": None}))
    assert line.startswith(f"error: no trained model in {w}"), line
