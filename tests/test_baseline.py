"""The Mask R-CNN peer of the equal-budget benchmark: ISTR's backbone, the same pixels, COCO output."""

from __future__ import annotations

import time

import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import MultiScaleRoIAlign

from istr_viz.baseline import (ANCHOR_SIZES, PeerHeads, CpuRoIAlign, build_mask_rcnn,
                               mask_rcnn_results, predict_mask_rcnn, train_mask_rcnn)
from istr_viz.config import apply_overrides, get_preset
from istr_viz.data.coco import CocoDataset
from istr_viz.data.shapes import make_shapes
from istr_viz.data.transforms import build_transform
from istr_viz.engine import transform_configs
from istr_viz.basis import MaskBasis
from istr_viz.data.instance_masks import synthetic_instance_masks
from istr_viz.model import build_model
from istr_viz.model.backbone import ChannelsLastMaxPool2d, ResNetBody

TINY = ["model.backbone_base_channels=8", "model.hidden_dim=32", "data.train_min_sizes=64",
        "data.train_max_size=64", "data.test_min_size=64", "data.test_max_size=64",
        "train.batch_size=2"]


def _tiny_shapes(tmp_path, num_train: int, num_val: int):
    """(config, train set, val set) of a tiny built-in-shapes folder at 64 px."""
    root = tmp_path / "shapes"
    make_shapes(root, num_train=num_train, num_val=num_val, size=64, seed=1, progress=False)
    cfg = apply_overrides(get_preset("shapes-cpu"), TINY)
    train_tf, test_tf = transform_configs(cfg)
    train = CocoDataset(root / "train" / "annotations.json", root / "train" / "images",
                        transform=build_transform(train_tf, train=True))
    val = CocoDataset(root / "val" / "annotations.json", root / "val" / "images",
                      transform=build_transform(test_tf, train=False))
    return cfg, train, val


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_peer_uses_istrs_backbone_and_keeps_the_pixels_it_is_given(norm):
    cfg = apply_overrides(get_preset("shapes-cpu"), TINY + [f"model.norm={norm}"])
    model = build_mask_rcnn(cfg, num_classes=3)
    body = model.backbone.body
    reference = ResNetBody("resnet18", 8, norm)
    assert {k: v.shape for k, v in body.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    fpn_norms = {type(m) for m in model.backbone.fpn.modules()
                 if isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm2d))}
    assert fpn_norms == ({torch.nn.GroupNorm} if norm == "gn" else set())  # as ISTR's FPN
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen: from scratch
    assert model.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes + background
    assert model.rpn.anchor_generator.sizes == ANCHOR_SIZES
    images, _ = model.transform([torch.rand(3, 48, 80)])
    assert images.image_sizes == [(48, 80)]  # no second resize


def test_peer_gets_istrs_fpn_output_convs_and_block_init():
    cfg = apply_overrides(get_preset("shapes-cpu"), TINY + ["model.fpn_output_conv=separable",
                                                            "model.zero_init_residual=true"])
    peer = build_mask_rcnn(cfg, num_classes=3)
    istr = build_model(cfg.model, 3, MaskBasis.fit(synthetic_instance_masks(50, 28, seed=0),
                                                   dim=8, seed=0))
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(peer.backbone.fpn.layer_blocks) == shapes(istr.backbone.fpn.layer_blocks)
    assert peer.backbone.fpn.layer_blocks[0][0][0].groups == cfg.model.hidden_dim  # depthwise
    assert not peer.backbone.body.layer2[1].bn2.weight.detach().any()  # zeroed scales


def test_peer_heads_take_the_sizes_given():
    cfg = apply_overrides(get_preset("shapes-cpu"), TINY)
    small = build_mask_rcnn(cfg, num_classes=3)
    heads = small.roi_heads
    assert heads.fg_bg_sampler.batch_size_per_image == PeerHeads().box_batch_size_per_image
    assert small.rpn._post_nms_top_n == {"training": 300, "testing": 150}
    assert heads.box_head.fc7.out_features == 512
    assert heads.mask_head[0][0].out_channels == 32  # as wide as the FPN (hidden_dim)
    assert heads.mask_predictor.mask_fcn_logits.out_channels == 4
    default = build_mask_rcnn(cfg, num_classes=3, heads=PeerHeads.torchvision_defaults())
    assert default.rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}
    assert default.roi_heads.fg_bg_sampler.batch_size_per_image == 512
    assert default.roi_heads.box_head.fc7.out_features == 1024
    assert default.roi_heads.mask_head[0][0].out_channels == 256


