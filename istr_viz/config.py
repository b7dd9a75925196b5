"""Configuration dataclasses. Every default is the paper's setting (ISTR v1, R50-3x).

Only builders (``build_model``, ``SetCriterion``) read these; the modules below them take plain
typed arguments. Override a field with ``dataclasses.replace(cfg, num_queries=50)``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields, replace

from istr_viz.errors import ConfigError

FPN_OUTPUT_CONVS = ("3x3", "separable")  # ModelConfig.fpn_output_conv
MASK_HEADS = ("query", "roi")  # ModelConfig.mask_head
ELU_KERNELS = ("auto", "library", "formula")  # ModelConfig.elu
LR_DECAYS = ("step", "linear")  # TrainConfig.lr_decay
CLASS_LOSSES = ("focal", "varifocal")  # LossConfig.class_loss


def first_mask_roi_stage(value: int, num_stages: int) -> int | None:
    """``ModelConfig.mask_roi_first_stage`` as a 1-based stage number (negative values count
    from the end: -1 is ``num_stages``), or None when it names no stage."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    stage = int(value) if value > 0 else num_stages + 1 + int(value)
    return stage if 1 <= stage <= num_stages else None


@dataclass(frozen=True)
class ModelConfig:
    """The ISTR architecture (see ``istr_viz.model.build_model``)."""

    backbone: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101
    backbone_base_channels: int = 64  # ResNet stem width: 64 = torchvision, less = narrow CPU model
    norm: str = "frozen_bn"  # "frozen_bn" (pretrained), "gn" (from scratch), "bn"
    pretrained_path: str | None = None  # local torchvision ImageNet state dict; never downloaded
    # "3x3": the FPN's output convs as in the FPN paper; "separable": depthwise 3x3 + pointwise
    # 1x1 (not in ISTR; ~1/9 of the multiply-adds, for CPUs: istr_viz.model.backbone.build_fpn)
    fpn_output_conv: str = "3x3"
    # every residual branch starts at zero (its last norm scale at 0): training from scratch only
    zero_init_residual: bool = False
    num_queries: int = 300
    # 0: num_queries as given. > 0 (at most 16): a training run raises num_queries to ceil(this
    # x the most instances any training image holds), at most 100, where that is more, so that
    # crowded data get more queries than the preset's (istr_viz.data.check.queries_for); the
    # run prints the number, the checkpoint records it. A run from --init-from takes the source
    # checkpoint's model settings, this one included; the train command's automatic start from
    # the shipped model takes the preset's value (engine.training_start)
    queries_per_instance: float = 0.0
    num_stages: int = 6
    hidden_dim: int = 256  # also the FPN width
    dim_dynamic: int = 64
    dim_feedforward: int = 2048
    num_heads: int = 8
    num_cls_layers: int = 3  # ISTR uses 3 (Sparse R-CNN 1)
    num_reg_layers: int = 3
    num_mask_layers: int = 3
    dropout: float = 0.0
    pooler_resolution: int = 7
    canonical_box_size: float = 224.0  # FPN level of a box: floor(4 + log2(sqrt(area) / this))
    prior_prob: float = 0.01  # initial foreground probability of every class logit
    zero_box_deltas: bool = False  # True: stages start as identity box refinements (not official)
    # where the learned proposal boxes start: "image" (official: every box is the whole image) or
    # "grid" (not official: boxes tiled over the image, so stage 1 pools different places)
    proposal_init: str = "image"
    # "grid" boxes' sides in grid cells (unused with "image"): one value, or two that alternate
    # as a checkerboard of large and small boxes (tried once on the second data set's small
    # objects, inconclusive: benchmarks/results_log.md, r12)
    proposal_box_cells: tuple[float, ...] = (2.0,)
    # Training-only aid (not in ISTR): a 1x1 conv on every FPN level predicts each pixel's class
    # (or background), supervised by LossConfig.semantic_weight; gives the from-scratch backbone
    # dense gradients. Inference never runs it: predictions are ISTR's.
    aux_semantic: bool = False
    # Training-only aid (FCOS-like, not in ISTR): a 1x1 conv on every FPN level predicts, at each
    # pixel inside an instance, the distances to that instance's box sides (a GIoU loss weighted
    # by LossConfig.dense_box_weight): dense localisation gradients for the backbone, as an RPN
    # gives Mask R-CNN. Inference never runs it.
    aux_dense_box: bool = False
    # Training-only aid (DN-DETR, not in ISTR): dn_groups noised copies of every GT box join the
    # queries and learn to reconstruct their instance without matching (istr_viz.model.denoising).
    dn_groups: int = 0
    dn_box_noise: float = 0.4  # corners move by up to this x half the box side
    dn_label_noise: float = 0.2  # probability that a denoising query's label embedding is flipped
    # Where each stage reads the mask embedding: "query" (v1: from the query, whose RoI was pooled
    # at the stage's input box) or "roi" (not in v1: the query also meets a RoI pooled at the
    # stage's own output box, the frame the mask is pasted into; istr_viz.model.stage). Pair "roi"
    # with loss.mask_target_boxes="pred". The roi encoder's cells are dim_dynamic wide.
    mask_head: str = "query"
    # With mask_head="roi": 0 (default) = the mask branch reads the P x P RoI that the next stage
    # pools anyway; R > 0 (not in ISTR; v2's mask head pools 28 x 28) = it reads its own R x R
    # RoI at the output box, pooled one FPN level finer than the box's (twice canonical_box_size)
    # and reduced by a stride-2 3 x 3 conv (istr_viz.model.stage.RoIMaskConvEncoder): finer
    # features for the mask, one more pooling a stage
    mask_roi_resolution: int = 0
    # With mask_roi_resolution R > 0: the first stage (1-based) whose mask branch reads that R x R
    # RoI; earlier stages read the P x P one. 1 = every stage; num_stages = the last stage only,
    # whose masks are the output, for a fraction of the extra pooling's cost. Negative values
    # count from the end, as Python indices do: -1 = the last stage, whatever num_stages is.
    # No effect when R = 0
    mask_roi_first_stage: int = 1
    # Test time only (not in ISTR; SOLOv2's "maskness"): a detection's score is its class
    # probability x maskness ** this, maskness = the mean of its mask's probabilities over the
    # pixels at or above 0.5 (0 for an empty mask), so that confident masks rank first.
    # 0 = the class probability alone (ISTR). istr_viz.postprocess.top_detections
    maskness_power: float = 0.0
    # The CPU kernel of the stages' ELU (same values up to rounding; istr_viz.model.activations):
    # "auto" (the faster on this machine, timed once per process), "library" (torch's) or
    # "formula". Pin one where runs must repeat to the last bit; no effect on other devices
    elu: str = "auto"

    def __post_init__(self) -> None:
        for name in ("num_queries", "num_stages", "hidden_dim", "dim_dynamic", "dim_feedforward",
                     "num_heads", "pooler_resolution", "backbone_base_channels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be at least 1, got {getattr(self, name)}")
        q = self.queries_per_instance
        if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0 <= q <= 16:
            raise ConfigError("model.queries_per_instance must be a number in 0..16 (0 = off), "
                              f"got {q!r}", entry="model.queries_per_instance")
        if self.hidden_dim % self.num_heads:
            raise ConfigError(f"model.hidden_dim ({self.hidden_dim}) must be divisible by "
                              f"model.num_heads ({self.num_heads})")
        if self.dn_groups < 0 or not 0 <= self.dn_label_noise <= 1 or self.dn_box_noise < 0:
            raise ConfigError("model.dn_groups must be >= 0, model.dn_label_noise in [0, 1] and "
                              "model.dn_box_noise >= 0")
        if self.proposal_init not in ("image", "grid"):
            raise ConfigError("model.proposal_init must be image or grid, "
                              f"got {self.proposal_init!r}")
        if not 1 <= len(self.proposal_box_cells) <= 2 or min(self.proposal_box_cells) <= 0:
            raise ConfigError("model.proposal_box_cells must be one or two positive cell counts, "
                              f"got {self.proposal_box_cells}")
        if self.elu not in ELU_KERNELS:
            raise ConfigError(f"model.elu must be {', '.join(ELU_KERNELS)}, got {self.elu!r}",
                              entry="model.elu")
        if self.mask_head not in MASK_HEADS:
            raise ConfigError(f"model.mask_head must be {' or '.join(MASK_HEADS)}, "
                              f"got {self.mask_head!r}",
                              entry="model.mask_head")
        if self.mask_roi_resolution < 0 or self.mask_roi_resolution == 1:
            raise ConfigError("model.mask_roi_resolution must be 0 (off) or at least 2, got "
                              f"{self.mask_roi_resolution}", entry="model.mask_roi_resolution")
        if self.mask_roi_resolution and self.mask_head != "roi":
            raise ConfigError("model.mask_roi_resolution needs model.mask_head='roi', got "
                              f"{self.mask_head!r}", entry="model.mask_roi_resolution")
        if first_mask_roi_stage(self.mask_roi_first_stage, self.num_stages) is None:
            raise ConfigError(f"model.mask_roi_first_stage must be in 1..{self.num_stages} or "
                              f"-{self.num_stages}..-1 (model.num_stages; -1 = the last stage), "
                              f"got {self.mask_roi_first_stage}",
                              entry="model.mask_roi_first_stage")
        if isinstance(self.maskness_power, bool) or not (
                isinstance(self.maskness_power, numbers.Real) and 0 <= self.maskness_power <= 16):
            raise ConfigError("model.maskness_power must be a number in 0..16, got "
                              f"{self.maskness_power!r}", entry="model.maskness_power")
        if self.norm not in ("frozen_bn", "gn", "bn"):
            raise ConfigError(f"model.norm must be frozen_bn, gn or bn, got {self.norm!r}")
        if self.fpn_output_conv not in FPN_OUTPUT_CONVS:
            raise ConfigError(f"model.fpn_output_conv must be {' or '.join(FPN_OUTPUT_CONVS)}, "
                              f"got {self.fpn_output_conv!r}")
        if self.zero_init_residual and (self.norm == "frozen_bn" or self.pretrained_path):
            raise ConfigError("model.zero_init_residual is for training from scratch: frozen "
                              "norms would keep the zeroed scales, ImageNet weights overwrite them")


