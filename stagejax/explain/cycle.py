"""Does the network's feature space reproduce the 12-stage cycle?

The stages are not 12 unrelated classes: the epithelium moves I -> II -> ...
-> XII -> I with small graded changes.  The study showed a t-SNE map of the
penultimate features in which the stages line up along this cycle.  A map
alone is easy to over-read, so besides the PCA and t-SNE pictures this module
scores the ordering with numbers that also work in the full feature space:

* ``score`` (circular rank correlation, 1 = perfect cycle).  Stage centroids
  are projected on their own two main principal axes and sorted by angle
  around their mean.  With r_k the angular rank and j_k the cycle position of
  stage k (among the n stages present), the score is
  ``max(|mean exp(i*2pi*(r_k - j_k)/n)|, |mean exp(i*2pi*(r_k + j_k)/n)|)``:
  1.0 exactly when going round the centroids visits the stages in cycle order
  (either direction, any starting stage); swapping two neighbouring stages of
  12 costs only ~0.02, so the score degrades gracefully.
* ``neighbour_fraction``: fraction of stages whose nearest other centroid
  (Euclidean, in the given space, no projection) is one of its two
  neighbours in the cycle (XII's neighbours are XI and I).

Both come with a permutation baseline (labels shuffled over the images, the
same statistic recomputed) so that, e.g., 0.9 can be read against the value
random stage labels give on the same features.

CLI: ``python -m stagejax.explain cycle --workdir W [--split test]`` reads
``W/eval_<split>/features.npy`` and ``predictions.csv`` (written by the
evaluation) and writes ``W/explain/cycle/{cycle.json,cycle_pca.png,cycle_tsne.png}``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stagejax.errors import ConfigError, DatasetError
from stagejax.explain import cycle_plots
from stagejax.stages import NUM_STAGES, STAGES, names_by_rank, parse_stage, stage_ranks

# --------------------------------------------------------------------------
# Score


def _centroids(features: np.ndarray, labels: np.ndarray, stages: np.ndarray) -> np.ndarray:
    onehot = (labels[None, :] == stages[:, None]).astype(np.float64)
    return (onehot @ features) / onehot.sum(axis=1, keepdims=True)


def _angular_ranks(centroids: np.ndarray) -> np.ndarray:
    """Rank (0..n-1) of each centroid's angle in the plane of its two main axes."""
    centred = centroids - centroids.mean(axis=0)
    if centred.shape[1] > 2:
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        centred = centred @ vt[:2].T
    angles = np.arctan2(centred[:, 1], centred[:, 0])
    ranks = np.empty(len(angles), np.int64)
    ranks[np.argsort(angles, kind="stable")] = np.arange(len(angles))
    return ranks


def _rank_correlation(ranks: np.ndarray) -> tuple[float, int]:
    """Circular rank correlation of angular ranks with cycle positions 0..n-1."""
    n = len(ranks)
    pos = np.arange(n)
    forward = abs(np.exp(2j * np.pi * (ranks - pos) / n).mean())
    backward = abs(np.exp(2j * np.pi * (ranks + pos) / n).mean())
    return (float(forward), 1) if forward >= backward else (float(backward), -1)


def _neighbour_fraction(centroids: np.ndarray) -> float:
    n = len(centroids)
    dist = np.linalg.norm(centroids[:, None] - centroids[None, :], axis=-1)
    np.fill_diagonal(dist, np.inf)
    nearest = dist.argmin(axis=1)
    step = np.abs(nearest - np.arange(n))
    return float(np.mean(np.minimum(step, n - step) == 1))


def _statistics(features: np.ndarray, labels: np.ndarray, stages: np.ndarray):
    centroids = _centroids(features, labels, stages)
    ranks = _angular_ranks(centroids)
    score, direction = _rank_correlation(ranks)
    return score, direction, ranks, _neighbour_fraction(centroids)


