"""Where a training iteration goes: the engine's step, part by part, on real training batches.

    python benchmarks/bench_step.py [--data ROOT] [--batch 2] [--iters 130] [--warmup 30]
        [--threads 1] [--compile] [--set KEY=VALUE ...]
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_step.py ...   # the DDP step

Mirrors the step of ``istr_viz.engine.train`` (a copy of its loop, not the loop itself: data
loading, forward under the preset's autocast, matching + loss, backward, gradient clipping, the
fused AdamW step, the EMA update) on the built-in training set (or ``--data``) and prints the
mean milliseconds of each part after ``--warmup`` iterations (which include any compilation;
their total is printed apart). Under ``torchrun`` the model is wrapped in DDP (gloo) as ``train
--processes N`` does: a barrier before the backward shows how long the processes wait for each
other (unequal batches), the backward then includes the gradient all-reduce, and the engine's
per-iteration collectives (the global instance count, the logged loss terms) are timed apart.
The engine's own bookkeeping (progress bar, log line, finiteness checks) is left out.
``bench_model.py`` times the model alone on random boxes; this one is what a training run pays.
Writes ``benchmarks/results/bench_step_1proc.json`` (``bench_step_ddp.json`` under ``torchrun``;
process 0), or ``--json-out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from istr_viz.basis import MaskBasis
from istr_viz.config import apply_overrides, get_preset
from istr_viz.data.batching import IterationBatchSampler, SeededDataset, padding_options
from istr_viz.data.coco import CocoDataset, collate, load_annotations
from istr_viz.data.instance_masks import instance_masks
from istr_viz.data.layout import default_data_root, split_paths
from istr_viz.data.transforms import build_transform
from istr_viz.engine import (DistInfo, _all_reduce_sum,
                             _global_terms, build_ema, param_groups, transform_configs)
from istr_viz.losses import SetCriterion
from istr_viz.model import build_model
from istr_viz.model.backbone import FROZEN_PARTS, freeze_backbone_at
from istr_viz.runtime import autocast_dtype, machine_summary

# torch.compile experiment (--compile): what it compiles in each stage (the RoI pooling, with its
# data-dependent sparse matrices, stays eager)
COMPILED_STAGE_PARTS = ("self_attn", "dynamic_conv", "ffn", "cls_branch", "reg_branch",
                        "mask_branch", "mask_roi_encoder")
RESULTS = Path(__file__).resolve().parent / "results"  # bench_step_1proc.json / _ddp.json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="data set root with train/ (default: the built-in shapes)")
    p.add_argument("--preset", default="shapes-cpu")
    p.add_argument("--batch", type=int, default=2, help="images per process (the preset's "
                   "train.batch_size is not read; the default 2 is the batch 4 over 2 processes "
                   "of the recorded results; the preset's batch 8 since session 23 is 4 each)")
    p.add_argument("--iters", type=int, default=130)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the backbone and the stages' layers (an experiment)")
    p.add_argument("--freeze-at", type=int, default=0, choices=range(6), metavar="N",
                   help="freeze the ResNet's first N parts (0 none, 1 the stem, 2 the stem and "
                        "layer1, ..., 5 all), as train.fine_tune_freeze_at=N does in a run from "
                        "trained weights")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json-out", type=Path, help="default: benchmarks/results/bench_step_1proc.json "
                   "(bench_step_ddp.json under torchrun)")
    args = p.parse_args()
    if args.iters <= args.warmup:
        p.error("--iters must exceed --warmup")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    json_out = args.json_out or RESULTS / f"bench_step_{'ddp' if world > 1 else '1proc'}.json"
    rank = 0
    if world > 1:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
    torch.set_num_threads(args.threads)
    cfg = apply_overrides(get_preset(args.preset), args.set)
    root = Path(args.data) if args.data else default_data_root()
    paths = split_paths(root, "train")
    ann = load_annotations(paths.ann_file)
    basis = MaskBasis.fit(instance_masks(ann, cfg.basis.mask_size, progress=False),
                          dim=cfg.basis.dim, recipe=cfg.basis.recipe, seed=cfg.train.seed)
    train_tf, _ = transform_configs(cfg)
    dataset = CocoDataset(paths.ann_file, paths.images_dir,
                          transform=build_transform(train_tf, train=True), annotations=ann)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, len(ann.class_names), basis)
    freeze_backbone_at(model.backbone.body, args.freeze_at)
    criterion = SetCriterion(cfg.loss, basis)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.backbone_lr_mult),
                                  lr=cfg.train.lr, betas=(0.9, cfg.train.adam_beta2),
                                  weight_decay=cfg.train.weight_decay, fused=True)
    ema = build_ema(model, cfg.train.ema_decay, cfg.train.ema_ramp) \
        if cfg.train.ema_decay > 0 else None
    forward_model = model
    if world > 1:
        forward_model = torch.nn.parallel.DistributedDataParallel(model,
                                                                  find_unused_parameters=True)
    if args.compile:  # each stage's fixed-code layers and the backbone, in place (keys kept)
        model.backbone.compile()
        for stage in model.stages:
            for name in COMPILED_STAGE_PARTS:
                if getattr(stage, name, None) is not None:
                    getattr(stage, name).compile()
    amp = autocast_dtype(torch.device("cpu"), cfg.train.amp)
    sampler = IterationBatchSampler(len(dataset), args.batch, cfg.train.seed, 0, args.iters,
                                    rank, world, **padding_options(cfg.data, dataset.annotations))
    batches = iter(DataLoader(SeededDataset(dataset), batch_sampler=sampler, collate_fn=collate,
                              num_workers=0))
    times: dict[str, list[float]] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        times.setdefault(name, []).append(now - since)
        return now

    info = DistInfo(rank, world)
    model.train()
    t_begin = time.perf_counter()
    warmup_s = 0.0
    for it in range(args.iters):
        if it == args.warmup:
            warmup_s = time.perf_counter() - t_begin
        t = time.perf_counter()
        batch = next(batches)
        t = lap("data", t)
        n = float(sum(len(tg["labels"]) for tg in batch.targets))
        if world > 1:
            n = _all_reduce_sum(n, info, torch.device("cpu"))
            t = lap("collectives: instance count", t)
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            output = forward_model(batch.images, batch.image_sizes, targets=batch.targets)
        t = lap("forward", t)
        loss, terms, _ = criterion(output.float(), batch.targets, num_instances=max(n, 1.0),
                                   num_processes=world)
        t = lap("matching+loss", t)
        if world > 1:
            dist.barrier()
            t = lap("waiting for the other processes", t)
        optimizer.zero_grad(set_to_none=True)
        (loss * world).backward()
        t = lap("backward" + (" (+ all-reduce)" if world > 1 else ""), t)
        if cfg.train.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.clip_grad_norm)
            t = lap("gradient clipping", t)
        optimizer.step()
        t = lap("optimizer step", t)
        if ema is not None:
            ema.update_parameters(model)
            t = lap("EMA update", t)
        if world > 1:  # the engine logs every iteration (train.log_every=1)
            _global_terms(loss, terms, info)
            lap("collectives: logged loss terms", t)
    parts = {k: round(1000 * statistics.mean(v[args.warmup:]), 1) for k, v in times.items()}
    report = {"preset": args.preset, "set": args.set, "freeze_at": args.freeze_at,
              "compile": args.compile,
              "processes": world, "images_per_process": args.batch, "threads": args.threads,
              "autocast": str(amp), "warmup_iterations": args.warmup,
              "warmup_s": round(warmup_s, 1), "ms_per_iteration": parts,
              "ms_per_iteration_total": round(sum(parts.values()), 1),
              "machine": machine_summary(device="cpu")}
    if rank == 0:
        print(f"{args.preset} {' '.join(args.set)}: {world} process(es) x {args.batch} images, "
              f"{args.threads} thread(s), autocast {amp}, compile {args.compile}, "
              f"frozen: {FROZEN_PARTS[args.freeze_at]}; first "
              f"{args.warmup} iterations {warmup_s:.1f} s")
        for name, ms in parts.items():
            print(f"  {name:<34} {ms:7.1f} ms")
        print(f"  {'total':<34} {report['ms_per_iteration_total']:7.1f} ms an iteration")
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
