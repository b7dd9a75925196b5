"""istr_viz.predictor and istr_viz.postprocess: any image in, every stage out at its own size."""

from __future__ import annotations

import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from coco_factory import write_quirky_coco
from istr_viz.basis import MaskBasis
from istr_viz.config import ModelConfig
from istr_viz.data.coco import CocoDataset, collate, load_image
from istr_viz.data.instance_masks import synthetic_instance_masks
from istr_viz.data.transforms import TransformConfig, build_transform, resized_size
from istr_viz.errors import DataError
from istr_viz.model import build_model
from istr_viz.postprocess import maskness, mask_to_rle, paste_masks, rescale_boxes, top_detections
from istr_viz.predictor import Predictor, image_to_array, input_size_for

TINY = ModelConfig(backbone="resnet18", backbone_base_channels=8, norm="gn", num_queries=10,
                   num_stages=2, hidden_dim=32, dim_dynamic=8, dim_feedforward=64, num_heads=2)
CATEGORY_IDS = [42, 7, 3]  # non-contiguous, unsorted: label i is category CATEGORY_IDS[i]
CLASS_NAMES = ["triangle", "circle", "square"]
MIN_SIZE, MAX_SIZE = 64, 96


@pytest.fixture(scope="module")
def model():
    basis = MaskBasis.fit(synthetic_instance_masks(200, 28, seed=0), dim=16, seed=0)
    torch.manual_seed(0)
    return build_model(TINY, len(CLASS_NAMES), basis)


@pytest.fixture
def predictor(model):
    return Predictor(model, CLASS_NAMES, CATEGORY_IDS, MIN_SIZE, MAX_SIZE, device="cpu")


def _gray(h: int = 30, w: int = 50, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _rgb(h: int = 30, w: int = 50, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _assert_rgb(array: np.ndarray, h: int, w: int) -> None:
    assert array.shape == (h, w, 3) and array.dtype == np.uint8


# ----------------------------------------------------------------------------- image_to_array


def test_image_to_array_grayscale_pil_and_array():
    gray = _gray()
    for image in (Image.fromarray(gray, "L"), gray, gray[:, :, None]):
        out = image_to_array(image)
        _assert_rgb(out, 30, 50)
        assert all(np.array_equal(out[:, :, c], gray) for c in range(3))


def test_image_to_array_rgba_drops_alpha_as_the_data_loader_does(tmp_path):
    rgba = np.concatenate([_rgb(), np.full((30, 50, 1), 100, np.uint8)], axis=2)
    for image in (Image.fromarray(rgba, "RGBA"), rgba):
        out = image_to_array(image)
        _assert_rgb(out, 30, 50)
        assert np.array_equal(out, rgba[:, :, :3])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert np.array_equal(image_to_array(tmp_path / "a.png"), rgba[:, :, :3])


def test_image_to_array_palette():
    index = np.arange(30 * 50).reshape(30, 50) % 4
    palette = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]
    img = Image.fromarray(index.astype(np.uint8), "P")
    img.putpalette([v for colour in palette for v in colour])
    out = image_to_array(img)
    _assert_rgb(out, 30, 50)
    assert np.array_equal(out, np.array(palette, np.uint8)[index])


def test_image_to_array_float_arrays_in_0_1_and_0_255():
    values = np.linspace(0, 1, 30 * 50).reshape(30, 50, 1).repeat(3, axis=2)
    out = image_to_array(values.astype(np.float32))
    _assert_rgb(out, 30, 50)
    assert np.array_equal(out, np.round(values * 255).astype(np.uint8))
    assert np.array_equal(image_to_array(values * 255.0), out)


def test_image_to_array_16_bit_is_scaled_as_the_data_loader_scales_it(tmp_path):
    gray16 = (_gray().astype(np.uint16) * 257)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    expected = np.repeat(_gray()[:, :, None], 3, axis=2)
    for image in (tmp_path / "g16.png", Image.open(tmp_path / "g16.png"), gray16):
        assert np.array_equal(image_to_array(image), expected)


def test_image_to_array_file_paths_png_and_jpeg(tmp_path):
    rgb = _rgb()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    png = image_to_array(tmp_path / "a.png")
    _assert_rgb(png, 30, 50)
    assert np.array_equal(png, rgb)
    y, x = np.mgrid[:30, :50]
    smooth = np.stack([x * 5, y * 8, 255 - x * 5], axis=2).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "a.jpg", quality=95)
    jpeg = image_to_array(str(tmp_path / "a.jpg"))  # a str path works too
    _assert_rgb(jpeg, 30, 50)
    assert np.abs(jpeg.astype(int) - smooth).mean() < 4  # lossy, but the same picture