@dataclass(frozen=True)
class LossConfig:
    """Matching costs and loss weights (ISTR v1 ``config.py``). All stages are weighted equally."""

    class_weight: float = 2.0  # focal class loss and focal matching cost
    l1_weight: float = 5.0  # L1 on xyxy boxes divided by the image (w, h, w, h)
    giou_weight: float = 2.0  # 1 - GIoU (loss), -GIoU (cost)
    mask_embed_weight: float = 2.0  # MSE between predicted and GT mask embedding, / M
    mask_dice_weight: float = 2.0  # dice of the decoded S x S mask against the GT crop
    match_mask_weight: float = 2.0  # matching cost -(cos(z_pred, z_gt) + 1) / 2
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # "focal" (ISTR): a matched query's class target is 1; "varifocal" (not in ISTR: VarifocalNet,
    # CVPR 2021): it is the IoU of the query's box with its GT box, so scores rank detections by
    # how well they are placed as well as by class. Matching keeps the focal cost. Training only.
    class_loss: str = "focal"
    embed_target_noise: bool = True  # loss-side GT codes use the basis' fresh logit noise (v1)
    # Per-component weights of the embedding MSE: "uniform" (v1: every whitened component counts
    # the same) or "variance" (component j weighted by its explained variance / the mean one, so
    # the MSE of whitened codes becomes the squared error in the basis' own (logit) space, led by
    # the components that carry the mask; predicting the mean code still scores 1). Codes that
    # are not whitened (basis.recipe "binary", the DCT codec) are in that space already: no change
    embed_weighting: str = "uniform"
    # Frame of the loss-side GT mask crops: "gt" = the GT boxes (v1); "pred" = the detached
    # predicted boxes, the frame the mask is pasted into at test time (v2). Matching uses "gt".
    mask_target_boxes: str = "gt"
    semantic_weight: float = 1.0  # cross-entropy of the auxiliary semantic head (model.aux_semantic)
    dense_box_weight: float = 1.0  # GIoU loss of the auxiliary dense box head (model.aux_dense_box)
    # Training-only aid (not in ISTR): the first ``o2m_stages`` stages match every GT instance to
    # up to ``o2m_k`` queries (the GT repeated k times in the Hungarian problem), giving k times
    # the positives early on; later stages stay one-to-one, so inference needs no NMS. 1 = off.
    o2m_k: int = 1
    o2m_stages: int = 0
    # Training-only aid (not in ISTR; Mask R-CNN trains its mask head on every positive RoI): the
    # mask losses of a stage also cover each unmatched query whose (detached) output box overlaps
    # a GT box by at least this IoU, against the GT it overlaps most; each instance's mask loss
    # is then the mean over its queries (the matched one and these) times its matched count (1;
    # o2m_k on a one-to-many stage), so the loss keeps its scale. The class and box targets stay
    # one-to-one; the denoising queries are left as they are. 0 = off (ISTR).
    mask_overlap_iou: float = 0.0

    def __post_init__(self) -> None:
        if self.embed_weighting not in ("uniform", "variance"):
            raise ConfigError(f"loss.embed_weighting must be 'uniform' or 'variance', got "
                              f"{self.embed_weighting!r}", entry="loss.embed_weighting")
        if self.class_loss not in CLASS_LOSSES:
            raise ConfigError(f"loss.class_loss must be {' or '.join(CLASS_LOSSES)}, got "
                              f"{self.class_loss!r}", entry="loss.class_loss")
        if self.o2m_k < 1 or self.o2m_stages < 0:
            raise ConfigError(f"loss.o2m_k must be >= 1 and loss.o2m_stages >= 0, got "
                              f"{self.o2m_k} and {self.o2m_stages}")
        if isinstance(self.mask_overlap_iou, bool) or not (
                isinstance(self.mask_overlap_iou, numbers.Real) and 0 <= self.mask_overlap_iou <= 1):
            raise ConfigError(f"loss.mask_overlap_iou must be an IoU in 0..1 (0 = off), got "
                              f"{self.mask_overlap_iou!r}", entry="loss.mask_overlap_iou")

    def cost_weights(self) -> dict[str, float]:
        """Weights of the matching cost terms, keyed by term name (see ``istr_viz.matcher``)."""
        return {"class": self.class_weight, "l1": self.l1_weight, "giou": self.giou_weight,
                "mask": self.match_mask_weight}


