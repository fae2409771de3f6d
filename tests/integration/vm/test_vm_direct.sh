#!/usr/bin/env bash
# test_vm_direct.sh — every byte through the guest kernel's NBD client: a TCG guest writes a
# known pattern with `dd oflag=direct` (1 MiB writes) across the whole of a 96 MiB clone of the
# 64 MiB busybox image (over the image's data and past its end), then 512-byte O_DIRECT writes
# into a few sectors (partial blocks: copy-up in the server), reads the disk back with
# `dd iflag=direct` and compares it in the guest; the host copies the container out and
# compares every byte with the same pattern built on the host.
# shellcheck source=vm_functions.sh
source "$(dirname "${BASH_SOURCE[0]}")/vm_functions.sh"

size_mib=96
busybox_pool
layer clone busybox:1 d1 --size "${size_mib}M" >/dev/null
start_server s "$pool"
sock=$server_sock

# The pattern: each 4 KiB block starts with its number (a misplaced or lost block shows), then
# a fixed filler. Built by busybox awk in the guest and by the same awk program on the host.
# (1 MiB at a time: busybox awk formats a block much faster than busybox seq prints lines.)
pattern_awk='BEGIN {
  filler = "";
  while (length(filler) < 4032) filler = filler "layer vm test pattern 0123456789 ";
  filler = substr(filler, 1, 4031);
  for (b = first; b < first + count; b++) printf "block %057d\n%s\n", b, filler;
}'
# The sectors the guest overwrites with 512-byte direct writes, and their content.
sectors="3 4097 65537 131071 150000 196607"
sector_awk='BEGIN { s = sprintf("sector %d written alone ", n); while (length(s) < 511) s = s "."; printf "%s\n", s }'

{
  echo "set -e"
  printf "pattern_awk='%s'\n" "$pattern_awk"
  printf "sector_awk='%s'\n" "$sector_awk"
  echo "size_mib=$size_mib sectors=\"$sectors\""
  cat <<'GUEST'
m=0
while [ $m -lt $size_mib ]; do
  awk -v first=$((m * 256)) -v count=256 "$pattern_awk"
  m=$((m + 1))
done | dd of="$DISK" bs=1M iflag=fullblock oflag=direct 2>/tmp/dd.err || { cat /tmp/dd.err; exit 1; }
for s in $sectors; do
  awk -v n=$s "$sector_awk" | dd of="$DISK" bs=512 seek=$s oflag=direct conv=notrunc 2>/dev/null
done
# Read back through the kernel client (O_DIRECT: not from the page cache); the host compares
# the digest with its own.
echo "guest read md5: $(dd if="$DISK" bs=1M iflag=direct 2>/dev/null | md5sum)"
GUEST
} >"$tmp/guest.sh"

vm_run direct d1 "$sock" --no-mount --script "$tmp/guest.sh"

# The host's pattern, from the same awk programs (busybox awk, as in the guest).
for ((m = 0; m < size_mib; m++)); do
  busybox awk -v first=$((m * 256)) -v count=256 "$pattern_awk"
done >"$tmp/want.img"
for s in $sectors; do
  busybox awk -v n="$s" "$sector_awk" |
    dd of="$tmp/want.img" bs=512 seek="$s" conv=notrunc status=none
done
[[ $(stat -c %s "$tmp/want.img") == $((size_mib << 20)) ]] || fail "host pattern has a wrong size"

nbdcopy "$(uri d1 "$sock")" "$tmp/got.img"
cmp "$tmp/want.img" "$tmp/got.img" || fail "the container differs from the pattern the guest wrote"
want_md5=$(md5sum <"$tmp/want.img")
want_md5=${want_md5%% *}
guest_md5=$(grep -a -o 'guest read md5: [0-9a-f]*' "$tmp/direct.log" | tail -n 1)
[[ "${guest_md5##* }" == "$want_md5" ]] ||
  fail "the guest read back ${guest_md5##* } through nbd0, want $want_md5"
log "ok: $size_mib MiB checked byte for byte on the host, and read back in the guest"
