#!/usr/bin/env bash
# test_clients.sh — real NBD clients against the plugin: nbdinfo (--list, --map), nbdcopy in
# both directions, qemu-img compare and qemu-io, each checked against the raw files the test made.
# shellcheck source=functions.sh
source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires nbdinfo
requires nbdcopy
requires qemu-img --version
requires qemu-io --version
requires cmp --version

pool=$tmp/pool
"$LAYER_BIN" init "$pool" >/dev/null

make_image "$tmp/base.img" 16 1
make_image "$tmp/other.img" 16 2
# 1 GiB with 3 MiB of data: a clone of it must copy as a sparse file.
truncate -s 1G "$tmp/sparse.img"
for mib in 1 300 1000; do
  head -c 1M /dev/urandom | dd of="$tmp/sparse.img" bs=1M seek="$mib" conv=notrunc status=none
done

layer image import base:1 "$tmp/base.img" >/dev/null
layer image import sparse:1 "$tmp/sparse.img" >/dev/null
for c in a b; do layer clone base:1 "$c" >/dev/null; done
layer clone sparse:1 sp >/dev/null

start_server s "$pool"
sock=$server_sock

# ---- nbdinfo --list shows every container ----
nbdinfo --list "nbd+unix://?socket=$sock" >"$tmp/list.txt"
for c in a b sp; do
  grep -qx "export=\"$c\":" "$tmp/list.txt" || fail "nbdinfo --list lacks $c: $(cat "$tmp/list.txt")"
done
listed=$(nbdinfo --list --json "nbd+unix://?socket=$sock" |
  json_get '" ".join(sorted(e["export-name"] for e in j["exports"] if "@" not in e["export-name"]))')
known=$(layer --json ls | json_get '" ".join(sorted(c["name"] for c in j))')
[[ "$listed" == "$known" ]] || fail "nbdinfo --list: '$listed', layer ls: '$known'"
[[ "$known" == "a b sp" ]] || fail "layer ls: $known"
log "nbdinfo --list: $listed"

# ---- nbdcopy out of a clone equals the image ----
nbdcopy "$(uri a "$sock")" "$tmp/a.out"
cmp "$tmp/base.img" "$tmp/a.out" || fail "nbdcopy of clone a differs from the image"
qemu-img compare -f raw -F raw "$tmp/base.img" "$(uri a "$sock")" ||
  fail "qemu-img compare (URI) differs"
qemu-img compare -f raw -F raw "$tmp/base.img" "nbd:unix:$sock:exportname=a" ||
  fail "qemu-img compare (nbd:unix:) differs"

# ---- nbdcopy into a clone, then back ----
nbdcopy "$tmp/other.img" "$(uri b "$sock")"
nbdcopy "$(uri b "$sock")" "$tmp/b.out"
cmp "$tmp/other.img" "$tmp/b.out" || fail "nbdcopy into clone b and back differs"
qemu-img compare -f raw -F raw "$tmp/other.img" "$(uri b "$sock")" || fail "qemu-img: b differs"
# The other clone did not change.
qemu-img compare -f raw -F raw "$tmp/base.img" "$(uri a "$sock")" || fail "clone a changed"

# ---- a sparse clone: extents show holes, and nbdcopy skips them ----
nbdinfo --map "$(uri sp "$sock")" >"$tmp/map.txt"
read -r data_bytes hole_bytes total_bytes < <(awk '
  { total += $2; if ($3 == 0) data += $2; else if ($3 == 3) hole += $2 }
  END { printf "%d %d %d\n", data, hole, total }' "$tmp/map.txt")
log "sparse clone map: $data_bytes data, $hole_bytes hole+zero of $total_bytes bytes"
((total_bytes == 1 << 30)) || fail "map covers $total_bytes bytes: $(head "$tmp/map.txt")"
((data_bytes >= 3 << 20)) || fail "map shows only $data_bytes data bytes: $(cat "$tmp/map.txt")"
((data_bytes <= 4 << 20)) || fail "map shows $data_bytes data bytes for 3 MiB of data"
nbdcopy "$(uri sp "$sock")" "$tmp/sp.out"
# nbdcopy wrote only the data extents: the copy is as sparse as the image.
allocated_kib=$(du -k "$tmp/sp.out" | cut -f1)
log "nbdcopy of the sparse clone allocated $allocated_kib KiB"
((allocated_kib <= 8 * 1024)) || fail "copy of the sparse clone allocates $allocated_kib KiB"
qemu-img compare -f raw -F raw "$tmp/sparse.img" "$tmp/sp.out" || fail "sparse copy differs"

# ---- qemu-io on the NBD URI ----
qemu-io -f raw -c 'write -P 0xab 4096 8192' -c 'read -P 0xab 4096 8192' "$(uri a "$sock")" \
  >"$tmp/qemu-io.out" 2>&1 || fail "qemu-io: $(cat "$tmp/qemu-io.out")"
grep -q 'read 8192/8192 bytes at offset 4096' "$tmp/qemu-io.out" || fail "qemu-io read"
! grep -q 'Pattern verification failed' "$tmp/qemu-io.out" || fail "qemu-io pattern"
# A new connection sees the write, and nothing else changed.
qemu-io -f raw -c 'read -P 0xab 4096 8192' "$(uri a "$sock")" >"$tmp/qemu-io.out" 2>&1 ||
  fail "qemu-io re-read: $(cat "$tmp/qemu-io.out")"
nbdcopy "$(uri a "$sock")" "$tmp/a2.out"
/usr/bin/python3 - "$tmp/base.img" "$tmp/a2.out" <<'EOF' || fail "clone a after qemu-io"
import sys
want = bytearray(open(sys.argv[1], "rb").read())
want[4096:4096 + 8192] = b"\xab" * 8192
got = open(sys.argv[2], "rb").read()
if got != bytes(want):
    at = next(i for i in range(len(got)) if got[i] != want[i])
    sys.exit(f"first difference at {at}")
EOF

stop_server s
layer fsck >"$tmp/fsck.out" 2>&1 || fail "fsck after the clients: $(cat "$tmp/fsck.out")"
log "ok"
