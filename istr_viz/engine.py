"""The training engine: one function that notebooks call and the CLI wraps.

It runs unchanged on the CPU, on one GPU (autocast) and under ``torchrun`` (DDP, nccl on GPUs, gloo
on CPUs). Nothing is lost: ``last.pt`` is written atomically every ``checkpoint_every`` iterations
and at the end, and a killed run resumes at the exact iteration with the optimiser, scheduler and
RNG state. Data order and augmentation are functions of (seed, iteration), so the continued run is
the same run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.model_averaging.utils import average_parameters
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from istr_viz.basis import MaskBasis
from istr_viz.checkpoint import load_checkpoint, save_checkpoint, trained_median_px
from istr_viz.config import (Config, TrainConfig, apply_overrides, with_architecture_of,
                             with_sizes_scaled)
from istr_viz.data.batching import IterationBatchSampler, SeededDataset, padding_options
from istr_viz.data.coco import CocoDataset, collate, load_annotations
from istr_viz.data.layout import DatasetPaths
from istr_viz.data.transforms import TransformConfig, build_transform
from istr_viz.errors import ConfigError, DataError, IstrVizError, NonFiniteError
from istr_viz.losses import SetCriterion
from istr_viz.model import build_model
from istr_viz.model.activations import library_elu_for, library_elu_is_faster, set_elu_kernel
from istr_viz.model.backbone import FROZEN_PARTS, IMAGENET_FREEZE_AT, freeze_backbone_at
from istr_viz.runtime import autocast_dtype, default_device, machine_summary, same_machine


UNKNOWN_MACHINE = {"cpu": None, "cpu_flags": None}  # where a run trained before machines were kept


class TrainingDiverged(NonFiniteError):
    """A loss term became NaN or infinite; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device | None = None) -> tuple[DistInfo, torch.device]:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), default_device(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or str(device) in ("auto", "cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local_rank), dev


def sync_batchnorm_for_ddp(model: nn.Module, device: torch.device, world_size: int,
                           enabled: bool = True) -> nn.Module:
    """The model with its BatchNorm layers as ``nn.SyncBatchNorm`` under multi-process CUDA.

    Unchanged on one process, on the CPU (torch's SyncBatchNorm trains on GPUs only) and with
    ``enabled=False``. The state dict keeps its keys, so checkpoints load into a plain model.
    """
    if not enabled or world_size <= 1 or device.type != "cuda":
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _all_reduce_sum(value: float, info: DistInfo, device: torch.device) -> float:
    if info.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def _broadcast_from_main(value: float, info: DistInfo, device: torch.device) -> float:
    if info.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


def _shared_elu_kernel(info: DistInfo, device: torch.device) -> bool:
    """Process 0's timed choice of CPU ELU kernel (``library_elu_is_faster``), in every process:
    processes that chose differently would compute in different rounding."""
    return bool(_broadcast_from_main(float(library_elu_is_faster()), info, device))


# ----------------------------------------------------------------------------- transforms


def transform_configs(cfg: Config) -> tuple[TransformConfig, TransformConfig]:
    """(train, eval) transform settings of a configuration."""
    d = cfg.data
    train = TransformConfig(min_size=tuple(d.train_min_sizes), max_size=d.train_max_size,
                            flip_prob=d.flip_prob)
    test = TransformConfig(min_size=(d.test_min_size,), max_size=d.test_max_size, flip_prob=0.0)
    return train, test


# ----------------------------------------------------------------------------- schedule


def lr_factor(iteration: int, max_iters: int | None, warmup_iters: int, warmup_factor: float,
              steps: tuple[float, ...], gamma: float, time_done: float = 0.0,
              decay: str = "step") -> float:
    """Linear warm-up from ``warmup_factor``, then ``decay``:

    - ``"step"``: x ``gamma`` at each step (fractions of the budget): a step is passed when
      ``iteration`` reaches that fraction of ``max_iters`` or ``time_done`` (the fraction of a
      minutes budget used) reaches it, whichever comes first;
    - ``"linear"``: down from 1 to 0 at the end of the budget, over the fraction of it done (the
      larger of ``iteration / max_iters`` and ``time_done``); ``steps`` and ``gamma`` unused.

    ``max_iters=None`` (a minutes budget): the schedule follows the clock alone, so neither a
    forecast that was too low nor iterations that slow down move it."""
    if decay == "linear":
        done = max(time_done, iteration / max_iters if max_iters else 0.0)
        factor = max(0.0, 1.0 - done)
    else:
        factor = gamma ** sum(time_done >= s or
                              (max_iters is not None and iteration >= round(s * max_iters))
                              for s in steps)
    if iteration < warmup_iters:
        alpha = iteration / max(1, warmup_iters)
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


def param_groups(model: nn.Module, backbone_lr_mult: float) -> list[dict]:
    """The optimiser's parameter groups: one, or with ``backbone_lr_mult`` != 1 the backbone's
    parameters (``model.backbone``) apart, their ``lr_mult`` read by the loop."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if backbone_lr_mult == 1.0:
        return [{"params": [p for _, p in trainable], "lr_mult": 1.0}]
    body = [p for n, p in trainable if n.startswith("backbone.")]
    head = [p for n, p in trainable if not n.startswith("backbone.")]
    return [{"params": body, "lr_mult": backbone_lr_mult}, {"params": head, "lr_mult": 1.0}]


# ----------------------------------------------------------------------------- weight average


def build_ema(model: nn.Module, decay: float, ramp: int) -> AveragedModel:
    """An exponential moving average of ``model`` (parameters and buffers), torch's
    ``AveragedModel``, whose decay ramps up as ``decay * (1 - exp(-n / ramp))`` after n updates
    (so the early, fast-moving weights are not averaged in for long)."""

    @torch.no_grad()
    def ema_update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged) -> None:
        n = float(n_averaged)
        d = decay * (1 - math.exp(-n / ramp)) if ramp > 0 else decay
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1 - d)
        else:  # integer buffers (BatchNorm's counters) follow the model
            for a, c in zip(averaged, current):
                a.copy_(c)

    ema = AveragedModel(model, multi_avg_fn=ema_update, use_buffers=True)
    ema.module.eval()
    return ema


def eval_points(max_iters: int, num_points: int) -> set[int]:
    """The iterations k * max_iters / (num_points + 1), k = 1..num_points, at which to evaluate."""
    return {round(max_iters * k / (num_points + 1)) for k in range(1, num_points + 1)}


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    out_dir: Path
    last_checkpoint: Path
    best_checkpoint: Path | None
    iterations: int
    minutes: float
    metrics: dict | None  # final val metrics (evaluate_results format) when a val set is given


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_finite(terms: dict[str, torch.Tensor], iteration: int) -> None:
    for name, value in terms.items():
        if not torch.isfinite(value).all():
            stage, _, term = name.partition("/")
            raise TrainingDiverged(
                f"loss term {term or name} of {stage} is {value.item()} at iteration {iteration}; "
                "stopped, the last good checkpoint is kept (try a lower train.lr)")


def _global_terms(loss: torch.Tensor, terms: dict[str, torch.Tensor], info: DistInfo) -> dict:
    """The loss and its terms summed over processes (each process holds its share of the global
    sums, since the loss is normalised by the global instance count; under local SGD by its own
    count times the number of processes, so that the sum is the mean of the processes' losses).
    A term that some process lacks (the denoising terms of a share of the batch without
    instances) counts 0 there."""
    names = ["loss", *terms]
    own = {"loss": loss.detach().float(), **{k: v.detach().float() for k, v in terms.items()}}
    if info.world_size > 1:
        gathered: list = [None] * info.world_size
        dist.all_gather_object(gathered, names)  # the same union, in the same order, everywhere
        names = list(dict.fromkeys(n for rank_names in gathered for n in rank_names))
    zero = loss.new_zeros((), dtype=torch.float32)
    values = torch.stack([own.get(n, zero) for n in names])
    if info.world_size > 1:
        dist.all_reduce(values)
    return {k: round(v, 6) for k, v in zip(names, values.tolist())}


def _check_finite_outputs(output, iteration: int) -> None:
    for k, stage in enumerate(output.stages, start=1):
        for name in ("logits", "boxes_xyxy", "mask_embed"):
            if not torch.isfinite(getattr(stage, name)).all():
                raise TrainingDiverged(
                    f"stage{k} predicted non-finite {name} at iteration {iteration}; stopped, the last "
                    "good checkpoint is kept (try a lower train.lr)")


# What starting from the shipped model gave on the second data set of benchmarks/, 30 minutes on 2
# CPU cores of an AMD EPYC (benchmarks/results_log.md: s47emac, s48emac_s1 and s47emac_s2, the
# seeds 0, 1 and 2, with shapes-cpu's fine-tuning weight average and no lr drop, at the sizes of
# data.median_object_px, sessions 47 and 48, against s44lr from scratch, session 44)
FINE_TUNE_EVIDENCE = ("on the second data set of benchmarks/, 39.9, 39.9 and 39.7 mask AP (three "
                      "seeds) after 30 minutes on 2 CPU cores against 20.4 from scratch")

AUTO_START = "auto"  # training_start: the shipped model where shipped_start says so


def _check_batch_fits(batch_size: int, world_size: int, num_images: int, ann_file: Path) -> None:
    """Refuse, before any work, a batch that does not split evenly over the processes or that
    holds more images than the training set, naming a value that would run."""
    if batch_size % world_size:
        raise ConfigError(f"train.batch_size {batch_size} does not split over {world_size} "
                          f"processes: give --set train.batch_size=N with N a multiple of "
                          f"{world_size}", entry="train.batch_size")
    if num_images < batch_size:
        fits = num_images - num_images % world_size
        advice = (f"give --set train.batch_size={fits} (at most the image count, a multiple of "
                  f"the {world_size} processes)" if fits else
                  f"{world_size} processes need at least {world_size} training images")
        raise DataError(f"the training set has {num_images} images, fewer than one batch of "
                        f"train.batch_size={batch_size}: {advice}", file=ann_file)


def shipped_start(cfg: Config, ann, shipped: str | Path | None = None) -> Path | None:
    """The shipped checkpoint where a new run of ``cfg`` on ``ann`` is better started from it than
    from scratch, as detection toolkits start from ImageNet weights: ``cfg`` takes no ImageNet
    weights (``model.pretrained_path``), its model has exactly the shipped model's weights by name
    and shape (settings that shape no weight, such as the canonical box size or the scoring, may
    differ; the per-class ones are left out: they start afresh), and the data's classes are not
    the shipped model's own (on its own classes, the built-in shapes, a run from scratch is what
    the preset's 30-minute recipe measures: continue the shipped model with an explicit
    ``init_from``). ``None`` otherwise, and when the shipped file is missing or unreadable.

    ``ann``: the training annotations (``CocoAnnotations``), or a function of no arguments that
    loads them, called only once the cheaper checks have passed; ``shipped``: the checkpoint
    (default ``istr_viz.predictor.SHIPPED_CHECKPOINT``)."""
    found = _suited_shipped(cfg, ann, shipped)
    return found[0] if found is not None else None


def _suited_shipped(cfg: Config, ann, shipped: str | Path | None) -> tuple[Path, dict] | None:
    """:func:`shipped_start`'s checkpoint and its loaded contents (read once), or ``None``."""
    from istr_viz.predictor import SHIPPED_CHECKPOINT

    shipped = Path(shipped) if shipped is not None else SHIPPED_CHECKPOINT
    if cfg.model.pretrained_path or not shipped.is_file():
        return None
    try:
        source = load_checkpoint(shipped)
        basis = MaskBasis.from_dict(source["basis"])
        names, ids = list(source["class_names"]), list(source["category_ids"])
    except (IstrVizError, KeyError, TypeError, ValueError):
        return None
    if not _same_weight_shapes(cfg, len(names), basis, source["model"]):
        return None
    ann = ann() if callable(ann) else ann
    if names == list(ann.class_names) and ids == list(ann.label_to_cat_id):
        return None
    return shipped, source


def training_start(preset: Config, overrides: list[str] | tuple[str, ...], train_ann: str | Path,
                   init_from: str | Path | None = AUTO_START,
                   shipped: str | Path | None = None) -> tuple[Config, Path | None]:
    """The configuration of a new run and the checkpoint it starts from (``None``: from scratch).

    ``preset`` with ``overrides`` (``--set KEY=VALUE`` items) when the run starts from scratch
    (``init_from=None``). With a checkpoint path, that checkpoint's model, basis and mask-target
    frame replace the preset's (``config.with_architecture_of``) before the overrides apply. With
    ``"auto"`` (the CLI's default), the shipped checkpoint where :func:`shipped_start` finds it
    suits the run (judged on the overridden preset and the classes of ``train_ann``, the training
    annotation file) and the run's own configuration still has all its weights but the per-query
    ones; else from scratch. That configuration is the shipped model's with the preset's
    ``model.queries_per_instance`` (the data may raise the query count: the proposal boxes and
    query features then start afresh; 36 queries from ship13 on the second data set of
    benchmarks/ gave 36.0 against 34.2 mask AP with its 24 copied, s36ft36 / s36ft), then the
    overrides. A run that starts from a checkpoint trains at ``train.fine_tune_lr`` where that is
    set (0: ``train.lr``), unless the overrides set ``train.lr``, and so with
    ``train.fine_tune_ema_decay`` and ``train.fine_tune_lr_gamma`` for ``train.ema_decay`` and
    ``train.lr_gamma`` (None: the run's own; :func:`fine_tune_settings`); its configuration then
    has them in ``train.lr``, ``train.ema_decay`` and ``train.lr_gamma``, and the fine-tuning
    ones unset (``FINE_TUNE_APPLIED``). ``shipped``: as in :func:`shipped_start`.
    """
    from istr_viz.data.check import queries_for

    cfg = apply_overrides(preset, list(overrides))
    auto = init_from is not None and str(init_from) == AUTO_START
    ann = None
    if auto:
        def annotations():
            nonlocal ann
            ann = load_annotations(Path(train_ann))
            return ann

        init_from, source = _suited_shipped(cfg, annotations, shipped) or (None, None)
    else:
        source = load_checkpoint(init_from) if init_from is not None else None
    if init_from is None:
        return cfg, None
    source_cfg = Config.from_dict(source["config"])
    if auto:  # the preset's rule for the query count, which the shipped model's may predate
        source_cfg = replace(source_cfg, model=replace(
            source_cfg.model, queries_per_instance=preset.model.queries_per_instance))
    started = with_architecture_of(preset, source_cfg)
    # a start from trained weights takes the fine-tuning settings (as overridden) where the
    # overrides do not set the run's own (train.lr=X still wins); once applied they are cleared,
    # which also tells train() that nothing is left to apply
    started = apply_overrides(started, list(overrides))
    started = replace(started, train=replace(
        started.train, **fine_tune_settings(started.train, overrides), **FINE_TUNE_APPLIED))
    if auto:  # once the data have set the query count, every weight but the per-query ones
        # (which start afresh where the count rises) must still fit
        queries = queries_for(started.model.num_queries, started.model.queries_per_instance, ann)
        run = replace(started, model=replace(started.model, num_queries=queries))
        if not _same_weight_shapes(run, len(ann.class_names), MaskBasis.from_dict(source["basis"]),
                                   source["model"], also_skip=_PER_QUERY_WEIGHTS):
            return cfg, None
    return started, Path(init_from)


# the fine-tuning settings of TrainConfig once training_start has applied them (their unset
# values; train.fine_tune_freeze_at is not one of them: train() applies it, on resumes too)
FINE_TUNE_APPLIED = {"fine_tune_lr": 0.0, "fine_tune_ema_decay": None, "fine_tune_lr_gamma": None}


def fine_tune_settings(tc: TrainConfig, overrides: list[str] | tuple = ()) -> dict:
    """The ``train`` fields that a run from trained weights takes from ``tc``'s fine-tuning
    settings: ``{"lr": tc.fine_tune_lr, "ema_decay": tc.fine_tune_ema_decay, "lr_gamma":
    tc.fine_tune_lr_gamma}``, each where set and where ``overrides`` (``--set`` items) do not set
    the field itself (``train.lr=X`` wins over ``train.fine_tune_lr``)."""
    given = {item.split("=")[0].strip() for item in overrides}
    pairs = {"lr": tc.fine_tune_lr or None, "ema_decay": tc.fine_tune_ema_decay,
             "lr_gamma": tc.fine_tune_lr_gamma}
    return {name: value for name, value in pairs.items()
            if value is not None and f"train.{name}" not in given}


def schedule_words(tc: TrainConfig, sources: dict[str, str] | None = None) -> str:
    """A run's lr, weight average and lr drop in words: ``lr 2.8e-04, weight average 0.995, no
    lr drop``. ``sources`` (``{"lr": "train.fine_tune_lr", "ema_decay": ..., "lr_gamma": ...}``)
    adds the setting that gave each."""
    def named(words: str, name: str) -> str:
        return f"{words} ({sources[name]})" if sources else words

    average = f"weight average {tc.ema_decay:g}" if tc.ema_decay else "no weight average"
    if tc.lr_decay != "step":
        drop = f"{tc.lr_decay} lr decay to 0" + (" (train.lr_decay)" if sources else "")
    elif not tc.lr_steps:
        drop = "no lr drop" + (" (train.lr_steps)" if sources else "")
    else:
        drop = named(f"lr x{tc.lr_gamma:g} at the steps" if tc.lr_gamma != 1 else "no lr drop",
                     "lr_gamma")
    return f"{named(f'lr {tc.lr:.1e}', 'lr')}, {named(average, 'ema_decay')}, {drop}"


def _number(value: float) -> str:
    """``2.8e-04`` for a lr, ``0.995`` for a decay or a factor."""
    return f"{value:.1e}" if 0 < abs(value) < 0.01 else f"{value:g}"


def start_record(init_from: str | Path | None) -> dict | None:
    """Where a run's weights started, for its checkpoint: the checkpoint's resolved path and the
    SHA-256 of its bytes, or ``None`` for a run from scratch."""
    if init_from is None:
        return None
    import hashlib

    path = Path(init_from).resolve()
    return {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def fine_tune_hint(cfg: Config, ann, shipped: Path | None = None) -> str | None:
    """A line suggesting to start from the shipped model, for a run from scratch where
    :func:`shipped_start` finds the shipped model suits it; ``None`` otherwise."""
    start = shipped_start(cfg, ann, shipped)
    if start is None:
        return None
    return (f"hint: this run starts from scratch; the shipped model {start} (the train command's "
            f"default here, unless --from-scratch; in Python engine.training_start(..., "
            f"init_from='auto')) gives its weights, with new class heads ({FINE_TUNE_EVIDENCE})")


_PER_CLASS_WEIGHTS = ("class_logits", "semantic_head.", "label_embed.")


# the weights with a row per query: they start afresh where a run has more queries than its source
_PER_QUERY_WEIGHTS = ("proposal_boxes.", "query_embed.")


def _same_weight_shapes(cfg: Config, num_classes: int, basis: MaskBasis, state: dict,
                        also_skip: tuple[str, ...] = ()) -> bool:
    """Whether the model ``cfg`` builds for ``num_classes`` classes has exactly the weights of
    ``state`` (a checkpoint's model state), by name and shape, apart from the basis, the
    per-class weights that ``_init_from`` leaves as initialised and any weight whose name holds
    one of ``also_skip``."""
    skip = _PER_CLASS_WEIGHTS + tuple(also_skip)

    def shapes(tensors: dict) -> dict:
        return {k: tuple(v.shape) for k, v in tensors.items()
                if torch.is_tensor(v) and not k.startswith("basis.")
                and not any(part in k for part in skip)}

    try:
        with torch.random.fork_rng(devices=[]):  # the run's own initial weights stay as seeded
            model = build_model(replace(cfg.model, pretrained_path=None), num_classes, basis)
    except Exception:  # a hint never stops a run: the run's own build reports a bad config
        return False
    return shapes(model.state_dict()) == shapes(state)


def _init_from(model: nn.Module, ckpt: dict, keep_class_head: bool = False) -> list[str]:
    """Copy every weight of checkpoint ``ckpt`` whose name and shape fit (the basis is the model's
    own) but, unless ``keep_class_head``, the per-class ones (the class logits, the semantic
    head's, the denoising label embedding: other classes may have the same count); return the
    names left as initialised."""
    own = model.state_dict()
    per_class = _PER_CLASS_WEIGHTS
    fitting = {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v
               for k, v in ckpt["model"].items()
               if torch.is_tensor(v) and not k.startswith("basis.") and k in own
               and own[k].shape == v.shape
               and (keep_class_head or not any(part in k for part in per_class))}
    model.load_state_dict(fitting, strict=False)
    return sorted(k for k in own if torch.is_tensor(own[k]) and not k.startswith("basis.")
                  and k not in fitting)


def _append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_jsonl(path: Path, last_iter: int) -> None:
    """Drop records written after ``last_iter`` (by a run killed after its last checkpoint)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines()
            if ln.strip() and json.loads(ln).get("iter", -1) <= last_iter]
    path.write_text("".join(ln + "\n" for ln in keep))


def _match_scale(cfg: Config, ann, source: dict | None, init_from: str | Path | None,
                 is_main: bool) -> tuple[Config, float]:
    """Scale matching (``data.median_object_px``) for a run that starts from checkpoint
    ``source``: ``cfg`` with every size x1.25 where the training set's median instance at the
    middle training size is at most 0.8 of the one ``source`` recorded
    (:func:`istr_viz.checkpoint.trained_median_px`), or of ``data.median_object_px`` for a
    checkpoint without the record (the shipped model); a note says so. A run from scratch or a
    resumed one (``source`` None), or one with the rule off, keeps ``cfg``. Also returns the
    median at the sizes returned, for the run's checkpoint."""
    from istr_viz.data.check import median_object_px, size_factor

    d = cfg.data
    median = median_object_px(ann, d.train_min_sizes, d.train_max_size)
    if source is None or d.median_object_px <= 0:
        return cfg, median
    recorded = trained_median_px(source)
    factor = size_factor(recorded or d.median_object_px, median)
    if factor == 1:
        return cfg, median
    scaled = with_sizes_scaled(cfg, factor)
    if is_main:
        under = (f"the {recorded:.1f} px that {init_from} trained on (its record)" if recorded
                 else f"data.median_object_px={d.median_object_px:g}")
        print(f"note: sizes x{factor:g}: training {list(scaled.data.train_min_sizes)} (at most "
              f"{scaled.data.train_max_size}), test {scaled.data.test_min_size} (at most "
              f"{scaled.data.test_max_size}): the median training instance is {median:.1f} px at "
              f"the middle training size, under {under}", file=sys.stderr, flush=True)
    s = scaled.data
    return scaled, median_object_px(ann, s.train_min_sizes, s.train_max_size)


def train(cfg: Config, train_data: DatasetPaths, out_dir: str | Path,
          val_data: DatasetPaths | None = None, basis: MaskBasis | None = None,
          init_from: str | Path | None = None, resume: bool = False,
          max_iters: int | None = None, max_minutes: float | None = None,
          device: str | torch.device | None = None, progress: bool = True,
          on_log: Callable[[dict], None] | None = None,
          suggest_shipped: bool = True) -> TrainResult:
    """Train ISTR on a COCO-format data set and return where the checkpoints are.

    ``max_minutes``: training stops when that many minutes of training (evaluations left out,
    summed over resumes) have passed, and the lr steps and ``train.eval_points`` fall at their
    shares of those minutes; the iteration count is forecast from the first iterations (and
    updated as they run) for the progress bar and the checkpoint's record; ``max_iters``
    overrides ``cfg.train.max_iters``. With
    ``resume=True`` the run continues from ``out_dir/last.pt`` with the configuration, basis,
    optimiser, scheduler, RNG and iteration stored there (never refitted).
    ``on_log(record)``: called (main process only) with each record just appended to
    ``metrics.jsonl``, a training record every ``log_every`` iterations and an ``"eval"`` record
    after each evaluation; a notebook uses it to redraw a live loss plot.
    ``suggest_shipped``: print :func:`fine_tune_hint`'s line where a new run from scratch could
    start from the shipped model (``False`` where the caller asked for scratch on purpose).
    ``init_from`` trains at ``cfg.train.lr``, ``ema_decay`` and ``lr_gamma``:
    :func:`training_start` gives a configuration the fine-tuning settings of a run from trained
    weights (``train.fine_tune_lr``, ``fine_tune_ema_decay``, ``fine_tune_lr_gamma``), and a note
    is printed where ``cfg`` still holds ones that were not applied; ``train.fine_tune_freeze_at``
    freezes the first parts of its ResNet here, in this run and its resumes. A fresh run with
    ``init_from`` on data with small objects trains and tests at ``data.median_object_px``'s larger sizes (a note says
    so; the checkpoint stores them), matched to the median that ``init_from`` recorded where it
    did; every checkpoint records its own
    (:func:`istr_viz.checkpoint.trained_median_px`).
    """
    from tqdm.auto import tqdm

    from istr_viz.data.check import MAX_RAISED_QUERIES, fit_warnings, most_instances, queries_for
    from istr_viz.evaluate import evaluate_model

    if max_iters is not None and max_minutes is not None:
        raise ConfigError("give max_iters or max_minutes, not both")
    if resume and max_minutes is not None:
        raise ConfigError("a resumed run keeps its stored budget: give max_iters to change it, "
                          "not max_minutes")

    info, device = setup_distributed(device)
    out_dir = Path(out_dir)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    metrics_path = out_dir / "metrics.jsonl"

    def log(record: dict) -> None:
        _append_jsonl(metrics_path, record)
        if on_log is not None:
            on_log(record)

    ckpt = None
    if resume:
        if not last_path.is_file():
            raise IstrVizError("nothing to resume: no last.pt", file=out_dir)
        ckpt = load_checkpoint(last_path)
        cfg = resumed_config(ckpt["config"])
        basis = MaskBasis.from_dict(ckpt["basis"])
    tc = cfg.train
    if ckpt is None and init_from is None and cfg.model.norm == "frozen_bn" \
            and not cfg.model.pretrained_path:
        raise ConfigError("model.norm=frozen_bn needs ImageNet weights: give "
                          "--set model.pretrained_path=FILE, or --set model.norm=bn (or gn) to train "
                          "from scratch")
    if tc.threads > 0 and device.type == "cpu":
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)  # the same initial weights in every process
    # the machines this run trained on, one entry more each time a resume lands on another: its
    # pace depends on them (train_state["machines"], runtime.machine_summary); a checkpoint from
    # before they were recorded trained on an unknown one so far
    here = machine_summary(device=device)
    machines = [] if ckpt is None else \
        list(ckpt["train_state"].get("machines") or [dict(UNKNOWN_MACHINE)])
    if not machines or not same_machine(machines[-1], here):
        machines.append(here)
    ann = load_annotations(train_data.ann_file)
    transform_configs(cfg)  # the sizes as given are valid (a clear error where not)
    source = load_checkpoint(init_from) if (init_from is not None and ckpt is None) else None
    cfg, trained_px = _match_scale(cfg, ann, source, init_from, info.is_main)
    train_tf, test_tf = transform_configs(cfg)
    hint = None
    if info.is_main and ckpt is None and init_from is None and suggest_shipped:
        # the configuration as given: --init-from takes the shipped model's query count
        hint = fine_tune_hint(cfg, ann)
    queries = queries_for(cfg.model.num_queries, cfg.model.queries_per_instance, ann)
    if ckpt is None and queries != cfg.model.num_queries:  # (a resumed run has its own number)
        if info.is_main:
            print(f"note: model.num_queries={queries} rather than {cfg.model.num_queries}: "
                  f"{cfg.model.queries_per_instance:g} x the {most_instances(ann)} instances of "
                  f"the most crowded training image (model.queries_per_instance; at most "
                  f"{MAX_RAISED_QUERIES})", file=sys.stderr, flush=True)
        cfg = replace(cfg, model=replace(cfg.model, num_queries=queries))
    if info.is_main and ckpt is None:
        for line in fit_warnings(ann, cfg.model.num_queries, cfg.data.test_min_size,
                                 cfg.data.test_max_size):
            print(f"warning: {line}", file=sys.stderr, flush=True)
        if hint:
            print(hint, file=sys.stderr, flush=True)
    if ckpt is not None and list(ckpt["category_ids"]) != list(ann.label_to_cat_id):
        raise DataError(f"resuming a run trained on categories {ckpt['category_ids']} with data whose "
                        f"categories are {ann.label_to_cat_id}", file=train_data.ann_file)
    if val_data is not None:
        _check_same_categories(ann, load_annotations(val_data.ann_file))
    _check_batch_fits(tc.batch_size, info.world_size, len(ann.image_ids), train_data.ann_file)
    if basis is None and source is not None:  # the mask head was trained with that basis
        basis = MaskBasis.from_dict(source["basis"])
    if basis is None:
        basis = _fit_or_share_basis(cfg, ann, out_dir, info, progress)
    dataset = CocoDataset(train_data.ann_file, train_data.images_dir,
                          transform=build_transform(train_tf, train=True), annotations=ann)
    model_cfg = cfg.model if (ckpt is None and source is None) else \
        replace(cfg.model, pretrained_path=None)  # the weights come from a checkpoint
    model = build_model(model_cfg, len(ann.class_names), basis).to(device)
    if info.world_size > 1 and device.type == "cpu" and library_elu_for(model_cfg.elu) is None:
        set_elu_kernel(model, _shared_elu_kernel(info, device))
    if source is not None:
        same = (list(source["category_ids"]) == ann.label_to_cat_id
                and list(source["class_names"]) == ann.class_names)
        reinitialised = _init_from(model, source, keep_class_head=same)
        if info.is_main and progress:
            print(f"initialised from {init_from} ({schedule_words(tc)}); re-initialised: "
                  f"{', '.join(reinitialised) or 'none'}")
        unapplied = {name: value for name, value in fine_tune_settings(tc).items()
                     if value != getattr(tc, name)}
        if info.is_main and unapplied:
            given = ", ".join(f"train.fine_tune_{n}={_number(v)}" for n, v in unapplied.items())
            used = ", ".join(f"train.{n}={_number(getattr(tc, n))}" for n in unapplied)
            print(f"note: {given} {'is' if len(unapplied) == 1 else 'are'} not applied (engine."
                  f"training_start applies {'it' if len(unapplied) == 1 else 'them'} to a run "
                  f"from trained weights, as the train command does); training at {used}",
                  file=sys.stderr, flush=True)
        source_norm = source.get("config", {}).get("model", {}).get("norm", cfg.model.norm)
        if info.is_main and source_norm != cfg.model.norm:
            print(f"note: {init_from} was trained with model.norm={source_norm}, this run uses "
                  f"{cfg.model.norm}: only the norms' scales and shifts that fit are copied "
                  f"(--set model.norm={source_norm} fine-tunes it as it was trained)",
                  file=sys.stderr)
        source_fpn = source.get("config", {}).get("model", {}).get("fpn_output_conv", "3x3")
        if info.is_main and source_fpn != cfg.model.fpn_output_conv:
            print(f"note: {init_from} has FPN output convs {source_fpn}, this run "
                  f"{cfg.model.fpn_output_conv}: those convs start afresh (--set "
                  f"model.fpn_output_conv={source_fpn} keeps them)", file=sys.stderr)
    started_from = ckpt["train_state"].get("init_from") if ckpt is not None else \
        start_record(init_from if source is not None else None)
    # what does not train, decided here for a fresh run and its resumes alike (the optimiser's
    # groups must match): ImageNet weights freeze the stem and layer1 (the model was built so on
    # a fresh run; a resume builds it without the file), a start from trained weights
    # train.fine_tune_freeze_at parts
    freeze_at = tc.fine_tune_freeze_at if started_from is not None else \
        IMAGENET_FREEZE_AT if cfg.model.pretrained_path else 0
    freeze_backbone_at(model.backbone.body, freeze_at)
    if info.is_main and progress and ckpt is None and started_from is not None and freeze_at:
        print(f"frozen: {FROZEN_PARTS[freeze_at]} (train.fine_tune_freeze_at={freeze_at}; 0 "
              f"trains everything)", flush=True)
    criterion = SetCriterion(cfg.loss, basis)
    params = [p for p in model.parameters() if p.requires_grad]
    # the fused kernel: one pass over all parameters (shapes-cpu, 10 M parameters, one core:
    # 15 ms a step against 57 ms for the default per-tensor loop)
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(param_groups(model, tc.backbone_lr_mult), lr=tc.lr,
                                  betas=(0.9, tc.adam_beta2), weight_decay=tc.weight_decay,
                                  fused=fused)

    budget = {"max_iters": max_iters or tc.max_iters, "from_minutes": max_minutes}
    start_iter, best_ap, train_s0 = 0, -1.0, 0.0
    if ckpt is not None:
        state = ckpt["train_state"]
        train_s0 = float(state.get("train_s", 0.0))  # the training seconds before this resume
        model.load_state_dict(state.get("raw_model", ckpt["model"]))  # raw weights under EMA
        # the saved groups carry the writer's fused flag, and load_state_dict also uses it to
        # place the step counters: give them this run's flag before loading
        saved = dict(state["optimizer"])
        saved["param_groups"] = [{**g, "fused": fused} for g in saved["param_groups"]]
        optimizer.load_state_dict(saved)
        start_iter, best_ap = state["iteration"], state["best_mask_ap"]
        budget = {"max_iters": state["max_iters"], "from_minutes": state.get("max_minutes")}
        if max_iters is not None:  # an explicit budget on resume extends or shortens the run
            budget["max_iters"] = max_iters
        _set_rng_state(state["rng"])
        if info.is_main:
            _truncate_jsonl(metrics_path, start_iter)
    elif info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("")

    def schedule(it: int) -> float:
        by_iters = None if budget.get("by_minutes") else budget["max_iters"]
        return lr_factor(it, by_iters, tc.warmup_iters, tc.warmup_factor, tc.lr_steps,
                         tc.lr_gamma, budget.get("time_done", 0.0), tc.lr_decay)

    per_process_batch = tc.batch_size // info.world_size
    local_sgd = info.world_size > 1 and tc.average_every > 1
    # (local SGD keeps per-process BatchNorm: SyncBatchNorm would be a collective every forward)
    model = sync_batchnorm_for_ddp(model, device, info.world_size, tc.sync_bn and not local_sgd)
    ddp_model = model
    if local_sgd:  # no gradient all-reduce: every process starts from process 0's weights
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, 0)
    elif info.world_size > 1:
        # a process whose share of the batch holds no instance (negative images) leaves the
        # denoising label embedding without a gradient (the training-only dense heads too):
        # without the search DDP's reductions fall out of step and the run fails or hangs (adding
        # 0 x the first element of every parameter to the loss instead, with the search off, was
        # no faster: 6% slower a step; results log, session 25)
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)
    amp_dtype = autocast_dtype(device, tc.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    if ckpt is not None and ckpt["train_state"].get("grad_scaler"):
        scaler.load_state_dict(ckpt["train_state"]["grad_scaler"])

    ema = build_ema(model, tc.ema_decay, tc.ema_ramp) if tc.ema_decay > 0 else None
    if ema is not None and ckpt is not None:
        ema.module.load_state_dict(ckpt["model"])  # "model" holds the average, see payload()
        ema.n_averaged.fill_(start_iter)
    eval_model = ema.module if ema is not None else model

    def average_weights() -> None:
        """Local SGD: every process takes the mean of the processes' weights and BatchNorm
        statistics (and of their EMAs). Called by all processes at the same iterations: every
        ``average_every``, and before anything is evaluated or saved, so that what process 0
        evaluates and checkpoints is the average, not its own weights. (A resume restarts every
        process from it, with process 0's optimizer state.)"""
        if not local_sgd:
            return
        for module in (model, ema.module if ema is not None else None):
            if module is not None:
                tensors = [*module.parameters(),
                           *(b for b in module.buffers() if b.is_floating_point())]
                average_parameters(iter(tensors), dist.group.WORLD)

    def payload(iteration: int, metrics: dict | None = None,
                train_s: float | None = None) -> dict:
        """The checkpoint; ``train_s`` defaults to the training seconds so far."""
        extra = {"raw_model": model.state_dict()} if ema is not None else {}
        return dict(
            model=eval_model.state_dict(), config=cfg.to_dict(), basis=basis.to_dict(),
            class_names=ann.class_names, category_ids=ann.label_to_cat_id, metrics=metrics or {},
            train_state={"iteration": iteration, "optimizer": optimizer.state_dict(),
                         "rng": _rng_state(), "max_iters": budget["max_iters"],
                         "grad_scaler": scaler.state_dict(),
                         "max_minutes": budget["from_minutes"], "best_mask_ap": best_ap,
                         "by_minutes": budget.get("by_minutes", False),
                         "time_done": budget.get("time_done"),
                         "world_size": info.world_size, "data": _data_record(train_data, val_data),
                         "init_from": started_from,
                         "machines": machines, "trained_median_px": trained_px,
                         "train_s": train_seconds() if train_s is None else train_s,
                         **extra})

    eval_s = 0.0  # seconds spent evaluating: "train_s" in the log leaves them out

    def train_seconds() -> float:
        """Seconds of training so far, over every resume, evaluations left out."""
        return round(train_s0 + time.perf_counter() - t_start - eval_s, 3)

    def run_eval(iteration: int) -> dict | None:
        nonlocal best_ap, eval_s
        if val_data is None or not info.is_main:
            return None
        t_eval = time.perf_counter()
        trained = train_seconds()
        # training draws from the global RNG (the denoising queries' noise), and so does an
        # evaluation (its DataLoader's base seed): put it back, so that where the evaluations
        # fall does not change the training. (Every process is seeded alike and draws alike;
        # only process 0 evaluates, and its RNG state is the one a checkpoint keeps for all.)
        rng = _rng_state()
        metrics = evaluate_model(eval_model, val_data, cfg, device=device,
                                 max_images=tc.eval_max_images or None, progress=False,
                                 category_ids=ann.label_to_cat_id)
        _set_rng_state(rng)
        log({"iter": iteration, "train_s": trained, "eval": {
            "bbox_AP": metrics["bbox"]["AP"], "segm_AP": metrics["segm"]["AP"],
            "per_stage_segm_AP": [s["segm"]["AP"] for s in metrics["per_stage"]]}})
        if metrics["segm"]["AP"] > best_ap:
            best_ap = metrics["segm"]["AP"]
            # its clock stops where this evaluation began (evaluating is not training)
            save_checkpoint(best_path, **payload(iteration, metrics, train_s=trained))
        model.train()
        if ema is not None:
            ema.module.eval()
        eval_s += time.perf_counter() - t_eval
        return metrics

    # A minutes budget ends the run, times the lr steps and places the evaluation points by the
    # training clock alone (unless a resume asked for an explicit iteration count); its iteration
    # count is only a forecast, for the progress bar and the record, kept up to date as it runs.
    # (a run once resumed with an explicit count keeps to counts when resumed again)
    stored_by_minutes = ckpt is None or ckpt["train_state"].get("by_minutes", True)
    hard_stop_s = budget["from_minutes"] * 60 if budget["from_minutes"] and stored_by_minutes \
        and not (ckpt is not None and max_iters is not None) else None
    budget["by_minutes"] = hard_stop_s is not None
    if budget["from_minutes"]:  # after a resume with an explicit --max-iters the share of the
        # minutes done when it switched to counts still times the lr steps, frozen (stored, so
        # that a later resume does not move it)
        frozen = ckpt["train_state"].get("time_done") if ckpt is not None and \
            not stored_by_minutes else None
        budget["time_done"] = frozen if frozen is not None else \
            train_s0 / (budget["from_minutes"] * 60)
    stop_at = 10**12 if budget["by_minutes"] else budget["max_iters"]
    if budget["by_minutes"] and budget["time_done"] >= 1.0:  # resuming a run whose minutes are up
        stop_at = start_iter
    # evaluation points: k / (n + 1) of the minutes, or of the iterations
    minute_points = [k / (tc.eval_points + 1) for k in range(1, tc.eval_points + 1)
                     if k / (tc.eval_points + 1) > budget.get("time_done", 0.0)] \
        if budget["by_minutes"] else []
    t_start = t_measure = time.perf_counter()
    # --max-minutes: time iterations [start+3, start+23) (after warm-up) for a first forecast
    measure_from = start_iter + 3
    measure_until = measure_from + 20 if (max_minutes and ckpt is None) else None
    sampler = IterationBatchSampler(len(dataset), per_process_batch, tc.seed, start_iter,
                                    stop_at, info.rank, info.world_size,
                                    **padding_options(cfg.data, ann))
    loader = DataLoader(SeededDataset(dataset), batch_sampler=sampler, collate_fn=collate,
                        num_workers=cfg.data.num_workers, generator=torch.Generator(),
                        persistent_workers=False)
    model.train()
    bar = tqdm(total=budget["max_iters"], initial=start_iter, disable=not (progress and info.is_main),
               desc="train", dynamic_ncols=True)
    iteration = start_iter
    for batch in loader:
        if iteration >= stop_at:
            break
        for g in optimizer.param_groups:
            g["lr"] = tc.lr * g.get("lr_mult", 1.0) * schedule(iteration)
        images = batch.images.to(device, non_blocking=True)
        sizes = batch.image_sizes.to(device)
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()}
                   for t in batch.targets]
        num_inst = float(sum(len(t["labels"]) for t in targets))
        # the losses are means over the batch's instances: over all processes' under DDP, over
        # this process's under local SGD (its own estimate, with no collective to wait on)
        num_inst = max(num_inst, 1.0) * info.world_size if local_sgd else \
            _all_reduce_sum(num_inst, info, device)
        try:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                output = ddp_model(images, sizes, targets=targets)  # targets: denoising only
            _check_finite_outputs(output, iteration + 1)
            loss, terms, _ = criterion(output.float(), targets, num_instances=max(num_inst, 1.0),
                                       num_processes=info.world_size)
        except NonFiniteError as err:
            if isinstance(err, TrainingDiverged):
                raise
            raise TrainingDiverged(f"{err.reason} at iteration {iteration + 1}; stopped, the last "
                                   "good checkpoint is kept (try a lower train.lr)") from None
        _check_finite(terms, iteration + 1)
        optimizer.zero_grad(set_to_none=True)
        # the loss is this process's share of a global sum: DDP averages the gradients, local SGD
        # steps on this estimate of the whole batch's
        scaler.scale(loss * info.world_size).backward()
        if tc.clip_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, tc.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        if local_sgd and (iteration + 1) % tc.average_every == 0:
            average_weights()
        if ema is not None:
            ema.update_parameters(model)
        iteration += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if measure_until is not None and iteration == measure_from:
            t_measure = time.perf_counter()
        if measure_until is not None and iteration == measure_until:
            now = time.perf_counter()
            per_iter = (now - t_measure) / (measure_until - measure_from)
            n = iteration + max(0, int((max_minutes * 60 - (now - t_start)) / per_iter))
            budget["max_iters"] = int(_all_reduce_sum(n, info, device) / info.world_size)
            bar.total = budget["max_iters"]
            measure_until = None
        due = False  # an evaluation point of the minutes passed
        if hard_stop_s is not None and (info.world_size == 1 or iteration % 10 == 0):
            # rank 0's clock (it alone evaluates), so that every process has the same lr, stops
            # at the same step and evaluates at the same points; read before the log line, so
            # that the last line of a run is past its minutes
            budget["time_done"] = _broadcast_from_main(train_seconds() / hard_stop_s, info, device)
            if budget["time_done"] >= 1.0:
                stop_at = budget["max_iters"] = bar.total = iteration
            elif measure_until is None and iteration % 25 == 0 and iteration > start_iter:
                # the forecast from this run's pace so far
                per_iter = (budget["time_done"] * hard_stop_s - train_s0) / (iteration - start_iter)
                left = (1.0 - budget["time_done"]) * hard_stop_s
                budget["max_iters"] = bar.total = iteration + max(1, int(left / max(per_iter, 1e-9)))
            while measure_until is None and minute_points and \
                    budget["time_done"] >= minute_points[0]:  # (not inside the timed iterations)
                minute_points.pop(0)
                due = True
        if iteration % tc.log_every == 0 or iteration == stop_at:
            logged = _global_terms(loss, terms, info)  # every process takes part under DDP
            if info.is_main:
                lrs = {"lr_backbone": optimizer.param_groups[0]["lr"]} \
                    if len(optimizer.param_groups) > 1 else {}
                log({
                    "iter": iteration, "lr": optimizer.param_groups[-1]["lr"], **lrs,
                    "time": round(time.perf_counter() - t_start, 3), "train_s": train_seconds(),
                    **logged})
        every = tc.eval_every and iteration % tc.eval_every == 0
        at_point = due if budget["by_minutes"] else \
            iteration in eval_points(budget["max_iters"], tc.eval_points)
        # an evaluation point is evaluated before the checkpoint of its iteration is written, so
        # that a run killed while evaluating evaluates it again when resumed
        evaluate_now = measure_until is None and iteration < stop_at and (every or at_point)
        save_now = tc.checkpoint_every and iteration % tc.checkpoint_every == 0 \
            and iteration < stop_at and measure_until is None  # budget fixed
        if (evaluate_now or save_now) and iteration % tc.average_every:  # not averaged just now
            average_weights()  # (the same condition in every process)
        if evaluate_now:
            run_eval(iteration)
        if info.is_main and save_now:
            save_checkpoint(last_path, **payload(iteration))
    bar.close()
    if iteration == start_iter and ckpt is not None and ckpt.get("metrics"):
        # resuming a finished run: nothing to train, its final evaluation is on record
        if info.world_size > 1:
            dist.barrier()
        return TrainResult(out_dir, last_path, best_path if best_path.exists() else None,
                           iteration, 0.0, ckpt["metrics"])
    if iteration > start_iter and iteration % tc.average_every:
        average_weights()  # every process, before the final checkpoint and evaluation
    if info.is_main:  # saved before evaluating, so a failing evaluation loses nothing
        save_checkpoint(last_path, **payload(iteration))
    final_metrics = run_eval(iteration)
    if info.is_main and final_metrics is not None:
        save_checkpoint(last_path, **payload(iteration, final_metrics))
    if info.world_size > 1:
        dist.barrier()
    return TrainResult(out_dir, last_path, best_path if best_path.exists() else None, iteration,
                       (time.perf_counter() - t_start) / 60, final_metrics)


