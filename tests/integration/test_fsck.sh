#!/usr/bin/env bash
# test_fsck.sh — `layer fsck --repair` run again and again beside a live server while a client
# writes and flushes, and while new clones are made and written for the first time (their delta
# files appear during fsck's scans). Nothing may be removed or rolled back that is in use: every
# flushed byte reads back, every clone keeps its data, and a final `fsck --full` is clean.
source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"
requires nbdsh

pool=$tmp/pool
layer init "$pool" >/dev/null
make_image "$tmp/base.img" 8 21
layer image import base:1 "$tmp/base.img" >/dev/null
layer clone base:1 busy >/dev/null
start_server s "$pool"
sock=$server_sock

# The writer: random 4 KiB-aligned and unaligned writes with a flush after every few, keeping
# its own reference; at the end it reads the whole disk back and compares.
background writer /usr/bin/python3 - "$(uri busy "$sock")" "$tmp/base.img" "$tmp/writer.done" <<'PY'
import os, random, sys, nbd
uri, base, done = sys.argv[1:4]
ref = bytearray(open(base, "rb").read())
h = nbd.NBD()
h.connect_uri(uri)
rng = random.Random(7)
i = 0
while not os.path.exists(done) or i < 200:
    off = rng.randrange(len(ref) - 9000)
    n = rng.choice([4096, 512, 1, 9000])
    buf = rng.randbytes(n)
    h.pwrite(buf, off)
    ref[off:off + n] = buf
    i += 1
    if i % 5 == 0:
        h.flush()
h.flush()
got = h.pread(len(ref), 0)
assert got == bytes(ref), "the busy container does not read back what was written"
print("writer: ok after", i, "writes")
PY
writer_pid=$bg_pid

# Clones made and written for the first time while fsck --repair runs beside them.
for n in $(seq 1 12); do
  layer fsck --repair >"$tmp/fsck.$n.out" 2>&1 &
  fsck_pid=$!
  layer clone base:1 "c$n" >/dev/null
  nbdsh -u "$(uri "c$n" "$sock")" -c "h.pwrite(bytes([$n]) * 12288, 4096 * $n)" -c "h.flush()"
  wait "$fsck_pid" || fail "fsck --repair #$n failed: $(cat "$tmp/fsck.$n.out")"
  if grep -q 'repaired:' "$tmp/fsck.$n.out"; then
    fail "fsck --repair #$n repaired something in a healthy pool: $(cat "$tmp/fsck.$n.out")"
  fi
done

touch "$tmp/writer.done"
wait "$writer_pid" || fail "the writer failed: $(cat "$tmp/writer.log")"
log "$(cat "$tmp/writer.log")"

# Every clone kept its first write.
for n in $(seq 1 12); do
  got=$(nbdsh -u "$(uri "c$n" "$sock")" -c "print(h.pread(12288, 4096 * $n) == bytes([$n]) * 12288)")
  [[ "$got" == True ]] || fail "clone c$n lost its data after fsck --repair ran beside it"
done

stop_server s
layer fsck --full >"$tmp/final.out" || fail "fsck --full after the run: $(cat "$tmp/final.out")"
log "$(cat "$tmp/final.out")"

# ---- scrub: clean, then a flipped byte in the image layer found with what it affects ----
layer scrub >"$tmp/scrub.out" || fail "scrub of a healthy pool: $(cat "$tmp/scrub.out")"
grep -q "0 damaged" "$tmp/scrub.out" || fail "scrub output: $(cat "$tmp/scrub.out")"
base=$(layer inspect busy --json | json_get 'j["chain"][-1]["layer"]')
base_file=$(layer inspect busy --json | json_get 'j["chain"][-1]["path"]')
# The first 64 KiB group holding data (a region the image did not leave as a hole).
off=$(/usr/bin/python3 -c '
import os, sys
f = os.open(sys.argv[1], os.O_RDONLY)
print(os.lseek(f, 0, os.SEEK_DATA) + 100)' "$base_file")
printf '\x5a' | dd of="$base_file" bs=1 seek="$off" conv=notrunc status=none
rc=0
layer scrub busy >"$tmp/scrub.out" 2>"$tmp/scrub.err" || rc=$?
[[ "$rc" == 1 ]] || fail "scrub of a damaged layer: exit $rc, want 1"
grep -q "layer $base: DAMAGED at offset $((off / 65536 * 65536)).*affects busy" "$tmp/scrub.out" ||
  fail "scrub did not name the damage: $(cat "$tmp/scrub.out")"
grep -q "scrub found damage in 1 layer" "$tmp/scrub.err" || fail "scrub stderr: $(cat "$tmp/scrub.err")"
rc=0
layer --json scrub "$base" >"$tmp/scrub.json" || rc=$?
[[ "$rc" == 1 && "$(json_get 'j["damaged"]' <"$tmp/scrub.json")" == 1 ]] ||
  fail "scrub --json: exit $rc: $(cat "$tmp/scrub.json")"
expect_user_error "scrub of an unknown container" layer scrub nope
expect_user_error "scrub of a diff" layer scrub 'busy@a..b'

# ---- verify=on: the damaged group fails with EIO, the rest is served ----
layer clone base:1 fresh >/dev/null
start_server v "$pool" -v --log=stderr -- verify=on hasher=off
/usr/bin/python3 - "$(uri fresh "$server_sock")" "$tmp/base.img" "$off" <<'PY' ||
import sys, nbd
uri, image, off = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = open(image, "rb").read()
h = nbd.NBD(); h.connect_uri(uri)
group = off // 65536 * 65536
try:
    h.pread(4096, off // 4096 * 4096)
    sys.exit("a read of the damaged group succeeded")
except nbd.Error as e:
    assert str(e.errno) in ("5", "EIO"), f"errno {e.errno}, want EIO"
for g in range(0, len(data), 65536):
    if g == group:
        continue
    assert h.pread(65536, g) == data[g:g + 65536], f"group at {g} reads wrong"
print("ok")
PY
  fail "verify=on did not refuse just the damaged group"
stop_server v
grep -q "checksum mismatch at offset $((off / 65536 * 65536))" "$tmp/v.log" ||
  fail "the server did not log the mismatch: $(cat "$tmp/v.log")"