def test_a_picture_gives_the_same_pixels_as_path_pil_image_or_array(tmp_path):
    # every mode of the quirky set: L JPEG, RGBA PNG, P PNG, RGB JPEG, I;16 PNG, EXIF-rotated JPEG
    paths = write_quirky_coco(tmp_path)
    for path in sorted(paths.images_dir.iterdir()):
        from_path = image_to_array(path)
        assert np.array_equal(from_path, np.asarray(load_image(path))), path.name
        with Image.open(path) as img:
            assert np.array_equal(image_to_array(img), from_path), path.name
            if img.mode != "P" and path.name != "rotated.jpg":  # an array has no palette, no EXIF
                assert np.array_equal(image_to_array(np.asarray(img)), from_path), path.name


def test_image_to_array_rejects_a_non_image_file_and_a_bad_shape(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(DataError) as info:
        image_to_array(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataError, match="missing.png"):
        image_to_array(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="expected"):
        image_to_array(np.zeros((4, 5, 2), np.uint8))


# ----------------------------------------------------------------------------- Predictor


def test_input_size_is_the_evaluation_transforms_size():
    # 150 * 23 / 100 = 34.5: Python's round() gives 34, the transform rounds half up to 35
    assert input_size_for(100, 150, 23, 1000) == resized_size(100, 150, 23, 1000) == (23, 35)
    assert input_size_for(40, 400, 64, 96) == resized_size(40, 400, 64, 96) == (10, 96)


def test_predictor_input_equals_the_data_sets_eval_input(tmp_path, predictor):
    paths = write_quirky_coco(tmp_path)
    tf = build_transform(TransformConfig(min_size=(MIN_SIZE,), max_size=MAX_SIZE), train=False)
    dataset = CocoDataset(paths.ann_file, paths.images_dir, transform=tf)
    for i in range(len(dataset)):
        batch = collate([dataset[i]])
        images, sizes = predictor.preprocess(image_to_array(dataset.image_path(i)))
        assert torch.equal(sizes, batch.image_sizes)
        assert torch.equal(images, batch.images), dataset.image_path(i).name


@pytest.mark.parametrize("name, image, size", [
    ("grayscale", Image.fromarray(_gray(45, 70), "L"), (45, 70)),
    ("rgba", Image.fromarray(np.dstack([_rgb(40, 40), _gray(40, 40)]), "RGBA"), (40, 40)),
    ("tall", _rgb(90, 33), (90, 33)),
    ("wide", _rgb(20, 130), (20, 130)),
])
def test_predictions_come_back_at_the_images_own_size(predictor, name, image, size):
    pred = predictor.predict(image)
    h0, w0 = size
    q, s = TINY.num_queries, 28
    assert pred.size == size and pred.image.shape == (h0, w0, 3)
    assert pred.input_size == resized_size(h0, w0, MIN_SIZE, MAX_SIZE)
    assert pred.num_stages == TINY.num_stages
    assert pred.proposal_boxes_xyxy.shape == (q, 4)
    assert pred.stage(None) is pred.stages[-1] and pred.stage(1) is pred.stages[0]
    with pytest.raises(IndexError):
        pred.stage(0)
    for k in range(1, pred.num_stages + 1):
        st = pred.stage(k)
        assert st.query_boxes_xyxy.shape == (q, 4)
        assert st.query_scores.shape == st.query_labels.shape == (q,)
        assert st.query_mask_probs.shape == (q, s, s)
        assert st.attn.shape == (q, q)
        det = pred.detections(k)
        assert len(det) == q * len(CLASS_NAMES)  # top-100 of Q x C
        for boxes in (det.boxes_xyxy, st.query_boxes_xyxy, pred.proposal_boxes_xyxy):
            assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= w0).all()
            assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= h0).all()
        masks = pred.detection_masks(k)
        assert masks.shape == (len(det), h0, w0) and masks.dtype == torch.bool
        # the best class of each query is among its detections
        best = set(zip(range(q), st.query_labels.tolist()))
        assert best <= set(zip(det.queries.tolist(), det.labels.tolist()))


