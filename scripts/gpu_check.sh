#!/usr/bin/env bash
# Checks on a machine with a CUDA GPU and a dozen or more CPU cores, in one go (about 9 minutes;
# each step's own limit caps the whole at 15):
#   bash scripts/gpu_check.sh OUTDIR [MINUTES]
# 1. the tests that exercise the model, the losses, training and checkpoints, with the GPU
#    visible (CUDA-only tests run rather than skip; "auto" devices pick the GPU); in parallel
#    where pytest-xdist is installed;
# 2. the paper's coco-r50 preset (R50-FPN, 300 queries, 6 stages, batch 16, 480-800 px) for 30
#    iterations on the GPU, from scratch (model.norm=bn: no ImageNet file needed): seconds per
#    iteration and the GPU memory in use (nvidia-smi: the whole device, context and cache too);
# 3. `train` of shapes-cpu for MINUTES (whole minutes, default 2) on the built-in shapes and on
#    the second data set (benchmarks/make_second_dataset.py), one after the other;
# 4. the checkpoint step 3 trained on the GPU, opened and run on the CPU.
# Each step has its own time limit and log in OUTDIR; a failing step does not stop the others,
# and the script exits 1 if any failed. OUTDIR/summary.log holds what it printed.
# DEVICE=cpu SKIP_TESTS=1 bash scripts/gpu_check.sh DIR 1 dry-runs the script on a CPU (step 2
# is skipped there).
set -uo pipefail
outdir=${1:?usage: bash scripts/gpu_check.sh OUTDIR [MINUTES]}
minutes=${2:-2}
[[ $minutes =~ ^[1-9][0-9]*$ ]] || { echo "MINUTES must be a whole number, got '$minutes'" >&2; exit 2; }
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)
exec > >(tee "$outdir/summary.log") 2>&1
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
data=${DATA_DIR:-/tmp/istr_gpu_check}
mkdir -p "$data"
rm -rf "$data"/run_*  # no step may pass on an earlier invocation's files
t_start=$SECONDS
failed=0
step() {  # step NAME SECONDS COMMAND...: run one step with a limit, log it, print its status
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS rc
    timeout "$limit" "$@" >"$outdir/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc in $((SECONDS - t0)) s (at $((SECONDS - t_start)) s)"
    tail -n 4 "$outdir/$name.log" | tr '\r' '\n' | tail -n 4 | cut -c1-400
    return $rc
}
evals() {  # evals RUN_DIR: one line per evaluation in its metrics.jsonl, and the step time
    $PY - "$1/metrics.jsonl" <<'EOF'
import json, sys
from pathlib import Path
path = Path(sys.argv[1])
recs = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
for r in recs:
    if "eval" in r:
        e = r["eval"]
        print(f"  iter {r['iter']:>6}  {r['train_s'] / 60:5.2f} min  box {100 * e['bbox_AP']:5.1f}"
              f"  mask {100 * e['segm_AP']:5.1f}  stages "
              + " / ".join(f"{100 * a:.1f}" for a in e["per_stage_segm_AP"]))
t = [r["train_s"] for r in recs if "eval" not in r and "train_s" in r]
if len(t) > 11:  # train_s is cumulative training seconds, evaluations left out
    print(f"  {len(t)} iterations; {(t[-1] - t[10]) / (len(t) - 11):.3f} s an iteration after 10")
EOF
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -c "import torch, torchvision, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
    echo "cores: $(nproc)"
} 2>&1 | tee "$outdir/env.log"

# the data sets, written while the tests run
(step shapes_data 200 $PY -m istr_viz make-shapes --out "$data/shapes") &
data_a=$!
(step second_data 200 $PY benchmarks/make_second_dataset.py --out "$data/second") &
data_b=$!

# 1. tests (the app, notebook, live-plot and browser tests need IPython, gradio and chromium)
if [ -z "${SKIP_TESTS:-}" ]; then
    parallel=()
    $PY -c "import xdist" 2>/dev/null && parallel=(-n 8)
    step tests 200 env OMP_NUM_THREADS=1 $PY -m pytest -q -p no:cacheprovider --timeout 60 \
        "${parallel[@]}" tests/test_model.py tests/test_checkpoint.py tests/test_basis.py \
        tests/test_engine.py tests/test_roi_align.py tests/test_losses.py tests/test_matcher.py \
        tests/test_predictor.py tests/test_evaluate.py tests/test_denoising.py \
        tests/test_boxes.py tests/test_cli.py || failed=1
fi
wait $data_a || failed=1
wait $data_b || failed=1

# 2. coco-r50 (training images only: no evaluation at the end)
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 \
        >"$outdir/coco_mem.log" 2>&1 &
    smi=$!
    step coco_r50 150 $PY -m istr_viz train --train-ann "$data/shapes/train/annotations.json" \
        --train-images "$data/shapes/train/images" --out "$data/run_coco" \
        --preset coco-r50 --device cuda --max-iters 30 --set train.warmup_iters=10 \
        --set data.num_workers=8 --set train.checkpoint_every=1000 --set model.norm=bn \
        || failed=1
    kill $smi 2>/dev/null
    evals "$data/run_coco"
    echo "  most GPU memory in use (MiB, nvidia-smi): $(sort -n "$outdir/coco_mem.log" | tail -1)"
fi

# 3. shapes-cpu on each data set, one after the other (one training per GPU: four side by side
#    on one GPU and 16 cores ran at 1.2 s an iteration each, one alone at 0.16 s)
run() {  # run NAME DATA EXTRA...
    local name=$1 d=$2; shift 2
    step "$name" $((minutes * 60 + 150)) $PY -m istr_viz train --data "$d" \
        --out "$data/run_$name" --device "$DEVICE" --max-minutes "$minutes" \
        --set train.eval_points=2 --set data.num_workers=4 "$@" || failed=1
    evals "$data/run_$name"
}
run shapes "$data/shapes"
run second "$data/second" --from-scratch  # (without it: the shipped model's weights)

# 4. the GPU-trained checkpoint on the CPU
step cpu_load 60 $PY - "$data/run_shapes/last.pt" "$data/shapes/val" <<'EOF' || failed=1
import json, sys, time
from pathlib import Path
from istr_viz import load_model
from istr_viz.predictor import suggested_score_threshold
ckpt, val = sys.argv[1], Path(sys.argv[2])
model, predictor = load_model(ckpt, device="cpu")
threshold = suggested_score_threshold(predictor.metrics, fallback=0.3)
assert all(not p.is_cuda for p in model.parameters())
name = json.loads((val / "annotations.json").read_text())["images"][0]["file_name"]
t = time.perf_counter()
pred = predictor.predict(val / "images" / name)
print(f"the checkpoint ran on the CPU: {pred.num_stages} stages, "
      f"{len(pred.detections(score_threshold=threshold).scores)} detections at score >= {threshold}, "
      f"{(time.perf_counter() - t) * 1e3:.0f} ms")
EOF
for d in shapes second coco; do
    cp "$data/run_$d/metrics.jsonl" "$outdir/${d}_metrics.jsonl" 2>/dev/null
done
echo "== done in $((SECONDS - t_start)) s; $([ $failed = 0 ] && echo 'every step passed' || echo 'a step failed')"
exit $failed
