#!/bin/bash
# test_snapshots.sh — snapshots through a real server and the CLI (tests/integration/
# snapshot_model.py): a seeded model-based sequence of I/O and snapshot operations and live
# snapshots under four writers (beside the server's background hasher), merges checked with
# `qemu-img compare`, and the CLI's errors.
# LAYER_TEST_SEED=N replays the model run; LAYER_SNAPSHOT_STEPS sets its length.
source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"
requires /usr/bin/python3 -c 'import nbd'
requires qemu-img

export LAYER_POOL=$tmp/pool
"$LAYER_BIN" init >/dev/null
truncate -s 8M "$tmp/base.raw"
# Some data in the base image, so rollbacks and zeroes have something below to hide.
/usr/bin/python3 -c "
import random
r = random.Random(5)
with open('$tmp/base.raw', 'r+b') as f:
    for i in range(0, 2048, 3):
        f.seek(i * 4096)
        f.write(bytes([r.randrange(1, 256)]) * 4096)
"
"$LAYER_BIN" image import base:1 "$tmp/base.raw" >/dev/null
"$LAYER_BIN" clone base:1 c >/dev/null
"$LAYER_BIN" clone base:1 live --size 4M >/dev/null 2>&1 || "$LAYER_BIN" clone base:1 live >/dev/null
start_server srv "$LAYER_POOL" --threads 16

seed=${LAYER_TEST_SEED:-$RANDOM}
/usr/bin/python3 "$LAYER_SRC/tests/integration/snapshot_model.py" model "$server_sock" "$seed" \
  "${LAYER_SNAPSHOT_STEPS:-400}"
/usr/bin/python3 "$LAYER_SRC/tests/integration/snapshot_model.py" live "$server_sock"

# Merge on snapshot rm: every other point reads the same, byte for byte, per qemu-img, beside
# the server's hasher (which takes no lock, so it never keeps a merge from happening).
"$LAYER_BIN" clone base:1 m >/dev/null
uri() { echo "nbd+unix:///$1?socket=$server_sock"; }
# A client's exit does not wait for the server to close its export (and release the layers it
# reads): wait for each close in the audit trail, which the server writes after the release.
closed_all() {  # closed_all CONTAINER: every export of it opened so far is closed
  "$LAYER_BIN" audit "$1" --json | json_get \
    'sum(e["event"] == "open" for e in j["events"]) == sum(e["event"] == "close" for e in j["events"])' |
    grep -qx True
}
qemu-io -f raw -c 'write -P 0x11 0 1M' "$(uri m)" >/dev/null
"$LAYER_BIN" snapshot m m1 >/dev/null
qemu-io -f raw -c 'write -P 0x22 512k 1M' "$(uri m)" >/dev/null
"$LAYER_BIN" snapshot m m2 >/dev/null
qemu-io -f raw -c 'write -P 0x33 3M 4k' "$(uri m)" >/dev/null
"$LAYER_BIN" snapshot m m3 >/dev/null
for p in m m@m2 m@m3; do qemu-img convert -f raw -O raw "$(uri "$p")" "$tmp/before-${p/@/-}.raw"; done
wait_until 30 closed_all m || fail "the server did not close m's exports"
out=$("$LAYER_BIN" --json snapshot rm m m1)
grep -q '"layer_fate":"merged"' <<<"$out" || fail "m1 was not merged: $out"
for p in m m@m2 m@m3; do
  qemu-img compare -f raw -F raw "$tmp/before-${p/@/-}.raw" "$(uri "$p")" >/dev/null ||
    fail "$p changed when m1 was merged away"
done
"$LAYER_BIN" fsck >/dev/null || fail "fsck after the merge: $("$LAYER_BIN" fsck 2>&1)"

# The export m@m2..m3 maps as data exactly the ranges `layer diff` reports (m3 added one 4 KiB
# write at 3 MiB) and as hole+zero the rest; it reads m3 there and zeroes elsewhere.
ranges=$("$LAYER_BIN" --json diff m@m2 m@m3 |
  /usr/bin/python3 -c 'import json,sys; print(" ".join("%d+%d" % (r["offset"], r["length"]) for r in json.load(sys.stdin)["ranges"]))')
mapped=$(nbdinfo --map --json "$(uri m@m2..m3)" |
  /usr/bin/python3 -c 'import json,sys; print(" ".join("%d+%d" % (e["offset"], e["length"]) for e in json.load(sys.stdin) if e["type"] == 0))')
[[ "$mapped" == "$ranges" && -n "$ranges" ]] ||
  fail "m@m2..m3 maps '$mapped' as changed, diff says '$ranges'"
nbdcopy "$(uri m@m3)" "$tmp/m3.raw"
nbdcopy "$(uri m@m2..m3)" "$tmp/m2-m3.raw"
/usr/bin/python3 - "$tmp/m3.raw" "$tmp/m2-m3.raw" $ranges <<'PY' || fail "m@m2..m3 does not read m3's changes over zeroes"
import sys
b, d = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read()
want = bytearray(len(b))
for r in sys.argv[3:]:
    o, n = map(int, r.split("+"))
    want[o:o + n] = b[o:o + n]