def test_the_cache_runs_the_model_once_per_image(predictor):
    calls = []
    handle = predictor.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        image = _rgb(40, 60, seed=1)
        first = predictor.predict(image)
        assert len(calls) == 1
        assert predictor.predict(image.copy()) is first  # same pixels, another array
        assert predictor.predict(Image.fromarray(image)) is first
        assert len(calls) == 1
        other = predictor.predict(_rgb(40, 60, seed=2))
        assert len(calls) == 2 and other is not first
        predictor.predict(image)  # only the last image is kept
        assert len(calls) == 3
        without = predictor.predict(image, return_attention=False)
        assert len(calls) == 4 and without.stage().attn is None
    finally:
        handle.remove()


def test_to_coco_results_uses_the_given_category_ids_and_valid_rle(predictor):
    pred = predictor.predict(_rgb(48, 72, seed=3))
    results = pred.to_coco_results(image_id=777, stage=1)
    det = pred.detections(1)
    masks = pred.detection_masks(1).numpy()
    assert len(results) == len(det) and masks.any()
    json.dumps(results)  # JSON-ready
    for r, label, box, mask in zip(results, det.labels.tolist(), det.boxes_xyxy, masks):
        assert r["image_id"] == 777
        assert r["category_id"] == CATEGORY_IDS[label]
        x0, y0, x1, y1 = box.tolist()
        assert r["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=0.01)
        assert r["segmentation"]["size"] == [48, 72]
        assert np.array_equal(mask_utils.decode(r["segmentation"]).astype(bool), mask)
    records = pred.to_records(stage=1)
    assert {r["category_name"] for r in records} <= set(CLASS_NAMES)
    assert all(CLASS_NAMES[CATEGORY_IDS.index(r["category_id"])] == r["category_name"]
               for r in records)
    strong = pred.to_coco_results(image_id=777, stage=1, score_threshold=float(det.scores[2]))
    assert len(strong) == 3


# ----------------------------------------------------------------------------- postprocess


def test_paste_a_full_mask_fills_exactly_its_integer_box():
    ones = torch.ones(1, 7, 7)
    box = torch.tensor([[3.0, 5.0, 11.0, 9.0]])  # x0, y0, x1, y1
    expected = torch.zeros(1, 16, 20, dtype=torch.bool)
    expected[0, 5:9, 3:11] = True  # the pixels whose centres lie inside the box
    assert torch.equal(paste_masks(ones, box, 16, 20), expected)

    probs = paste_masks(ones, box, 16, 20, threshold=None)
    assert probs.dtype == torch.float32 and probs.shape == (1, 16, 20)
    assert (probs[~expected] == 0).all()
    assert ((probs[expected] >= 0.5) & (probs[expected] <= 1)).all()
    assert (probs[0, 6:8, 4:10] == 1).all()  # inside the box's border pixels


def test_paste_clips_a_box_partly_outside_the_image():
    box = torch.tensor([[-4.0, -3.0, 6.0, 5.0]])
    expected = torch.zeros(1, 10, 12, dtype=torch.bool)
    expected[0, :5, :6] = True
    assert torch.equal(paste_masks(torch.ones(1, 14, 14), box, 10, 12), expected)
    outside = torch.tensor([[20.0, 20.0, 30.0, 30.0]])
    assert not paste_masks(torch.ones(1, 14, 14), outside, 10, 12).any()


def test_paste_keeps_the_masks_layout_and_handles_no_masks():
    half = torch.zeros(2, 4, 4)
    half[0, :, :2] = 1  # left half
    half[1, 2:, :] = 1  # bottom half
    boxes = torch.tensor([[0.0, 0.0, 8.0, 4.0], [2.0, 2.0, 6.0, 10.0]])
    out = paste_masks(half, boxes, 12, 10)
    left = torch.zeros(12, 10, dtype=torch.bool)
    left[0:4, 0:4] = True
    bottom = torch.zeros(12, 10, dtype=torch.bool)
    bottom[6:10, 2:6] = True
    assert torch.equal(out[0], left) and torch.equal(out[1], bottom)
    assert paste_masks(torch.zeros(0, 4, 4), torch.zeros(0, 4), 12, 10).shape == (0, 12, 10)


def _paste_whole_image(masks, boxes, height, width):
    """The definition, sampled at every pixel of the image: what paste_masks must equal."""
    import torch.nn.functional as F

    ys = torch.arange(height, dtype=torch.float32) + 0.5
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    x0, y0, x1, y1 = boxes.float().unbind(1)
    gx = (xs[None, :] - x0[:, None]) / (x1 - x0).clamp(min=1e-6)[:, None] * 2 - 1
    gy = (ys[None, :] - y0[:, None]) / (y1 - y0).clamp(min=1e-6)[:, None] * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    pasted = F.grid_sample(masks[:, None].float(), grid, mode="bilinear", align_corners=False)[:, 0]
    return pasted * ((gx.abs() <= 1)[:, None, :] & (gy.abs() <= 1)[:, :, None])


def test_paste_inside_each_box_equals_sampling_the_whole_image():
    g = torch.Generator().manual_seed(3)
    n, h, w = 64, 37, 53
    masks = torch.rand(n, 28, 28, generator=g)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w + 20.0, h + 20.0]) - 10
    wh = torch.rand(n, 2, generator=g) * 30
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes[:4] = torch.tensor([[5.0, 5.0, 5.0, 9.0], [0.5, 0.5, 1.5, 1.5],  # empty, one pixel
                              [-30.0, -30.0, 90.0, 90.0], [60.0, 2.0, 70.0, 9.0]])  # huge, outside
    boxes[4:6] = torch.tensor([[20.0, 20.0, 10.0, 10.0], [3.0, 30.0, 9.0, 20.0]])  # x1 < x0, y1 < y0
    reference = _paste_whole_image(masks, boxes, h, w)
    assert torch.allclose(paste_masks(masks, boxes, h, w, threshold=None), reference, atol=1e-6)
    assert torch.equal(paste_masks(masks, boxes, h, w), reference >= 0.5)
    broken = boxes.clone()
    broken[0] = torch.tensor([float("nan"), 1.0, 5.0, 9.0])
    broken[1, 2] = float("inf")
    out = paste_masks(masks, broken, h, w)  # non-finite boxes paste nothing; the rest as before
    assert not out[:2].any() and torch.equal(out[2:], reference[2:] >= 0.5)


