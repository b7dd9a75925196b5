"""istr_viz.viz.evaluation: precision / recall curves, per-image errors and their figures.

Oracles: the quirky COCO set (crowd regions, unsorted category ids, an empty image) with its ground
truth fed back as detections (precision 1 everywhere), COCOeval's own AP (the area under a curve
must be it), and hand-made detections whose true / false positives and misses are counted by hand.
The gallery is drawn from the tiny model of ``tiny_viz``.
"""

from __future__ import annotations

import matplotlib.colors as mcolors
import numpy as np
import pycocotools.mask as mask_utils
import pytest
from tiny_viz import dataset, model, panels, patches_with, rect_xyxy, tiny_predictor  # noqa: F401

from coco_factory import QUIRKY_CATEGORIES, QUIRKY_EMPTY_IMAGE_ID, write_quirky_coco
from istr_viz.data.coco import load_annotations
from istr_viz.evaluate import coco_eval, ground_truth_as_results
from istr_viz.viz.evaluation import (
    ImageErrors,
    image_errors,
    plot_error_breakdown,
    plot_mask_ap_ceilings,
    plot_pr_by_stage,
    plot_pr_curves,
    plot_prediction_gallery,
    plot_stage_ap,
    pr_curves,
    worst_images,
)
from istr_viz.viz.figures import figure_to_array

SORTED_IDS = [3, 7, 19, 42]  # the quirky category ids, sorted (19 has no instance)


@pytest.fixture(scope="module")
def gt(tmp_path_factory):
    return load_annotations(write_quirky_coco(tmp_path_factory.mktemp("quirky")).ann_file).coco


def _by_ann_id(gt, score: float = 0.9) -> dict[int, dict]:
    """The ground truth as results, keyed by annotation id (for picking and editing)."""
    results = ground_truth_as_results(gt)
    anns = gt.loadAnns(gt.getAnnIds(iscrowd=False))
    assert len(anns) == len(results)
    return {a["id"]: dict(r, score=score) for a, r in zip(anns, results)}


def _result(gt, image_id: int, category_id: int, mask: np.ndarray, score: float) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"image_id": image_id, "category_id": category_id, "score": score,
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "segmentation": {"size": [int(v) for v in rle["size"]],
                             "counts": rle["counts"].decode("ascii")}}


def _mask_of(gt, ann_id: int) -> np.ndarray:
    return gt.annToMask(gt.loadAnns([ann_id])[0]).astype(bool)


def degraded_results(gt) -> list[dict]:
    """Every instance found but three; a duplicate, a wrong class, a detection on a crowd region,
    one in the empty image and one below the usual 0.4 threshold. Per image (TP, FP, missed)
    at score >= 0.4 and IoU >= 0.5: 1001 (2, 0, 1), 17 (2, 1, 0), 5 (1, 1, 1), 230 (0, 1, 0),
    64 (0, 0, 1), 88 (2, 0, 0)."""
    found = _by_ann_id(gt)
    del found[13]  # image 1001: the circle is missed
    out = list(found.values())
    for r, score in zip(out, np.linspace(0.95, 0.6, len(out))):
        r["score"] = float(score)
    by_id = {a: r for a, r in found.items()}
    by_id[641]["score"] = 0.2  # image 64: the circle found, but below the threshold
    # image 17: the circle again, lower (a duplicate) and a circle-class detection on the crowd
    out.append(dict(by_id[21], score=0.5))
    out.append(_result(gt, 17, 7, _mask_of(gt, 23), 0.55))
    # image 5: the half-hidden square (52) given the triangle's class 42 instead of 3
    by_id[52]["category_id"] = 42
    by_id[52]["score"] = 0.45  # after the real triangle
    # the empty image: a confident square out of nowhere
    blank = np.zeros((60, 90), bool)
    blank[10:40, 20:50] = True
    out.append(_result(gt, QUIRKY_EMPTY_IMAGE_ID, 3, blank, 0.9))
    return out