def test_peer_trains_on_the_clock_and_writes_coco_results(tmp_path):
    cfg, train, val = _tiny_shapes(tmp_path, num_train=4, num_val=2)
    torch.manual_seed(0)
    model = build_mask_rcnn(cfg, len(train.annotations.class_names))
    calls = []
    run = train_mask_rcnn(model, train, minutes=0.03, lr=0.01, batch_size=2, warmup_iters=2,
                          checkpoints=(0.01,), on_checkpoint=lambda m, i: calls.append((m, i)),
                          progress=False)
    assert run["iterations"] >= 1 and not run["diverged"]
    assert run["minutes"] >= 0.03
    assert len(calls) == 1 and 0.01 <= calls[0][0] <= run["minutes"] and model.training
    model.roi_heads.score_thresh = 0.0  # an untrained model: keep whatever it finds
    results = mask_rcnn_results(model, val)
    assert results
    valid = set(val.annotations.label_to_cat_id)
    for r in results:
        assert r["category_id"] in valid and 0 <= r["score"] <= 1
        h0, w0 = (int(v) for v in val[0][1]["orig_size"])
        assert list(mask_utils.decode(r["segmentation"]).shape) == [h0, w0]


class _RecordingDataset(torch.utils.data.Dataset):
    """Records the index of every item the peer's loader reads (either reading path)."""

    def __init__(self, inner):
        self.inner, self.annotations, self.read = inner, inner.annotations, []

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):  # the shuffling DataLoader's path
        self.read.append(("item", index))
        return self.inner[index]

    def get(self, index, generator=None):  # the batch sampler's path (SeededDataset)
        self.read.append(("get", index))
        return self.inner.get(index, generator=generator)


def test_peer_batches_keep_to_the_groups_given(tmp_path):
    """The peer gets ISTR's orientation grouping (data.group_by_orientation) from the same
    batch sampler: every batch of 2 it trains on lies within one group."""
    cfg, train, _ = _tiny_shapes(tmp_path, num_train=8, num_val=1)
    groups = [0, 1, 1, 0, 1, 0, 0, 1]
    recording = _RecordingDataset(train)
    torch.manual_seed(0)
    model = build_mask_rcnn(cfg, len(train.annotations.class_names))
    run = train_mask_rcnn(model, recording, minutes=0.06, lr=0.01, batch_size=2, warmup_iters=2,
                          progress=False, groups=groups)
    assert {path for path, _ in recording.read} == {"get"}
    read = [i for _, i in recording.read[:2 * run["iterations"]]]
    assert run["iterations"] >= 2 and len(read) == 2 * run["iterations"]
    assert all(groups[a] == groups[b] for a, b in zip(read[::2], read[1::2]))


