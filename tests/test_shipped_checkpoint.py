"""The checkpoint shipped in checkpoints/: small, safe to load, self-describing, and it predicts."""

from __future__ import annotations

from istr_viz.checkpoint import load_checkpoint
from istr_viz.data.shapes import make_shapes
from istr_viz.predictor import SHIPPED_CHECKPOINT, default_checkpoint, load_model


def test_the_shipped_checkpoint_is_the_default_and_small(monkeypatch):
    monkeypatch.delenv("ISTR_VIZ_CHECKPOINT", raising=False)
    assert default_checkpoint() == SHIPPED_CHECKPOINT  # raises if the file is missing
    assert SHIPPED_CHECKPOINT.stat().st_size <= 25e6
    ckpt = load_checkpoint(SHIPPED_CHECKPOINT)  # weights_only=True inside
    assert "train_state" not in ckpt  # inference only
    card = ckpt["card"]
    assert {"data", "command", "hardware"} <= set(card)
    per_stage = ckpt["metrics"]["per_stage"]
    mask_ap = [s["segm"]["AP"] for s in per_stage]
    box_ap = [s["bbox"]["AP"] for s in per_stage]
    assert mask_ap[-1] > mask_ap[0] and box_ap[-1] > box_ap[0]  # refinement helps
    assert ckpt["metrics"]["segm"]["AP"] == mask_ap[-1]


def test_the_shipped_checkpoint_finds_shapes(tmp_path):
    """On freshly generated shapes images (another seed than the built-in set), the final stage's
    best detection per ground-truth instance overlaps it for most instances."""
    from torchvision.ops import box_iou

    from istr_viz.data.coco import CocoDataset

    make_shapes(tmp_path, num_train=1, num_val=12, size=256, seed=123, progress=False)
    _, predictor = load_model(SHIPPED_CHECKPOINT, device="cpu")
    ds = CocoDataset(tmp_path / "val" / "annotations.json", tmp_path / "val" / "images")
    hits, total = 0, 0
    for i in range(len(ds)):
        gt = ds[i][1]["boxes_xyxy"]  # no transform: the image's own pixels
        prediction = predictor.predict(ds.image_path(i))
        boxes = prediction.detections(None, 0.05).boxes_xyxy
        total += len(gt)
        if len(gt) and len(boxes):
            hits += int((box_iou(gt, boxes).max(1).values >= 0.5).sum())
    assert total > 20 and hits / total >= 0.3, (hits, total)
