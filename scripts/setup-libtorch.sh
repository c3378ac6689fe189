#!/usr/bin/env bash
# Installs libtorch 2.11.0 (what tch 0.24 links against) from the registry's torch wheel into
# .libtorch/site, with the two CUDA runtime wheels libtorch_cpu.so needs at load time.
# Idempotent: does nothing when the right version is already there. No root, no venv needed.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.libtorch/site
stamp=.libtorch/installed
want="torch==2.11.0 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -f "$dest/torch/lib/libtorch_cpu.so" ]; then
  exit 0
fi
command -v python3 >/dev/null || { echo "setup-libtorch: python3 is required (apt-get install python3 python3-pip)" >&2; exit 1; }
python3 -m pip --version >/dev/null 2>&1 || { echo "setup-libtorch: pip is required (apt-get install python3-pip)" >&2; exit 1; }
extra=()
# Debian marks its Python externally managed; --target never touches it, so opt out of the guard.
if python3 -m pip install --help 2>/dev/null | grep -q -- --break-system-packages; then
  extra+=(--break-system-packages)
fi
echo "setup-libtorch: installing $want into $dest (about 550 MB download)"
rm -rf "$dest" "$stamp"
mkdir -p "$dest"
# shellcheck disable=SC2086
python3 -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps \
  "${extra[@]}" --target "$dest" $want
test -f "$dest/torch/lib/libtorch_cpu.so"
echo "$want" > "$stamp"
echo "setup-libtorch: done ($(du -sh .libtorch | cut -f1))"
