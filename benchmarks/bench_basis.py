"""Time ``MaskBasis.fit`` against scikit-learn's PCA on the same noisy-logit matrix.

    python benchmarks/bench_basis.py [--n 100000] [--dim 60] [--repeats 7] [--solver-sweep]

The masks are box-tight random ellipses and star polygons (28 x 28). The reference is
``PCA(n_components=dim, svd_solver="covariance_eigh").fit(X)`` on the float32 noisy-logit matrix
that ``MaskBasis.fit`` builds from the same seed (only the decomposition is timed); ours is the
whole fit: binarise, build the matrix, decompose, fingerprint. The runs alternate (ours, reference,
ours, ...) so that load on a shared machine hits both alike. Target: ours <= 1.3 x reference.
Results go to ``benchmarks/results/bench_basis.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.decomposition import PCA

from istr_viz.basis import MaskBasis, design_matrix
from istr_viz.data.instance_masks import synthetic_instance_masks

TARGET_RATIO = 1.3
RESULTS = Path(__file__).resolve().parent / "results" / "bench_basis.json"


def summary(times: list[float]) -> dict:
    return {"min_s": min(times), "median_s": statistics.median(times), "all_s": times}


def time_fits(masks: np.ndarray, X: np.ndarray, dim: int, seed: int, repeats: int) -> dict:
    """Alternate our fit and the reference decomposition ``repeats`` times each."""
    ours, reference, parts = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        basis = MaskBasis.fit(masks, dim=dim, seed=seed)
        ours.append(time.perf_counter() - start)
        parts.append(basis.fit_timings)
        start = time.perf_counter()
        pca = PCA(n_components=dim, svd_solver="covariance_eigh").fit(X)
        reference.append(time.perf_counter() - start)
    names = ("prepare_s", "decompose_s", "fingerprint_s")
    breakdown = {name: statistics.median(getattr(p, name) for p in parts) for name in names}
    breakdown["other_s"] = statistics.median(  # per run: wall time not in the three parts
        wall - sum(getattr(p, name) for name in names) for wall, p in zip(ours, parts, strict=True))
    return {"ours": summary(ours), "reference": summary(reference), "ours_breakdown": breakdown,
            "agreement": agreement(basis, pca),
            "ratio_min": min(ours) / min(reference),
            "ratio_median": statistics.median(ours) / statistics.median(reference),
            # adjacent runs see the same load: the median of per-pair ratios resists drift
            "ratio_paired_median": statistics.median(
                a / b for a, b in zip(ours, reference, strict=True))}


def agreement(basis: MaskBasis, pca: PCA) -> dict:
    """How far our basis is from the reference (components up to sign)."""
    dots = np.abs(np.sum(basis.components.numpy() * pca.components_, axis=1))
    ev = basis.explained_variance.numpy()
    return {"min_abs_component_dot": float(dots.min()),
            "max_rel_explained_variance_diff": float(np.max(np.abs(ev / pca.explained_variance_
                                                                  - 1)))}


def solver_sweep(dim: int, seed: int, repeats: int = 3) -> list[dict]:
    """Median fit time of each scikit-learn solver for a few (n masks, 784 pixels) shapes."""
    rows = []
    all_masks = synthetic_instance_masks(100_000, 28, seed=seed)
    for n in (200, 500, 2000, 20_000, 100_000):
        X = design_matrix(all_masks[:n].reshape(n, -1), "istr", np.random.default_rng(seed))
        row = {"n": n, "pixels": X.shape[1]}
        for solver in ("covariance_eigh", "randomized", "full"):
            if solver == "full" and n > 20_000:
                continue
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                PCA(n_components=min(dim, n), svd_solver=solver, random_state=seed).fit(X)
                times.append(time.perf_counter() - start)
            row[solver] = statistics.median(times)
        rows.append(row)
        print(f"  solver sweep n={n}: " + ", ".join(f"{k} {v:.3f}s" for k, v in row.items()
                                                    if k not in ("n", "pixels")))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="number of masks")
    parser.add_argument("--dim", type=int, default=60, help="basis components")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--solver-sweep", action="store_true",
                        help="also time every scikit-learn solver at a few sizes")
    parser.add_argument("--incremental", action="store_true",
                        help="also time the streamed IncrementalPCA fit (chunks of 4096)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    start = time.perf_counter()
    masks = synthetic_instance_masks(args.n, 28, seed=args.seed)
    generate_s = time.perf_counter() - start
    X = design_matrix(masks.reshape(args.n, -1), "istr", np.random.default_rng(args.seed))
    print(f"{args.n} masks 28x28 generated in {generate_s:.2f}s (foreground {masks.mean():.2f}); "
          f"X {X.shape} {X.dtype}")
    MaskBasis.fit(masks[:2000], dim=args.dim)  # warm up imports and BLAS threads
    result = time_fits(masks, X, args.dim, args.seed, args.repeats)
    ours, ref = result["ours"], result["reference"]
    print(f"ours      min {ours['min_s']:.3f}s  median {ours['median_s']:.3f}s")
    print(f"reference min {ref['min_s']:.3f}s  median {ref['median_s']:.3f}s  "
          "(PCA covariance_eigh on the same matrix, decomposition only)")
    print("ours breakdown (median): " + ", ".join(
        f"{k[:-2]} {v:.3f}s" for k, v in result["ours_breakdown"].items()))
    print(f"ratio min/min {result['ratio_min']:.2f}  median/median {result['ratio_median']:.2f}"
          f"  median of paired runs {result['ratio_paired_median']:.2f}"
          f"  (target <= {TARGET_RATIO})")
    print(f"agreement: {result['agreement']}")
    report = {
        "n": args.n, "dim": args.dim, "mask_size": 28, "repeats": args.repeats,
        "generate_s": generate_s, **result, "target_ratio": TARGET_RATIO,
        "meets_target": result["ratio_paired_median"] <= TARGET_RATIO,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "numpy": np.__version__, "sklearn": sklearn.__version__,
                    "torch": torch.__version__, "load_average": os.getloadavg()},
    }
    if args.incremental:
        start = time.perf_counter()
        streamed = MaskBasis.fit(masks, dim=args.dim, seed=args.seed, chunk_size=4096)
        report["incremental_s"] = time.perf_counter() - start
        print(f"incremental (chunks of 4096): {report['incremental_s']:.2f}s")
        dots = (streamed.components[:10] * torch.from_numpy(
            PCA(args.dim, svd_solver="covariance_eigh").fit(X).components_[:10])).sum(1).abs()
        report["incremental_min_dot_top10"] = float(dots.min())
    if args.solver_sweep:
        report["solver_sweep"] = solver_sweep(args.dim, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
