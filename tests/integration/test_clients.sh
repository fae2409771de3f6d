#!/usr/bin/env bash
# test_clients.sh — real NBD clients against the plugin: nbdinfo (--list, --map), nbdcopy in
# both directions, qemu-img compare, qemu-img convert (an export to qcow2 and raw, a qcow2 into
# an export) and qemu-io (120 random unaligned writes with their own patterns, read back), each
# checked against the raw files the test made.
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
for c in a b q; do layer clone base:1 "$c" >/dev/null; done
layer clone sparse:1 sp >/dev/null

start_server s "$pool"
sock=$server_sock

# ---- nbdinfo --list shows every container ----
nbdinfo --list "nbd+unix://?socket=$sock" >"$tmp/list.txt"
for c in a b q sp; do
  grep -qx "export=\"$c\":" "$tmp/list.txt" || fail "nbdinfo --list lacks $c: $(cat "$tmp/list.txt")"
done
listed=$(nbdinfo --list --json "nbd+unix://?socket=$sock" |
  json_get '" ".join(sorted(e["export-name"] for e in j["exports"] if "@" not in e["export-name"]))')
known=$(layer --json ls | json_get '" ".join(sorted(c["name"] for c in j))')
[[ "$listed" == "$known" ]] || fail "nbdinfo --list: '$listed', layer ls: '$known'"
[[ "$known" == "a b q sp" ]] || fail "layer ls: $known"
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

# ---- qemu-img convert: an export to qcow2 and to raw, and a qcow2 into an export ----
qemu-img convert -f raw -O qcow2 "$(uri b "$sock")" "$tmp/b.qcow2" || fail "convert to qcow2"
qemu-img compare -f qcow2 -F raw "$tmp/b.qcow2" "$tmp/other.img" || fail "b.qcow2 differs"
qemu-img convert -f raw -O raw "$(uri b "$sock")" "$tmp/b.raw" || fail "convert to raw"
cmp "$tmp/other.img" "$tmp/b.raw" || fail "b.raw differs"
# Into an existing export (-n: do not create): clone q becomes b's content.
qemu-img convert -n -f qcow2 -O raw "$tmp/b.qcow2" "$(uri q "$sock")" || fail "convert into q"
qemu-img compare -f raw -F raw "$tmp/other.img" "$(uri q "$sock")" || fail "q after convert"
rm -f "$tmp/b.qcow2" "$tmp/b.raw"

# ---- qemu-io: random, unaligned writes, each with its own pattern, read back ----
# 120 requests into 120 slots 128 KiB apart over q (16 MiB): offset and length random and unaligned
# inside the slot; a second qemu-io session (read-only) reads each back with -P.
/usr/bin/python3 - "$tmp" <<'EOF' || fail "cannot make the qemu-io script"
import random, sys
tmp = sys.argv[1]
rng = random.Random(1207)
w, r, model = [], [], []
for slot in range(120):
    off = slot * 131072 + rng.randrange(0, 30000)
    n = rng.randrange(1, 35000)
    pat = 1 + slot % 254
    w.append(f"write -P {pat} {off} {n}")
    r.append(f"read -P {pat} {off} {n}")
    model.append(f"{off} {n} {pat}")
open(f"{tmp}/qio.write", "w").write("\n".join(w) + "\n")
open(f"{tmp}/qio.read", "w").write("\n".join(r) + "\n")
open(f"{tmp}/qio.model", "w").write("\n".join(model) + "\n")
EOF
# qio_args FILE: "-c CMD" for every line of FILE, NUL-separated.
qio_args() {
  local a=() c
  while read -r c; do a+=(-c "$c"); done <"$1"
  printf '%s\0' "${a[@]}"
}
mapfile -d '' wargs < <(qio_args "$tmp/qio.write")
mapfile -d '' rargs < <(qio_args "$tmp/qio.read")
qemu-io -f raw "${wargs[@]}" "$(uri q "$sock")" >"$tmp/qemu-io.out" 2>&1 ||
  fail "qemu-io random writes: $(tail -5 "$tmp/qemu-io.out")"
[[ $(grep -c '^wrote ' "$tmp/qemu-io.out") == 120 ]] || fail "qemu-io: $(tail -5 "$tmp/qemu-io.out")"
qemu-io -f raw -r "${rargs[@]}" "$(uri q "$sock")" >"$tmp/qemu-io.out" 2>&1 ||
  fail "qemu-io reads: $(tail -5 "$tmp/qemu-io.out")"
! grep -q 'Pattern verification failed' "$tmp/qemu-io.out" || fail "qemu-io: a pattern differs"
[[ $(grep -c '^read ' "$tmp/qemu-io.out") == 120 ]] || fail "qemu-io: $(tail -5 "$tmp/qemu-io.out")"
# And byte for byte, everything else is still what convert wrote.
nbdcopy "$(uri q "$sock")" "$tmp/q.out"
/usr/bin/python3 - "$tmp/other.img" "$tmp/q.out" "$tmp/qio.model" <<'EOF' || fail "q after qemu-io"
import sys
want = bytearray(open(sys.argv[1], "rb").read())
for line in open(sys.argv[3]):
    off, n, pat = map(int, line.split())
    want[off:off + n] = bytes([pat]) * n
got = open(sys.argv[2], "rb").read()
if got != bytes(want):
    at = next(i for i in range(len(got)) if got[i] != want[i])
    sys.exit(f"first difference at {at}")
EOF
log "qemu-img convert (to qcow2, to raw, into an export) and 120 random qemu-io writes: ok"

stop_server s
layer fsck >"$tmp/fsck.out" 2>&1 || fail "fsck after the clients: $(cat "$tmp/fsck.out")"
log "ok"
