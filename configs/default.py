"""Defaults shared by every model config: the study's recipe on real data.

The recipe (Tokuoka et al. 2025, reference-recipe.md): Adam lr 1e-3 with an L2
term of 5e-4 added to the gradient (PyTorch's Adam), 12 stages x 1 image per
batch, 896 px crops shifted by up to +/-128 px, 90-degree rotations and flips,
per-image min-max, 10 epochs, seed 109, best epoch by validation balanced
accuracy.

With ``data_dir`` empty, the simulated H-PAS dataset is generated and the
``simulated`` block below replaces image size, crop and schedule, so that the
README's command finishes in minutes on a laptop CPU. Override any field from
the command line, e.g. ``--config.global_batch_size=48``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "resnet50"
    c.num_classes = 12
    c.grayscale = False  # The study's option: train on gray images.

    # Data. An empty data_dir means: use the simulated dataset.
    c.data_dir = ""
    c.cache_dir = "~/.cache/stagejax"
    c.crop_size = 896
    c.crop_range = 128
    c.num_workers = 0  # Grain worker processes per host (0: in the main process).
    c.eval_batch_size = 12  # Global; padded at the end of the split.
    c.eval_split = "test"
    c.predict_dir = ""
    # Only for label_list.txt names that are not stage names (I..XII, 1..12): those
    # names in biological order, stage I first, comma-separated.
    c.stage_order = ""
    c.tta = False  # Predict: average the 8 rotations/flips.
    c.strict = False  # Predict: stop at the first unreadable image (default: skip, list it).
    c.overwrite = False  # Predict: replace an existing W/predict/<folder>/predictions.csv.

    # The simulated stand-in, used when data_dir is empty.
    c.simulated = ml_collections.ConfigDict()
    c.simulated.num_images = 480
    c.simulated.image_size = 112
    c.simulated.seed = 0
    c.simulated.crop_size = 96
    c.simulated.crop_range = 8
    c.simulated.num_epochs = 8
    c.simulated.global_batch_size = 24

    c.augment = ml_collections.ConfigDict()
    c.augment.rot90 = True
    c.augment.flip = True
    c.augment.stain_jitter = 0.0  # Not in the study; e.g. 0.05.
    c.augment.brightness = 0.0  # Not in the study; e.g. 0.1.
    c.augment.contrast = 0.0  # Not in the study; e.g. 0.1.

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
    c.precision = "float32"  # float32 | bfloat16 (computation; parameters stay float32)
    c.parallelism = "jit"  # jit (device mesh) | pmap
    c.log_every_steps = 10
    c.checkpoint_every_steps = 100
    c.init_from = ""  # A model directory from `python -m stagejax.convert`.
    # GiB one device may use (0: detect; on CPU the host's available RAM). Set it
    # when sharing a device: a train step that needs more stops before training.
    c.device_memory_gb = 0.0
    return c
