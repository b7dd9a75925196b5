"""How fast does the demo answer? One prediction, then 20 at once, through gradio_client.

    python benchmarks/bench_app.py [--checkpoint FILE] [--data DIR] [--concurrent 20]

Starts ``python app.py`` on a free localhost port, waits until it serves, then times through
``gradio_client`` (submit to result, seconds): one warm-up prediction, one single prediction
(the "under 2 seconds" target), and ``--concurrent`` predictions submitted at once (Gradio's
queue runs them one after another; every one must succeed). Prints the median and the worst, and
writes benchmarks/results/bench_app.json. Each prediction runs the model on an example and draws
the overlay, the table and the per-stage grid.

Without ``--checkpoint`` it uses the shipped one, or, when there is none yet, an untrained
shapes-cpu model saved to a temporary folder (same architecture, so the same model time; its
detections are few at the default threshold, so drawing is lighter than with a trained model).
Run it on a quiet machine: other jobs on the cores make every figure larger.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "bench_app.json"
EXAMPLES = ["photo coins", "photo cat", "photo coffee", "photo astronaut"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def untrained_checkpoint(data_root: Path | None, out: Path) -> Path:
    """An untrained shapes-cpu checkpoint (basis fitted on the data's train masks), in the format
    ``engine.train`` writes."""
    import torch

    from istr_viz.basis import MaskBasis
    from istr_viz.checkpoint import save_checkpoint
    from istr_viz.config import get_preset
    from istr_viz.data.coco import load_annotations
    from istr_viz.data.instance_masks import instance_masks
    from istr_viz.data.layout import default_data_root, split_paths
    from istr_viz.model import build_model

    cfg = get_preset("shapes-cpu")
    ann = load_annotations(split_paths(data_root or default_data_root(), "train").ann_file)
    masks = instance_masks(ann, cfg.basis.mask_size, progress=False)[:5000]
    basis = MaskBasis.fit(masks, dim=cfg.basis.dim, recipe=cfg.basis.recipe)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(ann.class_names), basis)
    return save_checkpoint(out, model=model.state_dict(), config=cfg.to_dict(),
                           basis=basis.to_dict(), class_names=ann.class_names,
                           category_ids=ann.label_to_cat_id, metrics={})


def timed(client, label: str, threshold: float, stage: int) -> float:
    start = time.perf_counter()
    result = client.predict(label, stage, threshold, api_name="/predict_example")
    elapsed = time.perf_counter() - start
    if "detections" not in result[3]:
        raise RuntimeError(f"prediction failed: {result[3]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--data", type=Path, help="data set root (default: the built-in shapes)")
    parser.add_argument("--concurrent", type=int, default=20)
    parser.add_argument("--threshold", type=float, default=0.3)
    args = parser.parse_args()

    from gradio_client import Client

    from istr_viz.predictor import default_checkpoint

    tmp = tempfile.TemporaryDirectory()
    checkpoint = default_checkpoint(args.checkpoint, must_exist=False)
    untrained = not checkpoint.is_file()
    if untrained:
        print(f"no checkpoint at {checkpoint}: timing an untrained shapes-cpu model")
        checkpoint = untrained_checkpoint(args.data, Path(tmp.name) / "untrained.pt")
    from istr_viz.checkpoint import load_checkpoint

    stage = int(load_checkpoint(checkpoint)["config"]["model"]["num_stages"])  # the last one
    port = free_port()
    cmd = [sys.executable, "app.py", "--checkpoint", str(checkpoint), "--server-port", str(port)]
    if args.data:
        cmd += ["--data", str(args.data)]
    log = open(Path(tmp.name) / "app.log", "w")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    app = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        start = time.perf_counter()
        while True:
            if app.poll() is not None:
                raise SystemExit("the app exited:\n" + (Path(tmp.name) / "app.log").read_text())
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        startup = time.perf_counter() - start
        client = Client(url, verbose=False)
        warmup = timed(client, EXAMPLES[0], args.threshold, stage)
        single = timed(client, EXAMPLES[1], args.threshold, stage)

        def one(i: int) -> float:
            return timed(client, EXAMPLES[i % len(EXAMPLES)], args.threshold, stage)

        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrent) as pool:
            latencies = list(pool.map(one, range(args.concurrent)))
        wall = time.perf_counter() - start
    finally:
        app.terminate()
        app.wait(timeout=30)
        log.close()
    report = {
        "checkpoint": str(args.checkpoint or "shipped") + (" (untrained)" if untrained else ""),
        "cpu_count": os.cpu_count(), "startup_s": round(startup, 2),
        "warmup_s": round(warmup, 3), "single_s": round(single, 3),
        "concurrent": args.concurrent, "all_succeeded": len(latencies) == args.concurrent,
        "concurrent_median_s": round(statistics.median(latencies), 3),
        "concurrent_worst_s": round(max(latencies), 3),
        "concurrent_wall_s": round(wall, 2),
    }
    print(json.dumps(report, indent=2))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    tmp.cleanup()


if __name__ == "__main__":
    main()
