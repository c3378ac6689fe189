#!/usr/bin/env bash
# Installs ONNX Runtime's shared library (what the `ort` crate's api-31 needs: >= 1.31) from
# the registry's onnxruntime wheel into .onnxruntime/lib. Only the C library is taken from
# the wheel (not its Python bindings), so any python3 with pip can fetch it, whatever its
# version. evald dlopens it at run time (src/infer/onnx.rs); the path below is compiled in
# as the default (build.rs), so neither the tests nor `target/*/evald` need ORT_DYLIB_PATH.
#
# Usage: scripts/setup-onnxruntime.sh          CPU build (onnxruntime, ~28 MB download)
#        scripts/setup-onnxruntime.sh --gpu    CUDA build (onnxruntime-gpu: adds the CUDA
#          execution provider, libonnxruntime_providers_cuda.so; it loads cuDNN 9, cuBLAS,
#          cuFFT and cuRAND for CUDA 13 from the system or LD_LIBRARY_PATH, the same
#          libraries libtorch's CUDA build uses)
# Idempotent: does nothing when the wanted build is already there. No root, no venv.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.onnxruntime/lib
stamp=.onnxruntime/installed
if [ "${1:-}" = "--gpu" ] || [ "${EVALD_ORT_GPU:-}" = 1 ]; then
  want="onnxruntime-gpu==1.31.1"
else
  want="onnxruntime==1.32.0"
fi
version=${want#*==}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -f "$dest/libonnxruntime.so.$version" ]; then
  exit 0
fi
command -v python3 >/dev/null || { echo "setup-onnxruntime: python3 is required (apt-get install python3 python3-pip)" >&2; exit 1; }
python3 -m pip --version >/dev/null 2>&1 || { echo "setup-onnxruntime: pip is required (apt-get install python3-pip)" >&2; exit 1; }
echo "setup-onnxruntime: installing $want's libraries into $dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The wheel for one CPython (3.11, manylinux 2.28) whatever python3 runs here: its C library
# does not depend on the interpreter.
python3 -m pip download --quiet --disable-pip-version-check --no-cache-dir --no-deps \
  --only-binary=:all: --python-version 3.11 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --dest "$tmp" "$want"
rm -rf "$dest" "$stamp"
mkdir -p "$dest"
python3 - "$tmp" "$dest" <<'EOF'
import glob, os, shutil, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(os.path.join(tmp, "*.whl"))
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        # libonnxruntime.so.X.Y.Z and the execution-provider libraries it dlopens
        # (providers_shared; providers_cuda / providers_tensorrt in the GPU build).
        if name.startswith("onnxruntime/capi/lib") and ".so" in base:
            with z.open(name) as src, open(os.path.join(dest, base), "wb") as dst:
                shutil.copyfileobj(src, dst)
EOF
test -f "$dest/libonnxruntime.so.$version"
ln -sf "libonnxruntime.so.$version" "$dest/libonnxruntime.so"
echo "$want" > "$stamp"
echo "setup-onnxruntime: done ($(du -sh .onnxruntime | cut -f1))"
