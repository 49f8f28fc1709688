"""Importing PyTorch weights: torchvision parity for every architecture, the study's
naming and pickles, error listings and the command line.

JAX forwards run eagerly for ResNets (their op shapes repeat, so compiled
kernels are reused across depths) and jitted for MobileNetV3 (about a hundred
distinct shapes, where one whole-model compile is cheaper) to keep CI short.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stagejax import convert, models
from stagejax.convert import ConversionError
from stagejax.errors import ConfigError
from stagejax.model.saved import load_model_weights
from tests.conftest import REPO, require_torch

torch, torchvision = require_torch()

X = np.random.default_rng(0).uniform(0.0, 1.0, (2, 3, 64, 64)).astype(np.float32)


def randomize(model: torch.nn.Module, x: np.ndarray = X) -> torch.nn.Module:
    """Random weights *and* BatchNorm statistics that keep activations O(1).

    Running statistics are set from a calibration batch (then perturbed), so
    eval-mode activations neither explode nor vanish across 150 layers, and
    each residual branch's last BatchNorm is scaled down (as torchvision's
    zero_init_residual does, less strictly) so deep ResNets' logits stay O(1)
    and an absolute tolerance of 1e-4 is meaningful.
    """
    gen = torch.Generator().manual_seed(0)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, m.in_features**-0.5, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)
        first_block = getattr(model, "layer1", [None])[0]
        basic = isinstance(first_block, torchvision.models.resnet.BasicBlock)
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.2, 0.6, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)
                if name.endswith("bn2" if basic else "bn3"):
                    m.weight.mul_(0.2)
        momenta = [bn.momentum for bn in bns]
        for bn in bns:
            bn.momentum = None  # cumulative average: running stats = calibration batch stats
        model.train()
        model(torch.from_numpy(x).flip(0) * 2.0)
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
            noise = torch.randn(bn.running_mean.shape, generator=gen)
            bn.running_mean.add_(0.1 * noise * bn.running_var.sqrt())
            bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.7, 1.3, generator=gen))
    return model.eval()


@functools.lru_cache(maxsize=2)
def torch_model(name: str) -> torch.nn.Module:
    """A randomised torchvision model in eval mode (callers must not change it)."""
    torch.manual_seed(0)
    return randomize(getattr(torchvision.models, name)(num_classes=12))


def numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def torch_logits(model: torch.nn.Module, x: np.ndarray = X) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def jax_logits(model: nnx.Module, x: np.ndarray = X) -> np.ndarray:
    x = jnp.asarray(x.transpose(0, 2, 3, 1))
    if isinstance(model, models.mobilenet.MobileNetV3):
        return np.asarray(nnx.jit(lambda m, v: m(v))(model, x))
    return np.asarray(model(x))


def assert_logits_equal(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    assert np.abs(ref).max() > 0.1  # the weights make a difference
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", models.NAMES)
def test_torchvision_weights_give_the_same_logits_and_batch_statistics(name):
    reference = torch_model(name)
    model = convert.convert_state_dict(numpy_state(reference), name)
    # Same weights, same order as the torch state_dict (batch counters aside).
    assert convert.torch_names(model) == [
        k for k in reference.state_dict() if not k.endswith("num_batches_tracked")
    ]
    assert (model.num_classes, model.in_channels) == (12, 3)  # inferred from the weights
    assert_logits_equal(jax_logits(model), torch_logits(reference))

    # One train-mode step updates every running statistic as torch does.
    reference = copy.deepcopy(reference).train()
    model.train()
    torch_logits(reference)
    jax_logits(model)
    expected = reference.state_dict()
    stats = nnx.to_flat_state(nnx.state(model, nnx.BatchStat))
    assert len(stats) == sum(1 for k in expected if k.endswith(("running_mean", "running_var")))
    for path, var in stats:
        ref = expected[convert.torch_name(path)].numpy()
        np.testing.assert_allclose(
            var[...],
            ref,
            rtol=1e-4,
            atol=1e-5 * max(1.0, np.abs(ref).max()),
            err_msg=convert.torch_name(path),
        )


def test_gray_input_and_class_count_are_inferred():
    reference = torchvision.models.resnet18(num_classes=5)
    reference.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    gray = X[:, :1]
    reference = randomize(reference, gray)
    model = convert.convert_state_dict(numpy_state(reference), "resnet18")
    assert (model.num_classes, model.in_channels) == (5, 1)
    assert_logits_equal(jax_logits(model, gray), torch_logits(reference, gray))


def study_state(reference: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The study's ResNet-50 names: ``identity_downsample`` for torchvision's ``downsample``."""
    return {
        k.replace(".downsample.", ".identity_downsample."): v
        for k, v in reference.state_dict().items()
    }