EXPECTED = {1001: (2, 0, 1), 17: (2, 1, 0), 5: (1, 1, 1), 230: (0, 1, 0), 64: (0, 0, 1),
            88: (2, 0, 0)}


# ----------------------------------------------------------------------------- pr_curves


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_the_ground_truth_has_precision_one_everywhere(gt, iou_type):
    curves = pr_curves(gt, ground_truth_as_results(gt), iou_type)
    assert curves.category_ids == SORTED_IDS and curves.iou_type == iou_type
    assert curves.precision.shape == (10, 101, 4)
    np.testing.assert_allclose(curves.recall, np.linspace(0, 1, 101))
    np.testing.assert_allclose(curves.iou_thresholds, np.linspace(0.5, 0.95, 10))
    unused = SORTED_IDS.index(19)
    assert np.isnan(curves.precision[:, :, unused]).all()  # no ground truth: no curve
    others = np.delete(curves.precision, unused, axis=2)
    np.testing.assert_allclose(others, 1.0)
    np.testing.assert_allclose(curves.mean(0.5), 1.0)
    assert curves.iou_index(0.75) == 5
    with pytest.raises(ValueError, match="0.52"):
        curves.iou_index(0.52)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_the_area_under_each_curve_is_cocoeval_ap(gt, iou_type):
    results = degraded_results(gt)
    curves = pr_curves(gt, results, iou_type)
    summary, per_cat = coco_eval(gt, results, iou_type)
    assert 0.2 < summary["AP50"] < 0.95  # degraded, not empty
    assert curves.mean(0.5).mean() == pytest.approx(summary["AP50"], abs=1e-12)
    assert curves.mean(0.75).mean() == pytest.approx(summary["AP75"], abs=1e-12)
    mean_ap = np.mean([curves.mean(t).mean() for t in curves.iou_thresholds])
    assert mean_ap == pytest.approx(summary["AP"], abs=1e-12)
    for k, cat in enumerate(curves.category_ids):
        if cat in per_cat:
            assert curves.precision[:, :, k].mean() == pytest.approx(per_cat[cat], abs=1e-12)
    # precision is COCO's interpolated one: never rising with recall
    block = np.nan_to_num(curves.precision[0])
    assert (np.diff(block, axis=0) <= 1e-12).all()


def test_no_results_give_zero_curves_where_there_is_ground_truth(gt):
    curves = pr_curves(gt, [], "segm")
    assert curves.precision.shape == (10, 101, 4)
    for k, cat in enumerate(SORTED_IDS):
        column = curves.precision[:, :, k]
        assert np.isnan(column).all() if cat == 19 else (column == 0).all()
    assert curves.mean(0.5).mean() == 0.0 == coco_eval(gt, [], "segm")[0]["AP50"]
    # restricted to image 64 (one circle): only the circle category has ground truth
    only_64 = pr_curves(gt, [], "bbox", image_ids=[64])
    has_curve = ~np.isnan(only_64.precision[0, 0])
    assert [c for c, h in zip(SORTED_IDS, has_curve) if h] == [7]
    # ... as with results there: the circle found, nothing for the other categories
    found = [r for r in ground_truth_as_results(gt, image_ids=[64])]
    with_results = pr_curves(gt, found, "bbox", image_ids=[64])
    np.testing.assert_array_equal(~np.isnan(with_results.precision[0, 0]), has_curve)
    np.testing.assert_allclose(with_results.mean(0.5), 1.0)
    with pytest.raises(ValueError, match="iou_type"):
        pr_curves(gt, [], "keypoints")


# ----------------------------------------------------------------------------- image_errors


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_image_errors_count_hits_false_positives_and_misses(gt, iou_type):
    errors = image_errors(gt, degraded_results(gt), 0.4, iou_type=iou_type)
    assert [e.image_id for e in errors] == sorted(gt.getImgIds())
    counts = {e.image_id: (e.true_positives, e.false_positives, e.misses) for e in errors}
    assert counts == EXPECTED
    f1 = {e.image_id: e.f1 for e in errors}
    assert f1 == {1001: pytest.approx(0.8), 17: pytest.approx(0.8), 5: pytest.approx(0.5),
                  230: 0.0, 64: 0.0, 88: 1.0}


