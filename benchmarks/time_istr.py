"""Time ISTR checkpoints against each other: milliseconds per image, as the equal-budget
benchmark times ISTR (one image at a time, the final stage's top 100 detections with their masks
pasted, bf16 autocast where the CPU supports it), at one or more test sizes.

    python benchmarks/time_istr.py --checkpoints OLD.pt checkpoints/istr_shapes.pt --sizes 224,240

The checkpoints are timed back to back on the same built-in val images (or ``--data ROOT``'s
val/), alternating image by image after a warm-up, so a change of architecture shows as a ratio
measured under the same conditions. Weights do not change ISTR's inference time (a fixed number
of queries, no NMS), so any checkpoint of an architecture stands for it. Prints one line per size
and writes the medians as JSON with ``--json-out``. Run it on a quiet machine.

``--kernels separable,torchvision`` times each checkpoint once with each CPU RoIAlign kernel at
inference (``RoIPooler.separable_inference``; by default the pooler picks by its canonical size):

    python benchmarks/time_istr.py --checkpoints checkpoints/istr_shapes.pt --kernels separable,torchvision
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from equal_budget import (KERNELS, _datasets, _istr_forward, set_istr_kernel,  # noqa: E402
                          time_interleaved)


def time_checkpoints(checkpoints: list[str], sizes: list[int], data: str | None = None,
                     images: int = 100, threads: int = 1,
                     kernels: list[str] | None = None) -> dict[int, dict[str, float]]:
    """Median milliseconds per image of each checkpoint, by test size; with ``kernels``, of each
    (checkpoint, RoIAlign kernel) pair, keyed ``"PATH [KERNEL]"``."""
    from istr_viz.config import get_preset, with_test_size
    from istr_viz.predictor import load_model

    unknown = sorted(set(kernels or ()) - set(KERNELS))
    if unknown:
        raise ValueError(f"unknown kernel {unknown[0]!r}; valid: {', '.join(KERNELS)}")
    if kernels and len(set(kernels)) < len(kernels):
        raise ValueError(f"each kernel once, got {','.join(kernels)}")
    torch.set_num_threads(threads)
    result: dict[int, dict[str, float]] = {}
    for size in sizes:
        _, val, _ = _datasets(with_test_size(get_preset("shapes-cpu"), size), data)
        batch = [val[i][0] for i in range(min(images, len(val)))]
        forwards = {}
        for path in checkpoints:
            for kernel in kernels or [None]:
                model, predictor = load_model(path, device="cpu")
                if kernel is not None:
                    set_istr_kernel(model, kernel)
                name = path if kernel is None else f"{path} [{kernel}]"
                forwards[name] = _istr_forward(
                    model, maskness_power=predictor.config.model.maskness_power)
        times = time_interleaved(forwards, batch)
        result[size] = {path: statistics.median(t) for path, t in times.items()}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", nargs="+", required=True)
    parser.add_argument("--sizes", default="224,240", help="test sizes, comma-separated")
    parser.add_argument("--data", help="data set root with val/ (default: the built-in shapes)")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kernels", help="CPU RoIAlign kernels to time each checkpoint with, "
                        f"comma-separated, of {', '.join(KERNELS)} (default: the pooler's choice)")
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    from istr_viz.errors import IstrVizError

    try:
        sizes = [int(s) for s in args.sizes.split(",")]
        kernels = args.kernels.split(",") if args.kernels else None
        result = time_checkpoints(args.checkpoints, sizes, args.data, args.images, args.threads,
                                  kernels)
    except (IstrVizError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for size, row in result.items():
        print(f"{size} px: " + ", ".join(f"{path} {ms:.1f} ms" for path, ms in row.items()))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(
            {"threads": args.threads, "images": args.images, "kernels": args.kernels,
             "ms_per_image": result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
