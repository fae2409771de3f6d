#!/bin/bash
# test_concurrency.sh — 8 connections x 32 requests in flight on one export (issue 15 item 7):
# unaligned writes, zeroes, trims, FUA writes, flushes and reads racing into shared blocks
# (inflight.py: every read and the final contents checked against the model), while the CLI
# works on the same pool (ls, inspect, snapshots of the served container, done by the server),
# then a restart: the data is still the model's, and fsck is clean.
source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"
requires /usr/bin/python3 -c 'import nbd'
requires nbdcopy

pool=$tmp/pool
nbd() { uri "$1" "$server_sock"; }
layer init >/dev/null
make_image "$tmp/base.raw" 32 9
layer image import base:1 "$tmp/base.raw" >/dev/null
layer clone base:1 c >/dev/null
start_server srv "$pool" --threads 32
# Held open from here, so that every snapshot below is the server's (live): with the container
# not yet open, `layer snapshot` would take it offline for a moment and an open then would fail.
hold_connection "$(nbd c)"
seed=${LAYER_TEST_SEED:-$RANDOM}
background inflight /usr/bin/python3 "$LAYER_SRC/tests/integration/inflight.py" "$(nbd c)" 8 32 \
  1500 "$seed"
inflight_pid=$bg_pid
# The CLI beside it: reads of the index, and live snapshots (taken by the server, writes paused
# for each) while the requests race.
snaps=0
while pid_alive "$inflight_pid"; do
  layer ls >/dev/null || fail "layer ls while serving"
  layer inspect c >/dev/null || fail "layer inspect while serving"
  layer snapshot c "s$snaps" >/dev/null || fail "live snapshot $snaps"
  snaps=$((snaps + 1))
  ((snaps < 20)) || break
  sleep 0.2
done
wait "$inflight_pid" || fail "$(cat "$tmp/inflight.log") (replay: LAYER_TEST_SEED=$seed)"
log "$(cat "$tmp/inflight.log"); $snaps live snapshots meanwhile"
h=$(nbdcopy "$(nbd c)" - | sha256sum)
kill_pid "$holder_pid"
stop_server srv
rm -f "$tmp/srv.sock"
start_server srv "$pool"
[[ "$(nbdcopy "$(nbd c)" - | sha256sum)" == "$h" ]] || fail "c changed across a restart"
stop_server srv
layer fsck >/dev/null || fail "fsck: $(layer fsck 2>&1)"
log "ok"