sys.exit(0 if bytes(want) == d else 1)
PY

# The same with a client attached: the serving server removes the name and merges, live, the
# layers only its disk reads; the client's disk and the other snapshot read the same.
"$LAYER_BIN" clone base:1 lm >/dev/null
qemu-io -f raw -c 'write -P 0x44 0 2M' "$(uri lm)" >/dev/null
"$LAYER_BIN" snapshot lm a >/dev/null
qemu-io -f raw -c 'write -P 0x55 1M 2M' "$(uri lm)" >/dev/null
"$LAYER_BIN" snapshot lm b >/dev/null
qemu-io -f raw -c 'write -P 0x66 5M 4k' "$(uri lm)" >/dev/null
for p in lm lm@b; do qemu-img convert -f raw -O raw "$(uri "$p")" "$tmp/before-${p/@/-}.raw"; done
wait_until 30 closed_all lm || fail "the server did not close lm's exports"
hold_connection "$(uri lm)"
out=$("$LAYER_BIN" --json snapshot rm lm a)
grep -q '"layer_fate":"merged"' <<<"$out" || fail "a was not merged live: $out"
grep -q '"live":true' <<<"$out" || fail "snapshot rm of a served container was not live: $out"
for p in lm lm@b; do
  qemu-img compare -f raw -F raw "$tmp/before-${p/@/-}.raw" "$(uri "$p")" >/dev/null ||
    fail "$p changed when a was merged away live"
done
# b carries the live delta: hidden. After the next snapshot it has a frozen child, but only the
# server reads it: `layer gc` asks that server, which merges it live.
out=$("$LAYER_BIN" --json snapshot rm lm b)
grep -q '"layer_fate":"hidden"' <<<"$out" || fail "b was not kept hidden: $out"
"$LAYER_BIN" snapshot lm c >/dev/null
out=$("$LAYER_BIN" gc)
grep -q 'by the server of container "lm"' <<<"$out" || fail "gc did not have the server merge: $out"
for p in lm lm@c; do
  qemu-img compare -f raw -F raw "$tmp/before-lm.raw" "$(uri "$p")" >/dev/null ||
    fail "$p changed when gc had the server merge"
done
"$LAYER_BIN" --json snapshot ls lm | grep -q '"hidden":\[\]' ||
  fail "a hidden layer is left after gc: $("$LAYER_BIN" snapshot ls lm)"
kill_pid "$holder_pid"

# Errors: clear messages and exit 1.
expect_error() {
  local want=$1
  shift
  local out rc=0
  out=$("$LAYER_BIN" "$@" 2>&1) || rc=$?
  [[ "$rc" == 1 ]] || fail "layer $*: exit $rc, want 1 ($out)"
  grep -q -- "$want" <<<"$out" || fail "layer $*: '$out' lacks '$want'"
}
expect_error 'already exists' snapshot m m2
expect_error 'not found' rollback m nope
expect_error 'not found' snapshot rm m nope
expect_error 'invalid snapshot name' snapshot m 'Bad/Name'
expect_error 'not found' clone m@nope x
expect_error 'already exists' commit m base:1
expect_error 'not found' diff m m@nope
expect_error 'usage' snapshot m

# A control request with a field of the wrong type is EINVAL: not done as if the field were
# absent (a rollback's "keep_as": 5 would drop the state it asks to keep), nor an exception
# answered as EIO ("container": 5 in a move). fuzz_control_ops found both.
control_request() {
  /usr/bin/python3 - "$LAYER_POOL/run/srv-$server_pid.sock" "$1" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
print(s.makefile().readline().strip())
PY
}
"$LAYER_BIN" snapshot m typed >/dev/null
before=$("$LAYER_BIN" --json snapshot ls m)
for request in '{"op":"rollback","container":"m","name":"typed","keep_as":5}' \
  '{"op":"commit","container":"m","image":"typed:1","description":5}' \
  '{"op":"snapshot","container":"m","name":["typed-2"]}' \
  '{"op":"move","layer":1,"tier":"hdd","container":5}'; do
  reply=$(control_request "$request")
  grep -q '"errno":"EINVAL"' <<<"$reply" || fail "control request $request: $reply"
done
[[ "$("$LAYER_BIN" --json snapshot ls m)" == "$before" ]] ||
  fail "refused control requests changed m: $before -> $("$LAYER_BIN" --json snapshot ls m)"
"$LAYER_BIN" image ls | grep -q typed && fail "a refused commit made an image"

"$LAYER_BIN" gc >/dev/null
"$LAYER_BIN" fsck >/dev/null || fail "fsck at the end: $("$LAYER_BIN" fsck 2>&1)"
log "ok"
