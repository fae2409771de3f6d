#!/usr/bin/env bash
# test_vm_nbd_client.sh — the guest kernel's NBD client against the plugin: a TCG guest
# (scripts/vm-attach) runs nbd-client over netlink on one clone of the busybox image and over
# the ioctl interface (-L) on another, mounts the ext4, writes files, deletes one, syncs,
# unmounts and disconnects; the host copies each container out (nbdcopy), e2fsck's it and reads
# the files back with debugfs, and checks that a third, untouched clone still equals the image.
# shellcheck source=vm_functions.sh
source "$(dirname "${BASH_SOURCE[0]}")/vm_functions.sh"

busybox_pool
for c in net ioc untouched; do layer clone busybox:1 "$c" >/dev/null; done
start_server s "$pool"
sock=$server_sock

# The guest's script: files whose contents the host can rebuild, in a new directory and in an
# existing one, a file deleted, and a file past the first block group of small writes.
cat >"$tmp/guest.sh" <<'GUEST'
set -e
mkdir -p vm/dir
echo "hello from the $CLIENT guest" >vm/hello.txt
seq 1 200000 >vm/numbers.txt
i=0
while [ $i -lt 50 ]; do
  echo "small file $i" >vm/dir/f$i
  i=$((i + 1))
done
echo "appended by the guest" >>etc/motd
rm etc/hostname
sync
GUEST

# The host's copy of what the guest wrote.
mkdir -p "$tmp/want/dir"
seq 1 200000 >"$tmp/want/numbers.txt"
for i in $(seq 0 49); do echo "small file $i" >"$tmp/want/dir/f$i"; done
{
  echo "This is the layer sample busybox image."
  echo "appended by the guest"
} >"$tmp/want/motd"

check_container() {
  local c=$1 client=$2 img=$tmp/$1.img
  export_image "$c" "$sock" "$img"
  echo "hello from the $client guest" >"$tmp/want/hello.txt"
  expect_file "$img" /vm/hello.txt "$tmp/want/hello.txt"
  expect_file "$img" /vm/numbers.txt "$tmp/want/numbers.txt"
  for i in $(seq 0 49); do expect_file "$img" "/vm/dir/f$i" "$tmp/want/dir/f$i"; done
  expect_file "$img" /etc/motd "$tmp/want/motd"
  if [[ "$(debugfs -R "stat /etc/hostname" "$img" 2>&1)" == *$'\n'Inode:* ]]; then
    fail "/etc/hostname, deleted by the $client guest, is still in $c"
  fi
  rm -f "$img"
}

vm_run netlink net "$sock" --script "$tmp/guest.sh"
check_container net nbd-netlink
vm_run ioctl ioc "$sock" --ioctl --script "$tmp/guest.sh"
check_container ioc nbd-ioctl

# Each guest wrote only into its own container.
nbdcopy "$(uri untouched "$sock")" "$tmp/untouched.img"
cmp "$tmp/busybox.img" "$tmp/untouched.img" || fail "the untouched clone differs from the image"
log "ok"
