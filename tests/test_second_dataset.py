"""The second data set (benchmarks/make_second_dataset.py): real-world COCO quirks, all loadable."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from istr_viz.cli import main as cli_main
from istr_viz.data.check import check_dataset
from istr_viz.data.coco import CocoDataset, load_annotations, load_image

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "make_second_dataset.py"
NUM_TRAIN, NUM_VAL = 8, 6  # index 2 of each split has a crowd region, index 5 nothing


def _load_script():
    """The script as a module (registered in sys.modules, which its dataclasses need)."""
    spec = importlib.util.spec_from_file_location("make_second_dataset", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen():
    return _load_script()


@pytest.fixture(scope="module")
def root(gen, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("second") / "root"
    summary = gen.make_dataset(out, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=0, verbose=False)
    assert summary["train"]["images"] == NUM_TRAIN and summary["val"]["images"] == NUM_VAL
    return out


def _raw(root: Path, split: str) -> dict:
    return json.loads((root / split / "annotations.json").read_text())


def _dataset(root: Path, split: str) -> CocoDataset:
    return CocoDataset(root / split / "annotations.json", root / split / "images")


@pytest.mark.parametrize("split", ["train", "val"])
def test_loads_with_nothing_skipped(root, split):
    summary = check_dataset(root / split / "annotations.json", root / split / "images")
    assert summary["skipped"] == []
    assert summary["images"] == (NUM_TRAIN if split == "train" else NUM_VAL)
    assert summary["crowd"] >= 1 and summary["images_without_annotations"] >= 1
    assert summary["instances"] == len([a for a in _raw(root, split)["annotations"]
                                        if not a["iscrowd"]])


def test_check_data_cli_exit_zero(root, capsys):
    val = root / "val"
    code = cli_main(["check-data", "--ann", str(val / "annotations.json"),
                     "--images", str(val / "images")])
    out = capsys.readouterr().out
    assert code == 0
    assert "nothing skipped" in out and "kite" in out and "(no instances)" in out


def test_category_ids_non_contiguous_unsorted_one_unused(root):
    raw = _raw(root, "train")
    file_ids = [c["id"] for c in raw["categories"]]
    assert file_ids == [11, 4, 27, 90, 58, 33, 72] and file_ids != sorted(file_ids)
    ann = load_annotations(root / "train" / "annotations.json")
    assert ann.label_to_cat_id == [4, 11, 27, 33, 58, 72, 90]
    assert ann.cat_id_to_label[90] == 6 and ann.class_names[ann.cat_id_to_label[72]] == "kite"
    used = {a["category_id"] for s in ("train", "val") for a in _raw(root, s)["annotations"]}
    assert 72 not in used and used <= set(file_ids)


def test_images_quirks(root):
    entries = _raw(root, "train")["images"] + _raw(root, "val")["images"]
    ids = [e["id"] for e in entries]
    assert len(set(ids)) == len(ids) and set(ids).isdisjoint(range(NUM_TRAIN + NUM_VAL + 1))
    assert all(e["width"] != e["height"] for e in entries)
    assert len({(e["width"], e["height"]) for e in entries}) > 1
    assert all(200 <= e["width"] <= 360 and 150 <= e["height"] <= 300 for e in entries)
    modes = set()
    for split in ("train", "val"):
        for e in _raw(root, split)["images"]:
            path = root / split / "images" / e["file_name"]
            with Image.open(path) as img:
                modes.add((img.mode, path.suffix))
            assert load_image(path).size == (e["width"], e["height"])
    assert ("L", ".jpg") in modes  # grayscale JPEG
    assert any(mode == "RGB" for mode, _ in modes)


def test_polygons_and_rle_both_present(root):
    anns = [a for s in ("train", "val") for a in _raw(root, s)["annotations"]]
    instances = [a for a in anns if not a["iscrowd"]]
    polygons = [a for a in instances if isinstance(a["segmentation"], list)]
    rles = [a for a in instances if isinstance(a["segmentation"], dict)]
    assert polygons and rles
    assert all(len(p) >= 6 and len(p) % 2 == 0 for a in polygons for p in a["segmentation"])
    assert all(isinstance(a["segmentation"]["counts"], str) for a in rles)
    crowds = [a for a in anns if a["iscrowd"]]
    assert crowds and all(isinstance(a["segmentation"]["counts"], list) for a in crowds)


@pytest.mark.parametrize("split", ["train", "val"])
def test_crowd_is_ignore_region_not_target(root, split):
    ds = _dataset(root, split)
    crowd_ann_ids = {a["id"] for a in _raw(root, split)["annotations"] if a["iscrowd"]}
    seen_crowd = False
    for i in range(len(ds)):
        _, target = ds[i]
        masks, crowd = target["masks"], target["crowd_mask"]
        assert not crowd_ann_ids & set(target["ann_ids"].tolist())
        assert target["labels"].shape[0] == masks.shape[0] == target["boxes_xyxy"].shape[0]
        assert not (masks.sum(dim=0) > 1).any()  # visible masks never overlap
        if crowd.any():
            seen_crowd = True
            assert not (masks & crowd).any()  # the region is cut out where objects lie on it
            assert target["crowd_boxes_xyxy"].shape[0] >= 1
    assert seen_crowd


def test_empty_image_has_no_targets(root):
    ds = _dataset(root, "train")
    _, target = ds[5]
    assert target["masks"].shape[0] == 0 and not target["crowd_mask"].any()


@pytest.mark.parametrize("first", [0, 1])
def test_uncompressed_rle_round_trip(gen, first):
    rng = np.random.default_rng(first)
    mask = rng.random((13, 17)) < 0.4
    mask[0, 0] = bool(first)
    rle = mask_utils.frPyObjects({"size": [13, 17], "counts": gen.uncompressed_rle(mask)}, 13, 17)
    np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), mask)


def test_exif_rotated_jpeg_reads_upright(gen, tmp_path):
    pixels = np.zeros((30, 50, 3), np.uint8)
    pixels[:10, :20] = 255  # a white block at the top left of the intended image
    name = gen.save_image(pixels, "rgb-jpeg-exif", "x", tmp_path)
    with Image.open(tmp_path / name) as raw:
        assert raw.size == (30, 50)  # stored turned
    upright = np.asarray(load_image(tmp_path / name))
    assert upright.shape == (30, 50, 3)
    assert np.abs(upright.astype(int) - pixels).mean() < 8


def test_deterministic_and_val_independent_of_train(gen, root, tmp_path):
    gen.make_dataset(tmp_path / "again", num_train=0, num_val=NUM_VAL, seed=0, verbose=False)
    again, first = tmp_path / "again" / "val", root / "val"
    assert (again / "annotations.json").read_bytes() == (first / "annotations.json").read_bytes()
    for e in _raw(root, "val")["images"][:3]:
        name = e["file_name"]
        assert (again / "images" / name).read_bytes() == (first / "images" / name).read_bytes()
    gen.make_dataset(tmp_path / "other", num_train=0, num_val=2, seed=1, verbose=False)
    other = json.loads((tmp_path / "other" / "val" / "annotations.json").read_text())
    assert [e["id"] for e in other["images"]] != [e["id"] for e in _raw(root, "val")["images"][:2]]


def test_rejects_negative_counts(gen, tmp_path):
    with pytest.raises(ValueError, match="num_val"):
        gen.make_dataset(tmp_path, num_train=1, num_val=-1, verbose=False)


def test_rejects_an_unknown_difficulty(gen, tmp_path):
    with pytest.raises(ValueError, match="difficulty must be one of full, plain"):
        gen.make_dataset(tmp_path, num_train=0, num_val=1, verbose=False, difficulty="easy")


def _instances_per_image_and_areas(root: Path) -> tuple[list[int], list[float]]:
    raw = _raw(root, "val")
    counts = {e["id"]: 0 for e in raw["images"]}
    areas = []
    for a in raw["annotations"]:
        if not a["iscrowd"]:
            counts[a["image_id"]] += 1
            areas.append(a["area"])
    return list(counts.values()), areas


def test_plain_difficulty_has_the_built_in_counts_and_sizes(gen, tmp_path):
    for name in ("full", "plain"):
        gen.make_dataset(tmp_path / name, num_train=0, num_val=40, seed=3, verbose=False,
                         difficulty=name)
    gen.make_dataset(tmp_path / "few-large", num_train=0, num_val=40, seed=3, verbose=False,
                     difficulty="few-large")
    full_counts, full_areas = _instances_per_image_and_areas(tmp_path / "full")
    plain_counts, plain_areas = _instances_per_image_and_areas(tmp_path / "plain")
    few_counts, _ = _instances_per_image_and_areas(tmp_path / "few-large")
    assert max(full_counts) > 8 >= max(plain_counts) and max(few_counts) <= 8
    assert np.median(plain_areas) > 1.3 * np.median(full_areas)  # radii from 2.5% of the side
    assert _raw(tmp_path / "plain", "val")["info"]["difficulty"] == "plain"
    assert "difficulty" not in _raw(tmp_path / "full", "val")["info"]  # full: the files of before
    assert check_dataset(tmp_path / "plain" / "val" / "annotations.json",
                         tmp_path / "plain" / "val" / "images")["skipped"] == []


def test_plain_look_paints_solid_objects_on_an_untouched_background(gen):
    plain = gen.DIFFICULTIES["plain-look"]
    h, w = 60, 80
    for difficulty, untouched in ((plain, True), (gen.DIFFICULTIES["full"], False)):
        look = gen._Look([], gray=False, difficulty=difficulty)
        background = gen._background(np.random.default_rng(7), h, w, look)
        image, instances, crowd = gen._render(np.random.default_rng(7), h, w, look, 0, False)
        expected = (np.clip(background, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        assert np.array_equal(image, expected) == untouched  # no clutter, no camera effects
    canvas = np.full((h, w, 3), 0.5, dtype=np.float32)
    mask = np.zeros((h, w), dtype=bool)
    mask[10:40, 20:60] = True
    for seed in range(12):  # every fill drawn is solid, and no drop shadow falls outside
        gen._paint(np.random.default_rng(seed), canvas, mask, gen._Look([], False, plain))
        assert len(np.unique(canvas[mask], axis=0)) == 1 and (canvas[~mask] == 0.5).all()
    shadowed = False
    for seed in range(12):  # the full look does cast shadows (30% of the shapes)
        canvas[:] = 0.5
        gen._paint(np.random.default_rng(seed), canvas, mask, gen._Look([], False))
        shadowed |= bool((canvas[~mask] < 0.5).any())
    assert shadowed
