#!/usr/bin/env bash
# Checks on a machine with a CUDA GPU and a dozen or more CPU cores, in one go (about 9 minutes):
#   bash scripts/gpu_check.sh OUTDIR [MINUTES]
# 1. the tests that exercise the model, the losses, training and checkpoints, with the GPU
#    visible (CUDA-only tests run rather than skip; "auto" devices pick the GPU);
# 2. the paper's coco-r50 preset (R50-FPN, 300 queries, 6 stages, batch 16, 480-800 px) for 30
#    iterations on the GPU, from scratch (BatchNorm: no ImageNet file here): seconds per
#    iteration and GPU memory;
# 3. `train` of shapes-cpu for MINUTES (default 2) on the built-in shapes and on the second data
#    set (benchmarks/make_second_dataset.py), one after the other, bf16 autocast;
# 4. a GPU-trained checkpoint opened and run on the CPU.
# Each step has its own time limit and log in OUTDIR; a failing step does not stop the others.
set -uo pipefail
OUT=${1:?usage: bash scripts/gpu_check.sh OUTDIR [MINUTES]}
MINUTES=${2:-2}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu: a dry run of the script itself
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
data=${DATA_DIR:-/tmp/istr_gpu_check}
mkdir -p "$data"
t_start=$SECONDS
step() {  # step NAME SECONDS COMMAND...: run one step with a limit, log it, print its status
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc in $((SECONDS - t0)) s (at $((SECONDS - t_start)) s)"
    tail -n 4 "$OUT/$name.log" | tr '\r' '\n' | tail -n 4 | cut -c1-400
}
evals() {  # evals RUN_DIR: one line per evaluation in its metrics.jsonl
    $PY - "$1/metrics.jsonl" <<'EOF'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
last = [r for r in recs if "eval" not in r]
for r in recs:
    if "eval" in r:
        e = r["eval"]
        print(f"  iter {r['iter']:>6}  {r['train_s'] / 60:5.2f} min  box {100 * e['bbox_AP']:5.1f}"
              f"  mask {100 * e['segm_AP']:5.1f}  stages "
              + " / ".join(f"{100 * a:.1f}" for a in e["per_stage_segm_AP"]))
if last:
    print(f"  trained {last[-1]['iter']} iterations in {last[-1].get('train_s', 0) / 60:.2f} min")
EOF
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -c "import torch, torchvision, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available(), 'bf16', torch.cuda.is_bf16_supported())"
    nproc
} 2>&1 | tee "$OUT/env.log"

# the data sets, written while the tests run
(step shapes_data 200 $PY -m istr_viz make-shapes --out "$data/shapes" >"$OUT/shapes_data.status") &
data_a=$!
(step second_data 200 $PY benchmarks/make_second_dataset.py --out "$data/second" >"$OUT/second_data.status") &
data_b=$!

# 1. tests (the app, notebook, live-plot and browser tests need packages that a GPU image may
#    lack: IPython, gradio, chromium)
[ -n "${SKIP_TESTS:-}" ] || step tests 150 env OMP_NUM_THREADS=1 $PY -m pytest -q -p no:cacheprovider --timeout 150 \
    -n 8 tests/test_checkpoint.py tests/test_basis.py tests/test_engine.py tests/test_roi_align.py \
    tests/test_losses.py tests/test_matcher.py tests/test_predictor.py tests/test_evaluate.py \
    tests/test_denoising.py tests/test_boxes.py tests/test_cli.py
wait $data_a $data_b
cat "$OUT/shapes_data.status" "$OUT/second_data.status"

# 2. coco-r50 (training images only: no evaluation at the end)
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 >"$OUT/coco_mem.log" 2>&1 &
smi=$!
step coco_r50 120 $PY -m istr_viz train --train-ann "$data/shapes/train/annotations.json" \
    --train-images "$data/shapes/train/images" --out "$data/run_coco" \
    --preset coco-r50 --device "$DEVICE" --max-iters 30 --set train.warmup_iters=10 \
    --set data.num_workers=8 --set train.checkpoint_every=1000 --set model.norm=bn
kill $smi 2>/dev/null
$PY - "$data/run_coco/metrics.jsonl" <<'EOF'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip() and "eval" not in l]
t = [r["train_s"] for r in recs if "train_s" in r]
if len(t) > 11:
    print(f"coco-r50: {(t[-1] - t[10]) / (len(t) - 11):.3f} s per iteration (batch 16) after 10 warm-up"
          f" iterations; last loss {recs[-1].get('loss', float('nan')):.3f}")
EOF
echo "coco-r50 peak GPU memory (MiB, nvidia-smi): $(sort -n "$OUT/coco_mem.log" | tail -1)"

# 3. shapes-cpu on each data set, one after the other: trainings that share one GPU take turns
#    on it (four side by side ran at 1.2 s an iteration each, one alone at 0.2 s)
run() {  # run NAME DATA EXTRA...
    local name=$1 d=$2; shift 2
    step "$name" $((MINUTES * 60 + 150)) $PY -m istr_viz train --data "$d" --out "$data/run_$name" \
        --device "$DEVICE" --max-minutes "$MINUTES" --set train.eval_points=2 \
        --set data.num_workers=4 "$@"
    evals "$data/run_$name"
}
run shapes "$data/shapes"
run second "$data/second"

# 4. the GPU-trained checkpoint on the CPU
step cpu_load 60 $PY - "$data/run_shapes/last.pt" "$data/shapes/val" <<'EOF'
import json, sys, time
from pathlib import Path
from istr_viz import load_model
ckpt, val = sys.argv[1], Path(sys.argv[2])
model, predictor = load_model(ckpt, device="cpu")
assert all(not p.is_cuda for p in model.parameters())
name = json.loads((val / "annotations.json").read_text())["images"][0]["file_name"]
t = time.perf_counter()
pred = predictor.predict(val / "images" / name)
print(f"GPU-trained checkpoint ran on the CPU: {pred.num_stages} stages, "
      f"{len(pred.detections(score_threshold=0.3).scores)} detections above 0.3, "
      f"{(time.perf_counter() - t) * 1e3:.0f} ms")
EOF
for d in shapes second coco; do
    cp "$data/run_$d/metrics.jsonl" "$OUT/${d}_metrics.jsonl" 2>/dev/null
done
echo "== done in $((SECONDS - t_start)) s"
