#!/usr/bin/env bash
# Test-only helpers the integration tests use, installed into ignored folders of the repo.
# (Nothing yet beyond libtorch; kept as the single place to add them.)
set -euo pipefail
cd "$(dirname "$0")/.."
exit 0
