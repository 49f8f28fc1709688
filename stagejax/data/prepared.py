"""Converts a layout folder into cached ArrayRecord shards that grain reads by index.

Why a cache: the raw folder is ~1,200 multi-megabyte TIFFs that may live on a
slow or network drive, and the balanced sampler needs cheap random access by
record index. ArrayRecord gives exactly that, TFDS writes it (without
TensorFlow, since images are stored as plain encoded bytes), and each record
keeps the original file bytes, so the cache costs no image quality.

The cache lives in `cache_dir/layout-<key>/`, where the key hashes the split
lists, the label list and every image's size and mtime: any change to the data
gives a new key and a rebuild, an unchanged folder is reused. A build is written
to a temporary sibling directory, finished with a completion marker, and only
then renamed into place, so an interrupted build is never read.
"""

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from stagejax.data.layout import SPLITS, Layout, read_layout
from stagejax.errors import DatasetError
from stagejax.images import to_storable
from stagejax.runtime import files, logs

CACHE_FORMAT = 1  # bump whenever what is stored per record changes
_MARKER = "COMPLETE"
_INDEX = "index.json"
_LOG_EVERY = 100

log = logging.getLogger(__name__)


class _LayoutBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder over one validated `Layout`; records keep split-list order."""

    name = "stagejax_layout"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Encoded image bytes, class label, file name."}
    # No download checksums to locate. tfds' own lookup imports the missing
    # `importlib_resources` package for builders defined inside a package.
    code_path = None

    def __init__(self, layout: Layout, **kwargs):
        self._layout = layout
        self.image_sizes: dict[str, list[tuple[int, int]]] = {s: [] for s in SPLITS}
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="H-PAS seminiferous tubule images with their stage label.",
            features=tfds.features.FeaturesDict(
                {
                    # Encoded PNG/JPEG/TIFF bytes: tfds.features.Image would need TF to decode.
                    "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "label": tfds.features.ClassLabel(names=self._layout.label_names),
                    "file_name": tfds.features.Text(),
                }
            ),
            disable_shuffling=True,  # keep split-list order (needs integer keys)
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        examples = self._layout.splits[split]
        for i, ex in enumerate(examples):
            data, size = to_storable(ex.path.read_bytes(), str(ex.path))
            self.image_sizes[split].append(size)
            yield i, {"image": data, "label": ex.label, "file_name": ex.file_name}
            if (i + 1) % _LOG_EVERY == 0 or i + 1 == len(examples):
                log.info("Cache %s: wrote %d/%d images.", split, i + 1, len(examples))


class RecordSource:
    """grain RandomAccessDataSource over one cached split.

    Records are dict(image=<encoded bytes>, label=int, file_name=str). Picklable,
    so grain worker processes can reopen the shards.
    """

    def __init__(self, tfds_source, cache_path: Path, split: str):
        self._source = tfds_source
        self._desc = f"RecordSource({cache_path}, split={split!r})"

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return _plain(self._source[index])

    def __getitems__(self, indices) -> list[dict]:
        return [_plain(r) for r in self._source.__getitems__(indices)]

    def __repr__(self) -> str:  # grain uses it to check that a checkpoint fits the data
        return self._desc


def _plain(record: dict) -> dict:
    return {
        "image": bytes(record["image"]),
        "label": int(record["label"]),
        "file_name": record["file_name"].decode("utf-8"),
    }


@dataclasses.dataclass(frozen=True)
class SplitSource:
    source: RecordSource
    labels: np.ndarray  # int32, aligned with `source`
    file_names: list[str]  # aligned with `source`
    # int32 [N, 2]: each image's decoded height and width (data/on_device.py sizes
    # the resident split from it without decoding); None where unknown.
    sizes: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    label_names: list[str]  # the dataset's name of each class id (label_list.txt order)
    splits: dict[str, SplitSource]
    cache_path: Path
    # Cycle position of each class id (0 = stage I), from the names or config.stage_order.
    stage_ranks: tuple[int, ...] = ()
    image_size: int = 0  # median short side of the training images in px (0: none)


def cache_key(layout: Layout) -> str:
    """Hash of label list, split lists and each listed image's size and mtime."""
    files = {
        split: [[ex.file_name, (st := ex.path.stat()).st_size, st.st_mtime_ns] for ex in exs]
        for split, exs in layout.splits.items()
    }
    blob = json.dumps({"format": CACHE_FORMAT, "labels": layout.label_names, "files": files})
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def prepare(
    data_dir: str | Path,
    cache_dir: str | Path,
    crop_size: int | None = None,
    stage_order: str = "",
) -> PreparedDataset:
    """Validates `data_dir`, builds (or reuses) its ArrayRecord cache, returns grain sources.

    Raises DatasetError for bad input before anything is written. The stage
    ranks are derived on every call (not cached): `stage_order` may change
    without a rebuild.
    """
    # Cheap: names, labels, existence.
    layout = read_layout(data_dir, check_images=False, stage_order=stage_order)
    path = Path(cache_dir) / f"layout-{cache_key(layout)}"
    if (path / _MARKER).is_file():
        log.info("Reusing dataset cache %s.", path)
    else:
        layout = read_layout(
            data_dir, crop_size=crop_size, check_images=True, stage_order=stage_order
        )
        _build(layout, path)
    prepared = _load(path, layout.root / "images", crop_size)
    return dataclasses.replace(prepared, stage_ranks=layout.stage_ranks)


