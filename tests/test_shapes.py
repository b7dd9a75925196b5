"""The synthetic shapes generator: COCO validity, determinism, classes, holes, occlusion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from scipy.ndimage import binary_fill_holes

from istr_viz.data.layout import split_paths
from istr_viz.data.shapes import CLASS_NAMES, MIN_VISIBLE_FRACTION, MIN_VISIBLE_PX, make_shapes
from istr_viz.errors import ConfigError

NUM_TRAIN, NUM_VAL, SIZE = 12, 6, 96


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A small data set root written once for the whole module."""
    out = tmp_path_factory.mktemp("shapes") / "root"
    summary = make_shapes(out, num_train=NUM_TRAIN, num_val=NUM_VAL, size=SIZE, seed=0,
                          progress=False)
    assert summary["train"]["images"] == NUM_TRAIN and summary["val"]["images"] == NUM_VAL
    return out


def _coco(root: Path, split: str) -> COCO:
    return COCO(str(root / split / "annotations.json"))


def _pixels(root: Path, split: str) -> list[np.ndarray]:
    files = sorted((root / split / "images").glob("*.png"))
    return [np.asarray(Image.open(f)) for f in files]


def test_layout_and_images(root):
    for split, count in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        paths = split_paths(root, split)
        data = json.loads(paths.ann_file.read_text())
        assert set(data) >= {"info", "images", "annotations", "categories"}
        assert len(data["images"]) == count
        for img in data["images"]:
            with Image.open(paths.images_dir / img["file_name"]) as im:
                assert im.mode == "RGB" and im.size == (SIZE, SIZE)
            assert (img["height"], img["width"]) == (SIZE, SIZE)
        assert len(list(paths.images_dir.glob("*.png"))) == count


def test_annotations_decode_to_their_area_and_bbox(root):
    for split in ("train", "val"):
        coco = _coco(root, split)
        anns = coco.loadAnns(coco.getAnnIds())
        assert anns, "expected some annotations"
        assert len({a["id"] for a in anns}) == len(anns)
        for ann in anns:
            assert ann["iscrowd"] == 0 and isinstance(ann["segmentation"]["counts"], str)
            mask = coco.annToMask(ann).astype(bool)
            assert mask.shape == (SIZE, SIZE)
            assert mask.sum() == ann["area"]
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            extent = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert np.allclose(extent, [x, y, x + w, y + h], atol=1)
            # the drop rule: nothing annotated is too small or too hidden
            assert ann["area"] >= MIN_VISIBLE_PX
            assert ann["area"] >= MIN_VISIBLE_FRACTION * ann["amodal_area"]
            assert ann["area"] <= ann["amodal_area"]


def test_categories_all_present(root):
    coco = _coco(root, "train")
    cats = coco.loadCats(coco.getCatIds())
    assert [c["id"] for c in cats] == list(range(1, len(CLASS_NAMES) + 1))
    assert [c["name"] for c in cats] == list(CLASS_NAMES) and len(cats) >= 6
    anns = [a for split in ("train", "val") for a in _coco(root, split).dataset["annotations"]]
    used = {a["category_id"] for a in anns}
    assert used == {c["id"] for c in cats}


def test_some_mask_has_a_hole(root):
    coco = _coco(root, "train")
    holes = [a for a in coco.dataset["annotations"]
             if (binary_fill_holes(m := coco.annToMask(a).astype(bool)) != m).any()]
    assert holes
    assert {a["category_id"] for a in holes} >= {CLASS_NAMES.index("ring") + 1}


def test_occlusion_present_and_masks_disjoint(root):
    coco = _coco(root, "train")
    assert any(a["area"] < a["amodal_area"] for a in coco.dataset["annotations"])
    for image_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        if anns:
            stack = np.stack([coco.annToMask(a) for a in anns]).astype(np.int32)
            assert stack.sum(axis=0).max() == 1


def test_deterministic_and_seed_dependent(root, tmp_path):
    again = tmp_path / "again"
    make_shapes(again, num_train=NUM_TRAIN, num_val=NUM_VAL, size=SIZE, seed=0, progress=False)
    for split in ("train", "val"):
        assert (again / split / "annotations.json").read_bytes() == \
            (root / split / "annotations.json").read_bytes()
        for a, b in zip(_pixels(again, split), _pixels(root, split), strict=True):
            assert np.array_equal(a, b)
    other = tmp_path / "other"
    make_shapes(other, num_train=2, num_val=2, size=SIZE, seed=1, progress=False)
    assert not np.array_equal(_pixels(other, "train")[0], _pixels(root, "train")[0])
    first = json.loads((other / "train" / "annotations.json").read_text())["annotations"]
    ref = [a for a in _coco(root, "train").dataset["annotations"] if a["image_id"] <= 2]
    assert [a["segmentation"] for a in first] != [a["segmentation"] for a in ref]


def test_val_does_not_depend_on_num_train(root, tmp_path):
    out = tmp_path / "fewer"
    make_shapes(out, num_train=3, num_val=NUM_VAL, size=SIZE, seed=0, progress=False)
    fewer = (out / "val" / "annotations.json").read_bytes()
    assert fewer == (root / "val" / "annotations.json").read_bytes()


def test_sizes_span_small_to_large_and_empty_images(tmp_path):
    summary = make_shapes(tmp_path, num_train=30, num_val=0, size=256, seed=0, progress=False)
    assert summary["train"]["empty_images"] == 1  # image index 25 of every 50
    coco = _coco(tmp_path, "train")
    assert coco.getAnnIds(imgIds=26) == []
    areas = np.array([a["area"] for a in coco.dataset["annotations"]])
    assert (areas < 32**2).any()
    assert ((areas >= 32**2) & (areas < 96**2)).any()
    assert (areas >= 96**2).any()


@pytest.mark.parametrize("kwargs", [{"size": 8}, {"num_train": -1}, {"seed": -3}])
def test_bad_arguments_raise_config_error(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        make_shapes(tmp_path, **{"num_train": 1, "num_val": 1, "progress": False, **kwargs})


def test_default_data_root_is_written_once_and_says_so(tmp_path, monkeypatch, capsys):
    from istr_viz.data import layout

    monkeypatch.setenv("ISTR_VIZ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(layout, "DEFAULT_SHAPES_TRAIN", 3)
    monkeypatch.setattr(layout, "DEFAULT_SHAPES_VAL", 2)
    monkeypatch.setattr(layout, "DEFAULT_SHAPES_SIZE", 64)
    assert not layout.default_data_root(generate=False).exists()
    root = layout.default_data_root(progress=True)
    assert "first use" in capsys.readouterr().err
    assert root == tmp_path / "cache" / layout.DEFAULT_SHAPES_NAME
    for split, n in (("train", 3), ("val", 2)):
        assert len(list((layout.split_paths(root, split).images_dir).iterdir())) == n
    assert layout.default_data_root(progress=True) == root  # the second call finds it
    assert "first use" not in capsys.readouterr().err
    assert [p.name for p in root.parent.iterdir()] == [layout.DEFAULT_SHAPES_NAME]  # no temp left
