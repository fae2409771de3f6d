#!/usr/bin/env bash
# test_fio.sh — fio's nbd engine against the plugin: a short random read/write run with crc32c
# verification; then a random write run, a server restart and fio --verify_only on the result;
# and a negative control (one corrupted block must fail the verification, so it really checks).
# shellcheck source=functions.sh
source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires fio --version
engines=$(fio --enghelp 2>/dev/null || true)
grep -qw nbd <<<"$engines" || skip "fio has no nbd engine"
requires nbdsh --version

pool=$tmp/pool
"$LAYER_BIN" init "$pool" >/dev/null
make_image "$tmp/base.img" 64 3
layer image import base:1 "$tmp/base.img" >/dev/null
layer clone base:1 f1 >/dev/null

start_server s "$pool" --threads 16
u=$(uri f1 "$server_sock")

# fio writes its own verification headers; --runtime only bounds a slow run.
common=(--ioengine=nbd "--uri=$u" --bs=4k --iodepth=8 --verify=crc32c --group_reporting)
log "fio randrw with verification"
fio --name=randrw --rw=randrw --size=64M --runtime=10 --randseed=11 "${common[@]}" \
  >"$tmp/fio1.out" 2>&1 || fail "fio randrw: $(cat "$tmp/fio1.out")"
grep -q 'err= 0' "$tmp/fio1.out" || fail "fio randrw: $(cat "$tmp/fio1.out")"

# The second job writes every 4k block of 16 MiB once (random order), verifies, and is then
# verified again, only reading, after a restart.
job2=(--name=randwrite --rw=randwrite --size=16M --offset=8M --randseed=22 "${common[@]}")
log "fio randwrite"
fio "${job2[@]}" >"$tmp/fio2.out" 2>&1 || fail "fio randwrite: $(cat "$tmp/fio2.out")"
stop_server s
start_server s2 "$pool" --threads 16
u=$(uri f1 "$server_sock")
common[1]="--uri=$u"
job2=(--name=randwrite --rw=randwrite --size=16M --offset=8M --randseed=22 "${common[@]}")
log "fio --verify_only after a restart"
fio "${job2[@]}" --verify_only >"$tmp/fio3.out" 2>&1 ||
  fail "fio --verify_only after restart: $(cat "$tmp/fio3.out")"

# Negative control: corrupt one block that the job wrote; verification must now fail.
nbdsh -u "$u" -c 'h.pwrite(b"\x55" * 4096, (8 << 20) + (5 << 20))' -c 'h.flush()'
if fio "${job2[@]}" --verify_only >"$tmp/fio4.out" 2>&1; then
  fail "fio --verify_only passed over a corrupted block: $(cat "$tmp/fio4.out")"
fi
grep -q 'verify: bad magic header' "$tmp/fio4.out" || fail "fio: $(cat "$tmp/fio4.out")"
log "ok"