class _SlowDataset(torch.utils.data.Dataset):
    """A data set whose every item takes ``delay`` seconds to load."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay
        self.annotations = inner.annotations

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        import time

        time.sleep(self.delay)
        return self.inner[index]


def test_peer_clock_counts_data_loading_and_not_evaluation(tmp_path):
    """ISTR's budget includes loading its batches, so the peer's must too. Items take 1 s each
    (2 s a batch of 2) and the budget is 5 s: 3 steps, however fast the model is (with loading
    off the clock it would be dozens). An evaluation after the first step sleeps 2.5 s: off the
    clock it changes nothing (on it, the run would stop after 2 steps)."""
    cfg, train, _ = _tiny_shapes(tmp_path, num_train=8, num_val=1)
    model = build_mask_rcnn(cfg, len(train.annotations.class_names))
    run = train_mask_rcnn(model, _SlowDataset(train, 1.0), minutes=5 / 60, lr=0.01, batch_size=2,
                          warmup_iters=2, progress=False, checkpoints=(0.01,),
                          on_checkpoint=lambda m, i: time.sleep(2.5))
    assert run["iterations"] == 3
    assert 6 / 60 <= run["minutes"] < 8.5 / 60  # 3 batches of loading; stops past the budget


def test_peer_clips_its_gradient_norm_as_istr_does(tmp_path):
    """One SGD step (momentum has nothing to add yet, no weight decay) moves the weights by lr x
    the warm-up's first factor (0.001) x the gradient: unclipped by the norm the run reports,
    clipped by the limit, from the same start and batch."""
    cfg, train, _ = _tiny_shapes(tmp_path, num_train=4, num_val=1)

    def one_step(clip: float):
        torch.manual_seed(0)
        model = build_mask_rcnn(cfg, len(train.annotations.class_names))
        params = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        run = train_mask_rcnn(model, train, minutes=1e-9, lr=10.0, batch_size=2,
                              warmup_iters=1, weight_decay=0.0, amp=False, progress=False,
                              clip_grad_norm=clip)
        moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(params, before)))
        return run, moved.item()

    free, moved_free = one_step(0.0)
    assert free["iterations"] == 1 and free["clipped"] == 0
    norm = free["grad_norm_max"]
    assert norm > 0 and moved_free == pytest.approx(0.01 * norm, rel=1e-3)
    limit = norm / 4
    clipped, moved_clipped = one_step(limit)
    assert clipped["iterations"] == 1 and clipped["clipped"] == 1.0
    assert clipped["grad_norm_max"] == pytest.approx(norm, rel=1e-4)
    assert moved_clipped == pytest.approx(0.01 * limit, rel=1e-3)


def test_peer_pooler_equals_torchvision_values_and_gradients():
    """The peer's RoI pooling in training (sparse-matrix RoIAlign, as ISTR's) and in inference
    (the separable one, as ISTR's) is torchvision's, on every FPN level."""
    g = torch.Generator().manual_seed(0)
    feats = {k: torch.randn(2, 8, 512 // (4 * 2**int(k)), 512 // (4 * 2**int(k)), generator=g)
             for k in "0123"}
    sides = torch.tensor([20.0, 60, 150, 300, 450, 90, 230])  # levels 0, 0, 1, 2, 3, 0, 2
    corners = torch.rand(len(sides), 2, generator=g) * (512 - sides[:, None])
    all_boxes = torch.cat([corners, corners + sides[:, None]], 1)
    boxes = [all_boxes[:4], all_boxes[4:]]
    for size in (7, 14):
        ref_in = {k: v.clone().requires_grad_() for k, v in feats.items()}
        ours_in = {k: v.clone().requires_grad_() for k, v in feats.items()}
        ref_pool = MultiScaleRoIAlign(list(feats), size, 2)
        ref = ref_pool(ref_in, boxes, [(512, 512)] * 2)
        ours = CpuRoIAlign(list(feats), size, 2)(ours_in, boxes, [(512, 512)] * 2)
        assert set(ref_pool.map_levels(boxes).tolist()) == {0, 1, 2, 3}
        assert torch.allclose(ours, ref, atol=1e-4)  # float sums in another order
        with torch.no_grad():
            inference = CpuRoIAlign(list(feats), size, 2)(feats, boxes, [(512, 512)] * 2)
        assert inference.is_contiguous() and torch.allclose(inference, ref, atol=1e-4)
        upstream = torch.randn(ref.shape, generator=g)
        ref.backward(upstream)
        ours.backward(upstream)
        for k in feats:
            assert ours_in[k].grad.abs().sum() > 0
            assert torch.allclose(ours_in[k].grad, ref_in[k].grad, atol=1e-4)
    model = build_mask_rcnn(apply_overrides(get_preset("shapes-cpu"), TINY), num_classes=3)
    assert isinstance(model.roi_heads.box_roi_pool, CpuRoIAlign)
    assert isinstance(model.roi_heads.mask_roi_pool, CpuRoIAlign)
    # inference: each pooler with the kernel measured faster for it (CpuRoIAlign's docstring)
    assert not model.roi_heads.box_roi_pool.separable_inference
    assert model.roi_heads.mask_roi_pool.separable_inference
    assert isinstance(model.backbone.body.maxpool, ChannelsLastMaxPool2d)  # as ISTR's body
    with pytest.raises(ValueError, match="square"):
        CpuRoIAlign(["0"], (7, 5), 2)


def test_peer_prediction_is_torchvisions_with_istrs_mask_paster(tmp_path):
    cfg, train, val = _tiny_shapes(tmp_path, num_train=1, num_val=1)
    torch.manual_seed(0)
    model = build_mask_rcnn(cfg, len(train.annotations.class_names)).eval()
    model.roi_heads.score_thresh = 0.0  # an untrained model: keep whatever it finds
    image = val[0][0]
    with torch.no_grad():
        reference = model([image])[0]
    ours = predict_mask_rcnn(model, image)
    assert len(ours["boxes"]) > 0
    for key in ("boxes", "labels", "scores"):
        assert torch.equal(ours[key], reference[key])
    assert ours["masks"].shape == reference["masks"].shape == (len(ours["boxes"]), 1, 64, 64)
    # both sample the 28 x 28 masks bilinearly inside each box; torchvision's pads and rounds
    # the box to whole pixels first, so they differ a little at the box edges
    assert (ours["masks"] - reference["masks"]).abs().mean() < 0.02
    boxes = ours["boxes"]
    for mask, (x0, y0, x1, y1) in zip(ours["masks"][:, 0], boxes.tolist()):
        outside = torch.ones_like(mask, dtype=torch.bool)
        outside[int(y0):int(y1) + 1, int(x0):int(x1) + 1] = False
        assert mask[outside].abs().max() == 0  # nothing pasted outside the box
