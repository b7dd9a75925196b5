"""istr_viz.data.check: the check-data summary of the quirky set, and bad inputs."""

from __future__ import annotations

import json

import pytest

import coco_factory as cf
from istr_viz.data.check import (check_dataset, check_images, fit_warnings, format_summary,
                                 median_object_px, most_instances, queries_for, size_factor)
from istr_viz.data.coco import CocoDataset, load_annotations
from istr_viz.errors import DataError


@pytest.fixture(scope="module")
def quirky(tmp_path_factory):
    return cf.write_quirky_coco(tmp_path_factory.mktemp("quirky"))


@pytest.fixture(scope="module")
def summary(quirky):
    return check_dataset(quirky.ann_file, quirky.images_dir)


def test_counts_of_the_quirky_set(summary):
    assert summary["images"] == len(cf.QUIRKY_IMAGE_IDS) == 6
    assert summary["instances"] == cf.QUIRKY_NUM_INSTANCES == 10
    assert summary["crowd"] == cf.QUIRKY_NUM_CROWD == 2
    assert summary["images_without_annotations"] == 1
    assert summary["instances_per_image"] == {"mean": pytest.approx(10 / 6), "max": 3}
    assert summary["skipped"] == []


def test_categories_sorted_by_id_with_the_empty_one(summary):
    assert summary["categories"] == [
        {"id": 3, "name": "square", "instances": 4},
        {"id": 7, "name": "circle", "instances": 4},
        {"id": 19, "name": "unused", "instances": 0},
        {"id": 42, "name": "triangle", "instances": 2},
    ]
    assert {c["id"]: c["instances"] for c in summary["categories"]} == \
        cf.QUIRKY_INSTANCES_PER_CATEGORY


def test_size_shares_follow_coco_area_thresholds(quirky, summary):
    areas = [a["area"] for a in json.loads(quirky.ann_file.read_text())["annotations"]
             if not a["iscrowd"]]
    assert sum(a < 32**2 for a in areas) == 1 and sum(a >= 96**2 for a in areas) == 1
    assert summary["size_shares"] == pytest.approx({"small": 0.1, "medium": 0.8, "large": 0.1})


def test_occlusion_proxy_finds_the_half_hidden_square(summary):
    assert summary["occlusion_method"] == "bbox-overlap proxy"
    assert summary["occluded_share"] == pytest.approx(1 / 10)


def test_occlusion_is_exact_with_amodal_area(tmp_path):
    paths = cf.write_quirky_coco(tmp_path)
    cf.add_amodal_areas(paths, {cf.QUIRKY_OCCLUDED_ANN_ID: 0.1, 11: 0.3, 21: 0.5})
    s = check_dataset(paths.ann_file, paths.images_dir)
    assert s["occlusion_method"] == "amodal_area"
    assert s["occluded_share"] == pytest.approx(2 / 10)  # 0.3 and 0.5 hidden; 0.1 is not > 0.2


def test_format_summary_is_a_readable_table(summary):
    text = format_summary(summary)
    assert "6 images (1 without annotations), 10 instances, 2 crowd regions" in text
    rows = {line.split()[1]: line.split() for line in text.splitlines()
            if line.strip().split(" ")[0].isdigit() and len(line.split()) >= 4}
    assert rows["unused"][:3] == ["19", "unused", "0"] and "(no instances)" in text
    assert rows["circle"][:4] == ["7", "circle", "4", "40.0%"]
    assert "nothing skipped" in text


@pytest.mark.parametrize("write", [
    cf.write_degenerate_polygon, cf.write_unknown_image_annotation,
    cf.write_unknown_category_annotation, cf.write_zero_area_box, cf.write_rle_size_mismatch,
])
def test_bad_annotations_are_listed_and_not_counted(tmp_path, write):
    case = write(tmp_path)
    s = check_dataset(case.paths.ann_file, case.paths.images_dir)
    assert [(p["file"], p["entry"]) for p in s["skipped"]] == [(str(case.file), case.entry)]
    assert s["instances"] == cf.QUIRKY_NUM_INSTANCES
    assert case.entry in format_summary(s)


def test_a_mask_that_rasterises_to_nothing_is_skipped(tmp_path):
    """A sliver inside one pixel passes the polygon checks but pycocotools draws no pixel."""
    sliver = [[10.1, 10.1, 10.3, 10.1, 10.2, 10.3]]
    case = cf.with_extra_annotation(tmp_path, id=960, segmentation=sliver,
                                    bbox=[10.1, 10.1, 0.2, 0.2])
    s = check_dataset(case.paths.ann_file, case.paths.images_dir)
    assert [(p["entry"], p["reason"]) for p in s["skipped"]] == [
        ("annotation id=960", "empty mask after rasterisation")]
    assert s["instances"] == cf.QUIRKY_NUM_INSTANCES
    _, target = CocoDataset(case.paths.ann_file, case.paths.images_dir)[0]  # image 1001
    assert 960 not in target["ann_ids"].tolist() and len(target["labels"]) == 3


