#!/bin/bash
# test_snapshot_crash.sh — a crash (SIGKILL, through the test-only LAYER_FAILPOINT) at each step
# of snapshot, commit, rollback, snapshot rm and its merge, flatten, in the CLI and in a server
# making a live change (its new delta made, its change committed): after a restart every point
# (container and snapshots) reads either its old or its new content, never a mix, and
# `layer fsck` is clean (after --repair where an interrupted merge or change must be rolled
# back); `layer gc` then finishes what was left.
source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"
requires nbdcopy
requires qemu-io
requires /usr/bin/python3 -c 'import nbd'

# stop_server kills by PID, leaving the socket behind.
restart() {
  rm -f "$tmp/srv.sock"
  start_server srv "$LAYER_POOL"
}
uri() { echo "nbd+unix:///$1?socket=$server_sock"; }
digest() { nbdcopy "$(uri "$1")" - | sha256sum | cut -c1-16; }

# A pool with container c: snapshots s1 and s2 and a head, each with its own writes.
setup() {
  rm -rf "$tmp/pool"
  export LAYER_POOL=$tmp/pool
  "$LAYER_BIN" init >/dev/null
  truncate -s 8M "$tmp/base.raw"
  printf 'base' | dd of="$tmp/base.raw" bs=1 seek=8192 conv=notrunc status=none
  "$LAYER_BIN" image import base:1 "$tmp/base.raw" >/dev/null
  "$LAYER_BIN" clone base:1 c >/dev/null
  restart
  qemu-io -f raw -c 'write -P 0x11 0 1M' "$(uri c)" >/dev/null
  "$LAYER_BIN" snapshot c s1 >/dev/null
  qemu-io -f raw -c 'write -P 0x22 512k 1M' "$(uri c)" >/dev/null
  "$LAYER_BIN" snapshot c s2 >/dev/null
  qemu-io -f raw -c 'write -P 0x33 3M 4k' "$(uri c)" >/dev/null
  h_c=$(digest c) h_s1=$(digest c@s1) h_s2=$(digest c@s2)
  stop_server srv
}

# expect POINT WANT...: after a restart, POINT reads one of the WANT digests.
expect() {
  local point=$1 got
  shift
  got=$(digest "$point")
  for want in "$@"; do [[ "$got" == "$want" ]] && return 0; done
  fail "$failpoint: $point reads $got, want one of $*"
}

# killed_by_failpoint POINT CMD...: runs the CLI with the failpoint; it must die of SIGKILL.
killed_by_failpoint() {
  local rc=0
  LAYER_FAILPOINT=$1 "${@:2}" >/dev/null 2>&1 || rc=$?
  [[ "$rc" == 137 ]] || fail "$1: '${*:2}' exited $rc, not killed at the failpoint"
}

fsck_clean() {
  local out
  if ! out=$("$LAYER_BIN" fsck 2>&1); then
    "$LAYER_BIN" fsck --repair >/dev/null 2>&1 || true
    out=$("$LAYER_BIN" fsck 2>&1) || fail "$failpoint: fsck after --repair: $out"
  fi
}

for failpoint in snapshot.committed commit.committed rollback.committed snapshot-rm.committed \
  merge.intent-committed merge.built merge.switched flatten.built; do
  setup
  case $failpoint in
    snapshot.committed) killed_by_failpoint "$failpoint" "$LAYER_BIN" snapshot c s3 ;;
    commit.committed) killed_by_failpoint "$failpoint" "$LAYER_BIN" commit c base:2 ;;
    rollback.committed) killed_by_failpoint "$failpoint" "$LAYER_BIN" rollback c s1 ;;
    flatten.built) killed_by_failpoint "$failpoint" "$LAYER_BIN" flatten c ;;
    *) killed_by_failpoint "$failpoint" "$LAYER_BIN" snapshot rm c s1 ;;
  esac
  restart
  case $failpoint in
    snapshot.committed) expect c "$h_c" && expect c@s3 "$h_c" ;;
    rollback.committed) expect c "$h_s1" ;;
    *) expect c "$h_c" ;;
  esac
  expect c@s2 "$h_s2"
  [[ "$failpoint" == snapshot-rm.committed || "$failpoint" == merge.* ]] || expect c@s1 "$h_s1"
  stop_server srv
  fsck_clean
  "$LAYER_BIN" gc >/dev/null
  "$LAYER_BIN" fsck >/dev/null || fail "$failpoint: fsck after gc: $("$LAYER_BIN" fsck 2>&1)"
  restart
  expect c@s2 "$h_s2"
  [[ "$failpoint" == rollback.committed ]] || expect c "$h_c"
  stop_server srv
  log "$failpoint: ok"
done

# A server killed in a live change: after its new delta was made (nothing committed: the
# intent is rolled back by fsck --repair, and the snapshot does not exist), or between the
# change's commit and its switch (the change is in the index, and the container reads what
# it read before: the snapshot was made of flushed data).
for failpoint in delta.premade change.committed; do
  setup
  rm -f "$tmp/srv.sock"
  LAYER_FAILPOINT=$failpoint start_server srv "$LAYER_POOL"
  hold_connection "$(uri c)"
  rc=0
  "$LAYER_BIN" snapshot c live >/dev/null 2>&1 || rc=$?
  [[ "$rc" != 0 ]] || fail "$failpoint: the snapshot succeeded although the server was killed"
  wait_until 10 eval "! pid_alive $server_pid" || fail "$failpoint: the server is still running"
  kill_pid "$holder_pid"
  stop_server srv
  restart
  expect c "$h_c"
  if [[ "$failpoint" == change.committed ]]; then
    expect c@live "$h_c"
  else
    "$LAYER_BIN" snapshot ls c | grep -q live && fail "$failpoint: snapshot live exists"
  fi
  expect c@s2 "$h_s2"
  stop_server srv
  if [[ "$failpoint" == delta.premade ]]; then
    out=$("$LAYER_BIN" fsck 2>&1) && fail "$failpoint: fsck is clean with an interrupted change"
    [[ "$out" == *'new delta for a live change of container "c"'* ]] ||
      fail "$failpoint: fsck does not report the interrupted change: $out"
  fi
  fsck_clean
  "$LAYER_BIN" fsck >/dev/null || fail "$failpoint: fsck: $("$LAYER_BIN" fsck 2>&1)"
  log "$failpoint: ok"
done
log "ok"
