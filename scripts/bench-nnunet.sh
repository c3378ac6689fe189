#!/usr/bin/env bash
# evald's native nnU-Net runtime vs nnUNetPredictor (nnunetv2 2.8.1), side by side in one run:
# same machine, model folder, test images, device and threads. Prints per-stage totals for
# both (network; preprocessing + export) and the ratios nnU-Net / evald.
#
# Settings (environment):
#   BENCH_MODEL=tests/data/nnunet/tinyct/model/nnUNetTrainer__nnUNetPlansTiny__3d_fullres
#   BENCH_IMAGES=tests/data/nnunet/tinyct/imagesTs
#   BENCH_THREADS=2       torch threads on both sides
#   BENCH_DEVICE=cpu      cpu | cuda:0
#   BENCH_PYTHON=python3  interpreter used to create the venv
#   BENCH_REPEATS=3       runs per side, alternating nnU-Net / evald; the fastest of each is kept
#                         (a shared machine's load only ever adds time)
# Needs: Python 3 with venv; creates .bench/nnunet-venv (git-ignored, ~3 GB: torch 2.11.0 in
# full and nnunetv2 2.8.1) on first use. nnU-Net imports the torch package of .libtorch/site
# (PYTHONPATH), i.e. the very libtorch_cpu.so evald links: same kernels on both sides, whatever
# torch version the venv resolved.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${BENCH_MODEL:-tests/data/nnunet/tinyct/model/nnUNetTrainer__nnUNetPlansTiny__3d_fullres}
IMAGES=${BENCH_IMAGES:-tests/data/nnunet/tinyct/imagesTs}
THREADS=${BENCH_THREADS:-2}
DEVICE=${BENCH_DEVICE:-cpu}
PY=${BENCH_PYTHON:-python3}
REPEATS=${BENCH_REPEATS:-3}
VENV=.bench/nnunet-venv
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import nnunetv2, torch' 2>/dev/null; then
  echo "bench-nnunet: creating $VENV (torch 2.11.0 + nnunetv2 2.8.1, ~3 GB; a few minutes)" >&2
  mkdir -p .bench
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir \
    torch==2.11.0 nnunetv2==2.8.1
fi
cargo build --release --quiet --example nnunet_stages
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "bench-nnunet: $MODEL on $IMAGES, $DEVICE, $THREADS threads, best of $REPEATS" >&2
for r in $(seq "$REPEATS"); do
  OMP_NUM_THREADS=$THREADS PYTHONPATH="$PWD/.libtorch/site" "$VENV/bin/python" bench/nnunet_stages.py \
    "$MODEL" "$IMAGES" "$THREADS" "$DEVICE" | grep '^{"total"' >> "$out/nnunet.jsonl"
  OMP_NUM_THREADS=$THREADS target/release/examples/nnunet_stages "$MODEL" "$IMAGES" "$THREADS" "$DEVICE" \
    | grep '^{"load"' >> "$out/evald.jsonl"
  echo "bench-nnunet: run $r of $REPEATS done" >&2
done
python3 - "$out/nnunet.jsonl" "$out/evald.jsonl" <<'PY'
import json, sys
nn_runs = [json.loads(l)["total"] for l in open(sys.argv[1])]
ev_runs = [json.loads(l)["total"] for l in open(sys.argv[2])]
# Fastest run per stage and side.
nn = {k: min(r[k] for r in nn_runs) for k in ("pre", "network", "export")}
ev = {k: min(r[k] for r in ev_runs) for k in ("network", "pre_export")}
nn_rest = nn["pre"] + nn["export"]
rows = [
    ("network (sliding window, folds)", nn["network"], ev["network"]),
    ("preprocessing + export", nn_rest, ev["pre_export"]),
    ("whole case (image read)", nn["network"] + nn_rest, ev["network"] + ev["pre_export"]),
]
print(f"{'stage':34} {'nnU-Net s':>10} {'evald s':>10} {'nnU-Net/evald':>14}")
for name, a, b in rows:
    print(f"{name:34} {a:10.3f} {b:10.3f} {a / b if b else float('nan'):14.2f}")
print(f"nnU-Net detail: preprocessing {nn['pre']:.3f} s, export {nn['export']:.3f} s")
print(f"runs: {len(nn_runs)} per side; network per run nnU-Net "
      + ", ".join(f"{r['network']:.2f}" for r in nn_runs) + " s, evald "
      + ", ".join(f"{r['network']:.2f}" for r in ev_runs) + " s")
PY