@pytest.mark.parametrize("write, reason", [
    (cf.write_truncated_image, "cannot read image"),
    (cf.write_text_as_jpg, "cannot read image"),
    (cf.write_missing_image, "image file not found"),
])
def test_unreadable_images_are_listed(tmp_path, write, reason):
    case = write(tmp_path)
    s = check_dataset(case.paths.ann_file, case.paths.images_dir)
    assert len(s["skipped"]) == 1
    assert s["skipped"][0]["file"] == str(case.file) and s["skipped"][0]["entry"] == case.entry
    assert reason in s["skipped"][0]["reason"]
    assert s["images"] == 6  # the entry still counts; the problem is reported
    no_files = check_dataset(case.paths.ann_file, case.paths.images_dir, check_image_files=False)
    assert no_files["skipped"] == []


def test_check_images_reports_a_size_mismatch(tmp_path):
    paths = cf.write_quirky_coco(tmp_path)
    data = json.loads(paths.ann_file.read_text())
    data["images"][3]["height"] = 61  # empty.jpg is 90 x 60
    paths.ann_file.write_text(json.dumps(data))
    problems = check_images(load_annotations(paths.ann_file), paths.images_dir)
    assert [p["entry"] for p in problems] == [f"image id={cf.QUIRKY_EMPTY_IMAGE_ID}"]
    assert "90 x 60 pixels but the annotation file says 90 x 61" in problems[0]["reason"]


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("write", [
    cf.write_missing_annotation_file,
    cf.write_invalid_json,
    cf.write_non_coco_json,
    lambda folder: cf.write_non_coco_json(folder, missing="images"),
    lambda folder: cf.write_non_coco_json(folder, missing="list"),
    cf.write_duplicate_image_ids,
], ids=["missing file", "invalid JSON", "no categories", "no images", "JSON list", "duplicate ids"])
def test_bad_annotation_files_raise_naming_the_file(tmp_path, write):
    case = write(tmp_path)
    for call in (load_annotations, lambda f: check_dataset(f, case.paths.images_dir)):
        with pytest.raises(DataError) as err:
            call(case.paths.ann_file)
        assert err.value.file == str(case.file) and str(case.file) in str(err.value)
        if case.entry is not None:
            assert case.entry in err.value.entry
        assert "\n" not in str(err.value)


def test_wrong_types_name_the_key(tmp_path):
    paths = cf.write_quirky_coco(tmp_path)
    for key in ("images", "annotations", "categories"):
        data = cf.quirky_dict_and_images()[0]
        data[key] = {"not": "a list"}
        paths.ann_file.write_text(json.dumps(data))
        with pytest.raises(DataError) as err:
            load_annotations(paths.ann_file)
        assert err.value.entry == key and "must be a list" in err.value.reason


@pytest.mark.parametrize("change, entry", [
    (lambda d: d["images"][0].pop("width"), "image id=1001"),
    (lambda d: d["images"][1].update(id="17"), "images[1]"),
    (lambda d: d["categories"].append({"id": 7, "name": "again"}), "category id=7"),
    (lambda d: d["categories"][0].pop("name"), "category id=42"),
])
def test_malformed_entries_raise_naming_the_entry(tmp_path, change, entry):
    paths = cf.write_quirky_coco(tmp_path)
    data = json.loads(paths.ann_file.read_text())
    change(data)
    paths.ann_file.write_text(json.dumps(data))
    with pytest.raises(DataError) as err:
        load_annotations(paths.ann_file)
    assert err.value.entry == entry


def test_missing_image_folder_raises(quirky, tmp_path):
    with pytest.raises(DataError) as err:
        check_dataset(quirky.ann_file, tmp_path / "no-images")
    assert str(tmp_path / "no-images") in str(err.value)


def test_fit_warnings_name_the_queries_and_the_shrink(quirky):
    ann = load_annotations(quirky.ann_file)
    # the quirky set: at most 3 instances per image, shorter sides 130-200 px
    assert fit_warnings(ann, num_queries=3, test_min_size=192, test_max_size=373) == []
    few, = fit_warnings(ann, num_queries=2, test_min_size=192, test_max_size=373)
    assert few.startswith("annotations.json: 1 of 6 images have more instances than the model's 2")
    assert "model.num_queries=6" in few
    shrink, = fit_warnings(ann, num_queries=24, test_min_size=48, test_max_size=96)
    assert "shrunk to less than half" in shrink and "data.test_min_size" in shrink


