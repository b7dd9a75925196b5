"""istr_viz.data.coco and transforms on a data set with every quirk real COCO files have."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage
from torchvision.ops import masks_to_boxes

import coco_factory as cf
from istr_viz.data.coco import CocoDataset, collate, load_annotations, load_image
from istr_viz.data.transforms import (
    TransformConfig,
    build_transform,
    resized_size,
    undo_box_transform,
    undo_mask_transform,
)
from istr_viz.data.validate import rle_string_counts
from istr_viz.errors import ConfigError, DataError

UPSCALE_JITTER = TransformConfig(min_size=(160, 192, 224), max_size=400, flip_prob=0.5)
DOWNSCALE_JITTER = TransformConfig(min_size=(64, 96, 128), max_size=400, flip_prob=0.5)
SEEDS = range(5)


@pytest.fixture(scope="module")
def quirky(tmp_path_factory):
    return cf.write_quirky_coco(tmp_path_factory.mktemp("quirky"))


@pytest.fixture(scope="module")
def ann(quirky):
    return load_annotations(quirky.ann_file)


def reference_mask(ann, ann_id: int) -> torch.Tensor:
    """pycocotools' own rasterisation of annotation ``ann_id`` at the original size."""
    return torch.from_numpy(ann.coco.annToMask(ann.coco.anns[ann_id]).astype(bool))


def augmented_samples(paths, cfg: TransformConfig):
    """Every (image, target) of the data set under ``cfg``'s train transform, for several seeds."""
    ds = CocoDataset(paths.ann_file, paths.images_dir, transform=build_transform(cfg, train=True))
    for seed in SEEDS:
        for i in range(len(ds)):
            yield ds.get(i, generator=torch.Generator().manual_seed(1000 * seed + i))


# ----------------------------------------------------------------------------- annotations


def test_categories_map_to_sorted_contiguous_labels_and_back(ann):
    assert ann.label_to_cat_id == [3, 7, 19, 42]
    assert ann.cat_id_to_label == {3: 0, 7: 1, 19: 2, 42: 3}
    assert ann.class_names == ["square", "circle", "unused", "triangle"]
    assert [c["id"] for c in ann.categories] == [3, 7, 19, 42]
    assert ann.image_ids == cf.QUIRKY_IMAGE_IDS
    assert ann.skipped == []


def test_crowd_true_and_one_are_crowd_false_and_zero_are_not(ann):
    assert [a["id"] for a in ann.crowd_anns(1001)] == [14]  # "iscrowd": 1
    assert [a["id"] for a in ann.crowd_anns(17)] == [23]  # "iscrowd": true
    assert [a["id"] for a in ann.instance_anns(17)] == [21, 22]  # "iscrowd": false
    assert [a["id"] for a in ann.instance_anns(5)] == [52, 51]  # "iscrowd": 0
    assert all(type(a["iscrowd"]) is int for a in ann.coco.anns.values())


def test_every_segmentation_kind_rasterises_to_its_area(ann):
    kinds = set()
    for a in ann.coco.anns.values():
        seg = a["segmentation"]
        kinds.add("polygons" if isinstance(seg, list) and len(seg) == 1 else
                  "multi-polygon" if isinstance(seg, list) else type(seg["counts"]).__name__)
        mask = ann.ann_to_mask(a)
        assert mask.shape == (ann.image_info(a["image_id"])["height"],
                              ann.image_info(a["image_id"])["width"])
        assert mask.sum() == a["area"]
    assert kinds == {"polygons", "multi-polygon", "str", "list"}


def test_rle_string_counts_match_column_major_runs():
    rng = np.random.default_rng(0)
    for h, w in [(7, 5), (40, 33), (1, 1)]:
        mask = rng.random((h, w)) < 0.4
        rle = cf.compressed_rle(mask)
        assert rle_string_counts(rle["counts"]).tolist() == cf.uncompressed_rle(mask)["counts"]
    assert rle_string_counts("\x7f") is None


# ----------------------------------------------------------------------------- samples


def test_untransformed_samples_match_files(quirky, ann):
    ds = CocoDataset(quirky.ann_file, quirky.images_dir)
    for i, image_id in enumerate(cf.QUIRKY_IMAGE_IDS):
        image, t = ds[i]
        info = ann.image_info(image_id)
        assert t["image_id"] == image_id
        assert image.shape == (3, info["height"], info["width"]) and image.dtype == torch.float32
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert t["orig_size"].tolist() == t["size"].tolist() == [info["height"], info["width"]]
        assert len(t["labels"]) == cf.QUIRKY_INSTANCES_PER_IMAGE[image_id]
        for mask, ann_id in zip(t["masks"], t["ann_ids"].tolist()):
            assert torch.equal(mask, reference_mask(ann, ann_id))
        assert not t["flipped"] and t["scale"].tolist() == [1.0, 1.0]


