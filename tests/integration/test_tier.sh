#!/bin/bash
# test_tier.sh — `layer tier move` with a real server: a served container's frozen layers (its
# image layer and a snapshot layer) moved both ways while clients read and write, every read
# checked against digests taken before, and the server told to let go of the old files; the
# delta of a served container moved by its server, live, both ways, while four connections
# write, zero, trim and read it, every read checked against their models; an offline
# container's delta and snapshot layers moved; a crash (SIGKILL, LAYER_FAILPOINT) at each step
# of a move in the CLI and of a live move in the server, then a restart: data intact (what was
# flushed), exactly one file per layer, `layer fsck` clean (after --repair where needed), no
# orphan file.
source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"
requires nbdcopy
requires qemu-io
requires qemu-img
requires /usr/bin/python3 -c 'import nbd'

pool=$tmp/pool
export LAYER_POOL=$pool
restart() {
  rm -f "$tmp/srv.sock"
  start_server srv "$pool"
}
nbd() { uri "$1" "$server_sock"; }
digest() { nbdcopy "$(nbd "$1")" - | sha256sum | cut -c1-16; }
# The tier of layer ID, as `layer inspect c --json` reports it.
tier_of() {
  layer inspect c --json | json_get "[l for l in j['chain'] if l['layer'] == $1][0]['tier']"
}
# only_in ID TIER: the layer's file is in TIER and not in the other one.
only_in() {
  local other=ssd
  [[ "$2" == ssd ]] && other=hdd
  [[ "$(tier_of "$1")" == "$2" ]] || fail "layer $1: index says $(tier_of "$1"), want $2"
  [[ -e "$pool/tiers/$2/$1.layer" ]] || fail "layer $1: no file in $2"
  [[ ! -e "$pool/tiers/$other/$1.layer" ]] || fail "layer $1: a file left in $other"
}

layer init >/dev/null
make_image "$tmp/base.raw" 16 7
layer image import base:1 "$tmp/base.raw" >/dev/null
layer clone base:1 c >/dev/null
restart
qemu-io -f raw -c 'write -P 0x11 1M 2M' "$(nbd c)" >/dev/null
layer snapshot c s1 >/dev/null
qemu-io -f raw -c 'write -P 0x22 8M 1M' "$(nbd c)" >/dev/null
h_s1=$(digest c@s1)
h_base=$(sha256sum <"$tmp/base.raw" | cut -c1-16)
chain=$(layer inspect c --json | json_get '" ".join(str(l["layer"]) for l in j["chain"])')
read -r delta snap base <<<"$chain"
log "layers: delta $delta, snapshot $snap, base $base"

# Readers of the snapshot and of the image (a second container), and a writer of c, all while
# the frozen layers move both ways.
layer clone base:1 d >/dev/null
reader() {
  local n=0
  while [[ ! -e "$tmp/stop" ]]; do
    [[ "$(digest c@s1)" == "$h_s1" ]] || { echo "c@s1 read wrong"; exit 1; }
    [[ "$(digest d)" == "$h_base" ]] || { echo "d read wrong"; exit 1; }
    n=$((n + 1))
  done
  echo "$n rounds"
}
writer() {
  local i=0
  while [[ ! -e "$tmp/stop" ]]; do
    qemu-io -f raw -c "write -P $((i % 200 + 1)) $((12 + i % 4))M 64k" "$(nbd c)" >/dev/null
    i=$((i + 1))
  done
  echo "$i" >"$tmp/writes"
}
# A connection held open on c keeps its disk (reading both frozen layers) open throughout.
hold_connection "$(nbd c)"
background reader reader
reader_pid=$bg_pid
background writer writer
writer_pid=$bg_pid
for to in hdd ssd hdd; do
  out=$(layer tier move "$base" "$to" --json)
  [[ "$(json_get 'j["layers"][0]["moved"]' <<<"$out")" == True ]] || fail "move $base: $out"
  layer tier move "$snap" "$to" --rate 64M >/dev/null  # paced, as the policy's moves are
  only_in "$base" "$to"
  only_in "$snap" "$to"
done
touch "$tmp/stop"
wait "$reader_pid" || fail "reader: $(cat "$tmp/reader.log")"
wait "$writer_pid" || fail "writer: $(cat "$tmp/writer.log")"
log "reader: $(cat "$tmp/reader.log"), writer: $(cat "$tmp/writes") writes"
# The writer's last write to each of its four 1 MiB regions is what they read.
n=$(cat "$tmp/writes")
for r in 0 1 2 3; do
  last=-1
  for ((i = n - 1; i >= 0 && i >= n - 4; i--)); do ((i % 4 == r)) && last=$i && break; done
  ((last >= 0)) || continue
  qemu-io -f raw -c "read -P $((last % 200 + 1)) $((12 + r))M 64k" "$(nbd c)" | grep -q '^read' ||
    fail "region $r does not hold write $last"