def test_thresholds_and_image_ids_change_the_counts(gt):
    results = degraded_results(gt)
    low = {e.image_id: (e.true_positives, e.false_positives, e.misses)
           for e in image_errors(gt, results, 0.1)}
    assert low[64] == (1, 0, 0)  # the 0.2 detection now counts
    only = image_errors(gt, results, 0.4, image_ids=[5, 88])
    assert [e.image_id for e in only] == [5, 88]
    # the small square of image 88 moved by 5 px: IoU 300 / 500 = 0.6
    shifted = _by_ann_id(gt)
    square = np.roll(_mask_of(gt, 882), 5, axis=1)
    moved = [r for a, r in shifted.items() if a != 882] + [_result(gt, 88, 3, square, 0.9)]
    at = {t: {e.image_id: e for e in image_errors(gt, moved, 0.4, iou_threshold=t)}[88]
          for t in (0.5, 0.7)}
    assert (at[0.5].true_positives, at[0.5].false_positives, at[0.5].misses) == (2, 0, 0)
    assert (at[0.7].true_positives, at[0.7].false_positives, at[0.7].misses) == (1, 1, 1)
    with pytest.raises(ValueError, match="iou_type"):
        image_errors(gt, results, iou_type="keypoints")


def test_the_ground_truth_makes_no_errors(gt):
    errors = image_errors(gt, ground_truth_as_results(gt), 0.4)
    assert all(e.errors == 0 and e.f1 == 1.0 for e in errors)
    assert worst_images(errors) == []
    empty = {e.image_id: e for e in errors}[QUIRKY_EMPTY_IMAGE_ID]
    assert (empty.true_positives, empty.false_positives, empty.misses) == (0, 0, 0)


def test_worst_images_come_lowest_f1_first(gt):
    errors = image_errors(gt, degraded_results(gt), 0.4)
    worst = worst_images(errors, num=10)
    # F1 0 (64 and 230, one error each, by id), 0.5 (5), then 0.8 with one error each (17, 1001)
    assert [e.image_id for e in worst] == [64, 230, 5, 17, 1001]  # 88 is perfect: left out
    assert [e.image_id for e in worst_images(errors, num=2)] == [64, 230]
    assert ImageErrors(5, 1, 1, 1).describe() == "image 5: 1 TP, 1 FP, 1 missed (F1 0.50)"


# ----------------------------------------------------------------------------- figures


def _metrics(num_stages: int = 3) -> dict:
    """evaluate_results-style metrics whose AP rises with the stage."""
    per_stage = []
    for k in range(1, num_stages + 1):
        entry = {"stage": k}
        for i, iou_type in enumerate(("bbox", "segm")):
            entry[iou_type] = {"AP": 0.1 * k + 0.01 * i, "AP50": 0.2 * k + 0.01 * i,
                               "AP75": 0.05 * k + 0.01 * i}
        per_stage.append(entry)
    return {"per_stage": per_stage}


def _rendered(fig) -> np.ndarray:
    image = figure_to_array(fig)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.std() > 5  # something is drawn
    return image


def _has_color(image: np.ndarray, color, tol: int = 12) -> bool:
    rgb = np.asarray(mcolors.to_rgb(color)) * 255
    return bool((np.abs(image.astype(float) - rgb).max(axis=2) <= tol).any())


