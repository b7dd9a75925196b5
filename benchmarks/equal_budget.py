"""ISTR against torchvision's Mask R-CNN at the same CPU training budget, from scratch.

    python benchmarks/equal_budget.py [--minutes 20] [--lrs 0.08,0.11,0.16]
                                      [--istr-lrs 2.8e-4,4e-4,5.6e-4] [--repeats 1] [--data ROOT]
                                      [--out runs/equal_budget] [--points 3] [--jobs 2]

Trains ISTR (the ``shapes-cpu`` preset, its own ``--max-minutes`` budget, AdamW) and Mask R-CNN
on the same backbone (``istr_viz.baseline``, SGD) once per learning rate, each for ``--minutes``
of training. The peer clips its gradient norm as ISTR does (``train.clip_grad_norm``, 1.0; session
39 measured about 6 mask AP for the peer at 20 minutes, one run each, and without it every lr over
0.16 diverged within 29 iterations; ``--peer-clip 0`` for torchvision's recipe without clipping).
Both clocks count everything a step costs (data loading included) and leave the evaluations out.
Jobs run ``--jobs`` at a time (one per core, one thread each; with 2 each job has the other core
busy, the same for both models). ``--repeats K`` trains every learning rate K times, repeat k
with the seed ``train.seed + k`` (its initial weights and data order; ISTR's mask basis fit
too). For each model the learning rate with the best mean final mask AP over its repeats is kept
(the same rule for both; chosen on the val set that is reported; a diverged run counts 0; a run
that trained more than 5% past the budget, and a last step beyond it, is not eligible), and the
ratio is that of the two means; with repeats the report adds each mean's spread and the ratio of
every repeat pair. The kept lr's run nearest its mean (of those that did not diverge) stands for
it in the timing.
Then the two kept models are timed back to back, image by image, at the test size, one image at
a time, one thread, bf16 autocast where the CPU has it (both with their linear and conv weights
stored in bf16 first: the same outputs without a cast per call), each with the post-processing
its AP was scored with (Mask R-CNN's own detections; ISTR's top 100 with each query's mask
pasted once), masks pasted at the image size by the same paster (ISTR's separable one); ISTR
runs ``final_only`` (the earlier stages without the class and mask heads that only training and
the per-stage views use: the same detections), as Mask R-CNN computes only what its detections
need; ISTR's network alone is timed too. Writes
``OUT/summary.json``, prints a table and saves ``OUT/ap_vs_minutes.png`` (AP against training
minutes, every run).

``OUT/sweep.json`` lists the runs of the benchmark in ``OUT``; the report reads those only, so
files of an earlier sweep in the same folder stay out of it (and are named). A full run starts a
new list; ``--peer-only`` / ``--istr-only`` run one side and add its runs to the list (run the
other later with the same ``--out`` and the timing happens once both are there; or extend a
sweep by another lr). ``--report`` only re-reads ``OUT``; ``--time`` redoes
the timing; ``--rescore`` scores every saved model of both kinds again with today's code and
the preset's test size (after a change to either) and writes ``OUT/peer_rescored.json`` and
``OUT/istr_rescored.json`` beside the recorded AP.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _machine(device: str | None = None) -> dict:
    """The CPU, threads, torch and GPU (on ``device``; None: the default) of this process: what a
    pace or a timing depends on."""
    from istr_viz.runtime import machine_summary

    return machine_summary(device=device)


def _paths(data: str | None):
    from istr_viz.data.layout import default_data_root, split_paths

    root = Path(data) if data else default_data_root()
    return split_paths(root, "train"), split_paths(root, "val")


def _datasets(cfg, data: str | None):
    from istr_viz.data.coco import CocoDataset
    from istr_viz.data.transforms import build_transform
    from istr_viz.engine import transform_configs

    train_paths, val_paths = _paths(data)
    train_tf, test_tf = transform_configs(cfg)
    train = CocoDataset(train_paths.ann_file, train_paths.images_dir,
                        transform=build_transform(train_tf, train=True))
    val = CocoDataset(val_paths.ann_file, val_paths.images_dir,
                      transform=build_transform(test_tf, train=False))
    return train, val, val_paths


def _coco_ap(val_paths, results: list[dict]) -> dict:
    from pycocotools.coco import COCO

    from istr_viz.evaluate import _quiet, coco_eval

    gt = _quiet(COCO, str(val_paths.ann_file))
    return {t: coco_eval(gt, results, t)[0] for t in ("bbox", "segm")}


def _peer_forward(model):
    """One-image inference of a torchvision Mask R-CNN, as a user calls it (``model([image])``)
    but with ISTR's mask paster (``predict_mask_rcnn``), as it is scored. Under bf16 autocast its
    linear and conv weights are stored in bf16 first, as ISTR's are (same outputs)."""
    from istr_viz.baseline import predict_mask_rcnn
    from istr_viz.runtime import autocast_dtype, cast_weights_for_autocast

    model.eval()
    amp = autocast_dtype(torch.device("cpu"), True)
    if amp is not None:
        cast_weights_for_autocast(model, amp)

    def forward(image):
        with torch.no_grad(), torch.autocast("cpu", dtype=amp or torch.float32,
                                             enabled=amp is not None):
            predict_mask_rcnn(model, image)
    return forward