def test_top_detections_is_the_global_top_k_over_queries_and_classes():
    g = torch.Generator().manual_seed(0)
    q, c, s = 6, 4, 5
    logits = torch.randn(q, c, generator=g)
    logits[2] = torch.tensor([5.0, 4.0, -9.0, -9.0])  # one query, two classes near the top
    boxes = torch.rand(q, 4, generator=g)
    masks = torch.rand(q, s, s, generator=g)
    det = top_detections(logits, boxes, masks, top_k=7)
    pairs = sorted(((float(logits[i, j].sigmoid()), i, j) for i in range(q) for j in range(c)),
                   reverse=True)[:7]
    assert det.scores.tolist() == pytest.approx([p[0] for p in pairs])
    assert det.queries.tolist() == [p[1] for p in pairs]
    assert det.labels.tolist() == [p[2] for p in pairs]
    assert det.queries.tolist()[:2] == [2, 2] and det.labels.tolist()[:2] == [0, 1]
    assert torch.equal(det.boxes_xyxy, boxes[det.queries])
    assert torch.equal(det.mask_probs, masks[det.queries])
    assert len(top_detections(logits, boxes, masks, top_k=1000)) == q * c
    strong = det.above(float(det.scores[3]))
    assert len(strong) == 4 and torch.equal(strong.queries, det.queries[:4])


def test_maskness_is_the_mean_probability_of_the_mask_pixels():
    masks = torch.zeros(3, 2, 2)
    masks[0] = torch.tensor([[0.9, 0.7], [0.2, 0.0]])  # two pixels at or above 0.5
    masks[1] = torch.tensor([[0.5, 0.5], [0.5, 0.5]])  # a hesitant mask
    # masks[2] has no pixel at 0.5: empty
    assert maskness(masks).tolist() == pytest.approx([0.8, 0.5, 0.0])


