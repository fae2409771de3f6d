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
