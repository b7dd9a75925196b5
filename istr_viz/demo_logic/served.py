"""What the demo serves: one checkpoint (or why there is none) and one data set (or why not).

:func:`open_checkpoint` never raises: a missing file, a file that is not a checkpoint or one that
does not fit its own configuration gives a :class:`ServedModel` without a predictor and with a
one-paragraph ``message`` for the page. :func:`open_data` does the same for the data set folder.
Both are called once when the page is built; the callbacks close over what they return.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from istr_viz.checkpoint import load_checkpoint, trained_median_px
from istr_viz.config import Config
from istr_viz.data.coco import CocoAnnotations, CocoDataset, load_annotations
from istr_viz.data.layout import DatasetPaths, default_data_root, split_paths
from istr_viz.data.transforms import build_transform
from istr_viz.engine import transform_configs
from istr_viz.errors import IstrVizError
from istr_viz.predictor import Predictor, model_from_checkpoint

TRAIN_HINT = ("Train one with `python -m istr_viz train --out runs/shapes --max-minutes 30` "
              "(the shapes-cpu preset on the built-in data), then start the demo with "
              "`python app.py --checkpoint runs/shapes/last.pt`.")


@dataclass
class ServedModel:
    """The checkpoint the page serves.

    predictor: ready to run (``predictor.model``, ``predictor.config``, ``predictor.metrics``), or
    None with ``message`` saying why. ``lock`` serialises every run of the model (the page's
    callbacks may run in several threads). ``iteration`` and ``data_record`` come from the
    checkpoint's training state when it has one; ``card`` is the card an exported (shipped)
    checkpoint carries (data, command, time, hardware: JSON-like), else {}. ``started_from``: the
    checkpoint the run's weights started from (``{"path", "sha256"}``, from the training state or
    the card), {} for a run from scratch or one that did not record it. ``machines``: the machines
    the run trained on (:func:`istr_viz.runtime.machine_summary` each, from the training state or
    the card), [] where it did not record them. ``trained_median_px``: the median training
    instance it recorded (:func:`istr_viz.checkpoint.trained_median_px`), 0 where it did not.
    """

    path: Path
    predictor: Predictor | None = None
    message: str = ""
    iteration: int | None = None
    data_record: dict = field(default_factory=dict)
    card: dict = field(default_factory=dict)
    started_from: dict = field(default_factory=dict)
    machines: list = field(default_factory=list)
    trained_median_px: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def ok(self) -> bool:
        return self.predictor is not None

    @property
    def config(self) -> Config | None:
        return self.predictor.config if self.predictor is not None else None

    @property
    def num_stages(self) -> int:
        """K, the refinement stages of the model (1 when there is no model)."""
        return self.config.model.num_stages if self.predictor is not None else 1

    def status(self) -> str:
        """The page's status line (Markdown)."""
        if self.predictor is None:
            return self.message
        cfg = self.config.model
        names = ", ".join(self.predictor.class_names)
        trained = f", trained {self.iteration} iterations" if self.iteration is not None else ""
        return (f"Serving checkpoint `{self.path}`{trained}: {cfg.backbone}, "
                f"{cfg.num_queries} queries, {cfg.num_stages} stages; classes: {names}.")


def open_checkpoint(path: str | Path, device: str | None = None) -> ServedModel:
    """Load ``path`` once (``torch.load(weights_only=True)``); never raises.

    A missing file gives the message saying how to train one; any other failure gives the
    checkpoint error's one line. The large training state (optimiser, raw weights) is dropped
    after reading the iteration and the data record.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        return ServedModel(path, message=(f"**No checkpoint is present yet** (looked for "
                                          f"`{path}`). {TRAIN_HINT}"))
    try:
        ckpt = load_checkpoint(path)
        _, predictor = model_from_checkpoint(ckpt, path, device)
    except IstrVizError as err:
        return ServedModel(path, message=(f"**The checkpoint could not be loaded**: "
                                          f"{err.one_line()}. {TRAIN_HINT}"))
    except Exception as err:  # noqa: BLE001 - a bad file must never stop the page
        return ServedModel(path, message=(f"**The checkpoint could not be loaded**: `{path}`: "
                                          f"{type(err).__name__}: {str(err)[:200]}. {TRAIN_HINT}"))
    state = ckpt.get("train_state") or {}
    card = ckpt.get("card") if isinstance(ckpt.get("card"), dict) else {}
    iteration = state.get("iteration", card.get("iteration"))
    try:
        iteration = int(iteration) if iteration is not None else None
    except (TypeError, ValueError):
        iteration = None
    record = state.get("data") or card.get("data")
    start = state.get("init_from") or card.get("init_from")
    machines = state.get("machines") or card.get("machines")
    return ServedModel(path, predictor, iteration=iteration,
                       data_record=dict(record) if isinstance(record, dict) else {}, card=card,
                       started_from=dict(start) if isinstance(start, dict) else {},
                       machines=[dict(m) for m in machines if isinstance(m, dict)]
                       if isinstance(machines, list) else [],
                       trained_median_px=trained_median_px(ckpt))


@dataclass
class DemoData:
    """The data set the page draws examples, ground truth and masks from.

    root: the data set folder; val / train: its splits (None with ``message`` when missing);
    val_annotations: the val annotation file, read once.
    """

    root: Path | None
    val: DatasetPaths | None = None
    train: DatasetPaths | None = None
    val_annotations: CocoAnnotations | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.val_annotations is not None

    def val_dataset(self, cfg: Config | None = None) -> CocoDataset:
        """The val split; with ``cfg`` it applies ``cfg``'s evaluation transform (what
        ``match_image`` needs), else none (original images)."""
        transform = build_transform(transform_configs(cfg)[1], train=False) if cfg else None
        return CocoDataset(self.val.ann_file, self.val.images_dir, transform,
                           annotations=self.val_annotations)

    def num_instances(self, index: int) -> int:
        """G, the non-crowd instances of val image ``index``."""
        ann = self.val_annotations
        return len(ann.instance_anns(ann.image_ids[index]))

    def categories_match(self, predictor: Predictor | None) -> bool:
        """Whether the data's categories (ids and names, in order) are the model's."""
        if predictor is None or self.val_annotations is None:
            return False
        ann = self.val_annotations
        return (list(ann.label_to_cat_id) == list(predictor.category_ids)
                and list(ann.class_names) == list(predictor.class_names))


def open_data(root: str | Path | None) -> DemoData:
    """The data set folder ``root`` (train/ and val/), or the built-in shapes when None
    (generated on first use); never raises: a folder that is not a data set gives ``message``."""
    try:
        root = Path(root).expanduser() if root is not None else default_data_root(progress=True)
        val = split_paths(root, "val")
        try:
            train = split_paths(root, "train")
        except IstrVizError:
            train = None
        return DemoData(root, val, train, load_annotations(val.ann_file))
    except IstrVizError as err:
        return DemoData(Path(root) if root is not None else None,
                        message=f"**No data set**: {err.one_line()}")


def data_image(data: DemoData, index: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Val image ``index`` as (H, W, 3) uint8, its GT boxes (G, 4) xyxy pixels and class names."""
    dataset = data.val_dataset()
    image = np.asarray(dataset.load_image(index))
    target = dataset.raw_target(index)
    names = dataset.class_names
    return image, target["boxes_xyxy"].numpy(), [names[int(c)] for c in target["labels"]]


__all__ = ["DemoData", "ServedModel", "TRAIN_HINT", "data_image", "open_checkpoint", "open_data"]
