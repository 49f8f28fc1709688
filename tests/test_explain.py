"""Grad-CAM and cycle score on models and features whose answer is known."""

import csv
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stagejax.errors import ConfigError, DatasetError
from stagejax.explain import cycle as cycle_mod
from stagejax.explain import cycle_score, gradcam, gradcam_and_logits, overlay
from stagejax.explain.__main__ import run as cli_main
from stagejax.stages import NUM_STAGES, STAGES

SIZE = 32


class QuadrantNet(nnx.Module):
    """Stage 0 sees only the top-left quadrant, stage 1 only the bottom-right one.

    Grad-CAM weights whole channels (by their mean gradient), so *where* a map
    lights up comes from where the weighted channels fire.  The backbone makes
    that explicit: a conv (+ BatchNorm, Dropout, stride 2) whose non-negative
    output is copied into two channel groups, one zeroed outside the top-left
    quadrant, one outside the bottom-right.  embed is the global average pool
    of real models; classify gives stage 0 positive weights on the top-left
    group only, stage 1 on the bottom-right group only; stages 2..11 are
    constants.
    """

    def __init__(self, channels: int = 4):
        rngs = nnx.Rngs(0)
        self.conv = nnx.Conv(3, channels, (3, 3), strides=2, rngs=rngs)
        self.bn = nnx.BatchNorm(channels, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        kernel = np.zeros((2 * channels, NUM_STAGES), np.float32)
        kernel[:channels, 0] = 1.0 + np.arange(channels)
        kernel[channels:, 1] = 1.0 + np.arange(channels)[::-1]
        self.head = nnx.Linear(2 * channels, NUM_STAGES, rngs=rngs)
        self.head.kernel[...] = jnp.asarray(kernel)

    def backbone(self, x):
        f = nnx.relu(self.drop(self.bn(self.conv(x))))
        h, w = f.shape[1] // 2, f.shape[2] // 2
        rows, cols = jnp.arange(f.shape[1])[:, None], jnp.arange(f.shape[2])[None, :]
        top_left = ((rows < h) & (cols < w))[None, :, :, None]
        bottom_right = ((rows >= h) & (cols >= w))[None, :, :, None]
        return jnp.concatenate([f * top_left, f * bottom_right], axis=-1)

    def embed(self, fmap):
        return fmap.mean(axis=(1, 2))

    def classify(self, emb):
        return self.head(emb)

    def __call__(self, x):
        return self.classify(self.embed(self.backbone(x)))


def quadrant_means(heat):
    """Mean heat of the [top-left, top-right, bottom-left, bottom-right] quadrants."""
    h, w = heat.shape[-2] // 2, heat.shape[-1] // 2
    return np.array(
        [
            heat[..., :h, :w].mean(),
            heat[..., :h, w:].mean(),
            heat[..., h:, :w].mean(),
            heat[..., h:, w:].mean(),
        ]
    )


@pytest.fixture(scope="module")
def model():
    m = QuadrantNet()
    m.eval()
    return m


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(size=(4, SIZE, SIZE, 3)).astype(np.float32)


def test_gradcam_highlights_the_quadrant_the_logit_reads(model, images):
    heat = gradcam(model, images, target=np.zeros(4, np.int32))
    assert heat.shape == (4, SIZE, SIZE) and heat.dtype == np.float32
    assert heat.min() >= 0.0 and np.allclose(heat.max(axis=(1, 2)), 1.0)
    for h in heat:
        tl, tr, bl, br = quadrant_means(h)
        assert tl > 0.3 and tl > 10 * max(tr, bl, br)


def test_gradcam_of_target_vs_predicted_stage(model, images):
    bottom_right = gradcam(model, images, target=1)  # one int applies to every image
    tl, tr, bl, br = quadrant_means(bottom_right)
    assert br > 10 * max(tl, tr, bl)
    # Stage 2..11 logits are constants: no evidence anywhere.
    assert np.all(gradcam(model, images, target=np.full(4, 5)) == 0.0)
    # target=None explains the argmax stage of each image.
    heat, logits = gradcam_and_logits(model, images)
    predicted = logits.argmax(-1)
    assert set(predicted) <= {0, 1}
    np.testing.assert_allclose(heat, gradcam(model, images, target=predicted), atol=1e-6)
    np.testing.assert_allclose(logits, model(jnp.asarray(images)), rtol=1e-5, atol=1e-5)


def test_gradcam_batch_equals_one_by_one(model, images):
    batch = gradcam(model, images, target=np.array([0, 1, 0, 1]))
    for i, t in enumerate([0, 1, 0, 1]):
        np.testing.assert_allclose(
            batch[i], gradcam(model, images[i : i + 1], target=[t])[0], atol=1e-5
        )


def test_gradcam_uses_eval_mode_without_changing_the_callers_module(images):
    model = QuadrantNet()  # train mode: dropout and batch statistics would apply
    heat = gradcam(model, images, target=0)
    assert model.drop.deterministic is False and model.bn.use_running_average is False
    model.eval()
    np.testing.assert_allclose(heat, gradcam(model, images, target=0), atol=1e-6)


def test_gradcam_rejects_bad_input(model, images):
    with pytest.raises(ValueError, match="target"):
        gradcam(model, images, target=NUM_STAGES)
    with pytest.raises(ValueError, match="images"):
        gradcam(model, (images * 255).astype(np.uint8))


def test_overlay_blends_the_colormap():
    image = np.full((4, 6, 3), 100, np.uint8)
    heat = np.zeros((4, 6), np.float32)
    heat[0, 0] = 1.0
    out = overlay(image, heat, alpha=0.5)
    assert out.shape == (4, 6, 3) and out.dtype == np.uint8
    assert np.array_equal(overlay(image, heat, alpha=0.0), image)
    assert not np.array_equal(out[0, 0], out[1, 1])  # hot and cold pixels differ
    gray = overlay(image[..., 0], heat, alpha=0.5)  # grayscale input -> RGB
    assert np.array_equal(gray, out)
    with pytest.raises(ValueError, match="heatmap"):
        overlay(image, heat[:2])


# --------------------------------------------------------------------------
# Cycle score


def circle_features(per_stage=8, noise=0.15, dim=2, seed=0):
    """Images of stage k around angle 2*pi*k/12 on a unit circle (+ noise)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(NUM_STAGES), per_stage)
    angle = 2 * np.pi * labels / NUM_STAGES
    points = np.stack([np.cos(angle), np.sin(angle)], -1)
    if dim > 2:  # a random 2-D plane inside a higher-dimensional space
        basis, _ = np.linalg.qr(rng.normal(size=(dim, 2)))
        points = points @ basis.T
    return points + noise * rng.normal(size=points.shape), labels


def test_cycle_score_is_one_for_stages_on_a_circle():
    features, labels = circle_features()
    stats = cycle_score(features, labels, num_permutations=100)
    assert stats["score"] > 0.99 and stats["neighbour_fraction"] == 1.0
    assert stats["angular_order"] == list(STAGES)
    assert stats["random_mean"] < 0.6 and stats["p_value"] < 0.02
    assert stats["neighbour_random_mean"] < 0.4
    assert stats["score"] > stats["random_mean"] + 4 * stats["random_std"]


def test_cycle_score_in_64d_with_noise_and_reverse_direction():
    features, labels = circle_features(dim=64, noise=0.2)
    reversed_labels = (NUM_STAGES - labels) % NUM_STAGES  # clockwise, starting elsewhere
    for lab in (labels, reversed_labels):
        stats = cycle_score(features, lab, num_permutations=50)
        assert stats["score"] > 0.95 and stats["neighbour_fraction"] > 0.9
        assert stats["angular_order"] == list(STAGES)


def test_cycle_score_is_graded_and_missing_stages_are_allowed():
    features, labels = circle_features(noise=0.01)
    swapped = labels.copy()
    swapped[labels == 1], swapped[labels == 2] = 2, 1  # II and III exchanged
    stats = cycle_score(features, swapped, num_permutations=0)
    assert 0.9 < stats["score"] < 0.99 and stats["random_mean"] is None
    assert stats["angular_order"][:4] == ["I", "III", "II", "IV"]
    keep = labels % 2 == 0  # only I, III, V, ...
    stats = cycle_score(features[keep], labels[keep], num_permutations=0)
    assert stats["score"] > 0.99 and stats["stages"] == list(STAGES[::2])


def test_cycle_score_of_shuffled_labels_is_near_random():
    features, labels = circle_features(dim=64)
    shuffled = np.random.default_rng(1).permutation(labels)
    stats = cycle_score(features, shuffled, num_permutations=200)
    assert abs(stats["score"] - stats["random_mean"]) < 3 * stats["random_std"]
    assert stats["p_value"] > 0.01
    assert stats["score"] < 0.8


def test_cycle_score_rejects_bad_input():
    features, labels = circle_features()
    with pytest.raises(ValueError, match="3 different stages"):
        cycle_score(features[:16], labels[:16])
    with pytest.raises(ValueError, match="labels"):
        cycle_score(features, labels[:-1])


def write_fake_eval(workdir, split="test", dim=32, per_stage=5):
    eval_dir = workdir / f"eval_{split}"
    eval_dir.mkdir(parents=True)
    features, labels = circle_features(per_stage=per_stage, dim=dim, noise=0.2)
    np.save(eval_dir / "features.npy", features.astype(np.float32))
    names = [f"slide_{i}_{STAGES[s]}-{i}.tif" for i, s in enumerate(labels)]
    (eval_dir / "features_files.txt").write_text("\n".join(names) + "\n")
    with (eval_dir / "predictions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "true_stage", "pred_stage", *[f"prob_{s}" for s in STAGES]])
        for name, s in zip(names, labels, strict=True):
            writer.writerow([name, STAGES[s], STAGES[s], *np.eye(NUM_STAGES)[s]])
    return eval_dir


def test_cycle_cli_writes_json_and_plots(tmp_path):
    write_fake_eval(tmp_path)
    cli_main(["cycle", "--workdir", str(tmp_path), "--num_permutations", "30"])
    out = tmp_path / "explain" / "cycle"
    result = json.loads((out / "cycle.json").read_text())
    assert result["num_images"] == 60 and result["feature_dim"] == 32
    assert set(result["spaces"]) == {"features", "pca", "tsne"}
    assert result["spaces"]["features"]["score"] > 0.95
    assert result["spaces"]["pca"]["score"] > 0.9
    for name in ("cycle_pca.png", "cycle_tsne.png"):
        assert (out / name).stat().st_size > 20_000


def test_cycle_cli_reports_bad_eval_folder(tmp_path):
    eval_dir = write_fake_eval(tmp_path)
    text = (eval_dir / "predictions.csv").read_text().replace(",VII,", ",7b,", 1)
    (eval_dir / "predictions.csv").write_text(text)
    with pytest.raises(DatasetError, match="true_stage '7b'"):
        cycle_mod.read_eval_outputs(eval_dir)
    with pytest.raises(DatasetError, match="missing"):
        cli_main(["cycle", "--workdir", str(tmp_path), "--split", "validation"])


# --------------------------------------------------------------------------
# Grad-CAM CLI on a tiny trained-run folder (untrained ResNet-18 weights)


def make_run(tmp_path, image_size=40, crop_size=32, per_split=12):
    """A dataset in the study's layout and a workdir with config.json + best_model/."""
    from PIL import Image

    from stagejax import models
    from stagejax.model.saved import save_model_weights
    from stagejax.recipe import get_config

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "split_list").mkdir()
    (root / "label_list.txt").write_text("\n".join(STAGES) + "\n")
    rng = np.random.default_rng(0)
    for split in ("train", "validation", "test"):
        names = [f"{split}_{i}_{STAGES[i % NUM_STAGES]}-{i}.png" for i in range(per_split)]
        for name in names:
            pixels = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / name)
        (root / "split_list" / f"{split}.txt").write_text("\n".join(names) + "\n")

    config = get_config()
    config.model, config.data_dir, config.crop_size = "resnet18", str(root), crop_size
    config.cache_dir = str(tmp_path / "cache")
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json())
    save_model_weights(workdir / "best_model", models.create("resnet18"), "resnet18")
    return workdir, root


