"""Every config value is checked before any data is read or anything compiled.

Unit tests of `stagejax.config.validate`, then the command line: a bad value is
exit status 2 and one ``error:`` line naming the field, no traceback, and
neither the workdir nor the dataset cache is touched.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import ml_collections
import pytest

from stagejax import config as config_lib
from stagejax.errors import ConfigError
from tests.conftest import REPO
from tests.test_reliability import _error_line, _run

sys.path.insert(0, str(REPO))
CONFIGS = ["default", "resnet", "resnext", "wide_resnet", "mobilenet"]


def _config(name: str = "resnet", **overrides) -> ml_collections.ConfigDict:
    config = importlib.import_module(f"configs.{name}").get_config()
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
    config_lib.validate(_config(name, data_dir="/data"), num_devices=4)


BAD = [  # (field as ConfigDict path with __, value, text the message must contain)
    ("model", "resnet", "one of resnet18,"),
    ("optimizer", "lamb", "one of adam, adamw, sgd"),
    ("schedule", "linear", "one of constant, cosine"),
    ("precision", "float16", "one of float32, bfloat16"),
    ("parallelism", "pjit", "one of jit, pmap"),
    ("eval_split", "val", "one of train, validation, test"),
    ("global_batch_size", 0, ">= 12"),
    ("global_batch_size", 6, ">= 12 (every batch holds every stage)"),
    ("simulated__global_batch_size", 11, ">= 12"),
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
    ("simulated__image_size", 64, ">= config.simulated.crop_size (96)"),
    ("simulated__crop_size", 12, ">= 16"),
    ("simulated__num_epochs", 0, ">= 1"),
]


@pytest.mark.parametrize("field,value,must", BAD, ids=[f"{f}={v}" for f, v, _ in BAD])
def test_bad_value_is_refused_naming_the_field(field, value, must):
    with pytest.raises(ConfigError) as err:
        config_lib.validate(_config(**{field: value}), num_devices=1)
    message = str(err.value)
    assert message.startswith(f"config.{field.replace('__', '.')}: {value!r}; must be "), message
    assert must in message and "\n" not in message, message


def test_batch_sizes_must_divide_by_the_devices():
    # Simulated data (no data_dir): the simulated block's batch (24) is the one used,
    # the top-level one (12) is not.
    config_lib.validate(_config(eval_batch_size=8), num_devices=8)
    with pytest.raises(ConfigError, match=r"^config\.simulated\.global_batch_size: 24; must be "
                                          r"a multiple of the 16 devices"):
        config_lib.validate(_config(eval_batch_size=16), num_devices=16)
    with pytest.raises(ConfigError, match=r"^config\.global_batch_size: 12; .*of the 8 devices"):
        config_lib.validate(_config(data_dir="/data", eval_batch_size=8), num_devices=8)
    with pytest.raises(ConfigError, match=r"^config\.eval_batch_size: 12; .*of the 8 devices"):
        config_lib.validate(_config(data_dir="/data", global_batch_size=16), num_devices=8)
    config_lib.validate(_config(data_dir="/data", global_batch_size=16, eval_batch_size=8),
                        num_devices=8)


def test_absent_fields_are_skipped():
    """Older configs (a run's config.json) and fields others add still validate."""
    config = ml_collections.ConfigDict({"model": "resnet18", "learning_rate": 0.1,
                                        "augment": {"rot90": True}})
    config_lib.validate(config, num_devices=1)
    config.learning_rate = -0.1
    with pytest.raises(ConfigError, match="config.learning_rate"):
        config_lib.validate(config, num_devices=1)


def _model_dir(path: Path, arch: str = "resnet18", num_classes: int = 12,
               in_channels: int = 3) -> Path:
    """What validate reads of a model directory: its model.json."""
    path.mkdir()
    (path / "model.json").write_text(json.dumps(
        {"arch": arch, "num_classes": num_classes, "in_channels": in_channels}))
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

    with pytest.raises(ConfigError, match=r"holds a resnet18 .* but config.model is 'resnet50'; "
                                          r"pass --config.model=resnet18"):
        config_lib.validate(_config(init_from=str(ok)), num_devices=1)
    with pytest.raises(ConfigError, match=r"3 input channel\(s\), but config.grayscale is True"):
        config_lib.validate(_config(model="resnet18", grayscale=True, init_from=str(ok)),
                            num_devices=1)
    gray = _model_dir(tmp_path / "gray", in_channels=1)
    config_lib.validate(_config(model="resnet18", grayscale=True, init_from=str(gray)),
                        num_devices=1)
    with pytest.raises(ConfigError, match="config.init_from: .*absent: no such model directory"):
        config_lib.validate(_config(init_from=str(tmp_path / "absent")), num_devices=1)


@pytest.mark.parametrize("flag,field", [
    ("--config.global_batch_size=0", "config.global_batch_size: 0"),
    ("--config.learning_rate=-1", "config.learning_rate: -1.0"),
    ("--config.model=resnet", "config.model: 'resnet'"),
])
def test_bad_value_on_the_command_line(flag, field, tmp_path):
    """Checked before the data: the data folder does not even exist here, and the
    error is about the field, not the folder."""
    workdir = tmp_path / "workdir"
    overrides = {"data_dir": str(tmp_path / "no_such_data"), "cache_dir": str(tmp_path / "c"),
                 "model": "resnet18", "crop_size": 32}
    res = _run(workdir, overrides, flag)
    line = _error_line(res)
    assert res.returncode == 2 and line.startswith(f"error: {field}; must be "), line
    assert not workdir.exists() and not (tmp_path / "c").exists()


def test_init_from_with_another_head_on_the_command_line(tmp_path):
    model = _model_dir(tmp_path / "imagenet_r18", num_classes=1000)
    overrides = {"cache_dir": str(tmp_path / "c"), "model": "resnet18", "init_from": model}
    res = _run(tmp_path / "workdir", overrides)
    line = _error_line(res)
    assert res.returncode == 2 and "1000 classes" in line and "--new_head" in line, line
    assert "training resnet18" not in res.stderr and not (tmp_path / "c").exists()