def _istr_forward(model, network_only: bool = False, maskness_power: float = 0.0):
    """One-image ISTR inference as it is scored: the final stage's top 100 (query, class) pairs
    (no score floor, no NMS), each query's mask pasted once at the image size (its classes share
    it), as ``evaluate`` does, scored with ``maskness_power`` (the preset's); the forward pass
    ``final_only`` (the same final stage). ``network_only``: the forward pass alone. Under bf16
    autocast the
    linear and conv weights are stored in bf16 first (``cast_weights_for_autocast``)."""
    from istr_viz.postprocess import paste_masks, top_detections
    from istr_viz.runtime import autocast_dtype, cast_weights_for_autocast

    model.eval()
    amp = autocast_dtype(torch.device("cpu"), True)
    if amp is not None:
        cast_weights_for_autocast(model, amp)

    def forward(image):
        h, w = image.shape[-2:]
        with torch.no_grad(), torch.autocast("cpu", dtype=amp or torch.float32,
                                             enabled=amp is not None):
            out = model(image[None], torch.tensor([[h, w]]), final_only=True)
        if network_only:
            return
        final = out.final
        boxes, masks = final.boxes_xyxy[0].float(), final.masks[0].float()
        det = top_detections(final.logits[0].float(), boxes, masks, 100, maskness_power)
        queries = torch.unique(det.queries)
        paste_masks(masks[queries], boxes[queries], h, w)
    return forward


def run_name(kind: str, lr: float, repeat: int = 0) -> str:
    """File stem of one run in the output folder: ``istr_lr0.0004``, ``peer_lr0.16_r2``
    (``kind`` "istr" or "peer"; repeat 0 keeps the name runs had before repeats existed)."""
    return f"{kind}_lr{lr:g}" + (f"_r{repeat}" if repeat else "")


def _record_name(record: dict) -> str:
    kind = "istr" if record["model"] == "istr" else "peer"
    return run_name(kind, record["lr"], record.get("repeat", 0))


def _save_weights(model, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)