def test_study_naming_imports_for_resnet50(tmp_path):
    reference = torch_model("resnet50")
    path = tmp_path / "study.pth"
    torch.save(study_state(reference), path)
    state = convert.load_torch_state_dict(path)
    assert any("identity_downsample" in k for k in state)
    model = convert.convert_state_dict(state, "resnet50")
    assert_logits_equal(jax_logits(model), torch_logits(reference))


STUDY_MODULE = """
import torch


class Block(torch.nn.Module):
    def __init__(self, tv_block):
        super().__init__()
        for name in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"):
            setattr(self, name, getattr(tv_block, name))
        self.identity_downsample = tv_block.downsample


class ResNet(torch.nn.Module):
    def __init__(self, tv):
        super().__init__()
        self.conv1, self.bn1, self.fc = tv.conv1, tv.bn1, tv.fc
        for i in range(1, 5):
            layer = getattr(tv, f"layer{i}")
            setattr(self, f"layer{i}", torch.nn.Sequential(*[Block(b) for b in layer]))
"""


def test_pickled_module_is_refused_unless_trusted(tmp_path, monkeypatch):
    """The study saves whole modules of its own classes, which are not importable here."""
    reference = torch_model("resnet50")
    (tmp_path / "study_net.py").write_text(textwrap.dedent(STUDY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    import study_net

    path = tmp_path / "best_model.pth"
    torch.save(study_net.ResNet(reference), path)
    monkeypatch.delitem(sys.modules, "study_net")
    (tmp_path / "study_net.py").unlink()  # as on a machine without the study's code

    with pytest.raises(ConversionError) as err:
        convert.load_torch_state_dict(path)
    message = str(err.value)
    assert "\n" not in message and "execute" in message and "--trust_pickle" in message

    with pytest.warns(UserWarning) as caught:
        state = convert.load_torch_state_dict(path, trust_pickle=True)
    warned = " ".join(str(w.message) for w in caught)
    assert "weights_only=False" in warned and "study_net.ResNet" in warned
    model = convert.convert_state_dict(state, "resnet50")
    assert_logits_equal(jax_logits(model), torch_logits(reference))


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return numpy_state(torchvision.models.resnet18(num_classes=12))


def test_wrong_architecture_is_listed_and_the_right_one_named(resnet18_state):
    with pytest.raises(ConversionError) as err:
        convert.convert_state_dict(resnet18_state, "resnet34")
    message = str(err.value)
    assert message.startswith("resnet34: missing keys [layer1.2.conv1.weight, layer1.2.bn1.")
    assert "more)]" in message and "unexpected" not in message
    assert message.endswith("; the file matches --arch resnet18") and "\n" not in message

    with pytest.raises(
        ConversionError,
        match=r"^mobilenet_v3_small: missing keys \[.*; "
        r"unexpected keys \[conv1.weight, bn1.weight, ",
    ):
        convert.convert_state_dict(resnet18_state, "mobilenet_v3_small")


def test_missing_extra_and_misshapen_keys_are_listed(resnet18_state):
    state = dict(resnet18_state)
    del state["fc.bias"]
    state["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as err:
        convert.convert_state_dict(state, "resnet18")
    assert str(err.value) == "resnet18: missing keys [fc.bias]; unexpected keys [extra.weight]"

    state = {**resnet18_state, "layer1.0.conv1.weight": np.zeros((64, 64, 1, 1), np.float32)}
    with pytest.raises(ConversionError) as err:
        convert.convert_state_dict(state, "resnet18")
    assert str(err.value) == (
        "resnet18: shape mismatches [layer1.0.conv1.weight: file (64, 64, 1, 1) vs model "
        "(64, 64, 3, 3)]"
    )

    # Only the classifier differs: the message says how to replace or keep it.
    with pytest.raises(ConversionError) as err:
        convert.convert_state_dict(resnet18_state, "resnet18", num_classes=10)
    assert str(err.value) == (
        "resnet18: the file's final classifier has 12 outputs, not --num_classes 10 "
        "(fc.weight: file (12, 512) vs model (10, 512)); pass --new_head to replace it with a "
        "freshly initialised 10-class layer (to fine-tune, e.g. from ImageNet weights), "
        "or --num_classes 12 to keep it"
    )


def test_unreadable_files_and_missing_torch(tmp_path, monkeypatch):
    with pytest.raises(ConversionError, match="no such file"):
        convert.load_torch_state_dict(tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="junk.pth: not a readable torch file"):
        convert.load_torch_state_dict(tmp_path / "junk.pth")
    torch.save({"epoch": 3, "lr": torch.tensor(0.1), "note": "x"}, tmp_path / "other.pth")
    with pytest.raises(ConversionError, match="expected a state_dict"):
        convert.load_torch_state_dict(tmp_path / "other.pth")

    monkeypatch.setitem(sys.modules, "torch", None)  # as if the extra were not installed
    with pytest.raises(ConversionError, match=r"pip install 'stagejax\[baseline\]'"):
        convert.load_torch_state_dict(tmp_path / "junk.pth")


def test_convert_file_end_to_end(tmp_path):
    """What the command line runs, in-process (a second interpreter importing jax and
    torch would double this test's time; the command line itself is tested below)."""
    reference = torch_model("mobilenet_v3_small")  # seeded: O(1) logits, see randomize
    src = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 10, "state_dict": reference.state_dict()}, src)  # wrapped state_dict
    out = tmp_path / "imported"
    assert convert.convert_file(src, "mobilenet_v3_small", out) == out
    assert json.loads((out / "model.json").read_text()) == {
        "arch": "mobilenet_v3_small",
        "num_classes": 12,
        "in_channels": 3,
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth", "imported"]

    model = load_model_weights(out)
    assert type(model).__name__ == "MobileNetV3" and model.num_classes == 12
    assert_logits_equal(jax_logits(model), torch_logits(reference))

    # Errors name the flag or the file, on one line.
    with pytest.raises(ConfigError) as info:
        convert.convert_file(src, "mobilenet_v3_small", out)
    assert str(info.value) == f"--out: {out} is not empty; name a new or empty folder"
    torch.save(reference, tmp_path / "whole.pth")
    with pytest.raises(ConversionError) as info:
        convert.convert_file(tmp_path / "whole.pth", "mobilenet_v3_small", tmp_path / "other")
    assert "--trust_pickle" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "other").exists()


def test_new_head_keeps_the_backbone_and_starts_a_12_stage_classifier():
    """ImageNet-style 1000-class weights fine-tune into 12 stages with --new_head."""
    torch.manual_seed(1)
    reference = randomize(torchvision.models.resnet18(num_classes=1000))
    state = numpy_state(reference)
    with pytest.raises(ConversionError, match=r"fc\.weight: file \(1000, 512\)"):
        convert.convert_state_dict(state, "resnet18", num_classes=12)

    model = convert.convert_state_dict(state, "resnet18", new_head=True)
    assert model.num_classes == 12 and model.fc.kernel.shape == (512, 12)
    assert float(jnp.abs(model.fc.kernel[...]).max()) > 0  # initialised, not left at zero
    x = jnp.asarray(X.transpose(0, 2, 3, 1))
    reference.fc = torch.nn.Identity()  # the backbone's embedding, before any head
    np.testing.assert_allclose(
        model.embed(model.backbone(x)), torch_logits(reference), rtol=0, atol=1e-4
    )


def _convert_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stagejax.convert", *args],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_error_line(res: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), res.stderr[-3000:]
    assert sum(ln.startswith("error:") for ln in lines) == 1, res.stderr[-3000:]
    return lines[-1]


def test_command_line_refuses_another_head_and_an_existing_out(tmp_path):
    """``python -m stagejax.convert`` as a user runs it: a plain 1000-class torchvision
    state_dict needs --new_head; --out must be new or empty."""
    torch.manual_seed(0)
    src = tmp_path / "resnet18_imagenet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), src)
    out = tmp_path / "model"
    line = _one_error_line(
        _convert_cli("--from", str(src), "--arch", "resnet18", "--out", str(out))
    )
    assert "final classifier has 1000 outputs, not --num_classes 12" in line, line
    assert "pass --new_head" in line and not out.exists()

    out.write_text("my notes\n")
    line = _one_error_line(
        _convert_cli("--from", str(src), "--arch", "resnet18", "--new_head", "--out", str(out))
    )
    assert line == f"error: --out: {out} exists and is not a folder"
    assert out.read_text() == "my notes\n"

    # Flags: a missing one (this command's check) and an unknown one (absl's).
    line = _one_error_line(_convert_cli("--from", str(src)))
    assert "--arch, --out required; usage: python -m stagejax.convert" in line, line
    line = _one_error_line(_convert_cli("--from", str(src), "--arch", "resnet18", "--bogus"))
    assert "bogus" in line, line

    model = tmp_path / "model_dir"
    res = _convert_cli("--from", str(src), "--arch", "resnet18", "--new_head", "--out", str(model))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith(f"wrote {model} (resnet18, 12 classes)"), res.stdout
    assert json.loads((model / "model.json").read_text())["num_classes"] == 12
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