def test_maskness_power_ranks_confident_masks_first():
    """Two queries of equal class score: with a maskness power the one with the confident mask
    comes first, and every score is the class probability x maskness ** power."""
    logits = torch.tensor([[1.0, -4.0], [1.0, -4.0], [0.5, -4.0]])
    boxes = torch.rand(3, 4)
    masks = torch.full((3, 4, 4), 0.55)  # query 0: hesitant
    masks[1, :2] = 0.95  # query 1: confident where it is on
    masks[1, 2:] = 0.05
    masks[2] = 0.99
    plain = top_detections(logits, boxes, masks, top_k=3)
    assert plain.scores.tolist() == pytest.approx(logits.sigmoid().flatten().sort(
        descending=True).values[:3].tolist())
    for power in (1.0, 2.5):
        det = top_detections(logits, boxes, masks, top_k=6, maskness_power=power)
        expected = logits.sigmoid() * maskness(masks)[:, None] ** power
        assert det.scores.tolist() == pytest.approx(expected.flatten().sort(
            descending=True).values.tolist())
        assert det.queries.tolist()[:3] == [1, 2, 0] and det.labels.tolist()[:3] == [0, 0, 0]
    assert top_detections(logits, boxes, masks, maskness_power=0.0).scores.tolist() == \
        plain.scores.tolist() + top_detections(logits, boxes, masks).scores.tolist()[3:]


def test_predictor_scores_with_its_maskness_power(model):
    image = _gray()
    powered = Predictor(model, CLASS_NAMES, CATEGORY_IDS, MIN_SIZE, MAX_SIZE, device="cpu",
                        maskness_power=2.0)
    stage = powered.predict(image, return_attention=False).stages[-1]
    expected = top_detections(_logits_of(powered, image), stage.query_boxes_xyxy,
                              stage.query_mask_probs, maskness_power=2.0)
    assert expected.scores.max() > 0
    assert stage.detections.scores.tolist() == pytest.approx(expected.scores.tolist())
    assert stage.detections.queries.tolist() == expected.queries.tolist()
    plain = Predictor(model, CLASS_NAMES, CATEGORY_IDS, MIN_SIZE, MAX_SIZE, device="cpu")
    assert plain.predict(image, return_attention=False).stages[-1].detections.scores.tolist() != \
        pytest.approx(expected.scores.tolist())


def _logits_of(predictor, image) -> torch.Tensor:
    """The last stage's (Q, C) class logits of ``predictor``'s model on ``image``."""
    images, sizes = predictor.preprocess(image_to_array(image))
    with torch.no_grad():
        return predictor.model(images, sizes).final.logits[0].float()


def test_rescale_boxes_maps_to_the_original_size_and_clips():
    boxes = torch.tensor([[10.0, 5.0, 50.0, 25.0], [-3.0, 0.0, 120.0, 60.0]])
    out = rescale_boxes(boxes, (50, 100), (100, 300))  # (H, W) -> (H0, W0): x * 3, y * 2
    assert torch.equal(out[0], torch.tensor([30.0, 10.0, 150.0, 50.0]))
    assert torch.equal(out[1], torch.tensor([0.0, 0.0, 300.0, 100.0]))


def test_mask_to_rle_round_trips():
    mask = np.zeros((7, 9), bool)
    mask[2:5, 1:8] = True
    rle = mask_to_rle(mask)
    assert isinstance(rle["counts"], str) and rle["size"] == [7, 9]
    assert np.array_equal(mask_utils.decode(json.loads(json.dumps(rle))).astype(bool), mask)



def test_suggested_score_threshold_rounds_down_and_falls_back():
    from istr_viz.predictor import suggested_score_threshold

    assert suggested_score_threshold({"score_threshold": {"threshold": 0.4271}}, 0.3) == 0.42
    assert suggested_score_threshold({"score_threshold": {"threshold": 0.42}}, 0.3) == 0.42
    assert suggested_score_threshold({"score_threshold": {"threshold": 0.0}}, 0.3) == 0.0
    for metrics in (None, {}, {"score_threshold": None}, {"score_threshold": {"threshold": 1.5}},
                    {"score_threshold": {"threshold": "0.2"}}, {"score_threshold": 0.2}):
        assert suggested_score_threshold(metrics, 0.3) == 0.3, metrics
