#!/usr/bin/env bash
# test_index.sh — copies of the index and a damaged index, with a real server and real clients:
# the server copies the index every interval (2 s here); `layer index restore` is refused while it runs; after a
# restore from a copy older than the container's last writes, `layer fsck` names the container,
# the server refuses to open it, `layer fsck --repair` adopts the writes and the server then
# serves every byte the client wrote. Then random bytes in a copy of data.mdb, again and again:
# `layer fsck` and nbdkit's start never crash, and a damaged index is reported in one line.
# LAYER_TEST_SEED replays the damage; LAYER_TEST_FUZZ_ROUNDS sets its rounds (default 60).
source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"
requires nbdinfo
requires /usr/bin/python3 -c 'import nbd'

pool=$tmp/pool
layer init "$pool" >/dev/null
make_image "$tmp/base.img" 8 31
layer image import base:1 "$tmp/base.img" >/dev/null
layer clone base:1 web1 >/dev/null
layer clone base:1 web2 >/dev/null

# nbd_io URI SCRIPT: runs SCRIPT (python, `h` connected to URI) with argv[1:] after it.
nbd_io() {
  local uri=$1 script=$2
  shift 2
  /usr/bin/python3 -c "import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
$script" "$uri" "$@"
}

# ---- copies, restore, marks, adoption ----
start_server s "$pool" -- index-backup-interval=2s
server_copy() { layer --json index ls | grep -q '"reason":"server"'; }
wait_until 30 server_copy || fail "the server took no copy of the index after its interval"

nbd_io "$(uri web1 "$server_sock")" '
h.pwrite(b"\x11" * 4096, 4096 * 3)
h.flush()'
# The server writes the connection's I/O history (docs/stats.md) when it closes: an index
# change of its own. Once it is in, the index stays as it is while nobody does I/O.
flushed_in_history() {
  [[ $(layer stats web1 --since 1d --json | json_get "j['totals']['flush_ops']") == 1 ]]
}
wait_until 30 flushed_in_history || fail "the server never wrote web1's I/O history"
layer index backup >"$tmp/backup.out"
grep -q "index copied to" "$tmp/backup.out" || fail "index backup: $(cat "$tmp/backup.out")"
layer index backup | grep -q "index unchanged since copy" || fail "a second copy of an unchanged index"
# Writes the copy will not know: whole blocks, a partial block, unflushed-then-flushed.
nbd_io "$(uri web1 "$server_sock")" '
h.pwrite(b"\x22" * 8192, 4096 * 10)
h.pwrite(b"\x33" * 50, 4096 * 20 + 100)
h.flush()
open(sys.argv[2], "wb").write(h.pread(h.get_size(), 0))' "$tmp/web1.ref"

expect_user_error "restore while a server runs" layer index restore
[[ "$error_line" == *"is open by another process"*"pid $server_pid"* ]] ||
  fail "restore refusal does not name the server: $error_line"
stop_server s

layer index restore >"$tmp/restore.out" || fail "restore: $(cat "$tmp/restore.out")"
log "$(cat "$tmp/restore.out")"
grep -q "container web1: its delta (layer [0-9]*) holds 3 blocks written after the copy" \
  "$tmp/restore.out" || fail "restore does not name web1: $(cat "$tmp/restore.out")"
grep -q "web2" "$tmp/restore.out" && fail "restore marks web2, which has no newer writes"
ls "$pool/index/backup/"replaced-*.mdb >/dev/null || fail "the replaced index was not kept"

rc=0
layer fsck >"$tmp/fsck.out" 2>"$tmp/fsck.err" || rc=$?
[[ $rc == 1 ]] || fail "fsck after the restore: exit $rc: $(cat "$tmp/fsck.out" "$tmp/fsck.err")"
grep -q "container web1: its delta .* holds 3 blocks written after the index copy" "$tmp/fsck.out" ||
  fail "fsck does not name web1: $(cat "$tmp/fsck.out")"

# Not served silently: the open fails, the log says what to do; web2 is served.
start_server s2 "$pool" -v --log=stderr
if nbdinfo "$(uri web1 "$server_sock")" >"$tmp/info.out" 2>&1; then
  fail "the server opened web1, whose map does not know its newest writes"
fi
nbdinfo "$(uri web2 "$server_sock")" >/dev/null || fail "web2 is not served after the restore"
stop_server s2
grep -q 'container "web1": its delta holds 3 blocks written after .*layer fsck --repair' \
  "$tmp/s2.log" || fail "no reason logged for refusing web1: $(grep error "$tmp/s2.log")"

layer fsck --repair >"$tmp/repair.out" || fail "fsck --repair: $(cat "$tmp/repair.out")"
grep -q "repaired: container web1: adopted 3 blocks" "$tmp/repair.out" ||
  fail "fsck --repair did not adopt: $(cat "$tmp/repair.out")"
layer fsck --full >/dev/null || fail "fsck after the repair: $(layer fsck)"
start_server s3 "$pool"
nbd_io "$(uri web1 "$server_sock")" '
want = open(sys.argv[2], "rb").read()
assert h.pread(len(want), 0) == want, "web1 does not read back what the client wrote"' \
  "$tmp/web1.ref" || fail "web1 after the adoption differs from what was written"
