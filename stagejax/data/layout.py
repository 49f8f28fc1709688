"""Reads and validates the dataset folder layout of the reference study.

    root/images/                 every image, named <anything>_<stage>-<index>.<ext>
    root/split_list/train.txt    one image file name per line (also validation.txt, test.txt)
    root/label_list.txt          one stage name per line; class id = 0-based line position

Stage names are roman (I..XII) or arabic (1..12), in any line order; each
class's place in the cycle (its rank, see `stagejax.stages.stage_ranks`) comes
from its name, or from ``config.stage_order`` for names of the user's own.

Everything that can be wrong with the input is checked here, before any cache is
built or any step is trained, and reported as a `DatasetError` whose one-line
message names the offending file: a run that fails after an hour because image
#913 is truncated, or that silently skips it, costs far more than this check.
"""

import dataclasses
import logging
from collections.abc import Iterable
from pathlib import Path

from stagejax.errors import DatasetError
from stagejax.images import image_info
from stagejax.stages import stage_ranks

__all__ = ["SPLITS", "DatasetError", "Example", "Layout", "read_layout", "stage_from_file_name"]

SPLITS = ("train", "validation", "test")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Example:
    file_name: str  # as listed in the split file
    path: Path
    label: int  # 0-based line position in label_list.txt


@dataclasses.dataclass(frozen=True)
class Layout:
    root: Path
    label_names: list[str]
    splits: dict[str, list[Example]]  # keys: SPLITS, in that order
    stage_ranks: tuple[int, ...] = ()  # cycle position of each class id (0 = stage I)


def stage_from_file_name(name: str) -> str:
    """The {stage} in `..._{stage}-{index}.ext`: text between the last '_' and the last '-'."""
    base = Path(name).name
    start, end = base.rfind("_"), base.rfind("-")
    if start < 0 or end <= start + 1:
        raise DatasetError(f"{name}: no stage in file name (expected ..._<stage>-<index>.<ext>)")
    return base[start + 1 : end]


def _read_lines(path: Path) -> list[str]:
    """Non-blank lines with surrounding whitespace removed (tolerates CRLF, trailing blanks)."""
    if not path.is_file():
        raise DatasetError(f"{path}: missing file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read as UTF-8 text ({type(e).__name__})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _first_duplicate(items: Iterable[str]) -> str | None:
    seen: set[str] = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


def _read_labels(label_file: Path) -> list[str]:
    label_names = _read_lines(label_file)
    if not label_names:
        raise DatasetError(f"{label_file}: no labels listed")
    if (dup := _first_duplicate(label_names)) is not None:
        raise DatasetError(f"{label_file}: label {dup!r} listed twice")
    return label_names


def _read_splits(
    root: Path, label_file: Path, label_ids: dict[str, int]
) -> dict[str, list[Example]]:
    """Every split's examples; a file in two splits, a stage not in the label list
    or a missing file is a ``DatasetError``."""
    splits: dict[str, list[Example]] = {}
    split_of: dict[str, str] = {}
    for split in SPLITS:
        split_file = root / "split_list" / f"{split}.txt"
        names = _read_lines(split_file)
        if not names:
            raise DatasetError(f"{split_file}: empty split")
        examples = []
        for name in names:
            if name in split_of:
                where = (
                    "twice in this split"
                    if split_of[name] == split
                    else (f"also in split {split_of[name]!r}")
                )
                raise DatasetError(f"{split_file}: {name} listed {where}")
            split_of[name] = split
            path = root / "images" / name
            stage = stage_from_file_name(str(path))
            if stage not in label_ids:
                raise DatasetError(f"{path}: stage {stage!r} is not in {label_file}")
            if not path.is_file():
                raise DatasetError(f"{path}: listed in {split_file} but missing")
            examples.append(Example(name, path, label_ids[stage]))
        splits[split] = examples
    return splits


def read_layout(
    root: str | Path,
    crop_size: int | None = None,
    check_images: bool = True,
    stage_order: str = "",
) -> Layout:
    """Parses and validates `root`; raises DatasetError at the first problem.

    `stage_order` (comma-separated label names, stage I first) is needed only
    when the label names are not stage names.

    With `check_images` every listed image is fully decoded (finds zero-byte,
    truncated, non-image and unsupported files) and, when `crop_size` is given,
    must be at least crop_size x crop_size. Without it only names, labels and
    file existence are checked, which is enough to compute a cache key.
    """
    root = Path(root)
    image_dir = root / "images"
    if not image_dir.is_dir():
        raise DatasetError(f"{image_dir}: missing images folder")
    label_file = root / "label_list.txt"
    label_names = _read_labels(label_file)
    ranks = stage_ranks(label_names, stage_order, source=str(label_file))
    splits = _read_splits(root, label_file, {name: i for i, name in enumerate(label_names)})

    present = {ex.label for ex in splits["train"]}
    if missing := [n for i, n in enumerate(label_names) if i not in present]:
        raise DatasetError(
            f"{root / 'split_list' / 'train.txt'}: no training image of stage {missing[0]!r}"
            + (f" (nor of {missing[1:]})" if len(missing) > 1 else "")
        )

    if check_images:
        for examples in splits.values():
            for ex in examples:
                _check_image(ex.path, crop_size)
        listed = sum(len(examples) for examples in splits.values())
        unused = sum(1 for p in image_dir.iterdir() if p.is_file()) - listed
        if unused > 0:
            log.info("%s: %d file(s) are in no split and are not used.", image_dir, unused)
    log.info(
        "%s: %d labels; %s.",
        root,
        len(label_names),
        ", ".join(f"{s} {len(splits[s])} images" for s in SPLITS),
    )
    return Layout(root=root, label_names=label_names, splits=splits, stage_ranks=ranks)


def _check_image(path: Path, crop_size: int | None) -> None:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror})") from None
    height, width = image_info(data, str(path))
    if crop_size is not None and min(height, width) < crop_size:
        raise DatasetError(f"{path}: image is {height}x{width}, smaller than crop_size {crop_size}")