def run_peer(args) -> None:
    """Train and evaluate Mask R-CNN at one learning rate (repeat ``args.repeat``: seed
    ``train.seed`` plus it); write OUT/peer_lr{lr}[_r{k}].json and the weights
    OUT/peer_lr{lr}[_r{k}].pt (for the timing)."""
    from istr_viz.baseline import build_mask_rcnn, mask_rcnn_results, train_mask_rcnn
    from istr_viz.config import apply_overrides, get_preset
    from istr_viz.data.batching import padding_options

    torch.set_num_threads(args.threads)
    cfg = apply_overrides(get_preset(args.preset), args.set or [])
    train, val, val_paths = _datasets(cfg, args.data)
    seed = cfg.train.seed + args.repeat
    torch.manual_seed(seed)
    model = build_mask_rcnn(cfg, len(train.annotations.class_names))
    # the gradient clipping ISTR trains with, unless told otherwise
    clip = cfg.train.clip_grad_norm if args.peer_clip is None else args.peer_clip
    curve = []

    def evaluate(minutes: float, iteration: int) -> None:
        # a guard, as in ISTR's engine: evaluating leaves the training's RNG as it was (the
        # peer's evaluation indexes the data set directly and likely draws nothing)
        with torch.random.fork_rng(devices=[]):
            ap = _coco_ap(val_paths, mask_rcnn_results(model, val, amp=cfg.train.amp,
                                                       max_images=args.eval_images))
        curve.append({"minutes": minutes, "iteration": iteration,
                      "box_AP": ap["bbox"]["AP"], "mask_AP": ap["segm"]["AP"]})

    points = tuple(args.minutes * k / (args.points + 1) for k in range(1, args.points + 1))
    run = train_mask_rcnn(model, train, args.minutes, args.lr, batch_size=cfg.train.batch_size,
                          amp=cfg.train.amp, seed=seed, checkpoints=points,
                          on_checkpoint=evaluate, num_workers=cfg.data.num_workers,
                          clip_grad_norm=clip,
                          **padding_options(cfg.data, train.annotations))
    evaluate(run["minutes"], run["iterations"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = run_name("peer", args.lr, args.repeat)
    _save_weights(model, out / f"{name}.pt")
    record = {"model": "mask_rcnn", "lr": args.lr, "repeat": args.repeat, "seed": seed,
              "clip_grad_norm": clip, **run,
              "budget_minutes": args.minutes,
              "set": args.set or [], "eval_images": args.eval_images, "curve": curve,
              "box_AP": curve[-1]["box_AP"], "mask_AP": curve[-1]["mask_AP"],
              "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
              "machine": _machine("cpu")}  # the peer trains on the CPU
    _write(out / f"{name}.json", record)


def run_istr(args) -> None:
    """Train ISTR at one learning rate with the engine (repeat ``args.repeat``: seed
    ``train.seed`` plus it), evaluate the final stage at ``--points`` evenly spaced points and
    the end; write OUT/istr_lr{lr}[_r{k}].json. The basis fit is part of
    ISTR's training, so it is timed and taken off the engine's ``--max-minutes`` budget; minutes
    are measured (the fit plus the engine's ``train_s``, evaluations left out). A diverged run
    is recorded (``diverged``, AP 0 at the end), not lost."""
    from istr_viz.basis import MaskBasis
    from istr_viz.config import apply_overrides, get_preset
    from istr_viz.data.coco import load_annotations
    from istr_viz.data.instance_masks import instance_masks
    from istr_viz.engine import TrainingDiverged, read_metrics, train
    from istr_viz.predictor import load_model

    train_paths, val_paths = _paths(args.data)
    seed = apply_overrides(get_preset(args.preset), args.set or []).train.seed + args.repeat
    cfg = apply_overrides(get_preset(args.preset), (args.set or []) + [
        f"train.lr={args.lr}", f"train.eval_points={args.points}",
        f"train.eval_max_images={args.eval_images or 0}", f"train.threads={args.threads}",
        f"train.seed={seed}"])
    torch.set_num_threads(args.threads)
    name = run_name("istr", args.lr, args.repeat)
    out_dir = Path(args.out) / name
    t0 = time.perf_counter()
    masks = instance_masks(load_annotations(train_paths.ann_file), cfg.basis.mask_size,
                           progress=False)
    basis = MaskBasis.fit(masks, dim=min(cfg.basis.dim, len(masks)), recipe=cfg.basis.recipe,
                          seed=cfg.train.seed)
    fit_minutes = (time.perf_counter() - t0) / 60
    diverged = False
    try:
        train(cfg, train_paths, out_dir, val_data=val_paths, basis=basis,
              max_minutes=args.minutes - fit_minutes)
    except TrainingDiverged as err:
        print(f"diverged: {err}", file=sys.stderr)
        diverged = True
    records = read_metrics(out_dir / "metrics.jsonl")
    evals = [r for r in records if "eval" in r]
    curve = [{"minutes": fit_minutes + r["train_s"] / 60, "iteration": r["iter"],
              "box_AP": r["eval"]["bbox_AP"], "mask_AP": r["eval"]["segm_AP"]} for r in evals]
    last = records[-1] if records else {"iter": 0, "train_s": 0.0}
    if diverged:
        curve.append({"minutes": fit_minutes + last["train_s"] / 60, "iteration": last["iter"],
                      "box_AP": 0.0, "mask_AP": 0.0})
    last_ckpt = out_dir / "last.pt"
    model = load_model(last_ckpt, device="cpu")[0] if last_ckpt.exists() else None
    record = {"model": "istr", "lr": cfg.train.lr, "repeat": args.repeat, "seed": seed,
              "iterations": curve[-1]["iteration"],
              "minutes": curve[-1]["minutes"], "basis_fit_minutes": fit_minutes,
              "budget_minutes": args.minutes, "set": args.set or [], "diverged": diverged,
              "curve": curve, "box_AP": curve[-1]["box_AP"], "mask_AP": curve[-1]["mask_AP"],
              "per_stage_mask_AP": None if diverged else evals[-1]["eval"]["per_stage_segm_AP"],
              "eval_images": args.eval_images,
              "checkpoint": str(last_ckpt.resolve()),
              "params_M": sum(p.numel() for p in model.parameters()) / 1e6 if model else None,
              "machine": _machine()}
    _write(Path(args.out) / f"{name}.json", record)


MANIFEST = "sweep.json"  # {"istr": [run names], "peer": [run names]}: the benchmark in OUT


def _listed(out: Path) -> dict[str, list[str]] | None:
    """The run names of OUT/sweep.json by side, or None for a folder written before it existed
    (then every run file in it counts)."""
    path = out / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def list_runs(out: Path, names: dict[str, list[str]], new_sweep: bool) -> None:
    """Record in OUT/sweep.json the runs a launch makes (``names`` by side, "istr" / "peer"):
    a new sweep replaces the list, a one-sided launch adds its runs to it (in a folder written
    before the list existed, to every run file already there, as the report counted them)."""
    listed = {"istr": [], "peer": []} if new_sweep else _listed(out) or {
        kind: [p.stem for p in sorted(out.glob(f"{kind}_lr*.json"))] for kind in ("istr", "peer")}
    for side, new in names.items():
        listed[side] = [n for n in listed.get(side, []) if n not in new] + new
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps(listed, indent=2))


def _run_files(out: Path, kind: str) -> tuple[list[Path], list[Path]]:
    """OUT's ``kind`` ("istr" / "peer") run files: those of the listed sweep, and the others."""
    paths = sorted(out.glob(f"{kind}_lr*.json"))
    listed = _listed(out)
    if listed is None:
        return paths, []
    names = set(listed.get(kind, []))
    return [p for p in paths if p.stem in names], [p for p in paths if p.stem not in names]


def _records(out: Path) -> tuple[list[dict], list[dict]]:
    """The ISTR and the Mask R-CNN records of the sweep in ``out``, each sorted by lr, repeat."""
    def read(kind):
        records = [json.loads(p.read_text()) for p in _run_files(out, kind)[0]]
        return sorted(records, key=lambda r: (r["lr"], r.get("repeat", 0)))
    return read("istr"), read("peer")


_SLACK_MINUTES = 0.05  # 3 s: one slow step or a scheduling hiccup at the end of a run


def _over_budget(record: dict) -> bool:
    """Trained more than 5% past the budget (a forecast that the machine's load outran), beyond
    what a clock-kept run may take past it: it stops at the first step boundary after its
    minutes, so its last step (at least a mean one, or a few seconds of a slow one) is allowed;
    in a budget of seconds, as in the tests, that alone can be 5%."""
    step = record["minutes"] / max(int(record.get("iterations", 1)), 1)
    return record["minutes"] > 1.05 * record["budget_minutes"] + max(step, _SLACK_MINUTES)


def by_lr(records: list[dict]) -> dict[float, list[dict]]:
    """The runs that kept to the budget, grouped by learning rate (its repeats)."""
    groups: dict[float, list[dict]] = {}
    for r in records:
        if not _over_budget(r):
            groups.setdefault(r["lr"], []).append(r)
    return groups


def _mean_ap(runs: list[dict], key: str = "mask_AP") -> float:
    """The mean final AP of ``runs``, a diverged run counting 0 (whatever its weights scored)."""
    return statistics.fmean(0.0 if r.get("diverged") else r[key] for r in runs)


def best_lr(records: list[dict]) -> tuple[float, list[dict]] | None:
    """The learning rate with the best mean final mask AP over its repeats, among the runs
    that kept to the budget, and its runs; None when no run did."""
    groups = by_lr(records)
    if not groups:
        return None
    lr = max(groups, key=lambda v: _mean_ap(groups[v]))
    return lr, groups[lr]


def _best(records: list[dict]) -> dict | None:
    """The run that stands for the best lr (``best_lr``) in the timing: of its runs that did not
    diverge, the one whose final mask AP is nearest the lr's mean (a tie, as two repeats always
    are, goes to the lower repeat; with one repeat, its only run)."""
    kept = best_lr(records)
    if kept is None:
        return None
    mean = _mean_ap(kept[1])
    trained = [r for r in kept[1] if not r.get("diverged")] or kept[1]
    return min(trained, key=lambda r: (abs(r["mask_AP"] - mean), r.get("repeat", 0)))


def sweep_warning(records: list[dict]) -> str | None:
    """A warning about one model's learning-rate sweep (``records``: its runs), or None when
    the sweep looks sound. Only runs that kept to the budget count. Warns when every run
    diverged, when fewer than two learning rates trained, and when the best lr (``best_lr``: the
    best mean final mask AP, a diverged run counting as 0) is the lowest or highest of the
    sweep, so that the best may lie beyond it."""
    eligible = [r for r in records if not _over_budget(r)]
    if not eligible:
        return None
    name = "ISTR" if eligible[0]["model"] == "istr" else "Mask R-CNN"
    lrs = sorted({r["lr"] for r in eligible})
    listed = ", ".join(f"{v:g}" for v in lrs)
    trained = [r for r in eligible if not r.get("diverged")]
    if not trained:
        return f"warning: every {name} run diverged (lr {listed}): sweep lower learning rates"
    if len(lrs) < 2:
        return f"warning: {name} trained at one lr only ({listed}): that is not a sweep"
    best, _ = best_lr(eligible)  # as the report picks it: a diverged repeat counts as AP 0
    if lrs[0] < best < lrs[-1]:
        return None
    side, step = ("lowest", "lower") if best == lrs[0] else ("highest", "higher")
    return (f"warning: {name}'s best lr {best:g} is the {side} of its sweep ({listed}): "
            f"a {step} one may be better")


def time_interleaved(forwards: dict, images: list) -> dict[str, list[float]]:
    """Milliseconds per image of each one-image ``forwards[name](image)``, run back to back on
    the same images (alternating image by image, after a warm-up of each on the first three)."""
    for image in images[:3]:
        for forward in forwards.values():
            forward(image)
    times: dict[str, list[float]] = {name: [] for name in forwards}
    for image in images:
        for name, forward in forwards.items():
            t0 = time.perf_counter()
            forward(image)
            times[name].append((time.perf_counter() - t0) * 1000)
    return times


KERNELS = ("separable", "torchvision")  # the CPU RoIAlign kernels at inference


def set_istr_kernel(model, kernel: str) -> None:
    """Make both of an ISTR model's poolers use ``kernel`` (one of ``KERNELS``) at CPU inference."""
    for pooler in (model.pooler, model.mask_pooler):
        if pooler is not None:
            pooler.separable_inference = kernel == "separable"


def time_best(out: Path, args) -> dict:
    """Time the best ISTR and the best Mask R-CNN back to back on the same val images (one image
    at a time, alternating, after a warm-up of each); write OUT/timing.json.

    Each model is timed with each CPU RoIAlign kernel at inference (ISTR: both poolers; the peer:
    its mask RoIs, its box proposals keep torchvision's, session 18) and keeps its faster:
    ``istr_ms`` and ``mask_rcnn_ms`` are the faster medians, ``*_kernels_ms`` both."""
    from istr_viz.baseline import build_mask_rcnn
    from istr_viz.config import apply_overrides, get_preset
    from istr_viz.predictor import load_model

    istr_runs, peer_runs = _records(out)
    istr, peer = _best(istr_runs), _best(peer_runs)
    if istr is None or peer is None:
        raise SystemExit(f"nothing to time in {out}: no run of one of the models kept to its "
                         "budget")
    torch.set_num_threads(args.threads)
    cfg = apply_overrides(get_preset(args.preset), peer["set"])  # as the peer was trained
    train, val, _ = _datasets(cfg, args.data)
    # scored as the preset scores, as --rescore does
    istr_power = apply_overrides(get_preset(args.preset), istr["set"]).model.maskness_power
    peer_state = torch.load(out / f"{_record_name(peer)}.pt", map_location="cpu",
                            weights_only=True)
    forwards = {}
    for kernel in KERNELS:
        istr_model, _ = load_model(istr["checkpoint"], device="cpu")
        set_istr_kernel(istr_model, kernel)
        forwards[f"istr_{kernel}"] = _istr_forward(istr_model, maskness_power=istr_power)
        peer_model = build_mask_rcnn(cfg, len(train.annotations.class_names))
        peer_model.load_state_dict(peer_state)
        peer_model.roi_heads.mask_roi_pool.separable_inference = kernel == "separable"
        forwards[f"mask_rcnn_{kernel}"] = _peer_forward(peer_model)
    istr_model, _ = load_model(istr["checkpoint"], device="cpu")  # the pooler's own choice
    forwards["istr_network"] = _istr_forward(istr_model, network_only=True)
    images = [val[i][0] for i in range(min(args.time_images, len(val)))]
    times = {name: statistics.median(t) for name, t in time_interleaved(forwards, images).items()}
    timing = {"istr_lr": istr["lr"], "peer_lr": peer["lr"], "istr_run": _record_name(istr),
              "peer_run": _record_name(peer), "images": len(images),
              "threads": args.threads, "test_min_size": cfg.data.test_min_size,
              "test_max_size": cfg.data.test_max_size, "machine": _machine("cpu")}
    for model in ("istr", "mask_rcnn"):
        by_kernel = {kernel: times[f"{model}_{kernel}"] for kernel in KERNELS}
        kept = min(by_kernel, key=by_kernel.get)
        timing.update({f"{model}_ms": by_kernel[kept], f"{model}_kernel": kept,
                       f"{model}_kernels_ms": by_kernel})
    timing["istr_network_ms"] = times["istr_network"]
    (out / "timing.json").write_text(json.dumps(timing, indent=2))
    return timing


def _rescored_row(record: dict, ap: dict, test_size: int, amp: bool) -> dict:
    name = "ISTR" if record["model"] == "istr" else "Mask R-CNN"
    row = {"lr": record["lr"], "repeat": record.get("repeat", 0), "run": _record_name(record),
           "test_min_size": test_size, "amp": amp,
           "recorded_box_AP": record["box_AP"],
           "recorded_mask_AP": record["mask_AP"], "box_AP": ap["bbox"]["AP"],
           "mask_AP": ap["segm"]["AP"]}
    print(f"{name} {_record_name(record)} at {test_size} px: box AP "
          f"{100 * record['box_AP']:.1f} -> "
          f"{100 * row['box_AP']:.1f}, mask AP {100 * record['mask_AP']:.1f} -> "
          f"{100 * row['mask_AP']:.1f}")
    return row


def rescore(out: Path, args) -> dict[str, list[dict]]:
    """Score each saved model of ``out`` (its final weights) on the val set again (on as many
    images as its run's evaluations used) with today's prediction and scoring code and the
    preset's test size, both models alike (both under ``train.amp``'s autocast, as they are
    timed; the ISTR runs' own evaluations during training are fp32), so that a change to either
    (post-processing, the test size) is compared on the same terms; the per-run files keep what
    was recorded at the time, and ``report`` adds the ratio of the kept lrs' means by the new
    scores. Writes ``OUT/peer_rescored.json`` and ``OUT/istr_rescored.json`` (per run: its name,
    lr and repeat, the recorded and the new box/mask AP, the test size) and returns both lists.
    A diverged ISTR run has no weights to score and is left out (the report counts it 0)."""
    from dataclasses import replace

    from istr_viz.baseline import build_mask_rcnn, mask_rcnn_results
    from istr_viz.config import apply_overrides, get_preset
    from istr_viz.evaluate import evaluate_model
    from istr_viz.predictor import load_model

    torch.set_num_threads(args.threads)
    istr_records, peer_records = _records(out)
    rows: dict[str, list[dict]] = {"peer": [], "istr": []}
    extra = args.set or []  # on top of each run's own: e.g. another test size
    for record in peer_records:
        cfg = apply_overrides(get_preset(args.preset), record["set"] + extra)  # as it was trained
        train, val, val_paths = _datasets(cfg, args.data)
        model = build_mask_rcnn(cfg, len(train.annotations.class_names))
        model.load_state_dict(torch.load(out / f"{_record_name(record)}.pt", map_location="cpu",
                                         weights_only=True))
        ap = _coco_ap(val_paths, mask_rcnn_results(model, val, amp=cfg.train.amp,
                                                   max_images=record.get("eval_images")))
        rows["peer"].append(_rescored_row(record, ap, cfg.data.test_min_size, cfg.train.amp))
    _, val_paths = _paths(args.data)
    for record in istr_records:
        if record.get("diverged") or not Path(record.get("checkpoint", "")).is_file():
            continue
        cfg = apply_overrides(get_preset(args.preset), record["set"] + extra)
        model, predictor = load_model(record["checkpoint"], device="cpu")
        # the checkpoint's own configuration, tested at the preset's size as the peer is and
        # scored as the preset scores (model.maskness_power)
        tested = replace(predictor.config, data=replace(
            predictor.config.data, test_min_size=cfg.data.test_min_size,
            test_max_size=cfg.data.test_max_size), model=replace(
            predictor.config.model, maskness_power=cfg.model.maskness_power))
        ap = evaluate_model(model, val_paths, tested, max_images=record.get("eval_images"),
                            progress=False, category_ids=predictor.category_ids,
                            amp=cfg.train.amp)  # the peer's precision (and the timing's)
        rows["istr"].append(_rescored_row(record, ap, cfg.data.test_min_size, cfg.train.amp))
    _write(out / "peer_rescored.json", rows["peer"])
    _write(out / "istr_rescored.json", rows["istr"])
    return rows


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


def _spread(runs: list[dict]) -> str:
    """Mean +- standard deviation (range) of ``runs``' final mask AP, a diverged run as 0."""
    aps = [0.0 if r.get("diverged") else 100 * r["mask_AP"] for r in runs]
    if len(aps) == 1:
        return f"{aps[0]:.1f}"
    return (f"{statistics.fmean(aps):.1f} +- {statistics.stdev(aps):.1f} "
            f"({min(aps):.1f}-{max(aps):.1f})")


def report(out: Path) -> dict:
    """Table, plot and summary.json from the per-run files of the sweep in ``out``."""
    from istr_viz.viz.figures import new_figure

    left_out = [p.name for kind in ("istr", "peer") for p in _run_files(out, kind)[1]]
    if left_out:
        print(f"not in this sweep ({MANIFEST}), left out: {', '.join(left_out)}", file=sys.stderr)
    istr_runs, peers = _records(out)
    istr, best = _best(istr_runs), _best(peers)
    istr_kept, peer_kept = best_lr(istr_runs), best_lr(peers)
    timing_path = out / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    timed_runs = (timing.get("istr_run", run_name("istr", timing["istr_lr"])),
                  timing.get("peer_run", run_name("peer", timing["peer_lr"]))) if timing else None
    if timed_runs and (istr is None or best is None
                       or timed_runs != (_record_name(istr), _record_name(best))):
        timing = {}  # timed before another run changed the best: time again with --time
    ms = {"istr": timing.get("istr_ms"), "mask_rcnn": timing.get("mask_rcnn_ms")}
    budgets = {r["budget_minutes"] for r in istr_runs + peers}
    if len(budgets) > 1:
        print(f"warning: the runs in {out} had different budgets {sorted(budgets)} minutes",
              file=sys.stderr)
    for r in istr_runs + peers:
        if _over_budget(r):
            print(f"warning: {_record_name(r)} trained {r['minutes']:.1f} of its "
                  f"{r['budget_minutes']:g} minutes: not eligible as the best lr", file=sys.stderr)
    kept_lrs = {"istr": istr_kept[0] if istr_kept else None,
                "mask_rcnn": peer_kept[0] if peer_kept else None}
    print(f"{'model':<26} {'lr':>8} {'rep':>3} {'iters':>6} {'minutes':>7} {'box AP':>7} "
          f"{'mask AP':>8} {'infer ms':>9}")
    for r in istr_runs + peers:
        name = ("ISTR" if r["model"] == "istr" else "Mask R-CNN") + (
            " (over budget)" if _over_budget(r) else
            " (best lr)" if r["lr"] == kept_lrs[r["model"]] else "")
        timed = r is istr or r is best
        infer = f"{ms[r['model']]:.1f}" if timed and ms[r["model"]] else "-"
        print(f"{name:<26} {r['lr']:>8g} {r.get('repeat', 0):>3} {r['iterations']:>6} "
              f"{r['minutes']:>7.1f} {100 * r['box_AP']:>7.1f} {100 * r['mask_AP']:>8.1f} "
              f"{infer:>9}")
    repeated = any(len(runs) > 1 for records in (istr_runs, peers)
                   for runs in by_lr(records).values())
    if repeated:
        print("mean final mask AP per lr over its repeats (+- standard deviation, range):")
        for records in (istr_runs, peers):
            for lr, runs in sorted(by_lr(records).items()):
                model = "ISTR" if runs[0]["model"] == "istr" else "Mask R-CNN"
                print(f"  {model:<11} lr {lr:<8g} {len(runs)} runs: {_spread(runs)}")
    clips = sorted({r.get("clip_grad_norm", 0.0) for r in peers})
    if clips:
        print("Mask R-CNN's gradient norm clipped to " + " / ".join(f"{c:g}" for c in clips)
              + " (0: not clipped)" + (": the runs mixed clipping settings" if len(clips) > 1
                                        else ""))
    summary = {"istr": istr_runs, "peers": peers, "best_istr_lr": kept_lrs["istr"],
               "best_peer_lr": kept_lrs["mask_rcnn"], "timing": timing or None}
    if istr and best:
        istr_mean, peer_mean = _mean_ap(istr_kept[1]), _mean_ap(peer_kept[1])
        summary.update({"istr_mask_APs": [r["mask_AP"] for r in istr_kept[1]],
                        "peer_mask_APs": [r["mask_AP"] for r in peer_kept[1]],
                        "istr_mean_mask_AP": istr_mean, "peer_mean_mask_AP": peer_mean,
                        "mask_AP_ratio": istr_mean / max(peer_mean, 1e-9)})
        line = f"ISTR / Mask R-CNN (best lr each): mask AP x{summary['mask_AP_ratio']:.2f}"
        if len(istr_kept[1]) > 1 or len(peer_kept[1]) > 1:
            line += (f" (means {100 * istr_mean:.1f} over {len(istr_kept[1])} runs against "
                     f"{100 * peer_mean:.1f} over {len(peer_kept[1])})")
        # the repeats of the same seed offset that both trained (a diverged one has no ratio)
        peer_by_repeat = {r.get("repeat", 0): r for r in peer_kept[1] if not r.get("diverged")}
        pairs = {k: r["mask_AP"] / max(peer_by_repeat[k]["mask_AP"], 1e-9)
                 for k, r in ((r.get("repeat", 0), r) for r in istr_kept[1]
                              if not r.get("diverged"))
                 if k in peer_by_repeat}
        if len(pairs) > 1:
            summary["pair_ratios"] = {str(k): v for k, v in sorted(pairs.items())}
            line += (f"; {len(pairs)} repeat pairs (the same seed offset) "
                     f"x{min(pairs.values()):.2f}-x{max(pairs.values()):.2f}")
        if timing:
            summary["infer_ratio"] = timing["istr_ms"] / timing["mask_rcnn_ms"]
            line += f", inference time x{summary['infer_ratio']:.2f}"
        print(line)
        rescored = {}
        for name in ("peer", "istr"):
            path = out / f"{name}_rescored.json"
            rows = json.loads(path.read_text()) if path.exists() else []
            rescored[name] = {row.get("run", run_name(name, row["lr"])): row for row in rows}
        # --rescore: every run of both kept lrs scored again by today's code at today's test
        # size (the kept lrs stay those chosen by the recorded AP); a diverged run has no
        # weights to score and counts 0, as it does in the recorded mean
        now = {side: [rescored[side].get(_record_name(r), {"mask_AP": 0.0} if r.get("diverged")
                                         else None) for r in runs]
               for side, runs in (("istr", istr_kept[1]), ("peer", peer_kept[1]))}
        scored = [row for rows in now.values() for row in rows if row and "test_min_size" in row]
        if scored and all(row is not None for rows in now.values() for row in rows):
            istr_now, peer_now = _mean_ap(now["istr"]), _mean_ap(now["peer"])
            summary["peer_rescored"] = list(rescored["peer"].values())
            summary["istr_rescored"] = list(rescored["istr"].values())
            summary["mask_AP_ratio_rescored"] = istr_now / max(peer_now, 1e-9)
            print(f"both kept lrs' runs scored again by today's code at "
                  f"{scored[0].get('test_min_size', '?')} px (*_rescored.json): mask AP "
                  f"{100 * istr_now:.1f} against {100 * peer_now:.1f}, "
                  f"x{summary['mask_AP_ratio_rescored']:.2f}")
        if peer_mean < 0.05:
            print("warning: the peer is below 0.05 mask AP: broken, not beaten")
    for records in (istr_runs, peers):
        warning = sweep_warning(records)
        if warning:
            print(warning, file=sys.stderr)
    fig, axes = new_figure(1, 2, size_per_panel=(4.2, 3.2))
    for ax, key, title in zip(axes.flat, ("mask_AP", "box_AP"), ("mask AP", "box AP")):
        for r in istr_runs + peers:
            label = f"{'ISTR' if r['model'] == 'istr' else 'Mask R-CNN'} lr {r['lr']:g}" + (
                f" r{r['repeat']}" if r.get("repeat") else "")
            xs = [0.0] + [c["minutes"] for c in r["curve"]]
            ys = [0.0] + [100 * c[key] for c in r["curve"]]
            ax.plot(xs, ys, marker="o" if r["model"] == "istr" else "s", label=label,
                    lw=2.2 if r["lr"] == kept_lrs[r["model"]] else 1.0,
                    ls="-" if r["model"] == "istr" else "--")
        ax.set_xlabel("training minutes")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.savefig(out / "ap_vs_minutes.png", dpi=110, bbox_inches="tight")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=20.0)
    # the default sweeps, steps of x1.4 around each model's best at batch 8: the peer's 0.16 was
    # the top of its sweep in eb24 and the middle in eb31 (0.22 diverged); with the session-29
    # preset ISTR's 4e-4 won eb31 at the top of its sweep (over 2.8e-4 and 2e-4) and eb32 at the
    # bottom (over 5.6e-4 and 8e-4; eb31b's single 5.6e-4 run had beaten it): centred on 4e-4
    # (eb38, session 38, picked 2.8e-4, its later runs on a slower machine: not separated from pace;
    # eb39 picked 5.6e-4 of 2.8e-4 to 8e-4, its later runs on a faster one). The peer's sweep
    # since session 39, when it began to clip its gradients as ISTR does: clipped, 0.22 and 0.31
    # trained but scored under 0.16 and 0.11 (eb39), so the sweep moved down around its best
    # (0.08 / 0.11 / 0.16 / 0.22 / 0.31: 21.3 / 22.6 / 21.9 / 16.6 / 16.9 mask AP)
    p.add_argument("--lrs", default="0.08,0.11,0.16", help="Mask R-CNN SGD learning rates")
    p.add_argument("--istr-lrs", default="2.8e-4,4e-4,5.6e-4", help="ISTR AdamW learning rates")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per learning rate, repeat k with the seed train.seed + k; the best "
                        "lr is the best by its mean final mask AP")
    p.add_argument("--peer-clip", type=float, default=None,
                   help="clip Mask R-CNN's gradient norm to this before each step (0: off; "
                        "default: ISTR's train.clip_grad_norm, 1.0 in the presets)")
    p.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    p.add_argument("--data", help="data set root with train/ and val/ (default: built-in shapes)")
    p.add_argument("--preset", default="shapes-cpu")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="config override for the ISTR runs (the peer reads its data sizes, batch "
                        "and amp from the same config); with --rescore, applied on top of each "
                        "run's own (ISTR takes only the test sizes from it)")
    p.add_argument("--out", default="runs/equal_budget")
    p.add_argument("--points", type=int, default=3, help="evaluations during training")
    p.add_argument("--eval-images", type=int, default=None, help="val images per evaluation")
    p.add_argument("--time-images", type=int, default=100, help="val images timed per model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2, help="trainings at a time")
    side = p.add_mutually_exclusive_group()
    side.add_argument("--peer-only", action="store_true")
    side.add_argument("--istr-only", action="store_true")
    side.add_argument("--report", action="store_true")
    side.add_argument("--time", action="store_true", help="only redo the inference timing")
    side.add_argument("--rescore", action="store_true",
                      help="score the saved models of both kinds again with today's code and "
                           "test size (both under the same autocast as the timing)")
    p.add_argument("--run", choices=["istr", "peer"], help=argparse.SUPPRESS)  # one job (internal)
    p.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)  # its repeat (internal)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.peer_clip is not None and args.peer_clip < 0:
        p.error(f"--peer-clip must be 0 (off) or positive, got {args.peer_clip:g}")
    if any(item.split("=")[0].strip() == "train.lr" for item in args.set or []):
        p.error("--set train.lr is what --istr-lrs sweeps: give the values there")
    out = Path(args.out).resolve()
    args.out = str(out)
    if args.data:
        args.data = str(Path(args.data).resolve())
    if args.run == "peer":
        run_peer(args)
        return 0
    if args.run == "istr":
        run_istr(args)
        return 0
    if args.rescore:
        if not any(_records(out)):
            print(f"no result in {out} to score again", file=sys.stderr)
            return 2
        rescore(out, args)
        report(out)
        return 0
    if not (args.report or args.time):
        common = [sys.executable, __file__, "--minutes", str(args.minutes), "--out", str(out),
                  "--points", str(args.points), "--threads", str(args.threads),
                  "--preset", args.preset]
        common += ["--peer-clip", str(args.peer_clip)] if args.peer_clip is not None else []
        common += ["--data", args.data] if args.data else []
        common += ["--eval-images", str(args.eval_images)] if args.eval_images else []
        for item in args.set or []:
            common += ["--set", item]
        istr_jobs = [] if args.peer_only else [
            (run_name("istr", float(lr), k), common + ["--run", "istr", "--lr", lr,
                                                       "--repeat", str(k)])
            for k in range(args.repeats) for lr in args.istr_lrs.split(",")]
        peer_jobs = [] if args.istr_only else [
            (run_name("peer", float(lr), k), common + ["--run", "peer", "--lr", lr,
                                                       "--repeat", str(k)])
            for k in range(args.repeats) for lr in args.lrs.split(",")]
        # alternate the two models, so that with 2 jobs at a time each runs beside the other
        jobs = [job for pair in itertools.zip_longest(istr_jobs, peer_jobs) for job in pair if job]
        _paths(args.data)  # the built-in data set is written here once, not by every job
        out.mkdir(parents=True, exist_ok=True)
        for name, _ in jobs:  # results of an earlier run under these names are replaced
            (out / f"{name}.json").unlink(missing_ok=True)
        for name, side_jobs in (("istr", istr_jobs), ("peer", peer_jobs)):
            if side_jobs:  # scores of models that are being replaced
                (out / f"{name}_rescored.json").unlink(missing_ok=True)
        list_runs(out, {side: [name for name, _ in side_jobs] for side, side_jobs
                        in (("istr", istr_jobs), ("peer", peer_jobs)) if side_jobs},
                  new_sweep=not (args.peer_only or args.istr_only))
        (out / "timing.json").unlink(missing_ok=True)
        running: list[subprocess.Popen] = []
        started: list[tuple[str, subprocess.Popen]] = []
        for name, cmd in jobs:
            while len(running) >= args.jobs:
                running = [r for r in running if r.poll() is None]
                time.sleep(2)
            log = open(out / f"{name}.log", "w")
            running.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
            started.append((name, running[-1]))
        failed = [name for name, r in started if r.wait() != 0]
        if failed:
            print(f"some jobs failed (see their logs in {out}): {failed}", file=sys.stderr)
            report(out)
            return 1
    istr_runs, peers = _records(out)
    if args.time and not (istr_runs and peers):
        print(f"nothing to time in {out}: it needs an ISTR and a Mask R-CNN result",
              file=sys.stderr)
        return 2
    if istr_runs and peers and (args.time or not args.report):
        print("timing the kept models back to back (run it with nothing else on the machine)...")
        time_best(out, args)
    report(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