stop_server s3
log "restore: web1 marked, refused, adopted, read back byte for byte"

# ---- a damaged index ----
# Deterministic first: half the file gone.
cp -a "$pool" "$tmp/cut"
rm -f "$tmp/cut/index/lock.mdb"
truncate -s "$(($(stat -c %s "$tmp/cut/index/data.mdb") / 2))" "$tmp/cut/index/data.mdb"
rc=0
"$LAYER_BIN" --pool "$tmp/cut" fsck >/dev/null 2>"$tmp/cut.err" || rc=$?
[[ $rc == 2 && $(wc -l <"$tmp/cut.err") == 1 ]] ||
  fail "fsck of a truncated index: exit $rc: $(cat "$tmp/cut.err")"
grep -q "is damaged: .*index restore" "$tmp/cut.err" || fail "fsck says: $(cat "$tmp/cut.err")"
rc=0
"$LAYER_BIN" --pool "$tmp/cut" --json fsck >/dev/null 2>"$tmp/cut.json" || rc=$?
if [[ $rc != 2 ]] || ! grep -q '"errno":"EUCLEAN","exit":2' "$tmp/cut.json"; then
  fail "fsck --json of a truncated index: exit $rc: $(cat "$tmp/cut.json")"
fi
rc=0
# shellcheck disable=SC2046
env $(nbdkit_env "$tmp/cut.sanitizer") nbdkit -U - "$LAYER_PLUGIN" pool="$tmp/cut" --run true \
  2>"$tmp/cut-nbdkit.err" || rc=$?
[[ $rc == 1 ]] || fail "nbdkit on a truncated index: exit $rc: $(cat "$tmp/cut-nbdkit.err")"
if [[ $(grep -c . "$tmp/cut-nbdkit.err") != 1 ]] || ! grep -q "is damaged" "$tmp/cut-nbdkit.err"; then
  fail "nbdkit's refusal is not one line: $(cat "$tmp/cut-nbdkit.err")"
fi
log "truncated index: $(cat "$tmp/cut-nbdkit.err")"

# Then random bytes, many times, in a copy of the pool.
seed=${LAYER_TEST_SEED:-$RANDOM}
rounds=${LAYER_TEST_FUZZ_ROUNDS:-60}
log "damage seed $seed (replay with LAYER_TEST_SEED=$seed), $rounds rounds"
cp -a "$pool" "$tmp/fz"
cp "$tmp/fz/index/data.mdb" "$tmp/pristine.mdb"
declare -A outcomes=()
for ((round = 0; round < rounds; round++)); do
  /usr/bin/python3 - "$tmp/pristine.mdb" "$tmp/fz/index/data.mdb" "$((seed * 1000 + round))" <<'PY'
import random, sys
src, dst, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
data = bytearray(open(src, "rb").read())
page = rng.randrange(len(data) // 4096)
burst = rng.random() < 0.5
for _ in range(rng.randint(1, 16)):
    at = page * 4096 + rng.randrange(4096) if burst else rng.randrange(len(data))
    data[at] ^= rng.randint(1, 255)
open(dst, "wb").write(data)
PY
  rm -f "$tmp/fz/index/lock.mdb"
  rc=0
  "$LAYER_BIN" --pool "$tmp/fz" fsck >"$tmp/fz.out" 2>"$tmp/fz.err" || rc=$?
  ((rc <= 2)) || fail "round $round: fsck exit $rc (a crash?): $(cat "$tmp/fz.err")"
  if ((rc != 0)); then
    if [[ $(wc -l <"$tmp/fz.err") != 1 ]] || ! grep -q "^layer: error: " "$tmp/fz.err"; then
      fail "round $round: fsck exit $rc without one error line: $(cat "$tmp/fz.err")"
    fi
  fi
  if grep -q "is damaged" "$tmp/fz.err"; then
    outcomes[damaged]=$((${outcomes[damaged]:-0} + 1))
  else
    outcomes["exit $rc"]=$((${outcomes["exit $rc"]:-0} + 1))
  fi
  if ((round % 5 == 0)); then
    rc=0
    # shellcheck disable=SC2046
    env $(nbdkit_env "$tmp/fz.sanitizer") nbdkit -U - "$LAYER_PLUGIN" pool="$tmp/fz" \
      index-backup-interval=0 --run true 2>"$tmp/fz-nbdkit.err" || rc=$?
    ((rc <= 1)) || fail "round $round: nbdkit exit $rc (a crash?): $(cat "$tmp/fz-nbdkit.err")"
    if ((rc == 1)); then
      [[ $(grep -c . "$tmp/fz-nbdkit.err") == 1 ]] ||
        fail "round $round: nbdkit refused with more than one line: $(cat "$tmp/fz-nbdkit.err")"
    fi
  fi
done
summary=""
for k in "${!outcomes[@]}"; do summary+=" $k: ${outcomes[$k]};"; done
log "$rounds damaged copies of data.mdb:$summary"
((${outcomes[damaged]:-0} > 0)) || fail "no round found the index damaged"
compgen -G "$tmp/fz/core*" >/dev/null && fail "a core file was left"
log "ok"