def _build(layout: Layout, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    leftovers = sorted(path.parent.glob(f"{files.TMP_PREFIX}{path.name}.*"))
    if leftovers:
        log.warning(
            "Ignoring unfinished cache build(s) %s; delete them to free space.",
            ", ".join(map(str, leftovers)),
        )
    log.info("Building dataset cache %s from %s.", path, layout.root)
    # False: another process finished first (``_fill`` removed any incomplete one): use theirs.
    files.new_dir(path, lambda tmp: _fill(layout, tmp, path), "the dataset cache")
    log.info("Dataset cache %s ready.", path)


def _fill(layout: Layout, tmp: Path, path: Path) -> None:
    builder = _LayoutBuilder(layout, data_dir=str(tmp), file_format="array_record")
    tfds.disable_progress_bar()  # we log progress ourselves
    with logs.quiet_stdout():  # its "Downloading and preparing dataset Unknown size"
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    index = {
        "label_names": layout.label_names,
        "splits": {
            split: {
                "file_names": [ex.file_name for ex in layout.splits[split]],
                "labels": [ex.label for ex in layout.splits[split]],
                "sizes": builder.image_sizes[split],
            }
            for split in SPLITS
        },
    }
    (tmp / _INDEX).write_text(json.dumps(index))
    (tmp / _MARKER).write_text("complete\n")  # written last: the cache is usable
    if path.exists() and not (path / _MARKER).is_file():  # an incomplete one: replace it
        shutil.rmtree(path)


def _load(path: Path, image_dir: Path, crop_size: int | None) -> PreparedDataset:
    index = json.loads((path / _INDEX).read_text())
    builder = tfds.builder_from_directory(
        str(path / _LayoutBuilder.name / str(_LayoutBuilder.VERSION))
    )
    splits = {}
    for split in SPLITS:
        entry = index["splits"][split]
        if crop_size is not None:
            for name, (height, width) in zip(entry["file_names"], entry["sizes"], strict=True):
                if min(height, width) < crop_size:
                    raise DatasetError(
                        f"{image_dir / name}: image is {height}x{width}, "
                        f"smaller than crop_size {crop_size}"
                    )
        source = RecordSource(builder.as_data_source(split=split), path, split)
        if len(source) != len(entry["file_names"]):
            raise DatasetError(
                f"{path}: cache holds {len(source)} {split} records, index "
                f"{len(entry['file_names'])}; delete the directory to rebuild"
            )
        splits[split] = SplitSource(
            source=source,
            labels=np.asarray(entry["labels"], dtype=np.int32),
            file_names=list(entry["file_names"]),
            sizes=np.asarray(entry["sizes"], dtype=np.int32).reshape(-1, 2),
        )
    train_sizes = index["splits"]["train"]["sizes"]
    return PreparedDataset(
        label_names=index["label_names"],
        splits=splits,
        cache_path=path,
        image_size=int(np.median([min(hw) for hw in train_sizes])) if train_sizes else 0,
    )
