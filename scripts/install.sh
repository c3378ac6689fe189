#!/usr/bin/env bash
# Install evald as a systemd service (README, "Administration"): the binary, the libtorch it
# links, the ONNX Runtime library it loads for ONNX models, the unit, sysusers.d and
# tmpfiles.d entries, and the example configuration (never over an existing one).
#
# libtorch goes beside the binary (<prefix>/lib/evald/{torch/lib,nvidia/cu13/lib}, the
# layout libtorch's own $ORIGIN rpath expects), where the binary's RUNPATH
# ($ORIGIN/../lib/evald/torch/lib) finds it: the service needs no LD_LIBRARY_PATH and never
# reads the build checkout. ONNX Runtime goes to <prefix>/lib/evald/onnxruntime, where evald
# looks for it beside its binary (src/infer/onnx.rs; ORT_DYLIB_PATH in the unit overrides it).
#
# Usage: make build && sudo scripts/install.sh
# Environment: PREFIX (/usr/local; the unit's ExecStart expects /usr/local/bin/evald),
#   DESTDIR (empty; a staging root), BIN (target/release/evald), UNIT_DIR (/etc/systemd/system)
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
BIN=${BIN:-target/release/evald}
UNIT_DIR=${UNIT_DIR:-/etc/systemd/system}
TORCH_LIB=.libtorch/site/torch/lib
CUDA_RT_LIB=.libtorch/site/nvidia/cu13/lib
ORT_LIB=.onnxruntime/lib

if [ ! -x "$BIN" ]; then
    echo "install: $BIN is missing: run 'make build' first (as yourself, not as root)" >&2
    exit 1
fi
if [ ! -f "$TORCH_LIB/libtorch_cpu.so" ]; then
    echo "install: no libtorch in $TORCH_LIB: run 'make setup' first" >&2
    exit 1
fi
if [ ! -e "$ORT_LIB/libonnxruntime.so" ]; then
    echo "install: no ONNX Runtime in $ORT_LIB: run 'make setup' first" >&2
    exit 1
fi

lib="$DESTDIR$PREFIX/lib/evald"
install -D -m 0755 "$BIN" "$DESTDIR$PREFIX/bin/evald"
mkdir -p "$lib/torch/lib" "$lib/nvidia/cu13/lib"
# Only the shared libraries (not the wheel's static archives or headers).
cp -a "$TORCH_LIB"/*.so* "$lib/torch/lib/"
cp -a "$CUDA_RT_LIB"/*.so* "$lib/nvidia/cu13/lib/"
# The library, its libonnxruntime.so link and the execution providers it dlopens from its
# own folder (the CUDA provider too, after setup-onnxruntime.sh --gpu).
mkdir -p "$lib/onnxruntime"
cp -a "$ORT_LIB"/*.so* "$lib/onnxruntime/"
install -D -m 0644 systemd/evald.service "$DESTDIR$UNIT_DIR/evald.service"
install -D -m 0644 systemd/evald.sysusers "$DESTDIR/usr/lib/sysusers.d/evald.conf"
install -D -m 0644 systemd/evald.tmpfiles "$DESTDIR/usr/lib/tmpfiles.d/evald.conf"
if [ -e "$DESTDIR/etc/evald/evald.toml" ]; then
    echo "install: keeping the existing $DESTDIR/etc/evald/evald.toml"
else
    install -D -m 0640 config/evald.toml "$DESTDIR/etc/evald/evald.toml"
fi
echo "install: $DESTDIR$PREFIX/bin/evald with libtorch and ONNX Runtime in $lib ($(du -sh "$lib" | cut -f1))"
if [ -z "$DESTDIR" ] && [ "$(id -u)" = 0 ]; then
    systemd-sysusers evald.conf
    systemd-tmpfiles --create evald.conf
    chgrp evald /etc/evald/evald.toml
    systemctl daemon-reload
    echo "install: next: edit /etc/evald/evald.toml, 'evald check-config --config /etc/evald/evald.toml', 'systemctl enable --now evald'"
fi
