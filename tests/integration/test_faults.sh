#!/usr/bin/env bash
# test_faults.sh — bad storage underneath a running server:
# - a full disk: a container's delta on a small tmpfs tier; writes past the space fail with
#   ENOSPC at the client, everything written and flushed before reads back, the server keeps
#   serving, and fsck finds the index consistent;
# - a missing base layer file: reads that need it fail with EIO and a log line naming the layer;
# - a corrupted base layer file: fsck --full reports a checksum mismatch naming layer and offset.
source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"
requires nbdsh
requires mount
requires umount

# The server logs are checked for the errors' wording: keep nbdkit's stderr (-v --log=stderr).
export LAYER_TEST_VERBOSE=1
pool=$tmp/pool
small=$tmp/small
mkdir -p "$small"
mount -t tmpfs -o size=6M tmpfs "$small" 2>/dev/null || skip "cannot mount a tmpfs here (need root)"
cleanup_fn umount -l "$small"

layer init "$pool" --ssd "$small" >/dev/null
make_image "$tmp/base.img" 16 7
layer image import base:1 "$tmp/base.img" >/dev/null
layer clone base:1 full >/dev/null
layer clone base:1 other >/dev/null

start_server s "$pool"
sock=$server_sock

# ---- full disk ----
# Fill the tier: the image already used part of its 6 MiB; write 1 MiB chunks until ENOSPC.
out=$(/usr/bin/python3 - "$(uri full "$sock")" <<'PY'
import errno, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
written = []
hit = None
for i in range(16):
    off = i * (1 << 20)
    if off + (1 << 20) > size:
        break
    buf = bytes([0x40 + i]) * (1 << 20)
    try:
        h.pwrite(buf, off)
        h.flush()
        written.append(i)
    except nbd.Error as e:
        hit = e.errno
        break
print("written", len(written), "errno", hit)
# Everything acknowledged and flushed before the failure reads back.
for i in written:
    got = h.pread(1 << 20, i * (1 << 20))
    assert got == bytes([0x40 + i]) * (1 << 20), f"chunk {i} lost after ENOSPC"
# The server still serves: small writes into blocks already written work.
h.pwrite(b"x" * 4096, 0)
h.flush()
assert h.pread(4096, 0) == b"x" * 4096
h.shutdown()
PY
)
log "full disk: $out"
[[ "$out" == *"errno ENOSPC"* || "$out" == *"errno 28"* ]] ||
  fail "expected ENOSPC at the client, got: $out"
[[ "$out" != "written 0 "* ]] || fail "nothing could be written before the disk filled"


grep -q "No space left on device" "$tmp/s.log" || fail "the server log does not say the disk was full"
stop_server s
fsck_out=$(layer fsck 2>&1) || fail "fsck after ENOSPC: $fsck_out"
log "fsck after ENOSPC: $fsck_out"

# ---- missing base layer file ----
base_layer=$(layer --json image ls | json_get 'j[0]["layer"]')
layer_file=$small/$base_layer.layer
[[ -f "$layer_file" ]] || fail "expected the image's layer file at $layer_file"
mv "$layer_file" "$tmp/saved.layer"
start_server s2 "$pool"
set +e
err=$(nbdcopy "$(uri other "$server_sock")" - 2>&1 >/dev/null)
rc=$?
set -e
((rc != 0)) || fail "reading a clone whose base layer file is missing succeeded"
grep -q "layer $base_layer: file .* is missing" "$tmp/s2.log" ||
  fail "the server log does not name the missing layer file: $(tail -5 "$tmp/s2.log")"
set +e
fsck_out=$(layer fsck 2>&1)
rc=$?
set -e
((rc == 1)) || fail "fsck with a missing layer file exited $rc, expected 1"
[[ "$fsck_out" == *"layer $base_layer: file"*"is missing"* ]] || fail "fsck: $fsck_out"
stop_server s2
mv "$tmp/saved.layer" "$layer_file"

# ---- corrupted base layer file ----
# Flip one byte inside the first data block of the image.
offset=$(/usr/bin/python3 - "$tmp/base.img" <<'PY'
import sys
data = open(sys.argv[1], "rb").read()
for off in range(0, len(data), 4096):
    if any(data[off:off + 4096]):
        print(off + 100)
        break
PY
)
printf '\xff' | dd of="$layer_file" bs=1 seek="$offset" conv=notrunc status=none
set +e
fsck_out=$(layer fsck --full 2>&1)
rc=$?
set -e
((rc == 1)) || fail "fsck --full with a corrupted layer exited $rc, expected 1"
[[ "$fsck_out" == *"layer $base_layer: checksum mismatch at offset"* ]] || fail "fsck --full: $fsck_out"
log "ok"