def test_stage_ap_plots_each_key_against_the_stage():
    metrics = _metrics()
    fig = plot_stage_ap(metrics)
    axes = panels(fig)
    assert [ax.get_title() for ax in axes] == ["box AP", "mask AP"]
    for ax, iou_type in zip(axes, ("bbox", "segm")):
        lines = ax.get_lines()
        assert [ln.get_label() for ln in lines] == ["AP", "AP50", "AP75"]
        for line, key in zip(lines, ("AP", "AP50", "AP75")):
            np.testing.assert_allclose(line.get_xdata(), [1, 2, 3])
            np.testing.assert_allclose(line.get_ydata(),
                                       [100 * e[iou_type][key] for e in metrics["per_stage"]])
        assert list(ax.get_xticks()) == [1, 2, 3]
    image = _rendered(fig)
    assert _has_color(image, lines[0].get_color())  # the AP line is really drawn
    with pytest.raises(ValueError, match="no stages"):
        plot_stage_ap({"per_stage": []})


def test_mask_ap_ceilings_plot_draws_a_bar_per_row_and_key(gt):
    from istr_viz.basis import MaskBasis
    from istr_viz.ceilings import CEILING_ROWS, mask_ap_ceilings

    rng = np.random.default_rng(0)
    basis = MaskBasis.fit(rng.random((200, 16, 16)) > 0.5, dim=8, seed=0)
    ceilings = mask_ap_ceilings(gt, degraded_results(gt), basis)
    fig = plot_mask_ap_ceilings(ceilings)
    (ax,) = panels(fig)
    heights = sorted((p.get_y(), p.get_width()) for p in ax.patches)  # bottom row first
    widths = [w for _, w in heights]
    expected = [100 * ceilings[row][key] for row, _ in reversed(CEILING_ROWS)
                for key in ("AP", "AP75")]
    np.testing.assert_allclose(widths, expected)
    assert [t.get_text() for t in ax.get_yticklabels()] == [label for _, label in
                                                            reversed(CEILING_ROWS)]
    (box_line,) = ax.get_lines()
    assert box_line.get_xdata()[0] == pytest.approx(100 * ceilings["model_box"]["AP"])
    with pytest.raises(ValueError, match="ceilings lack"):
        plot_mask_ap_ceilings({"model": ceilings["model"]})


def test_error_breakdown_plot_draws_each_figure_once(gt):
    from istr_viz.breakdown import breakdown_both

    breakdown = breakdown_both(gt, degraded_results(gt))
    fig = plot_error_breakdown(breakdown)
    (ax,) = panels(fig)
    drawn = sorted((round(p.get_x(), 6), p.get_height()) for p in ax.patches)
    keys = ("AP", "AP_classes_corrected", "AP50", "AP50_classes_corrected", "AP10",
            "AP10_classes_corrected", "missed")
    expected = [100 * breakdown[t][k] for t in ("bbox", "segm") for k in keys]  # x order
    np.testing.assert_allclose([h for _, h in drawn], expected)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["boxes", "masks"]
    with pytest.raises(ValueError, match="breakdown lacks"):
        plot_error_breakdown({"bbox": breakdown["bbox"]})


def test_pr_curves_draw_one_line_per_category_and_the_mean(gt):
    curves = pr_curves(gt, degraded_results(gt), "segm")
    fig = plot_pr_curves(curves, (0.5, 0.75), class_names=QUIRKY_CATEGORIES)
    axes = panels(fig)
    assert [ax.get_title() for ax in axes] == ["mask IoU 0.50", "mask IoU 0.75"]
    for ax, iou in zip(axes, (0.5, 0.75)):
        lines = ax.get_lines()
        names = [ln.get_label().rsplit(" ", 1)[0] for ln in lines]
        assert names == ["square", "circle", "triangle", "mean"]  # 19 "unused": no curve
        block = curves.precision[curves.iou_index(iou)]
        for line, cat in zip(lines[:3], (3, 7, 42)):
            k = SORTED_IDS.index(cat)
            np.testing.assert_allclose(line.get_xdata(), curves.recall)
            np.testing.assert_allclose(line.get_ydata(), block[:, k])
            assert line.get_label() == f"{QUIRKY_CATEGORIES[cat]} {100 * block[:, k].mean():.0f}"
        mean = lines[3]
        np.testing.assert_allclose(mean.get_ydata(), curves.mean(iou))
        assert mean.get_linestyle() == "--" and mcolors.same_color(mean.get_color(), "k")
    image = _rendered(fig)
    assert _has_color(image, axes[0].get_lines()[0].get_color())
    by_id = [ln.get_label() for ln in panels(plot_pr_curves(curves))[0].get_lines()]
    assert by_id[0].startswith("3 ")  # without names: the category ids
    with pytest.raises(ValueError, match="class names"):
        plot_pr_curves(curves, class_names=["a", "b"])


