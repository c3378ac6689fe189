#!/usr/bin/env bash
# Test-only helpers the integration tests use, installed into ignored folders of the repo
# (no root needed, idempotent: a second run does nothing).
#
# - aiosmtpd (PyPI) in .venv-test/aiosmtpd: the real SMTP server the mail tests start on
#   loopback (tests/it/smtp_sink.py). Python 3 + pip are enough; Debian's python3-aiosmtpd
#   works too when it is installed system-wide.
set -euo pipefail
cd "$(dirname "$0")/.."

AIOSMTPD_DIR=.venv-test/aiosmtpd
AIOSMTPD_VERSION=1.4.6
if PYTHONPATH="$AIOSMTPD_DIR" python3 -c 'import aiosmtpd, sys; sys.exit(aiosmtpd.__version__ != "'"$AIOSMTPD_VERSION"'")' 2>/dev/null; then
    echo "test-deps: aiosmtpd $AIOSMTPD_VERSION present in $AIOSMTPD_DIR"
else
    echo "test-deps: installing aiosmtpd $AIOSMTPD_VERSION into $AIOSMTPD_DIR"
    rm -rf "$AIOSMTPD_DIR"
    extra=()
    # Debian marks its Python externally managed; --target never touches it.
    if python3 -m pip install --help 2>/dev/null | grep -q -- --break-system-packages; then
        extra+=(--break-system-packages)
    fi
    python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
        "${extra[@]}" --target "$AIOSMTPD_DIR" "aiosmtpd==$AIOSMTPD_VERSION"
fi
