#!/usr/bin/env bash
# test_vm_qemu.sh — qemu's own NBD client against the plugin: (1) a TCG guest with a clone of
# the busybox image as its virtio disk (-drive file=nbd+unix:///CONTAINER?socket=SOCK, no
# nbd-client in the guest) mounts it, writes files, unmounts; the host reads them back. (2) A
# guest boots another clone as its root filesystem (root=/dev/vda): the host first replaces the
# clone's /etc/init.d/rcS (through NBD: nbdcopy out, debugfs -w, nbdcopy in) by one that writes
# a file and powers off, then the clone's own busybox /sbin/init runs it; the host checks the file.
# shellcheck source=vm_functions.sh
source "$(dirname "${BASH_SOURCE[0]}")/vm_functions.sh"

busybox_pool
for c in q1 root1; do layer clone busybox:1 "$c" >/dev/null; done
start_server s "$pool"
sock=$server_sock

# (1) The container as the guest's virtio disk.
cat >"$tmp/guest.sh" <<'GUEST'
set -e
[ "$DISK" = /dev/vda ]
mkdir -p vm
echo "hello from the $CLIENT guest on $DISK" >vm/hello.txt
seq 1 100000 >vm/numbers.txt
sync
GUEST
vm_run qemu q1 "$sock" --qemu --script "$tmp/guest.sh"
export_image q1 "$sock" "$tmp/q1.img"
echo "hello from the qemu guest on /dev/vda" >"$tmp/want.hello"
seq 1 100000 >"$tmp/want.numbers"
expect_file "$tmp/q1.img" /vm/hello.txt "$tmp/want.hello"
expect_file "$tmp/q1.img" /vm/numbers.txt "$tmp/want.numbers"

# (2) Boot from the container. Its inittab runs /etc/init.d/rcS at sysinit: ours records that
# the container's init ran (as PID 1, from the container's root) and powers off.
cat >"$tmp/rcS" <<'RCS'
#!/bin/sh
mount -t proc proc /proc
root=$(awk '$2 == "/" { print $1 }' /proc/mounts | tail -n 1)
echo "booted: init $(cat /proc/1/comm) root $root host $(cat /etc/hostname)" >/root/booted.txt
sync
echo "vm-attach: guest result: 0"
poweroff -f
RCS
nbdcopy "$(uri root1 "$sock")" "$tmp/root1.img"
debugfs -w -f - "$tmp/root1.img" >"$tmp/debugfs.out" 2>&1 <<DEBUGFS
rm /etc/init.d/rcS
cd /etc/init.d
write $tmp/rcS rcS
sif rcS mode 0100755
DEBUGFS
expect_file "$tmp/root1.img" /etc/init.d/rcS "$tmp/rcS"
nbdcopy "$tmp/root1.img" "$(uri root1 "$sock")"
rm -f "$tmp/root1.img"

vm_run boot root1 "$sock" --boot
grep -a -q 'switching root to /dev/vda, init /sbin/init' "$tmp/boot.log" ||
  fail "the guest did not switch root to the container"
export_image root1 "$sock" "$tmp/root1.img"
echo "booted: init init root /dev/vda host busybox" >"$tmp/want.booted"
expect_file "$tmp/root1.img" /root/booted.txt "$tmp/want.booted"
log "ok"