done
[[ "$(digest c@s1)" == "$h_s1" ]] || fail "c@s1 changed"
# The server let go of the old files (its open disk switched to the new ones, told by the CLI;
# the others closed): none of its descriptors is a removed layer file.
deleted_layer_fds() { ls -l "/proc/$server_pid/fd" | grep -c '\.layer (deleted)' || true; }
wait_until 30 eval '[[ $(deleted_layer_fds) == 0 ]]' ||
  fail "nbdkit still holds removed layer files: $(ls -l "/proc/$server_pid/fd" | grep deleted)"
out=$(layer tier move "$base" ssd --json)
[[ "$(json_get 'j["layers"][0]["reloaded_by"]' <<<"$out")" == "[$server_pid]" ]] ||
  fail "the server did not reload layer $base: $out"
[[ "$(deleted_layer_fds)" == 0 ]] || fail "nbdkit holds the old file of layer $base right after"
layer tier move "$base" hdd >/dev/null

expect_user_error "move to no tier" layer tier move "$base" tape
expect_user_error "move an unknown image" layer tier move nope:1 hdd
expect_user_error "--rate 1x" layer tier move "$base" ssd --rate 1x

# A served container's delta is moved by its server, live (the held connection keeps c open):
# by container (its snapshot layer by the CLI) and by id.
by_of() { json_get "[l for l in j['layers'] if l['layer'] == $1][0]['$2']"; }
out=$(layer tier move c hdd --json)
[[ "$(by_of "$delta" by <<<"$out")" == "server pid $server_pid" ]] || fail "move c: $out"
[[ "$(by_of "$delta" moved <<<"$out")" == True ]] || fail "move c: $out"
[[ "$(by_of "$snap" by <<<"$out")" == cli ]] || fail "move c: $out"
only_in "$delta" hdd
only_in "$snap" hdd
out=$(layer tier move "$delta" ssd)
[[ "$out" == "moved layer $delta from hdd to ssd ("*" by the server (pid $server_pid), writes paused "*" ms" ]] ||
  fail "move $delta: $out"
only_in "$delta" ssd
[[ "$(digest c@s1)" == "$h_s1" ]] || fail "c@s1 changed"

# Four connections write, zero, trim and read their own quarters of c, every read checked
# against their models, while its delta moves between the tiers four times, live: no client
# sees an error or a wrong byte, before, during or after.
seed=${LAYER_TEST_SEED:-$RANDOM}
background writers /usr/bin/python3 "$LAYER_SRC/tests/integration/snapshot_model.py" writers \
  "$server_sock" c "$seed" "$tmp/stop-writers"
writers_pid=$bg_pid
wait_until 60 eval "[[ -e $tmp/stop-writers.ready ]] || ! pid_alive $writers_pid" || true
[[ -e "$tmp/stop-writers.ready" ]] || fail "the writers did not start: $(cat "$tmp/writers.log")"
for to in hdd ssd hdd ssd; do
  rate=()
  [[ "$to" == hdd ]] && rate=(--rate 32M)  # paced by the server (the control op's "rate")
  out=$(layer tier move "$delta" "$to" "${rate[@]}" --json)
  [[ "$(by_of "$delta" moved <<<"$out")" == True ]] || fail "live move to $to: $out"
  only_in "$delta" "$to"
  log "live move to $to: $(json_get '{k: j["layers"][0][k] for k in ("data_bytes", "pause_ms",
    "start_pause_ms", "catch_up_rounds", "caught_up_bytes")}' <<<"$out")"
done
touch "$tmp/stop-writers"
wait "$writers_pid" || fail "writers: $(cat "$tmp/writers.log")"
log "$(tail -n 1 "$tmp/writers.log")"

# A long live move (paced at 2 MiB/s) holds one of the control socket's workers; the server
# answers other requests meanwhile: a live snapshot of another served container (d) during it.
c_holder=$holder_pid
hold_connection "$(nbd d)"
d_holder=$holder_pid
background slowmove layer tier move "$delta" hdd --rate 2M --json
slow_pid=$bg_pid
sleep 0.3
out=$(layer snapshot d during-move --json)
pid_alive "$slow_pid" || fail "the paced move ended too soon to show anything: $(cat "$tmp/slowmove.log")"
[[ "$(json_get 'j["live"]' <<<"$out")" == True ]] || fail "d's snapshot was not live: $out"
wait "$slow_pid" || fail "paced live move: $(cat "$tmp/slowmove.log")"
[[ "$(json_get 'j["layers"][0]["by"]' <"$tmp/slowmove.log")" == "server pid $server_pid" ]] ||
  fail "the paced move was not the server's: $(cat "$tmp/slowmove.log")"