def cycle_score(
    features: np.ndarray,
    labels: np.ndarray,
    num_permutations: int = 200,
    seed: int = 0,
    stage_names: Sequence[str] = STAGES,
) -> dict:
    """How well stage centroids of ``features`` [N,D] follow the cycle I..XII -> I.

    Args:
      features: one row per image, any dimension D >= 2 (raw features, PCA or t-SNE).
      labels: cycle position 0..11 (0 = stage I) per row, not a class id; at
        least 3 different stages present.
      num_permutations: label shuffles for the random-labelling baseline.
      stage_names: the name shown for each cycle position (the dataset's own).

    Returns a dict with ``score`` (circular rank correlation, 1 = perfect
    cyclic order) and ``random_mean``/``random_std``/``p_value`` from shuffled
    labels; ``neighbour_fraction`` with its own ``neighbour_random_mean``/
    ``neighbour_random_std``/``neighbour_p_value``; ``angular_order`` (stage
    names going round the centroids from I, in the direction that fits best);
    ``stages`` present and ``num_images``.
    """
    features = np.asarray(features, np.float64)
    labels = np.asarray(labels).astype(np.int64)
    stages = _check_inputs(features, labels)
    score, direction, ranks, neighbour = _statistics(features, labels, stages)
    rng = np.random.default_rng(seed)
    null = np.empty((num_permutations, 2))  # columns: score, neighbour_fraction
    for i in range(num_permutations):
        shuffled = _statistics(features, rng.permutation(labels), stages)
        null[i] = shuffled[0], shuffled[3]
    order = _angular_order(ranks, direction)
    mean, std, p = _baseline(score, null[:, 0])
    n_mean, n_std, n_p = _baseline(neighbour, null[:, 1])
    return {
        "score": score,
        "random_mean": mean,
        "random_std": std,
        "p_value": p,
        "neighbour_fraction": neighbour,
        "neighbour_random_mean": n_mean,
        "neighbour_random_std": n_std,
        "neighbour_p_value": n_p,
        "angular_order": [stage_names[stages[k]] for k in order],
        "stages": [stage_names[s] for s in stages],
        "num_images": int(features.shape[0]),
        "num_permutations": int(num_permutations),
    }


