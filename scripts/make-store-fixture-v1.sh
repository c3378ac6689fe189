#!/usr/bin/env bash
# Builds tests/data/store/v1.db.gz: a state database written by the evald release whose
# store schema is version 1 (commit a79fd74), for the migration test in tests/it/daemon.rs
# (`a_version_1_store_migrates_in_place`). See tests/data/store/PROVENANCE.md.
#
# usage: scripts/make-store-fixture-v1.sh EVALD_BINARY_OF_THAT_RELEASE OUT.db.gz
#
# Every row is written by that binary itself (no SQL written by hand):
#   #1 thyroid-ca/demo-vendor/v1      evaluated and mailed (file transport: outbox row sent),
#                                     then `evald requeue 1`: queued again
#   #2 thyroid-ca/demo-vendor/v1-copy the same model again: rejected (duplicate)
#   #3 thyroid-b/demo-vendor/v1       evaluated while the SMTP server is down: mailed, its
#                                     email queued in the outbox (never sent)
set -euo pipefail
EVALD=$(realpath "$1")
OUT=$(realpath -m "$2")
W=$(mktemp -d)
PID=
cleanup() { if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; fi; rm -rf "$W"; }
trap cleanup EXIT

# The demo makes a phantom test set, a model and a configuration; its own state is dropped.
"$EVALD" demo --cases 2 --size 48,48,12 --out "$W/demo" >"$W/demo.out"
CFG=$W/demo/evald.toml
DROP=$W/demo/drop
mkdir "$W/model"
cp "$DROP/thyroid-ca/demo-vendor/v1/model.pt" "$DROP/thyroid-ca/demo-vendor/v1/submission.toml" "$W/model/"
rm -rf "$DROP" "$W/demo/state" "$W/demo/outbox"
mkdir -p "$DROP"

# $1: file | smtp. No attachment (a small fixture); a second task on the same test set.
config_mail() {
  python3 - "$CFG" "$1" <<'PY'
import socket, sys
cfg, mode = sys.argv[1], sys.argv[2]
t = open(cfg).read()
t = t[:t.index('[tasks.thyroid-ca]')]
if '[mail]' in t:
    t = t[:t.index('[mail]')]
task = open(cfg).read()[len(open(cfg).read().split('[tasks.thyroid-ca]')[0]):].split('[tasks.thyroid-b]')[0]
mail = '[mail]\nfrom = "evald demo <evald@localhost>"\nattach_max_mb = 0\n'
if mode == 'file':
    mail += 'transport = "file"\noutbox_dir = "' + cfg.rsplit('/', 1)[0] + '/outbox"\n'
else:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    mail += f'transport = "smtp"\nsmtp_host = "127.0.0.1"\nsmtp_port = {port}\nsmtp_security = "none"\nsmtp_timeout_secs = 5\n'
open(cfg, 'w').write(t + mail + '\n' + task + '\n' + task.replace('[tasks.thyroid-ca]', '[tasks.thyroid-b]'))
PY
}

serve() {
  "$EVALD" serve --config "$CFG" 2>>"$W/serve.log" &
  PID=$!
  for _ in $(seq 600); do grep -q "evald ready" "$W/serve.log" && return; sleep 0.1; done
  cat "$W/serve.log"; exit 1
}
stop() { kill -TERM "$PID"; wait "$PID" || true; PID=; : >"$W/serve.log"; }
deliver() { # deliver the model to $1 the way vendors are told to (copy aside, rename in)
  rm -rf "$DROP/.upload"; mkdir -p "$DROP/.upload" "$(dirname "$DROP/$1")"
  cp "$W/model/"* "$DROP/.upload/"; mv "$DROP/.upload" "$DROP/$1"
}
wait_counts() { # wait_counts mailed N rejected M
  for _ in $(seq 1200); do
    "$EVALD" status --json --config "$CFG" | python3 -c '
import json, sys
v = json.load(sys.stdin); want = sys.argv[1:]
c = dict(v["counts"]) if v else {}
sys.exit(0 if all(c.get(want[i], 0) == int(want[i + 1]) for i in range(0, len(want), 2)) else 1)' "$@" && return
    sleep 0.1
  done
  cat "$W/serve.log"; exit 1
}

config_mail file
serve
deliver thyroid-ca/demo-vendor/v1
wait_counts mailed 1
deliver thyroid-ca/demo-vendor/v1-copy
wait_counts mailed 1 rejected 1
stop

config_mail smtp
serve
deliver thyroid-b/demo-vendor/v1
wait_counts mailed 2 rejected 1
stop

"$EVALD" requeue 1 --config "$CFG"
"$EVALD" status --config "$CFG"
rm -f "$W/v1.db"
sqlite3 "$W/demo/state/evald.db" "VACUUM INTO '$W/v1.db'"
gzip -9 -n -c "$W/v1.db" >"$OUT"
echo "wrote $OUT ($(stat -c %s "$OUT") bytes)"
