#!/usr/bin/env bash
# evald run (worker pool) vs the original-style Python pipeline (bench/python_pipeline.py):
# same machine, same TorchScript model (tests/data/models/unet2d.pt), same phantom data
# (bench/gen_phantoms.py), same number of worker processes and threads per worker.
# Prints both wall times and the ratio python / evald.
#
# Settings (environment):
#   BENCH_N=12             cases
#   BENCH_SHAPE="256 256 64"  phantom grid X Y Z
#   BENCH_WORKERS=2        worker processes on both sides (Pool(N) / pool.workers)
#   BENCH_THREADS=1        torch threads per worker on both sides
#   BENCH_DEVICE=cpu       cpu | cuda:0
#   BENCH_BATCH=16         slices per forward on both sides
#   BENCH_PYTHON=python3   interpreter used to create the venv
# Needs: Python 3 with venv; creates .bench/venv (git-ignored, ~2.7 GB: torch 2.11.0 in full,
# numpy, scipy, nibabel, SimpleITK, pandas, openpyxl) on first use, and caches the phantom
# data in .bench/data-<N>-<shape>/.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${BENCH_N:-12}
SHAPE=${BENCH_SHAPE:-"256 256 64"}
WORKERS=${BENCH_WORKERS:-2}
THREADS=${BENCH_THREADS:-1}
DEVICE=${BENCH_DEVICE:-cpu}
BATCH=${BENCH_BATCH:-16}
PY=${BENCH_PYTHON:-python3}
B=.bench
VENV=$B/venv
MODEL=tests/data/models/unet2d.pt

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import torch, nibabel, SimpleITK, pandas, openpyxl, scipy' 2>/dev/null; then
  echo "bench: creating $VENV (torch 2.11.0 in full, ~2.7 GB; a few minutes)" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir \
    torch==2.11.0 numpy scipy nibabel SimpleITK pandas openpyxl
fi

tag="$N-$(echo "$SHAPE" | tr ' ' x)"
DATA=$B/data-$tag
if [ ! -f "$DATA/cases.json" ]; then
  echo "bench: generating $N phantoms of $SHAPE in $DATA" >&2
  rm -rf "$DATA"
  # shellcheck disable=SC2086
  "$VENV/bin/python" bench/gen_phantoms.py --n "$N" --shape $SHAPE --seed 5678 --out "$DATA" --workers 2 >/dev/null
fi

if [ -z "${EVALD_BIN:-}" ]; then
  cargo build --release --quiet
  EVALD_BIN=target/release/evald
fi

ROOT=$(pwd)/$B/run-$tag
rm -rf "$ROOT"
SUB=$ROOT/drop/thyroid-ca/bench/unet2d
mkdir -p "$SUB" "$ROOT/py-out"
cp "$MODEL" "$SUB/model.pt"
printf 'input = "slices2d"\noutput = "logits"\nbatch_size = %s\npad_multiple = 8\n' "$BATCH" > "$SUB/submission.toml"
cat > "$ROOT/evald.toml" <<EOF
[daemon]
drop_dir = "$ROOT/drop"
state_dir = "$ROOT/state"
log_dir = "$ROOT/logs"

[pool]
workers = $WORKERS
devices = ["$DEVICE"]
threads_per_worker = $THREADS
case_timeout_secs = 600

[tasks.thyroid-ca]
images = "$(pwd)/$DATA/imagesTs"
labels = "$(pwd)/$DATA/labelsTs"
classes = { 1 = "thyroid", 2 = "nodule" }
window = { level = 40, width = 400 }
input = "slices2d"
positive_class = 2
lesion_classes = [2]
EOF

now() { date +%s.%N; }
echo "bench: $N cases of $SHAPE, $WORKERS workers x $THREADS threads, device $DEVICE, batch $BATCH" >&2

t0=$(now)
EVALD_LOG=${EVALD_LOG:-info} "$EVALD_BIN" run "$SUB" --config "$ROOT/evald.toml" --task thyroid-ca \
  > "$ROOT/evald.out" 2> "$ROOT/evald.log"
t1=$(now)
evald_s=$(echo "$t1 - $t0" | bc -l)
grep -E "pool: model forward" "$ROOT/evald.log" | tail -1 >&2 || true

t0=$(now)
"$VENV/bin/python" bench/python_pipeline.py --data "$DATA" --model "$MODEL" --out "$ROOT/py-out" \
  --device "$DEVICE" --workers "$WORKERS" --threads "$THREADS" --batch "$BATCH" > "$ROOT/python.json"
t1=$(now)
python_s=$(echo "$t1 - $t0" | bc -l)

py_fwd=$("$VENV/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["sum_forward_s"])' "$ROOT/python.json")
printf 'evald run (pool)        : %8.2f s wall\n' "$evald_s"
printf 'python_pipeline.py      : %8.2f s wall (summed forward %s s)\n' "$python_s" "$py_fwd"
printf 'ratio python / evald    : %8.2f x\n' "$(echo "$python_s / $evald_s" | bc -l)"
grep -E '^  (thyroid|nodule)' "$ROOT/evald.out" >&2 || true
"$VENV/bin/python" -c 'import json,sys; print("python mean Dice:", json.load(open(sys.argv[1]))["mean_dice"])' "$ROOT/python.json" >&2