def test_pr_by_stage_draws_one_line_per_stage_light_to_dark(gt):
    results = degraded_results(gt)
    stages = [results[::3], results[::2], results]
    curves = [pr_curves(gt, r, "bbox") for r in stages]
    fig = plot_pr_by_stage(curves, 0.5)
    (ax,) = panels(fig)
    lines = ax.get_lines()
    assert len(lines) == 3
    for k, (line, c) in enumerate(zip(lines, curves), start=1):
        np.testing.assert_allclose(line.get_ydata(), c.mean(0.5))
        assert line.get_label() == f"stage {k} AP {100 * c.mean(0.5).mean():.1f}"
    lightness = [np.mean(mcolors.to_rgb(line.get_color())) for line in lines]
    assert lightness[0] > lightness[1] > lightness[2]  # stage 1 light, the last dark
    assert "IoU 0.50" in ax.get_title() and ax.get_title().startswith("box")
    image = _rendered(fig)
    assert _has_color(image, lines[-1].get_color())
    with pytest.raises(ValueError, match="empty"):
        plot_pr_by_stage([])


def test_gallery_draws_each_prediction_with_its_ground_truth(model, dataset):
    predictor = tiny_predictor(model, dataset)
    indices = [0, 1, 2, 3]
    predictions = [predictor.predict(dataset.image_path(i)) for i in indices]
    gt_boxes = [dataset.raw_target(i)["boxes_xyxy"].numpy() for i in indices]
    titles = [f"image {i}" for i in indices]
    threshold = float(predictions[0].detections(None).scores[4])  # at least 5 in the first
    fig = plot_prediction_gallery(predictions, titles, gt_boxes, score_threshold=threshold,
                                  ncols=3)
    axes = panels(fig)
    assert len(axes) == 4 and len(fig.axes) == 6  # a 2 x 3 grid, the last two hidden
    for ax, prediction, boxes, title in zip(axes, predictions, gt_boxes, titles):
        assert ax.get_title() == title
        np.testing.assert_array_equal(ax.images[0].get_array(), prediction.image)
        dashed = [rect_xyxy(p) for p in patches_with(ax, "--")]
        np.testing.assert_allclose(dashed, boxes.reshape(-1, 4), atol=1e-4)
        shown = prediction.detections(None, threshold)
        solid = [rect_xyxy(p) for p in patches_with(ax, "-")]
        np.testing.assert_allclose(solid, shown.boxes_xyxy.numpy().reshape(-1, 4), atol=1e-4)
        h, w = prediction.size
        assert ax.get_xlim() == (-0.5, w - 0.5) and ax.get_ylim() == (h - 0.5, -0.5)
    assert len(patches_with(axes[0], "-")) >= 5
    _rendered(fig)
    one = plot_prediction_gallery(predictions[:1], stage=1, score_threshold=threshold)
    assert panels(one)[0].get_title().startswith("stage 1:")  # no titles: draw_stage's own
    with pytest.raises(ValueError, match="no predictions"):
        plot_prediction_gallery([])
    with pytest.raises(ValueError, match="titles"):
        plot_prediction_gallery(predictions, titles[:2])
    with pytest.raises(ValueError, match="gt_boxes"):
        plot_prediction_gallery(predictions, gt_boxes=gt_boxes[:1])
