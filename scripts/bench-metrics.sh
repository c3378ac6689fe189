#!/usr/bin/env bash
# Metrics benchmark, side by side on the same files in one run: `evald score` (all metrics:
# overlap, per-slice, surface distances, lesions, patient level) against the peers named in
# METRICS.md, installed with pip in a throwaway venv (.bench/venv, gitignored):
#   DeepMind surface-distance, MONAI (+ torch), nnU-Net v2 (compute_metrics_on_folder,
#   compared with `evald score --no-surface`), MedPy optionally (about 72 s per case).
# Prints per-case times, ratios and peak RSS (/usr/bin/time -v). Not a test: nothing fails
# when a target is missed; the numbers are for the README.
#
# Usage: scripts/bench-metrics.sh [-n N] [--peers "deepmind monai nnunet medpy"]
#                                 [--shape "512 512 160"] [--seed S] [--no-install]
# Environment: LIBTORCH as for every cargo command (only when target/release/evald is missing).
set -euo pipefail
cd "$(dirname "$0")/.."

N=4
PEERS="deepmind monai nnunet"
SHAPE="512 512 160"
SEED=5678
INSTALL=1
while [ $# -gt 0 ]; do
    case "$1" in
        -n|--n) N="$2"; shift 2 ;;
        --peers) PEERS="$2"; shift 2 ;;
        --shape) SHAPE="$2"; shift 2 ;;
        --seed) SEED="$2"; shift 2 ;;
        --no-install) INSTALL=0; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

VENV=.bench/venv
PY=$VENV/bin/python
DATA=.bench/data/n${N}_${SHAPE// /x}_seed${SEED}
OUT=.bench/out/n${N}_${SHAPE// /x}_seed${SEED}
EVALD=target/release/evald
mkdir -p "$OUT"

have() { "$PY" -c "import $1" >/dev/null 2>&1; }
pipi() { "$VENV/bin/pip" install -q -c bench/VERSIONS.txt "$@"; }

# --- 1. peers in a throwaway venv (versions pinned by bench/VERSIONS.txt) -------------
if [ ! -x "$PY" ]; then python3 -m venv "$VENV"; fi
if [ "$INSTALL" = 1 ]; then
    have nibabel && have surface_distance || pipi numpy scipy nibabel surface-distance
    case " $PEERS " in *" monai "*|*" nnunet "*)
        have monai || pipi torch monai || echo "WARN: torch/monai install failed" >&2 ;;
    esac
    case " $PEERS " in *" nnunet "*)
        # nnunetv2 pulls a training stack; the evaluation needs only these (bench/VERSIONS.txt)
        have nnunetv2 || {
            pipi --no-deps nnunetv2 batchgenerators dynamic-network-architectures &&
            pipi acvl-utils scikit-image blosc2 SimpleITK tifffile pandas
        } || echo "WARN: nnunetv2 install failed" >&2 ;;
    esac
    case " $PEERS " in *" medpy "*) have medpy || pipi MedPy || echo "WARN: MedPy install failed" >&2 ;; esac
fi

# --- 2. data --------------------------------------------------------------------------
if [ ! -f "$DATA/cases.json" ]; then
    echo "generating $N phantom cases $SHAPE (seed $SEED) in $DATA" >&2
    # shellcheck disable=SC2086
    "$PY" bench/gen_phantoms.py --n "$N" --shape $SHAPE --seed "$SEED" --out "$DATA" --workers 2 >&2
fi

# --- 3. evald -------------------------------------------------------------------------
if [ ! -x "$EVALD" ]; then
    : "${LIBTORCH:?set LIBTORCH (see the README) or build target/release/evald first}"
    cargo build --release >&2
fi

timed() { # timed NAME CMD...: wall seconds to $OUT/NAME.wall, /usr/bin/time -v to $OUT/NAME.time
    local name=$1; shift
    local t0 t1
    t0=$(date +%s.%N)
    /usr/bin/time -v -o "$OUT/$name.time" "$@" >"$OUT/$name.log" 2>&1 || {
        echo "WARN: $name failed, see $OUT/$name.log" >&2; return 0; }
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc -l >"$OUT/$name.wall"
}

