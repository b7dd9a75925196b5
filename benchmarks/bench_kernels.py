"""The two hand-written CPU kernels against the library operators they replace in training.

    python benchmarks/bench_kernels.py [--threads 1] [--repeats 7]

Milliseconds for forward + backward, best of ``--repeats``, at the ``shapes-cpu`` training
sizes (batch 4, 128 channels, 208 px images, 32 queries per image with the denoising ones):

- ELU: the formula of ``istr_viz.model.activations`` against ``torch.nn.functional.elu``, on the
  tensors a refinement stage applies it to (the model uses whichever of the two is faster on the
  machine, ``library_elu_is_faster``: printed below);
- RoIAlign (``istr_viz.model.roi_align.sparse_roi_align``) against ``torchvision.ops.roi_align``
  on each FPN level, with the RoIs spread over the levels as the grid proposals are.

Also checks that the two agree. Writes benchmarks/results/bench_kernels.json. Run it on a quiet
machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from istr_viz.model.activations import elu, library_elu_is_faster
from istr_viz.model.roi_align import sparse_roi_align

RESULTS = Path(__file__).resolve().parent / "results" / "bench_kernels.json"
BATCH, CHANNELS, SIDE, ROIS = 4, 128, 208, 128
ELU_SHAPES = {"dynamic conv 1": (ROIS, 49, 32), "dynamic conv 2": (ROIS, 49, CHANNELS),
              "ffn": (ROIS, 512), "branch": (ROIS, CHANNELS)}
LEVEL_ROIS = {4: 64, 8: 40, 16: 16, 32: 8}  # RoIs per level (stride: count), 128 in all


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def forward_backward(op, x: torch.Tensor, grad: torch.Tensor):
    def run():
        leaf = x.detach().requires_grad_()
        out = op(leaf)
        out.backward(grad)
        return out, leaf.grad
    return run


def random_rois(count: int, stride: int, generator: torch.Generator) -> torch.Tensor:
    side = torch.rand(count, 2, generator=generator) * stride * 8 + stride * 2
    xy = torch.rand(count, 2, generator=generator) * (SIDE - side)
    index = torch.randint(0, BATCH, (count, 1), generator=generator).float()
    return torch.cat([index, xy, xy + side], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, shape in ELU_SHAPES.items():
        x, grad = torch.randn(shape, generator=g) * 2, torch.randn(shape, generator=g)
        ref = forward_backward(F.elu, x, grad)
        ours = forward_backward(lambda t: elu(t, library=False), x, grad)
        error = max((a - b).abs().max().item() for a, b in zip(ref(), ours()))
        rows.append({"kernel": f"ELU {name} {tuple(shape)}", "library_ms": best_ms(ref, args.repeats),
                     "ours_ms": best_ms(ours, args.repeats), "max_abs_diff": error})
    for stride, count in LEVEL_ROIS.items():
        feat = torch.randn(BATCH, CHANNELS, SIDE // stride, SIDE // stride, generator=g)
        rois = random_rois(count, stride, g)
        grad = torch.randn(count, CHANNELS, 7, 7, generator=g)
        ref = forward_backward(lambda f: roi_align(f, rois, 7, 1 / stride, 2, True), feat, grad)
        ours = forward_backward(lambda f: sparse_roi_align(f, rois, 7, 1 / stride, 2), feat, grad)
        error = max((a - b).abs().max().item() for a, b in zip(ref(), ours()))
        rows.append({"kernel": f"RoIAlign P{stride.bit_length() - 1} ({count} RoIs)",
                     "library_ms": best_ms(ref, args.repeats), "ours_ms": best_ms(ours, args.repeats),
                     "max_abs_diff": error})
    print(f"forward + backward, ms, {args.threads} thread(s), best of {args.repeats}")
    print(f"{'kernel':<40} {'library':>8} {'ours':>8} {'speed-up':>9} {'max diff':>9}")
    for r in rows:
        print(f"{r['kernel']:<40} {r['library_ms']:8.2f} {r['ours_ms']:8.2f} "
              f"{r['library_ms'] / r['ours_ms']:8.1f}x {r['max_abs_diff']:9.1e}")
    total = {k: sum(r[k] for r in rows) for k in ("library_ms", "ours_ms")}
    print(f"{'sum':<40} {total['library_ms']:8.2f} {total['ours_ms']:8.2f}")
    library = library_elu_is_faster()
    print(f"the model's ELU on this machine: {'library' if library else 'ours'}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "rows": rows,
                                   "model_elu": "library" if library else "ours"},
                                  indent=2) + "\n")


if __name__ == "__main__":
    main()
