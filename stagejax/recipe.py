"""The training recipe: every config's fields and defaults, in two variants,
``study`` and ``demo``. The model configs (configs/*.py) start from it, and a
run's recorded config.json is read back through it (`stagejax.config.load_recorded`),
so a field added later has its default there too.

Only what training needs is here: what a mode acts on (the folder to predict,
the slides, TTA, strict, overwrite) is a flag of that mode (stagejax/main.py).

``study`` (``--config=configs/resnet.py:study``): the study's recipe on real
data (Tokuoka et al. 2025, reference-recipe.md): Adam lr 1e-3 with an L2 term
of 5e-4 added to the gradient (PyTorch's Adam), 12 stages x 1 image per batch,
896 px crops shifted by up to +/-128 px, 90-degree rotations and flips,
per-image min-max, 10 epochs, seed 109, best epoch by validation balanced
accuracy.

``demo`` (``--config=configs/resnet.py:demo``): the same recipe at the size
of the simulated dataset that is generated when ``data_dir`` is empty (480
images of 112 px, hand-cut like the study's): 96 px crops shifted by up to
+/-8 px, batches of 24, 14 epochs with one warm-up epoch and a cosine decay,
stain jitter, brightness and contrast augmentation (chosen by measurement), so
that the README's command finishes in under 10 minutes on a 2-core CPU.

The rule (`stagejax.config`):

* a field given on the command line always wins, and ``W/config.json``
  records exactly the config that ran;
* the variant is the one named after the colon; with none named,
  ``python -m stagejax.main`` picks ``demo`` when no ``--config.data_dir`` is
  given, ``study`` otherwise (`stagejax.config.complete_argv`);
* eval, predict and section on a trained workdir need no ``--config``: the
  recipe is the run's own W/config.json.

``get_config()`` without an argument is ``study``.
"""

import json
from pathlib import Path

import ml_collections

from stagejax.errors import ConfigError, WorkdirError