def test_image_without_annotations_has_empty_targets_of_the_right_shape(quirky):
    ds = CocoDataset(quirky.ann_file, quirky.images_dir,
                     transform=build_transform(UPSCALE_JITTER, train=True))
    image, t = ds[cf.QUIRKY_IMAGE_IDS.index(cf.QUIRKY_EMPTY_IMAGE_ID)]
    h, w = image.shape[-2:]
    assert t["boxes_xyxy"].shape == (0, 4) and t["boxes_cxcywh"].shape == (0, 4)
    assert t["masks"].shape == (0, h, w) and t["masks"].dtype == torch.bool
    assert t["labels"].shape == (0,) and t["labels"].dtype == torch.int64
    assert t["crowd_boxes_xyxy"].shape == (0, 4)
    assert t["crowd_mask"].shape == (h, w) and not t["crowd_mask"].any()


def test_every_image_mode_becomes_rgb_with_pixels_on_the_masks(quirky):
    """Grayscale, RGBA, palette, 16-bit and EXIF-rotated files: bright on masks, dark elsewhere."""
    ds = CocoDataset(quirky.ann_file, quirky.images_dir)
    for i in range(len(ds)):
        image, t = ds[i]
        assert image.shape[0] == 3
        inside = t["masks"].any(0)
        outside = ~inside & ~t["crowd_mask"]
        assert float(image[0][outside].mean()) < 0.2, t["image_id"]
        if inside.any():
            assert float(image[0][inside].mean()) > 0.55, t["image_id"]


def test_crowd_is_an_ignore_region_never_a_target(quirky, ann):
    ds = CocoDataset(quirky.ann_file, quirky.images_dir)
    for i, image_id in enumerate(cf.QUIRKY_IMAGE_IDS):
        _, t = ds[i]
        crowd_ids = [a["id"] for a in ann.crowd_anns(image_id)]
        assert not set(crowd_ids) & set(t["ann_ids"].tolist())
        expected = torch.zeros_like(t["crowd_mask"])
        for ann_id in crowd_ids:
            expected |= reference_mask(ann, ann_id)
        assert torch.equal(t["crowd_mask"], expected)
        assert len(t["crowd_boxes_xyxy"]) == len(crowd_ids)
    assert sum(len(ann.crowd_anns(i)) for i in ann.image_ids) == cf.QUIRKY_NUM_CROWD


@pytest.mark.parametrize("cfg", [UPSCALE_JITTER, DOWNSCALE_JITTER], ids=["up", "down"])
def test_transformed_boxes_enclose_masks_and_labels_keep_category_ids(quirky, ann, cfg):
    flips, sizes = set(), set()
    for image, t in augmented_samples(quirky, cfg):
        h, w = image.shape[-2:]
        assert t["size"].tolist() == [h, w] and t["masks"].shape[-2:] == (h, w)
        assert t["crowd_mask"].shape == (h, w)
        flips.add(t["flipped"])
        sizes.add(min(h, w))
        if len(t["masks"]):
            mask_boxes = masks_to_boxes(t["masks"]) + torch.tensor([0.0, 0.0, 1.0, 1.0])
            assert (mask_boxes - t["boxes_xyxy"]).abs().max() <= 1.0
            norm = t["boxes_cxcywh"] * torch.tensor([w, h, w, h])
            centres = (t["boxes_xyxy"][:, :2] + t["boxes_xyxy"][:, 2:]) / 2
            assert torch.allclose(norm[:, :2], centres)
        cat_ids = [ann.label_to_cat_id[label] for label in t["labels"].tolist()]
        assert cat_ids == [ann.coco.anns[i]["category_id"] for i in t["ann_ids"].tolist()]
        inside = t["masks"].any(0)
        if inside.any():  # the image moved with its masks (flip and resize)
            assert float(image[0][inside].mean()) > 0.5
    assert flips == {True, False}
    assert len(sizes) > 2  # scale jitter happened


def test_undo_transform_recovers_pycocotools_masks(quirky, ann):
    for _, t in augmented_samples(quirky, UPSCALE_JITTER):
        for mask, ann_id in zip(t["masks"], t["ann_ids"].tolist()):
            ref = reference_mask(ann, ann_id)
            back = undo_mask_transform(mask, t)
            assert back.shape == ref.shape
            iou = float((back & ref).sum() / (back | ref).sum())
            assert iou >= 0.98, (t["image_id"], ann_id, iou)


