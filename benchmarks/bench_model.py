"""Where does the time go? Forward and forward+backward per image, split by part.

    python benchmarks/bench_model.py [--config shapes-cpu|coco-r50|both] [--threads 2] [--repeats 5]
        [--set model.fpn_output_conv=separable ...]

Times (median over repeats, milliseconds per image) the backbone+FPN, the RoI pooling, the
refinement stages (without pooling), the Hungarian matching and the loss, for forward only and
for forward+backward, on random images at the preset's test size. Writes
benchmarks/results/bench_model.json. Run it before and after any change meant to speed things up,
on a quiet machine (one heavy job at a time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from istr_viz.basis import MaskBasis
from istr_viz.config import apply_overrides, get_preset
from istr_viz.data.instance_masks import synthetic_instance_masks
from istr_viz.losses import SetCriterion
from istr_viz.model import build_model
from istr_viz.runtime import autocast_dtype

RESULTS = Path(__file__).resolve().parent / "results" / "bench_model.json"


class Timer:
    """Accumulates wall time per named part; parts may nest (pooling inside stages)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    @contextmanager
    def part(self, name: str):
        t = time.perf_counter()
        yield
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t


def _instrument(model, timer: Timer) -> None:
    """Wrap the backbone, the pooler and each stage's forward with timers (forward only)."""
    def wrap(module, name):
        original = module.forward

        def timed(*args, **kwargs):
            with timer.part(name):
                return original(*args, **kwargs)
        module.forward = timed

    wrap(model.backbone, "backbone+fpn")
    wrap(model.pooler, "roi_pool")
    for stage in model.stages:
        wrap(stage, "stages (incl. roi_pool)")


def _targets(batch: int, size: int, num_classes: int, gen: torch.Generator) -> list[dict]:
    targets = []
    for _ in range(batch):
        g = 5
        xy = torch.rand(g, 2, generator=gen) * size * 0.6
        wh = 8 + torch.rand(g, 2, generator=gen) * size * 0.35
        boxes = torch.cat([xy, xy + wh], 1).clamp(max=size - 1)
        masks = torch.zeros(g, size, size, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            masks[i, y0:y1, x0:x1] = True
        targets.append({"boxes_xyxy": boxes, "labels": torch.randint(num_classes, (g,), generator=gen),
                        "masks": masks, "size": torch.tensor([size, size])})
    return targets


def bench(preset: str, threads: int, repeats: int, batch: int, amp: bool,
          overrides: list[str] = ()) -> dict:
    torch.set_num_threads(threads)
    cfg = apply_overrides(get_preset(preset), list(overrides))
    size = cfg.data.test_min_size
    basis = MaskBasis.fit(synthetic_instance_masks(4000, cfg.basis.mask_size), dim=cfg.basis.dim)
    num_classes = 6 if preset == "shapes-cpu" else 80
    model = build_model(replace(cfg.model, pretrained_path=None), num_classes, basis)
    criterion = SetCriterion(cfg.loss, basis)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=gen)
    sizes = torch.tensor([[size, size]] * batch)
    targets = _targets(batch, size, num_classes, gen)
    dtype = autocast_dtype(torch.device("cpu"), amp)
    timer = Timer()
    _instrument(model, timer)

    def step(backward: bool) -> dict[str, float]:
        timer.totals.clear()
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(images, sizes)
        t_fwd = time.perf_counter() - t0
        parts = dict(timer.totals)
        if not backward:
            return {"forward": t_fwd, **parts}
        from istr_viz import matcher

        t1 = time.perf_counter()
        result = criterion(out.float(), targets)
        t_loss = time.perf_counter() - t1
        t2 = time.perf_counter()
        result[0].backward()
        t_bwd = time.perf_counter() - t2
        model.zero_grad(set_to_none=True)
        del matcher
        return {"forward": t_fwd, **parts, "matching+loss": t_loss, "backward": t_bwd,
                "forward+backward": time.perf_counter() - t0}

    model.train()
    step(True)  # warm-up
    rows = {"forward_only": [], "train_step": []}
    for _ in range(repeats):
        with torch.no_grad():
            rows["forward_only"].append(step(False))
        rows["train_step"].append(step(True))
    report = {"preset": preset, "overrides": list(overrides), "image_size": size, "batch": batch, "threads": threads,
              "autocast": str(dtype), "parameters_M": sum(p.numel() for p in model.parameters()) / 1e6}
    for kind, runs in rows.items():
        keys = runs[0].keys()
        report[kind] = {k: round(1000 * statistics.median(r[k] for r in runs) / batch, 1) for k in keys}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="both", choices=["shapes-cpu", "coco-r50", "both"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--no-amp", action="store_true", help="plain fp32 even where bf16 is fast")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a field of the preset, as train --set does")
    args = parser.parse_args()
    presets = ["shapes-cpu", "coco-r50"] if args.config == "both" else [args.config]
    reports = []
    for preset in presets:
        rep = bench(preset, args.threads, args.repeats if preset == "shapes-cpu" else 2, args.batch,
                    not args.no_amp, args.set)
        reports.append(rep)
        print(f"\n{preset} {' '.join(args.set)}: {rep['image_size']} px, batch {rep['batch']}, {rep['threads']} threads, "
              f"autocast {rep['autocast']}, {rep['parameters_M']:.1f} M parameters (ms per image)")
        for kind in ("forward_only", "train_step"):
            print(f"  {kind:<13}" + "  ".join(f"{k} {v}" for k, v in rep[kind].items()))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(reports, indent=2) + "\n")


if __name__ == "__main__":
    main()