VARIANTS = ("study", "demo")
RECORD = "config.json"  # what a run in W records: W/config.json


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """The ``variant`` (one of ``VARIANTS``; None: ``study``) of the shared defaults.

    ``variant`` may instead be the path of a run's ``config.json``: that run's recipe
    (`recorded`). Why here: ``--config=stagejax/recipe.py:W/config.json`` is how
    eval, predict and section read a trained workdir's recipe with the command
    line's ``--config.X`` applied, exactly as for a config file.
    """
    if variant and variant.endswith(".json"):
        return recorded(variant)
    variant = variant or "study"
    if variant not in VARIANTS:
        raise ConfigError(
            f"--config=...:{variant}: unknown variant; choose one of {', '.join(VARIANTS)}"
        )
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.model = "resnet50"
    c.num_classes = 12
    c.grayscale = False  # The study's option: train on gray images.

    # Data. An empty data_dir means: use the simulated dataset.
    c.data_dir = ""
    c.cache_dir = "~/.cache/stagejax"
    c.crop_size = 896
    c.crop_range = 128
    c.num_workers = 0  # Grain worker processes per host (0: in the main process).
    # Keep the decoded training split on every device as uint8 and cut each batch's
    # crops inside the train step (the same batches as the Grain loader, without
    # decoding per step): auto (when it fits in data_on_device_fraction of one
    # device's memory) | true (stop before training if it does not) | false.
    c.data_on_device = "auto"
    c.data_on_device_fraction = 0.4
    c.eval_batch_size = 12  # Global; padded at the end of the split.
    c.eval_split = "test"
    # Only for label_list.txt names that are not stage names (I..XII, 1..12): those
    # names in biological order, stage I first, comma-separated.
    c.stage_order = ""
    # Micrometres per pixel of the training images. 0: the simulated dataset's (known);
    # for real data set it (the study's images: about 0.217, an estimate). Recorded in
    # W/best_model/model.json; --mode=section resamples every tubule to it.
    c.mpp = 0.0

    # The simulated dataset, generated into cache_dir when data_dir is empty.
    c.simulated = ml_collections.ConfigDict()
    c.simulated.num_images = 480
    c.simulated.image_size = 112
    c.simulated.seed = 0
    c.simulated.hand_cut = True  # White outside the tubule's outline, as the study cut them.

    c.augment = ml_collections.ConfigDict()
    c.augment.rot90 = True
    c.augment.flip = True
    c.augment.stain_jitter = 0.0  # Not in the study; e.g. 0.05.
    c.augment.brightness = 0.0  # Not in the study; e.g. 0.1.
    c.augment.contrast = 0.0  # Not in the study; e.g. 0.1.

    # Stain normalisation (not in the study): map every image onto one reference
    # stain in H-PAS optical-density space; none | macenko | reinhard. The reference
    # ("" = estimated from the training images) is recorded in config.json and
    # model.json; --mode=section estimates each slide's stain from its tubules.
    c.stain = ml_collections.ConfigDict()
    c.stain.normalize = "none"
    c.stain.reference = ""

    # Optimisation.
    c.global_batch_size = 12  # Must be >= 12: every batch holds every stage.
    c.num_epochs = 10
    c.optimizer = "adam"  # adam (L2 added to the gradient, as PyTorch) | adamw | sgd
    c.learning_rate = 1e-3
    c.weight_decay = 5e-4
    c.momentum = 0.9  # sgd only
    c.schedule = "constant"  # constant | cosine (with linear warmup)
    c.warmup_epochs = 0.0
    c.label_smoothing = 0.0
    c.seed = 109

    # Execution.
    # Recompute each residual block's activations in the backward pass instead of
    # keeping them: far less memory per step, some more compute.
    c.remat = False
    c.precision = "float32"  # float32 | bfloat16 (computation; parameters stay float32)
    c.parallelism = "jit"  # jit (device mesh) | pmap
    c.log_every_steps = 10
    c.checkpoint_every_steps = 100
    c.init_from = ""  # A model directory from `python -m stagejax.convert`.
    # GiB one device may use (0: detect; on CPU the host's available RAM). Set it
    # when sharing a device: a train step that needs more stops before training.
    c.device_memory_gb = 0.0

    if variant == "demo":  # the simulated dataset's size (simulated.image_size = 112)
        c.crop_size = 96
        c.crop_range = 8
        c.global_batch_size = 24
        # Chosen by measurement (benchmarks/RESULTS.md, "The demo"): 8 epochs at the
        # constant rate ended at 38% balanced accuracy, 14 with a cosine decay at 55%.
        c.num_epochs = 14
        c.schedule = "cosine"
        c.warmup_epochs = 1.0
        # Also by measurement (benchmarks/RESULTS.md, "Held-out stainings"): photometric
        # augmentation raised +/-1 accuracy from 81% to 93% (ResNet-18, 3 seeds).
        c.augment.stain_jitter = 0.1
        c.augment.brightness = 0.1
        c.augment.contrast = 0.1
    return c


def recorded(path: str | Path) -> ml_collections.ConfigDict:
    """The recipe a run recorded in ``path`` (its config.json), read the one way every
    mode reads it: fields added to the recipe since then get their defaults (of that
    run's variant); fields the recipe no longer has (e.g. ``predict_dir``, now a
    flag of its mode) are dropped."""
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise WorkdirError(f"{path}: missing; is {path.parent} the workdir of a training run?")
    try:
        old = json.loads(path.read_text())
    except ValueError:
        raise WorkdirError(f"{path}: unreadable; choose another --workdir") from None
    variant = old.get("variant") if old.get("variant") in VARIANTS else "study"
    config = get_config(variant)
    _overlay(config, old)
    return config


def _overlay(config: ml_collections.ConfigDict, values: dict) -> None:
    """``config``'s fields set from ``values`` where both have them."""
    for key, value in values.items():
        if key not in config:
            continue
        if isinstance(config[key], ml_collections.ConfigDict):
            if isinstance(value, dict):
                _overlay(config[key], value)
        else:
            config[key] = value