def test_undo_after_downscaling_errs_only_at_the_boundary(quirky, ann):
    """Shrinking loses detail below one resized pixel: errors stay within that band of the edge."""
    for _, t in augmented_samples(quirky, DOWNSCALE_JITTER):
        band = int(np.ceil(1.0 / float(t["scale"].min()))) + 1
        for mask, ann_id in zip(t["masks"], t["ann_ids"].tolist()):
            ref = reference_mask(ann, ann_id).numpy()
            wrong = undo_mask_transform(mask, t).numpy() ^ ref
            edge = ref ^ ndimage.binary_erosion(ref)
            near_edge = ndimage.binary_dilation(edge, iterations=band)
            assert not (wrong & ~near_edge).any(), (t["image_id"], ann_id)


def test_undo_box_transform_returns_annotation_boxes(quirky, ann):
    for _, t in augmented_samples(quirky, DOWNSCALE_JITTER):
        for box, ann_id in zip(undo_box_transform(t["boxes_xyxy"], t), t["ann_ids"].tolist()):
            x, y, bw, bh = ann.coco.anns[ann_id]["bbox"]
            assert torch.allclose(box, torch.tensor([x, y, x + bw, y + bh]), atol=1e-3)


def test_same_generator_seed_gives_the_same_sample(quirky):
    ds = CocoDataset(quirky.ann_file, quirky.images_dir,
                     transform=build_transform(DOWNSCALE_JITTER, train=True))
    draws = []
    for seed in range(8):
        a = ds.get(0, generator=torch.Generator().manual_seed(seed))
        b = ds.get(0, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1]["masks"], b[1]["masks"])
        draws.append((a[1]["flipped"], tuple(a[0].shape)))
    assert len(set(draws)) > 1
    torch.manual_seed(3)
    c = ds[0]
    torch.manual_seed(3)
    assert torch.equal(c[0], ds[0][0])  # the global RNG when no generator is passed


def test_eval_transform_is_a_fixed_resize_without_flip(quirky):
    cfg = TransformConfig(min_size=(64, 96, 128), max_size=150, flip_prob=1.0)
    ds = CocoDataset(quirky.ann_file, quirky.images_dir,
                     transform=build_transform(cfg, train=False))
    for i in range(len(ds)):
        image, t = ds[i]
        h0, w0 = t["orig_size"].tolist()
        assert not t["flipped"]
        assert tuple(image.shape[-2:]) == resized_size(h0, w0, 128, 150)
        assert max(image.shape[-2:]) <= 150  # max_size caps the longer side


def test_transform_config_rejects_bad_values():
    with pytest.raises(ConfigError):
        TransformConfig(min_size=(), max_size=100, flip_prob=0.5)
    with pytest.raises(ConfigError):
        TransformConfig(min_size=(100,), max_size=100, flip_prob=1.5)


def test_collate_pads_to_a_multiple_of_32_and_keeps_sizes(quirky):
    ds = CocoDataset(quirky.ann_file, quirky.images_dir,
                     transform=build_transform(DOWNSCALE_JITTER, train=False))
    samples = [ds[i] for i in range(len(ds))]
    batch = collate(samples)
    b, c, hp, wp = batch.images.shape
    assert (b, c) == (len(samples), 3) and hp % 32 == 0 and wp % 32 == 0
    assert hp - 32 < max(s[0].shape[1] for s in samples) <= hp
    for i, (image, t) in enumerate(samples):
        h, w = image.shape[-2:]
        assert batch.image_sizes[i].tolist() == [h, w] == t["size"].tolist()
        assert torch.equal(batch.images[i, :, :h, :w], image)
        assert batch.images[i, :, h:].abs().sum() == 0
        assert batch.images[i, :, :, w:].abs().sum() == 0
        assert int(batch.valid_mask()[i].sum()) == h * w
    assert batch.targets[0] is samples[0][1]


# ----------------------------------------------------------------------------- bad annotations


BAD_ANNOTATIONS = {
    "degenerate polygon": (cf.write_degenerate_polygon, "4 coordinates"),
    "unknown image": (cf.write_unknown_image_annotation, "unknown image_id"),
    "unknown category": (cf.write_unknown_category_annotation, "unknown category_id"),
    "zero-area box": (cf.write_zero_area_box, "zero or negative width"),
    "rle size mismatch": (cf.write_rle_size_mismatch, "does not match"),
}