def resumed_config(stored: dict) -> Config:
    """The configuration of a run being resumed, from its checkpoint's ``config``. A run written
    before ``data.group_by_orientation`` existed keeps the ungrouped batches it trained on."""
    data = stored.get("data", {})
    if "group_by_orientation" not in data:
        stored = {**stored, "data": {**data, "group_by_orientation": False}}
    return Config.from_dict(stored)


def _data_record(train_data: DatasetPaths, val_data: DatasetPaths | None) -> dict:
    record = {"train_ann": str(train_data.ann_file), "train_images": str(train_data.images_dir)}
    if val_data is not None:
        record.update(val_ann=str(val_data.ann_file), val_images=str(val_data.images_dir))
    return record


def resume_data(out_dir: str | Path) -> tuple[DatasetPaths, DatasetPaths | None]:
    """The train and val data sets a run in ``out_dir`` was trained on (from its ``last.pt``)."""
    ckpt = load_checkpoint(Path(out_dir) / "last.pt")
    data = ckpt.get("train_state", {}).get("data")
    if not data:
        raise IstrVizError("the checkpoint does not record its data: give the data again",
                           file=Path(out_dir) / "last.pt")
    train = DatasetPaths(Path(data["train_ann"]), Path(data["train_images"])).check_exists()
    val = (DatasetPaths(Path(data["val_ann"]), Path(data["val_images"])).check_exists()
           if "val_ann" in data else None)
    return train, val