@dataclass(frozen=True)
class BasisConfig:
    """The PCA mask basis fitted on the training masks when no basis file is given."""

    dim: int = 60  # embedding length M (ISTR v1: 60)
    mask_size: int = 28  # S
    recipe: str = "istr"  # "istr": noisy logit space, whitened, sigmoid decode; "binary": plain PCA


@dataclass(frozen=True)
class DataConfig:
    """Input sizes and augmentation (detectron2's ResizeShortestEdge + flip, as in ISTR)."""

    train_min_sizes: tuple[int, ...] = tuple(range(480, 801, 32))  # scale jitter: one drawn per image
    train_max_size: int = 1333
    test_min_size: int = 800
    test_max_size: int = 1333
    flip_prob: float = 0.5
    num_workers: int = 2  # DataLoader workers per process
    # Training batches never mix portrait with landscape images, so less of a batch is padding
    # (detectron2's aspect-ratio grouping, on in ISTR's configs; istr_viz.data.batching). On the
    # second data set (a fifth of the images portrait): 12% less time a step on its plain variant
    # (benchmarks/bench_step.py), 7% more iterations in the preset's 30 minutes, mask AP ahead at
    # 15 and 22.5 minutes and level at 30 (s35g against s35ng, one run each; results log,
    # session 35). Square images form one group and batch exactly as without it
    group_by_orientation: bool = True
    # Scale matching for a run that starts from trained weights (not in ISTR; Yu et al., "Scale
    # Match for Tiny Person Detection", WACV 2020): where the training set's median instance (the
    # square root of its area) at the middle training size is at most 1 / 1.25 of this many px,
    # every size above (training, test, and their caps) is raised x1.25, so that the objects come
    # closer to the sizes the weights learned on (engine._match_scale, data.check.size_factor;
    # x1.4 was no better at 30 minutes). 0 = off. Every checkpoint records the median it trained
    # at (checkpoint.trained_median_px), and a start from one that did matches that record: this
    # value then only turns the rule on. It is the target for a checkpoint without the record,
    # as the shipped model: shapes-cpu's 28 is the built-in shapes' median, its data. Sizes set
    # with --set are raised too. A run from scratch keeps its sizes. A run applies it once, at
    # its start, and stores the sizes it got
    median_object_px: float = 0.0

    def __post_init__(self) -> None:
        px = self.median_object_px
        if isinstance(px, bool) or not isinstance(px, numbers.Real) or not 0 <= px <= 1000:
            raise ConfigError(f"data.median_object_px must be a number in 0..1000 (0 = off), "
                              f"got {px!r}", entry="data.median_object_px")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation (ISTR v1: AdamW 2.5e-5, batch 16, 270k iterations, x0.1 at 210k and 250k)."""

    batch_size: int = 16  # in total, over all processes
    lr: float = 2.5e-5
    # the backbone's (ResNet + FPN) lr is lr x this (not in ISTR: a from-scratch CNN may take a
    # higher lr than the transformer-like head); 1 = one lr for all
    backbone_lr_mult: float = 1.0
    # the lr of a run that starts from another checkpoint's weights (engine.training_start: the
    # train command's default start or --init-from, then --set, so train.lr=X still wins), where
    # a lr tuned for training from scratch is too high; 0 = train.lr
    fine_tune_lr: float = 0.0
    # a run that starts from another checkpoint's weights freezes the first parts of its ResNet,
    # numbered as detectron2's FREEZE_AT: 0 none, 1 the stem, 2 the stem and layer1, ..., 5 the
    # whole ResNet (their BatchNorm still normalises with each batch's statistics, where
    # detectron2 fixes them). It saves the backward pass
    # through the high-resolution layers: at 2, shapes-cpu on the second data set took 11% less
    # time an iteration, but ended 1.2 mask AP under the mean of three seeds training everything
    # (session 47, one run), so 0 is the default. A run from scratch trains everything, and one
    # from ImageNet weights (model.pretrained_path) all but the stem and layer1
    fine_tune_freeze_at: int = 0
    # the weight average (train.ema_decay) and the lr drop at the steps (train.lr_gamma) of a run
    # from trained weights, applied as train.fine_tune_lr is (engine.training_start); None = the
    # run's own train.ema_decay / train.lr_gamma
    fine_tune_ema_decay: float | None = None
    fine_tune_lr_gamma: float | None = None
    weight_decay: float = 1e-4
    # AdamW's second-moment decay (ISTR: torch's default 0.999, a memory of about 1,000 steps);
    # a run of ~1,000 iterations spans that memory once
    adam_beta2: float = 0.999
    max_iters: int = 270_000
    warmup_iters: int = 1000
    warmup_factor: float = 0.01
    lr_steps: tuple[float, ...] = (210_000 / 270_000, 250_000 / 270_000)  # fractions of max_iters
    lr_gamma: float = 0.1
    # "step" (ISTR): x lr_gamma at each of lr_steps; "linear" (not in ISTR): from the end of the
    # warm-up down to 0 at the end of the budget (iterations or minutes), as "budgeted training"
    # (Li et al., ICLR 2020) found best for a fixed budget
    lr_decay: str = "step"
    clip_grad_norm: float = 1.0  # full-model L2 norm; 0 = off
    amp: bool = True  # autocast: bf16 (fp16 where bf16 is missing) on CUDA, bf16 on CPUs with it
    seed: int = 40244023
    checkpoint_every: int = 1000  # iterations
    eval_every: int = 0  # iterations; 0 = only at the end (needs a val set)
    # also evaluate at this many evenly spaced points of the budget (k / (n + 1) of max_iters),
    # known only once --max-minutes has fixed it: AP against training time
    eval_points: int = 0
    eval_max_images: int = 0  # 0 = the whole val set
    log_every: int = 1  # metrics.jsonl line every N iterations
    threads: int = 0  # torch.set_num_threads on the CPU; 0 = torch's default
    # Exponential moving average of the weights (not in ISTR): 0 = off. The decay ramps up as
    # ema_decay * (1 - exp(-n / ema_ramp)) over the first updates; evaluation, best.pt and the
    # checkpoint's "model" hold the averaged weights (the raw ones travel for resuming).
    ema_decay: float = 0.0
    ema_ramp: int = 100
    # Under CUDA DDP, BatchNorm layers (model.norm="bn") become SyncBatchNorm, normalising over
    # the whole batch rather than each process's share; False keeps per-process statistics. The
    # CPU (gloo) path always keeps them: torch's SyncBatchNorm trains on GPUs only.
    sync_bn: bool = True
    # Under several processes: 1 = DDP, the gradients all-reduced at every iteration; k > 1 =
    # local SGD (not in ISTR): each process steps on its own share of the batch and the processes
    # average their weights every k iterations (torch.distributed.algorithms.model_averaging), for
    # the CPU, where the all-reduce of every gradient costs a fifth of an iteration
    average_every: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_iters < 1:
            raise ConfigError("train.batch_size and train.max_iters must be at least 1")
        if not self.lr > 0 or not self.backbone_lr_mult > 0:
            raise ConfigError(f"train.lr and train.backbone_lr_mult must be positive, got "
                              f"{self.lr} and {self.backbone_lr_mult}")
        if not self.fine_tune_lr >= 0:
            raise ConfigError(f"train.fine_tune_lr must be positive, or 0 for train.lr, got "
                              f"{self.fine_tune_lr}", entry="train.fine_tune_lr")
        if not 0 <= self.fine_tune_freeze_at <= 5:  # model.backbone.FROZEN_PARTS
            raise ConfigError(f"train.fine_tune_freeze_at must be 0-5 (0 none, 1 the stem, 2 the "
                              f"stem and layer1, ..., 5 the whole ResNet), got "
                              f"{self.fine_tune_freeze_at}", entry="train.fine_tune_freeze_at")
        if self.fine_tune_ema_decay is not None and not 0.0 <= self.fine_tune_ema_decay < 1.0:
            raise ConfigError(f"train.fine_tune_ema_decay must be in [0, 1), or none for "
                              f"train.ema_decay, got {self.fine_tune_ema_decay}",
                              entry="train.fine_tune_ema_decay")
        if not 0 < self.lr_gamma < math.inf:
            raise ConfigError(f"train.lr_gamma must be positive and finite (1 = no drop), got "
                              f"{self.lr_gamma}", entry="train.lr_gamma")
        if self.fine_tune_lr_gamma is not None and not 0 < self.fine_tune_lr_gamma < math.inf:
            raise ConfigError(f"train.fine_tune_lr_gamma must be positive and finite (1 = no "
                              f"drop), or none for train.lr_gamma, got {self.fine_tune_lr_gamma}",
                              entry="train.fine_tune_lr_gamma")
        if not 0.0 < self.adam_beta2 < 1.0:
            raise ConfigError(f"train.adam_beta2 must be in (0, 1), got {self.adam_beta2}",
                              entry="train.adam_beta2")
        if self.lr_decay not in LR_DECAYS:
            raise ConfigError(f"train.lr_decay must be {' or '.join(LR_DECAYS)}, got "
                              f"{self.lr_decay!r}", entry="train.lr_decay")
        if self.log_every < 1 or self.average_every < 1:
            raise ConfigError("train.log_every and train.average_every must be at least 1")
        if not 0.0 <= self.ema_decay < 1.0 or self.ema_ramp < 0:
            raise ConfigError(f"train.ema_decay must be in [0, 1) and train.ema_ramp >= 0, got "
                              f"{self.ema_decay} and {self.ema_ramp}")


@dataclass(frozen=True)
class Config:
    """Everything a training run needs besides the data paths; travels inside the checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    basis: BasisConfig = field(default_factory=BasisConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Rebuild from :meth:`to_dict` output (lists become tuples again); unknown keys raise."""
        parts = {}
        for f in fields(cls):
            sub_cls = f.type if isinstance(f.type, type) else _SECTIONS[f.name]
            values = dict(d.get(f.name, {}))
            known = {sf.name for sf in fields(sub_cls)}
            unknown = set(values) - known
            if unknown:
                raise ConfigError(f"unknown keys {sorted(unknown)} in section {f.name!r}")
            parts[f.name] = sub_cls(**{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in values.items()})
        return cls(**parts)


_SECTIONS = {"model": ModelConfig, "loss": LossConfig, "basis": BasisConfig, "data": DataConfig,
             "train": TrainConfig}

PRESETS: dict[str, Config] = {
    # The paper's setting: R50-FPN (ImageNet weights from a local file via model.pretrained_path),
    # 300 queries, 6 stages, batch 16, 270k iterations, short side 480-800.
    "coco-r50": Config(),
    # Small enough to train a useful model on 2 CPU cores in under 30 minutes (see benchmarks/).
    "shapes-cpu": Config(
        # narrow ResNet-18 with BatchNorm (trains from scratch); 24 queries (at most 8 objects per
        # image) and 3 stages: 2.4x the iterations of 40 x 6 in the same minutes, and lower losses
        # at equal time (benchmarks/results_log.md, r6 / r8); identity-initialised box deltas
        # (ModelConfig.zero_box_deltas); one group of denoising queries in training; proposal boxes
        # that start tiled over the image (8x the mask AP of whole-image boxes at 20 minutes:
        # benchmarks/results_log.md, session 3 ablations)
        # The training-only semantic head (dense per-pixel class supervision on the FPN) and a 3x
        # lr for the backbone: each gained at 12 minutes in side-by-side screens; at 30 minutes
        # 25.8 / 18.4 box / mask AP against 23.7 / 16.5 without them (r17, r19). The weight is 1:
        # 3 measured no better on top of the lr in a side-by-side pair at 12 minutes (all in
        # benchmarks/results_log.md, sessions 6-7). The embedding MSE weights each component by
        # its variance (loss.embed_weighting): 3.4 against 2.7 mask AP at 12 minutes (session 8).
        # BatchNorm rather than GroupNorm in the ResNet (the FPN then has no norm): 33.4 against
        # 28.4 mask AP at 30 minutes (r23, r22, session 9; one process, batch 4; under DDP each
        # process normalises over its share of the batch).
        # Depthwise-separable FPN output convs: the 3x3 ones cost as much as the whole ResNet;
        # 26% more iterations and 10.6 against 6.4 mask AP at 30 minutes on an fp32-only CPU
        # (c12_sep, c12_base, session 12). Each stage's mask branch also reads a RoI pooled at
        # its own output box, and learns masks cropped to that box (mask_head="roi",
        # mask_target_boxes="pred"): 26.0 / 20.2 against 25.9 / 17.8 box / mask AP at 30 minutes
        # in 12% fewer iterations, ahead at every eval point (m1, m0, session 14).
        # At least 3 queries per instance of the most crowded training image: 24 on the built-in
        # shapes (at most 8 each), 36 on the second data set (12), where 36 queries reached 5.1 /
        # 14.8 mask AP at 15 / 30 minutes against 24's 4.0 / 13.0 on the same code, in 10% fewer
        # iterations (s34q36, s34q24, one run each; benchmarks/results_log.md, session 34)
        model=ModelConfig(backbone="resnet18", backbone_base_channels=32, norm="bn",
                          fpn_output_conv="separable",
                          num_queries=24, queries_per_instance=3.0,
                          num_stages=3, hidden_dim=128, dim_dynamic=32,
                          dim_feedforward=512, num_heads=4, canonical_box_size=112.0,
                          zero_box_deltas=True, dn_groups=1, proposal_init="grid",
                          aux_semantic=True, mask_head="roi", maskness_power=2.0,
                          mask_roi_resolution=14, mask_roi_first_stage=-1),
        # Detections are scored by class probability x maskness ** 2 (test time only): +0.4 to
        # +0.8 mask AP on five model / val-set pairs (the shipped model, a 30-minute run, each on
        # the built-in val set and 400 held-out images; a 30-minute run on the second set), box AP
        # within 0.2; power 3 or 4 gained at most 0.2 more mask AP (the shipped model) but cost the
        # 30-minute run up to 0.7 box AP (benchmarks/results_log.md, session 27).
        # The last stage's mask branch reads a 14 x 14 RoI of its own, one FPN level finer
        # (mask_roi_resolution=14, mask_roi_first_stage=-1; 9% fewer iterations a minute): +0.8 /
        # +1.0 mask and -1.3 / -0.8 box AP against the shipped model on the val set / 400
        # held-out images (ship12, 110 against 108 minutes, session 28), +1.3 mask AP at 30
        # minutes (b8fine against b8lr). In every stage it cost ~25% a step (ship11, session 27).
        # RoIs pooled one FPN level finer than with the 56 px canonical size (canonical_box_size
        # 112: a 56-111 px box reads P3, stride 8, rather than P4; the levels stop at P2, so the
        # last stage's mask RoI, at twice the canonical size, reads P2 for every box under 112
        # px): 12.8 / 29.8 / 42.5 / 48.2 mask AP at 7.5 / 15 / 22.5 / 30 minutes against 8.3 /
        # 24.7 / 40.2 / 47.4, box AP 56.4 against 53.7 at the end, in 7% fewer iterations (c112
        # against ov5, session 29; EMA weights, as both runs evaluated; raw: 49.0 against 48.4).
        basis=BasisConfig(dim=60, mask_size=28),
        # 256 px shapes seen at 160-224 px: the backbone's cost grows with the pixels. The caps on
        # the longer side keep detectron2's 800:1333 ratio, so that they bind only for images
        # wider than 5:3 (a 224 cap shrank 360 x 200 images to 224 x 124)
        # Tested at 240, a step above the largest training size: 224 gave +2.8 / +1.5 / +0.9
        # mask AP over 192 for the shipped model, a 30-minute run and a 30-minute run on the
        # second set (ship9, b8lr, s8lr; session 26); 240 gave 0.5-0.9 more on two of them, 256
        # and 288 less. On 400 images no choice had seen (make-shapes --seed 11), 240 against 224:
        # +0.8 mask AP for the shipped model (68.8 / 68.0), +0.9 for a 30-minute run (c112,
        # 52.2 / 51.3) (session 29). The longer-side cap keeps the 800:1333 ratio.
        # A run from trained weights (the train command's default start from the shipped model
        # on data of other classes, or --init-from) on data whose median object is smaller than
        # the built-in shapes' (28 px at 192; at most 22.4) raises all these sizes x1.25
        # (data.median_object_px): the second data set's 20 px gets x1.25, which gave 46.0 / 39.4
        # against 44.2 / 36.7 box / mask AP at 30 minutes from the shipped model, in 2,080 against
        # 2,420 iterations (s45r125 against s44ft, one run each, AMD EPYC; 45.1 / 37.9 with the
        # seed 1, s45ft_s1, on a slower stretch of the machine; 46.1 / 39.0 with the seed 2,
        # s46s2; the sizes 208-272 tested at 272: 45.5 / 38.6, s45big; x1.4: 46.6 / 38.7,
        # s46x14). From scratch the same sizes cost 2.5 mask AP
        # (s45lr: 21.7 / 17.9 against s44lr's 24.6 / 20.4 in 1,970 against 2,530 iterations), so
        # a run from scratch keeps the sizes below (benchmarks/results_log.md, sessions 45-46)
        data=DataConfig(train_min_sizes=(160, 176, 192, 208, 224), train_max_size=373,
                        test_min_size=240, test_max_size=400, num_workers=0,
                        median_object_px=28.0),
        # The varifocal class loss (a matched query's class target is its box's IoU, so scores
        # rank detections by placement as well): level for 15 minutes, then ahead; +1.7 mask AP
        # at equal iterations at the end of 30 minutes (29.9 / 23.3 against 26.9 / 20.8 box / mask
        # AP at the end of each run, 140 iterations more; vfl20 against m20, session 20, one seed
        # each, built-in shapes only; session 19's perturbed run was +1.7 at 22.5 minutes too).
        # On the 108-minute shipped recipe it ended 0.7 mask AP below the focal loss at equal
        # iterations (ship8 against ship7, session 21): the shipped model keeps the focal loss.
        # Its scores are expected IoUs, on another scale than the focal loss's (best-F1 thresholds
        # 0.60 and 0.34): the display threshold follows the model (evaluate.best_f1_threshold).
        # The mask losses also train every unmatched query whose box overlaps a GT by IoU 0.5,
        # each instance's loss the mean over its queries (loss.mask_overlap_iou, training only):
        # 47.4 against 45.8 mask AP at 30 minutes (48.4 against 47.1 with the raw weights),
        # ahead at 15 and 22.5 minutes by 0.2 and 0.7 (ov5 against b8fine, session 29).
        loss=LossConfig(embed_weighting="variance", mask_target_boxes="pred",
                        class_loss="varifocal", mask_overlap_iou=0.5),
        # one thread: on 2 cores, 2 OpenMP threads were no faster (benchmarks/bench_model.py).
        # Batch 8 (4 a process under --processes 2): 1.35-1.43x the images a second of batch 4 (a
        # step is mostly per-operation overhead; at equal images the two learn the same) and 41.6
        # against 34.7 mask AP at 30 minutes, ahead at every eval point; batch 16 was level with 8
        # (41.5) (b8, b16 in session 23 against m22 in session 22; benchmarks/results_log.md).
        # lr 2.8e-4 (2e-4 x sqrt 2 for the doubled batch): 52.0 / 42.3 against 51.5 / 41.6 box /
        # mask AP at 30 minutes in 13% fewer iterations on a slower day; mask AP ahead at equal
        # iterations at every eval point (+5.1 at 2,560, before either run's lr drop) (b8lr,
        # session 24, against b8); +4.1 mask AP in the equal-budget benchmark's one process too
        # (eb23). At batch 4, GroupNorm then, a higher lr hurt (session 8).
        # lr 4e-4 since session 37: 60.4 / 53.0 against 57.7 / 49.9 box / mask AP at 30 minutes
        # (p37lr against p32, 3,000 against 3,040 iterations), mask AP +0.5 / +1.1 / +2.6 / +3.1
        # at 7.5 / 15 / 22.5 / 30 minutes; in the equal-budget benchmark's one process 4e-4 had
        # scored best of 2e-4 / 2.8e-4 / 4e-4 (eb31) and of 4e-4 / 5.6e-4 / 8e-4 (eb32), one run
        # per lr (eb38 then picked 2.8e-4, on a machine that slowed as its runs went, and eb39
        # 5.6e-4, on one that sped up: lr and pace not separated). A start from trained weights
        # (the train command's default on data of other classes) keeps 2.8e-4: from the shipped
        # model on the second data set, 4e-4 was 3.3 mask AP behind it at 15 minutes (s37ft: 27.8
        # against s36ft36's 31.1). Such a start also averages its weights (EMA 0.995, about the
        # last 200 iterations) in place of the lr drop (x1 at the step): from the shipped model
        # on the second data set, 39.9 / 39.9 / 39.7 mask AP at 30 minutes over the seeds 0 / 1 /
        # 2 against 39.4 / 38.8 / 39.0 for the same seeds with the x0.1 step and no average
        # (s47emac, s48emac_s1, s47emac_s2 against s45r125, s48s1, s46s2; sessions 47-48); the
        # average with the step ended 0.6 behind (s47ema, 38.8).
        train=TrainConfig(batch_size=8, lr=4e-4, fine_tune_lr=2.8e-4, backbone_lr_mult=3.0,
                          fine_tune_ema_decay=0.995, fine_tune_lr_gamma=1.0,
                          max_iters=1500,
                          warmup_iters=100,
                          lr_steps=(0.8,), checkpoint_every=100, seed=0, threads=1),
        # No weight EMA from scratch (train.ema_decay=0): at 30 minutes a 0.998 average lags the
        # raw weights, which scored +1.3 / +1.0 / +0.8 mask AP over it at the end of three runs
        # (b8fine, ov5, c112: each the same run's two sets of weights); at 110 minutes the two
        # were level (ship12 raw 75.1 / 68.2 against 75.3 / 68.3; session 29).

    ),
}


def get_preset(name: str) -> Config:
    """The named preset; an unknown name raises :class:`ConfigError` listing the valid ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def with_architecture_of(cfg: Config, source: Config) -> Config:
    """``cfg`` with the model and basis of ``source`` (a checkpoint to start from), and the frame
    of its mask targets (``loss.mask_target_boxes``), which goes with its mask head: a ``query``
    head trained on ``gt`` crops should not be fine-tuned toward ``pred`` ones."""
    loss = replace(cfg.loss, mask_target_boxes=source.loss.mask_target_boxes)
    return replace(cfg, model=source.model, basis=source.basis, loss=loss)


MAX_TEST_SIZE = 4096  # px on the shorter side: beyond it an image is more memory than a model


def with_sizes_scaled(cfg: Config, factor: float) -> Config:
    """``cfg`` with every size of ``cfg.data`` (the training sizes, the test size and both
    caps) times ``factor``, rounded to whole pixels (``data.median_object_px``'s sizes: a start
    from the run's checkpoint matches the median it recorded at them, so they are not raised
    twice)."""
    d = cfg.data
    data = replace(d, train_min_sizes=tuple(round(s * factor) for s in d.train_min_sizes),
                   train_max_size=round(d.train_max_size * factor),
                   test_min_size=round(d.test_min_size * factor),
                   test_max_size=round(d.test_max_size * factor))
    return replace(cfg, data=data)


def with_test_size(cfg: Config, min_size: int) -> Config:
    """``cfg`` testing at ``min_size`` px on the shorter side (``data.test_min_size``). The cap on
    the longer side (``data.test_max_size``) is raised where it would be below detectron2's
    800:1333 ratio to the new size, and never lowered: a larger size binds only for images wider
    than 5:3, as the presets' caps do; a smaller one keeps the cap (it binds later). A size that
    is not a whole number in 1..``MAX_TEST_SIZE`` raises :class:`ConfigError`."""
    if isinstance(min_size, bool) or not isinstance(min_size, numbers.Integral) \
            or not 1 <= min_size <= MAX_TEST_SIZE:
        raise ConfigError(f"the test size must be a whole number of pixels in 1..{MAX_TEST_SIZE}, "
                          f"got {min_size!r}", entry="data.test_min_size")
    min_size = int(min_size)
    max_size = max(cfg.data.test_max_size, round(min_size * 1333 / 800))
    return replace(cfg, data=replace(cfg.data, test_min_size=min_size, test_max_size=max_size))


def with_maskness_power(cfg: Config, power: float) -> Config:
    """``cfg`` scoring detections with ``power`` (``ModelConfig.maskness_power``); a power that is
    not a number in 0..16 raises :class:`ConfigError`."""
    if isinstance(power, bool) or not isinstance(power, numbers.Real):
        raise ConfigError(f"model.maskness_power must be a number in 0..16, got {power!r}",
                          entry="model.maskness_power")
    return replace(cfg, model=replace(cfg.model, maskness_power=float(power)))


def _coerce(text: str, current, annotation: str):
    """Parse ``text`` into the type of the field (from its current value and annotation)."""
    if text.lower() in ("none", "null") and "None" in str(annotation):
        return None
    if current is None:  # an optional field that is unset: its annotation names the type
        kinds = {"float | None": 0.0, "int | None": 0, "str | None": ""}
        if str(annotation) not in kinds:
            raise ValueError(f"cannot parse a value for a field of type {annotation}")
        current = kinds[str(annotation)]
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if isinstance(current, tuple):
        items = [t for t in text.strip("()[] ").split(",") if t.strip()]
        kind = type(current[0]) if current else float
        return tuple(kind(t.strip()) for t in items)
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    return text


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``["model.num_stages=4", "train.lr=1e-4", ...]``; unknown keys list the valid ones.

    Each section is checked once, with all its overrides in place, so their order does not
    matter (``model.mask_head=query`` may come before ``model.mask_roi_resolution=0``); a later
    override of the same key wins."""
    changes: dict[str, dict] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. model.num_stages=4)")
        key, value = item.split("=", 1)
        section, _, name = key.strip().partition(".")
        valid = [f"{s}.{sf.name}" for s, c in _SECTIONS.items() for sf in fields(c)]
        if section not in _SECTIONS or name not in {f.name for f in fields(_SECTIONS[section])}:
            raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
        sub = getattr(cfg, section)
        f = next(f for f in fields(sub) if f.name == name)
        try:
            new_value = _coerce(value.strip(), getattr(sub, name), f.type)
        except ValueError as err:
            raise ConfigError(f"bad value {value!r} for {key}: {err}") from None
        changes.setdefault(section, {})[name] = new_value
    return replace(cfg, **{section: replace(getattr(cfg, section), **named)
                           for section, named in changes.items()})