@pytest.mark.parametrize("name", list(BAD_ANNOTATIONS))
def test_bad_annotation_is_skipped_with_reason_or_raises_when_strict(tmp_path, name):
    write, reason = BAD_ANNOTATIONS[name]
    case = write(tmp_path)
    ann = load_annotations(case.paths.ann_file)
    assert [(s["file"], s["entry"]) for s in ann.skipped] == [(str(case.file), case.entry)]
    assert reason in ann.skipped[0]["reason"]
    bad_id = int(case.entry.split("=")[1])
    assert bad_id not in ann.coco.anns
    assert len(ann.coco.anns) == cf.QUIRKY_NUM_INSTANCES + cf.QUIRKY_NUM_CROWD
    with pytest.raises(DataError) as err:
        load_annotations(case.paths.ann_file, strict=True)
    assert err.value.entry == case.entry and str(case.file) in str(err.value)


@pytest.mark.parametrize("fields, reason", [
    ({"segmentation": [[1, 2, 3, 4, 5, 6, 7]]}, "7 coordinates"),
    ({"segmentation": [[10, 10, 20, 20, 30]]}, "5 coordinates"),
    ({"segmentation": []}, "empty list"),
    ({"segmentation": [[10, 10, 20, 20, 30, 30]]}, "zero area"),
    ({"segmentation": [[10, 10, 20, float("nan"), 30, 10]]}, "not a finite number"),
    ({"segmentation": [10, 10, 20, 20, 30, 10]}, "not a flat list"),
    ({"segmentation": [[-50, -50, -10, -50, -10, -10]]}, "outside the image"),
    ({"segmentation": {"size": [160, 240], "counts": [10, 5]}}, "do not cover"),
    ({"segmentation": {"size": [160, 240], "counts": "0"}}, "do not cover"),
    ({"segmentation": {"size": [160, 240], "counts": [160 * 240]}}, "empty mask"),
    ({"segmentation": "not a mask"}, "segmentation must be"),
    ({"area": "big"}, "area must be"),
    ({"iscrowd": 2}, "iscrowd must be"),
    ({"bbox": [1, 2, 3]}, "bbox must be"),
    ({"bbox": [500, 10, 20, 20]}, "outside"),
])
def test_more_annotation_problems_are_skipped(tmp_path, fields, reason):
    case = cf.with_extra_annotation(tmp_path, id=950, **fields)
    ann = load_annotations(case.paths.ann_file)
    assert [s["entry"] for s in ann.skipped] == ["annotation id=950"]
    assert reason in ann.skipped[0]["reason"]


def test_missing_bbox_and_area_are_computed_from_the_mask(tmp_path):
    paths = cf.write_quirky_coco(tmp_path)
    data = json.loads(paths.ann_file.read_text())
    expected = {a["id"]: (a.pop("bbox"), a.pop("area")) for a in data["annotations"]}
    paths.ann_file.write_text(json.dumps(data))
    ann = load_annotations(paths.ann_file)
    for ann_id, (bbox, area) in expected.items():
        assert ann.coco.anns[ann_id]["bbox"] == pytest.approx(bbox)
        assert ann.coco.anns[ann_id]["area"] == area


# ----------------------------------------------------------------------------- images


@pytest.mark.parametrize("write", [cf.write_truncated_image, cf.write_text_as_jpg,
                                   cf.write_missing_image])
def test_unreadable_image_raises_data_error_naming_the_file(tmp_path, write):
    case = write(tmp_path)
    with pytest.raises(DataError) as err:
        load_image(case.file)
    assert str(case.file) in str(err.value)
    ds = CocoDataset(case.paths.ann_file, case.paths.images_dir)
    index = cf.QUIRKY_IMAGE_IDS.index(int(case.entry.split("=")[1]))
    with pytest.raises(DataError):
        ds[index]


def test_sixteen_bit_image_is_scaled_not_clipped(quirky):
    image = np.asarray(load_image(quirky.images_dir / "gray16.png"))
    assert image.shape[-1] == 3 and image.dtype == np.uint8
    assert abs(int(image[0, 0, 0]) - cf.BACKGROUND) <= 1 and image[64, 64, 0] == 160


def test_image_of_another_size_than_annotated_raises(tmp_path):
    paths = cf.write_quirky_coco(tmp_path)
    data = json.loads(paths.ann_file.read_text())
    data["images"][4]["width"] = 129  # gray16.png is 128 wide
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 64]
    paths.ann_file.write_text(json.dumps(data))
    ds = CocoDataset(paths.ann_file, paths.images_dir)
    with pytest.raises(DataError, match="128 x 128 pixels but the annotation file says 129"):
        ds[4]


def test_missing_image_folder_raises(quirky, tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        CocoDataset(quirky.ann_file, tmp_path / "nowhere")