def _check_inputs(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The stages present; ``ValueError`` for inputs no cycle can be scored on."""
    if features.ndim != 2 or features.shape[1] < 2:
        raise ValueError(f"features: expected [N, D>=2], got shape {features.shape}")
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels: expected shape ({features.shape[0]},), got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_STAGES):
        raise ValueError(f"labels: stage indices must be in 0..{NUM_STAGES - 1}")
    if not np.all(np.isfinite(features)):
        raise ValueError("features: contain NaN or inf")
    stages = np.unique(labels)
    if len(stages) < 3:
        raise ValueError(f"labels: need at least 3 different stages for a cycle, got {len(stages)}")

    return stages


def _angular_order(ranks: np.ndarray, direction: int) -> np.ndarray:
    """Indices of the stages present, going round the circle from stage I (or the
    first stage present) in the direction that fits the cycle best."""
    order = np.argsort(ranks)
    order = np.roll(order, -int(np.flatnonzero(order == 0)[0]))
    if direction < 0:
        order = np.concatenate([order[:1], order[1:][::-1]])
    return order


def _baseline(observed: float, samples: np.ndarray) -> tuple:
    """mean, std and one-sided permutation p-value (None without permutations)."""
    if not len(samples):
        return None, None, None
    p = (1 + np.sum(samples >= observed - 1e-12)) / (1 + len(samples))
    return float(samples.mean()), float(samples.std()), float(p)


# --------------------------------------------------------------------------
# Embeddings and plots


def pca_2d(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First two principal components and their explained-variance ratios."""
    from sklearn.decomposition import PCA  # heavy: imported only for the analysis

    pca = PCA(n_components=2, random_state=0)
    return pca.fit_transform(features), pca.explained_variance_ratio_


def tsne_perplexity(num_points: int) -> float:
    """sklearn's default 30, lowered for small test sets (must stay below N)."""
    return float(np.clip((num_points - 1) / 3.0, 2.0, 30.0))


def tsne_2d(features: np.ndarray, seed: int = 0) -> np.ndarray:
    from sklearn.decomposition import PCA  # heavy: imported only for the analysis
    from sklearn.manifold import TSNE

    n, d = features.shape
    if d > 50 and n > 50:  # usual denoising / speed-up before t-SNE
        features = PCA(n_components=50, random_state=seed).fit_transform(features)
    tsne = TSNE(
        n_components=2,
        perplexity=tsne_perplexity(n),
        init="pca",
        learning_rate="auto",
        random_state=seed,
    )
    return tsne.fit_transform(features)


def read_stage_names(eval_dir: Path) -> tuple[dict[str, int] | None, list[str]]:
    """The dataset's stage names of an eval_<split> folder (from its metrics.json):
    name -> cycle position, and the name of each of the 12 positions. Without
    metrics.json (or names in it), None and I..XII: names are then parsed."""
    path = eval_dir / "metrics.json"
    if not path.is_file():
        return None, list(STAGES)
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise DatasetError(f"{path}: not valid JSON") from None
    names = meta.get("label_names")
    if not names:
        return None, list(STAGES)
    ranks = meta.get("stage_ranks") or stage_ranks(names, source=str(path))
    if len(ranks) != len(names):
        raise DatasetError(f"{path}: {len(ranks)} stage_ranks for {len(names)} label_names")
    return dict(zip(names, ranks, strict=True)), names_by_rank(names, ranks)


def read_eval_outputs(eval_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """features [N,D], true cycle positions [N] (0 = stage I) and file names from an
    eval_<split> folder."""
    features_path, csv_path = eval_dir / "features.npy", eval_dir / "predictions.csv"
    for path in (features_path, csv_path):
        if not path.is_file():
            raise DatasetError(f"{path}: missing (run the evaluation first)")
    features = np.load(features_path)
    if features.ndim != 2:
        raise DatasetError(f"{features_path}: expected a 2-D array, got shape {features.shape}")
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        if "true_stage" not in (reader.fieldnames or []):
            raise DatasetError(f"{csv_path}: no 'true_stage' column")
        rows = list(reader)
    rank_of, _ = read_stage_names(eval_dir)
    labels, names = [], []
    for line, row in enumerate(rows, start=2):
        stage = row["true_stage"].strip()
        rank = parse_stage(stage) if rank_of is None else rank_of.get(stage)
        if rank is None:
            raise DatasetError(f"{csv_path}: line {line}: unknown true_stage {stage!r}")
        labels.append(rank)
        names.append(row.get("file_name", ""))
    if len(labels) != features.shape[0]:
        raise DatasetError(
            f"{features_path}: {features.shape[0]} rows but {csv_path.name} has {len(labels)}"
        )
    files_txt = eval_dir / "features_files.txt"
    if files_txt.is_file() and rows and "file_name" in rows[0]:
        listed = [line.strip() for line in files_txt.read_text().splitlines() if line.strip()]
        if listed != names:
            raise DatasetError(f"{files_txt}: rows are not in predictions.csv order")
    return features, np.asarray(labels, np.int64), names


def analyse(
    workdir: str | Path,
    split: str = "test",
    out: str | Path | None = None,
    num_permutations: int = 200,
    seed: int = 0,
) -> Path:
    """Score and plot the stage cycle of a run's evaluation features (``eval_<split>/``);
    returns the path of ``cycle.json``."""
    if num_permutations < 1:
        raise ConfigError("--num_permutations: must be >= 1")
    workdir = Path(workdir)
    features, labels, _ = read_eval_outputs(workdir / f"eval_{split}")
    _, stage_names = read_stage_names(workdir / f"eval_{split}")
    out = Path(out) if out is not None else workdir / "explain" / "cycle"
    out.mkdir(parents=True, exist_ok=True)

    kw = dict(num_permutations=num_permutations, seed=seed, stage_names=stage_names)
    pca_points, pca_var = pca_2d(features)
    tsne_points = tsne_2d(features, seed=seed)
    spaces = {
        "features": cycle_score(features, labels, **kw),
        "pca": cycle_score(pca_points, labels, **kw),
        "tsne": cycle_score(tsne_points, labels, **kw),
    }
    n, d = features.shape
    _plot_spaces(
        out, split, features, labels, stage_names, spaces, pca_points, pca_var, tsne_points
    )
    result = {
        "split": split,
        "num_images": int(n),
        "feature_dim": int(d),
        "pca_explained_variance": [float(v) for v in pca_var],
        "tsne_perplexity": tsne_perplexity(n),
        "score_definition": (
            "score: circular rank correlation between the angular order of stage "
            "centroids (in the plane of their 2 main axes) and the cycle order I..XII->I, "
            "1 = perfect cycle; neighbour_fraction: share of stages whose nearest centroid "
            "is a cycle neighbour; random_*: same statistic with shuffled labels"
        ),
        "spaces": spaces,
    }
    json_path = out / "cycle.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    return json_path


def summary_line(json_path: Path) -> str:
    """One line for the terminal: the full feature space's score against chance."""
    s = json.loads(Path(json_path).read_text())["spaces"]["features"]
    return (
        f"cycle score (features) {s['score']:.3f}, random {s['random_mean']:.3f} ± "
        f"{s['random_std']:.3f}, p = {s['p_value']:.3g}; written to {json_path.parent}"
    )


def _plot_spaces(
    out: Path, split: str, features, labels, stage_names, spaces, pca_points, pca_var, tsne_points
) -> None:
    """cycle_pca.png and cycle_tsne.png, titled with their scores."""
    n, d = features.shape
    header = f"{split} split: {n} tubules, {d}-D penultimate features"
    legend = (
        "(cycle score 1 = stage centroids go round in the order "
        f"{', '.join(stage_names[:2])}, ..., {stage_names[-1]}, {stage_names[0]})"
    )
    cycle_plots.plot_embedding(
        out / "cycle_pca.png",
        pca_points,
        labels,
        f"PCA of network features, {header}\n"
        f"{cycle_plots.score_text('in the full feature space', spaces['features'])}\n"
        f"{cycle_plots.score_text('in this PCA plane', spaces['pca'])}\n{legend}",
        f"PC 1 ({pca_var[0]:.0%} of variance)",
        f"PC 2 ({pca_var[1]:.0%} of variance)",
        stage_names,
    )
    cycle_plots.plot_embedding(
        out / "cycle_tsne.png",
        tsne_points,
        labels,
        f"t-SNE of network features (perplexity {tsne_perplexity(n):.0f}), {header}\n"
        f"{cycle_plots.score_text('in this t-SNE map', spaces['tsne'])}\n{legend}",
        "t-SNE 1",
        "t-SNE 2",
        stage_names,
    )