@pytest.mark.slow
def test_gradcam_cli_writes_pairs_and_stage_grids(tmp_path):
    workdir, root = make_run(tmp_path)
    cli_main(["gradcam", "--workdir", str(workdir), "--max_images", "5", "--batch_size", "4"])
    out = workdir / "explain" / "gradcam"
    pairs = sorted(p.name for p in out.glob("test_*.png"))
    assert pairs == [f"test_{i}_{STAGES[i]}-{i}.png" for i in range(5)]  # one per stage I..V
    grids = sorted(p.name for p in out.glob("grid_stage_*.png"))
    assert grids == sorted(f"grid_stage_{s}.png" for s in STAGES[:5])
    assert all((out / name).stat().st_size > 10_000 for name in pairs + grids)

    # A folder of images, explaining a chosen stage, into another folder.
    other = tmp_path / "folder_out"
    cli_main(
        [
            "gradcam",
            "--workdir",
            str(workdir),
            "--images",
            str(root / "images"),
            "--stage",
            "VII",
            "--max_images",
            "2",
            "--batch_size",
            "4",
            "--out",
            str(other),
        ]
    )
    assert len(list(other.glob("*.png"))) == 2 + 2  # two pairs, two stage grids
    with pytest.raises(ConfigError, match="--stage"):
        cli_main(["gradcam", "--workdir", str(workdir), "--stage", "XIII"])
