"""Where data sets live: the (annotation file, image folder) convention and the built-in default.

A data set is an ``(annotation file, image folder)`` pair. Wherever a command, notebook or the app
takes a data set *folder*, that folder is a root holding ``train/`` and ``val/``, each with
``annotations.json`` and ``images/`` (what ``make-shapes`` writes).

The built-in shapes data set is generated once, with fixed defaults, into a cache folder
(``$ISTR_VIZ_CACHE`` or ``~/.cache/istr_viz``) the first time something asks for it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from istr_viz.errors import DataError

# The built-in data set. Every AP figure reported on "the built-in val set" is on exactly these.
DEFAULT_SHAPES_SEED = 0
DEFAULT_SHAPES_TRAIN = 2000
DEFAULT_SHAPES_VAL = 200
DEFAULT_SHAPES_SIZE = 256
DEFAULT_SHAPES_NAME = "shapes-v1"  # bump when the generator's output changes

SPLITS = ("train", "val")


@dataclass(frozen=True)
class DatasetPaths:
    """One COCO-format data set: an annotation file and the folder its ``file_name``s are relative to."""

    ann_file: Path
    images_dir: Path

    def check_exists(self) -> "DatasetPaths":
        """Raise :class:`DataError` naming the missing path, else return ``self``."""
        if not self.ann_file.is_file():
            raise DataError("annotation file not found", file=self.ann_file)
        if not self.images_dir.is_dir():
            raise DataError("image folder not found", file=self.images_dir)
        return self


def split_paths(root: str | Path, split: str) -> DatasetPaths:
    """The ``split`` (``"train"`` or ``"val"``) of a data set root, checked to exist.

    Raises :class:`DataError` saying what layout was expected when the folder is not like that.
    """
    root = Path(root)
    expected = (
        f"expected a data set root holding train/ and val/, each with annotations.json and "
        f"images/ (as make-shapes writes); missing {split}/"
    )
    if not root.is_dir():
        raise DataError("data set folder not found; " + expected.split("; ")[0], file=root)
    paths = DatasetPaths(root / split / "annotations.json", root / split / "images")
    for p in (paths.ann_file, paths.images_dir):
        if not p.exists():
            rel = p.relative_to(root)
            raise DataError(expected.replace(f"missing {split}/", f"missing {rel}"), file=root)
    return paths


def cache_dir() -> Path:
    """The folder where istr_viz keeps generated data: ``$ISTR_VIZ_CACHE`` or ``~/.cache/istr_viz``."""
    env = os.environ.get("ISTR_VIZ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "istr_viz"


def default_data_root(generate: bool = True, progress: bool = True) -> Path:
    """The built-in shapes data set root, generated on first use (atomically: temp folder + rename)."""
    root = cache_dir() / DEFAULT_SHAPES_NAME
    if (root / "val" / "annotations.json").is_file() or not generate:
        return root
    from istr_viz.data.shapes import make_shapes  # local import: generation is rare

    if progress:
        print(f"first use: writing the built-in shapes data set to {root} (about a minute, once)",
              file=sys.stderr, flush=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-shapes-", dir=root.parent))
    try:
        make_shapes(
            tmp,
            num_train=DEFAULT_SHAPES_TRAIN,
            num_val=DEFAULT_SHAPES_VAL,
            size=DEFAULT_SHAPES_SIZE,
            seed=DEFAULT_SHAPES_SEED,
            progress=progress,
        )
        try:
            tmp.rename(root)
        except OSError:  # another process finished first: keep theirs
            if not (root / "val" / "annotations.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