def _check_same_categories(train_ann, val_ann) -> None:
    """The val set must have the training set's categories (ids and names), else AP is meaningless."""
    if train_ann.label_to_cat_id != val_ann.label_to_cat_id or \
            train_ann.class_names != val_ann.class_names:
        raise DataError(
            f"the val set's categories {dict(zip(val_ann.label_to_cat_id, val_ann.class_names))} "
            f"differ from the training set's "
            f"{dict(zip(train_ann.label_to_cat_id, train_ann.class_names))}", file=val_ann.ann_file)


def _fit_or_share_basis(cfg: Config, ann, out_dir: Path, info: DistInfo, progress: bool) -> MaskBasis:
    """Fit the basis on the training masks (process 0), share it through ``out_dir/basis.npz``."""
    from istr_viz.data.instance_masks import instance_masks

    path = out_dir / "basis.npz"
    if info.is_main:
        masks = instance_masks(ann, cfg.basis.mask_size, progress=progress)
        basis = MaskBasis.fit(masks, dim=min(cfg.basis.dim, len(masks)), recipe=cfg.basis.recipe,
                              seed=cfg.train.seed)
        out_dir.mkdir(parents=True, exist_ok=True)
        basis.save(path)
    if info.world_size > 1:
        dist.barrier()
        if not info.is_main:
            basis = MaskBasis.load(path)
    return basis


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file."""
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


__all__ = ["IterationBatchSampler", "TrainResult", "TrainingDiverged", "build_ema", "eval_points",
           "lr_factor", "read_metrics",
           "setup_distributed", "train"]