def test_queries_for_scales_with_the_most_crowded_image(quirky):
    """The quirky set's most crowded image holds 3 instances (its crowd regions not counted)."""
    ann = load_annotations(quirky.ann_file)
    assert most_instances(ann) == 3
    assert queries_for(4, 0.0, ann) == 4  # off
    assert queries_for(4, 2.5, ann) == 8  # ceil(7.5)
    assert queries_for(24, 3.0, ann) == 24  # never fewer than given


def test_queries_for_raises_at_most_to_the_cap(quirky, monkeypatch):
    from istr_viz.data import check

    ann = load_annotations(quirky.ann_file)
    monkeypatch.setattr(check, "MAX_RAISED_QUERIES", 7)
    assert check.queries_for(4, 3.0, ann) == 7  # not 9
    assert check.queries_for(12, 3.0, ann) == 12  # a larger number given by hand stands


def _median_by_hand(ann_file, middle: float, max_size: float) -> float:
    """The median of sqrt(area) x the training resize's scale, from the JSON itself."""
    import math
    import statistics

    data = json.loads(ann_file.read_text())
    images = {i["id"]: i for i in data["images"]}
    sizes = []
    for a in data["annotations"]:
        if a["iscrowd"]:
            continue
        h, w = images[a["image_id"]]["height"], images[a["image_id"]]["width"]
        scale = min(middle / min(h, w), max_size / max(h, w))
        sizes.append(math.sqrt(a["area"]) * scale)
    return statistics.median(sizes)


def test_median_object_px_is_the_median_instance_at_the_middle_training_size(quirky):
    ann = load_annotations(quirky.ann_file)
    want = _median_by_hand(quirky.ann_file, 96, 1000)
    assert median_object_px(ann, (64, 96, 128), 1000) == pytest.approx(want)
    assert median_object_px(ann, (90, 96, 200), 1000) == pytest.approx(want)  # the median size
    # a cap on the longer side binds for the wider images: never larger than without it
    capped = median_object_px(ann, (64, 96, 128), 120)
    assert capped == pytest.approx(_median_by_hand(quirky.ann_file, 96, 120)) and capped < want


def test_size_factor_is_x125_where_the_median_object_is_at_most_08_of_the_target(quirky):
    ann = load_annotations(quirky.ann_file)
    median = median_object_px(ann, (96,), 1000)
    assert median > 0
    factor = lambda target: size_factor(target, median)  # noqa: E731
    assert factor(0) == 1.0  # off
    assert factor(median * 0.9) == 1.0  # already larger than asked
    assert factor(median * 1.2) == 1.0  # under the step: left as it is
    assert factor(median * 1.25) == 1.25 and factor(median * 1.4) == 1.25
    assert factor(median * 10) == 1.25  # larger steps were not measured


def test_median_object_px_needs_training_sizes(quirky):
    from istr_viz.errors import ConfigError

    with pytest.raises(ConfigError, match="data.train_min_sizes is empty"):
        median_object_px(load_annotations(quirky.ann_file), (), 100)


def test_the_presets_object_size_leaves_the_built_in_shapes_as_they_are(tmp_path):
    """shapes-cpu's data.median_object_px (28) is the built-in shapes' own median at the middle
    training size (28.1 px over the 2,000 training images): a built-in-like set keeps its sizes."""
    from istr_viz.config import get_preset
    from istr_viz.data.shapes import make_shapes

    make_shapes(tmp_path, num_train=60, num_val=1, size=256, seed=5, progress=False)
    ann = load_annotations(tmp_path / "train" / "annotations.json")
    data = get_preset("shapes-cpu").data
    assert 22.4 < median_object_px(ann, data.train_min_sizes, data.train_max_size) < 40
    median = median_object_px(ann, data.train_min_sizes, data.train_max_size)
    assert size_factor(data.median_object_px, median) == 1.0


def test_median_object_px_must_be_a_sensible_number():
    from istr_viz.config import apply_overrides, get_preset
    from istr_viz.errors import ConfigError

    for bad in ("-1", "1e9", "true"):
        with pytest.raises(ConfigError, match="data.median_object_px"):
            apply_overrides(get_preset("shapes-cpu"), [f"data.median_object_px={bad}"])
    from dataclasses import replace

    with pytest.raises(ConfigError, match="data.median_object_px"):  # not a bool, built directly
        replace(get_preset("shapes-cpu").data, median_object_px=True)