only_in "$delta" hdd
kill_pid "$d_holder"
holder_pid=$c_holder
kill_pid "$holder_pid"
h_c=$(digest c)
stop_server srv

# Offline: the container's own layers (its snapshot and delta) both ways, the image's layer.
layer tier move c ssd >/dev/null
only_in "$snap" ssd
only_in "$delta" ssd
layer tier move base:1 ssd >/dev/null
only_in "$base" ssd
restart
[[ "$(digest c)" == "$h_c" ]] || fail "c changed by the moves"
qemu-img compare -f raw -F raw "$(nbd d)" "$tmp/base.raw" >/dev/null || fail "d differs from base"
stop_server srv
layer fsck >/dev/null || fail "fsck: $(layer fsck 2>&1)"

# A crash at each step of a move of the image layer (from ssd to hdd), then a restart.
for failpoint in move.intent-committed move.copied move.verified move.switched; do
  rc=0
  LAYER_FAILPOINT=$failpoint "$LAYER_BIN" tier move "$base" hdd >/dev/null 2>&1 || rc=$?
  [[ "$rc" == 137 ]] || fail "$failpoint: tier move exited $rc, not killed at the failpoint"
  # Before any repair, fsck names the interrupted move.
  if layer fsck >"$tmp/fsck.out" 2>&1; then fail "$failpoint: fsck sees no interrupted move"; fi
  grep -q "move of layer $base" "$tmp/fsck.out" || fail "$failpoint: $(cat "$tmp/fsck.out")"
  layer fsck --repair >/dev/null
  layer fsck >/dev/null || fail "$failpoint: fsck after --repair: $(layer fsck 2>&1)"
  want=ssd
  [[ "$failpoint" == move.switched ]] && want=hdd
  only_in "$base" "$want"
  restart
  [[ "$(digest c)" == "$h_c" ]] || fail "$failpoint: c changed"
  [[ "$(digest c@s1)" == "$h_s1" ]] || fail "$failpoint: c@s1 changed"
  [[ "$(digest d)" == "$h_base" ]] || fail "$failpoint: d changed"
  stop_server srv
  # Back to ssd for the next round; the next run of a move also finishes what a crash left.
  layer tier move "$base" ssd >/dev/null
  only_in "$base" ssd
  log "$failpoint: ok"
done

# A server killed at each step of a live move of c's delta, a client connected and writes
# flushed: after a restart (whose pool open recovers the move) c reads what was flushed, the
# delta is in one tier (the new one only once the switch committed), fsck is clean.
pwrite_flush() {
  /usr/bin/python3 -c 'import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(bytes([int(sys.argv[2])]) * 262144, int(sys.argv[3]))
h.flush()
h.shutdown()' "$@"
}
for failpoint in move.intent-committed move.copied move.caught-up move.verified move.published \
  move.switched; do
  from=$(tier_of "$delta") to=hdd
  [[ "$from" == hdd ]] && to=ssd
  rm -f "$tmp/srv.sock"
  LAYER_FAILPOINT=$failpoint start_server srv "$pool"
  hold_connection "$(nbd c)"
  pwrite_flush "$(nbd c)" $((RANDOM % 255 + 1)) $((2 << 20))
  h_c=$(digest c)
  rc=0
  layer tier move "$delta" "$to" >"$tmp/move.out" 2>&1 || rc=$?
  [[ "$rc" != 0 ]] || fail "$failpoint: the live move succeeded although its server was killed"
  wait_until 10 eval "! pid_alive $server_pid" || fail "$failpoint: the server still runs"
  kill_pid "$holder_pid"
  stop_server srv
  want=$from
  [[ "$failpoint" == move.switched ]] && want=$to
  restart
  [[ "$(digest c)" == "$h_c" ]] || fail "$failpoint: c does not read what was flushed"
  [[ "$(digest c@s1)" == "$h_s1" ]] || fail "$failpoint: c@s1 changed"
  stop_server srv
  layer fsck >/dev/null || fail "$failpoint: fsck after the restart: $(layer fsck 2>&1)"
  only_in "$delta" "$want"
  log "$failpoint (a live move in the server): ok"
done
layer fsck --full >/dev/null || fail "fsck --full: $(layer fsck --full 2>&1)"
log "ok"
