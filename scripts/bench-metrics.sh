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
            pipi --no-deps --no-warn-conflicts nnunetv2 batchgenerators dynamic-network-architectures &&
            pipi --no-warn-conflicts acvl-utils scikit-image blosc2 SimpleITK tifffile pandas
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
"$PY" - "$OUT" "$N" "$PEERS" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'EOF'
import json, math, os, re, sys
out, n, peers, load = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4]
nan = float("nan")

def rd(name, ext):
    p = os.path.join(out, f"{name}.{ext}")
    return open(p).read() if os.path.exists(p) else None

def wall(name):
    w = rd(name, "wall")
    return float(w) if w else nan

def tv(name, key):
    t = rd(name, "time")
    m = t and re.search(re.escape(key) + r": ([0-9.]+)", t)
    return float(m.group(1)) if m else nan

def rss_mb(name):
    return tv(name, "Maximum resident set size (kbytes)") / 1024

def cpu(name):
    return tv(name, "User time (seconds)") + tv(name, "System time (seconds)")

def scoring_wall(summary_path):
    # evald's own wall time for the evaluation (read, score, aggregate) without the process
    # start (loading libtorch): the counterpart of the peers' per-case loop timers.
    try:
        return dict(json.load(open(summary_path))["evald"]["run"]["timings"])["total_wall"]
    except (OSError, KeyError, ValueError):
        return nan

def peer(p):
    f = os.path.join(out, f"peer-{p}.json")
    return json.load(open(f)) if os.path.exists(f) else None

ev = json.load(open(os.path.join(out, "evald.json")))
cases = sorted(os.path.basename(c["reference_file"])[:-7] for c in ev["metric_per_case"])
P = {p: peer(p) for p in peers}
print(f"\n{n} cases; load average at the end {load} (2 cores: other work on the machine inflates every number)")
print("per-case seconds (evald: scoring wall time of a one-case run, process start excluded; peers: their per-case timer)")
print(f"{'case':<10} {'evald':>8}" + "".join(f" {p:>9}" for p in peers))
for c in cases:
    row = f"{c:<10} {scoring_wall(os.path.join(out, 'single', c, 'summary.json')):>8.3f}"
    for p in peers:
        pc = (P[p] or {}).get("timing", {}).get("per_case_s") or {}
        row += f" {pc.get(c, nan):>9.3f}"
    print(row)

e_in, e_wall, e_cpu = scoring_wall(os.path.join(out, "evald.json")), wall("evald"), cpu("evald")
s_in, s_wall, s_cpu = scoring_wall(os.path.join(out, "evald-nosurface.json")), wall("evald_nosurface"), cpu("evald_nosurface")
print(f"\nevald process start alone (loads libtorch): {wall('evald_startup'):.2f} s")
print("evald all metrics (overlap, per-slice, HD/HD95/HD95_pooled/ASSD/NSD/NSD_voxel, lesions, patient level):")
print(f"  scoring {e_in:.3f} s = {e_in / n:.3f} s/case; process {e_wall:.2f} s wall, {e_cpu:.2f} s CPU; peak RSS {rss_mb('evald'):.0f} MB")
print(f"evald --no-surface: scoring {s_in:.3f} s = {s_in / n:.3f} s/case; process {s_wall:.2f} s wall, {s_cpu:.2f} s CPU; peak RSS {rss_mb('evald_nosurface'):.0f} MB")
print("\nratios peer/evald: per case = peer's per-case loop vs evald's scoring wall; end to end = process wall"
      " (start and imports included); CPU = user+sys of the whole process")
for p in peers:
    d = P[p]
    if not d:
        print(f"  {p}: no result (see {out}/{p}.log)")
        continue
    t = d["timing"]
    if p == "nnunet":
        b_in, b_wall, b_cpu, b_rss, what = s_in, s_wall, s_cpu, rss_mb("evald_nosurface"), "evald --no-surface"
    else:
        b_in, b_wall, b_cpu, b_rss, what = e_in, e_wall, e_cpu, rss_mb("evald"), "evald all metrics"
    print(f"  {p:<9} {t['per_case_mean_s']:.3f} s/case, process {wall(p):.1f} s wall {cpu(p):.1f} s CPU, peak RSS {rss_mb(p):.0f} MB"
          f" | vs {what}: per case {t['per_case_mean_s'] / (b_in / n):.1f}x, end to end {wall(p) / b_wall:.1f}x,"
          f" CPU {cpu(p) / b_cpu:.1f}x, peak RSS {rss_mb(p) / b_rss:.1f}x")

# agreement on these files (the conformance tests check real data; this is a sanity check)
def ours(c, l, k):
    for m in ev["metric_per_case"]:
        if m["reference_file"].endswith(f"/{c}.nii.gz"):
            return m["metrics"][str(l)].get(k)

for p, pairs in [("monai", [("hd95_mm", "HD95"), ("assd_mm", "ASSD"), ("nsd_1mm", "NSD_voxel")]),
                 ("deepmind", [("nsd_1mm", "NSD")]), ("medpy", [("hd95_mm", "HD95_pooled"), ("assd_mm", "ASSD")]),
                 ("nnunet", [("dice", "Dice")])]:
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