SCORE=(score --labels "$DATA/labelsTs" --predictions "$DATA/predictions" --classes 1,2)
ALL=(--lesion-classes 2 --positive-class 2)
"$EVALD" "${SCORE[@]}" "${ALL[@]}" --out "$OUT/warmup.json" >/dev/null 2>&1 # page cache, as for the peers
timed evald_startup "$EVALD" --version
timed evald "$EVALD" "${SCORE[@]}" "${ALL[@]}" --out "$OUT/evald.json"
timed evald_nosurface "$EVALD" "${SCORE[@]}" --no-surface --out "$OUT/evald-nosurface.json"
# one process per case as well (each includes process start)
for f in "$DATA"/labelsTs/*.nii.gz; do
    c=$(basename "$f" .nii.gz)
    d=$OUT/single/$c
    mkdir -p "$d/l" "$d/p"
    ln -sf "$(realpath "$f")" "$d/l/$c.nii.gz"
    ln -sf "$(realpath "$DATA/predictions/$c.nii.gz")" "$d/p/$c.nii.gz"
    timed "evald_case_$c" "$EVALD" score --labels "$d/l" --predictions "$d/p" --classes 1,2 \
        "${ALL[@]}" --out "$d/summary.json"
done

# --- 4. peers -------------------------------------------------------------------------
for p in $PEERS; do
    echo "running peer $p" >&2
    timed "$p" "$PY" "bench/peers/${p}_eval.py" "$DATA/labelsTs" "$DATA/predictions" 1,2 "$OUT/peer-$p.json"
done

# --- 5. report ------------------------------------------------------------------------
"$PY" - "$OUT" "$N" "$PEERS" <<'EOF'
import json, math, os, re, sys
out, n, peers = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()

def rd(name, ext):
    p = os.path.join(out, f"{name}.{ext}")
    return open(p).read() if os.path.exists(p) else None

def wall(name):
    w = rd(name, "wall")
    return float(w) if w else None

def rss_mb(name):
    t = rd(name, "time")
    m = t and re.search(r"Maximum resident set size \(kbytes\): (\d+)", t)
    return int(m.group(1)) / 1024 if m else None

def peer(p):
    f = os.path.join(out, f"peer-{p}.json")
    return json.load(open(f)) if os.path.exists(f) else None

ev = json.load(open(os.path.join(out, "evald.json")))
cases = sorted(os.path.basename(c["reference_file"])[:-7] for c in ev["metric_per_case"])
startup = wall("evald_startup") or 0.0
w_all, w_nos = wall("evald"), wall("evald_nosurface")
print(f"\n{n} cases; evald process start {startup:.3f} s (included in every evald number)")
hdr = f"{'case':<10} {'evald 1 case':>13}" + "".join(f" {p:>10}" for p in peers)
print(hdr)
P = {p: peer(p) for p in peers}
for c in cases:
    row = f"{c:<10} {wall('evald_case_' + c) or float('nan'):>13.3f}"
    for p in peers:
        pc = (P[p] or {}).get("timing", {}).get("per_case_s") or {}
        row += f" {pc.get(c, float('nan')):>10.3f}"
    print(row)
per_case = w_all / n
print(f"\nevald, all metrics (overlap, per-slice, HD/HD95/ASSD/NSD, lesions, patient level):"
      f" {w_all:.3f} s for {n} cases = {per_case:.3f} s/case, peak RSS {rss_mb('evald'):.0f} MB")
print(f"evald --no-surface: {w_nos:.3f} s = {w_nos / n:.3f} s/case, peak RSS {rss_mb('evald_nosurface'):.0f} MB")
for p in peers:
    d = P[p]
    if not d:
        print(f"{p}: no result (see {out}/{p}.log)")
        continue
    t = d["timing"]
    base = w_nos / n if p == "nnunet" else per_case
    what = "evald --no-surface" if p == "nnunet" else "evald all metrics"
    print(f"{p:<9} {t['per_case_mean_s']:.3f} s/case (run {t['run_s']:.1f} s + import {t['import_s']:.1f} s), "
          f"peak RSS {rss_mb(p) or float('nan'):.0f} MB -> {what} is {t['per_case_mean_s'] / base:.1f}x faster per case"
          f" ({t['total_s'] / (w_nos if p == 'nnunet' else w_all):.1f}x end to end)")

# agreement on these files (the conformance tests check real data; this is a sanity check)
def ours(c, l, k):
    for m in ev["metric_per_case"]:
        if m["reference_file"].endswith(f"/{c}.nii.gz"):
            return m["metrics"][str(l)].get(k)

for p, pairs in [("monai", [("hd95_mm", "HD95"), ("assd_mm", "ASSD"), ("nsd_1mm", "NSD_voxel")]),
                 ("deepmind", [("nsd_1mm", "NSD")]), ("medpy", [("hd95_mm", "HD95_pooled"), ("assd_mm", "ASSD")])]:
    d = P.get(p)
    if not d:
        continue
    for pk, ok in pairs:
        diffs = []
        for c, ls in d["cases"].items():
            for l, v in ls.items():
                a, b = ours(c, l, ok), v.get(pk)
                if isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isfinite(b):
                    diffs.append(abs(a - b))
        if diffs:
            print(f"agreement {ok} vs {p} {pk}: max |diff| {max(diffs):.2e} over {len(diffs)} case/labels")
EOF
