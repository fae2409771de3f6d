# shellcheck shell=bash
# vm_functions.sh — helpers of the guest VM tests (ctest label vm). Source it first:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/vm_functions.sh"
#
# It sources ../functions.sh (set -euo pipefail, $tmp, cleanup hooks, start_server, ...), then
# skips the test (exit 77) when qemu-system-x86_64 or a guest kernel cannot run here at all.
# Guests are started with scripts/vm-attach, which caches its initramfs in $LAYER_VM_CACHE
# (set by tests/integration/CMakeLists.txt to build/vm).

# shellcheck source=../functions.sh
source "$(dirname "${BASH_SOURCE[0]}")/../functions.sh"

vm_attach_bin=$LAYER_SRC/scripts/vm-attach
export LAYER_VM_CACHE=${LAYER_VM_CACHE:-$tmp/vm-cache}

requires qemu-system-x86_64
# qemu must start at all: an empty machine whose monitor reads "quit" from stdin.
echo quit | timeout 30 qemu-system-x86_64 -accel tcg -machine none -nodefaults -no-user-config \
  -display none -monitor stdio >"$tmp/qemu-probe.out" 2>&1 ||
  skip "qemu-system-x86_64 cannot run here: $(tail -n 1 "$tmp/qemu-probe.out")"
vm_kernel=$(find /boot -maxdepth 1 -name 'vmlinuz-*' 2>/dev/null | sort -V | tail -n 1)
[[ -n "$vm_kernel" ]] || skip "no guest kernel in /boot (install linux-image-amd64)"
[[ -r "$vm_kernel" ]] || skip "the guest kernel $vm_kernel is not readable by this user"
[[ -d "/lib/modules/${vm_kernel##*/vmlinuz-}" ]] || skip "no modules for $vm_kernel"
for tool in socat cpio nbd-client modinfo; do requires "$tool"; done
[[ -x /bin/busybox ]] || skip "no /bin/busybox (install busybox-static)"
requires nbdcopy
requires debugfs -V
requires e2fsck -V

# busybox_pool: builds the busybox sample image, a pool $pool with it imported as busybox:1.
busybox_pool() {
  local recipe=$LAYER_SRC/images/busybox/build rc=0
  "$recipe" "$tmp/busybox.img" >"$tmp/build.log" 2>&1 || rc=$?
  ((rc != 77)) || skip "the busybox recipe cannot run here: $(tail -n 1 "$tmp/build.log")"
  ((rc == 0)) || fail "images/busybox/build failed ($rc): $(cat "$tmp/build.log")"
  pool=$tmp/pool
  "$LAYER_BIN" init "$pool" >/dev/null
  layer image import busybox:1 "$tmp/busybox.img" >/dev/null
}

# vm_run NAME CONTAINER SOCK [VM_ATTACH_ARGS...]: runs scripts/vm-attach (by PID, stopped at
# exit), its console in $tmp/NAME.log (printed when the test fails); fails unless the guest
# reports success. Prints how long the guest took.
vm_run() {
  local name=$1 container=$2 sock=$3 rc=0 start=$SECONDS
  shift 3
  background "$name" "$vm_attach_bin" "$container" --socket "$sock" --timeout 120 \
    --console "$tmp/$name.console" -q "$@"
  wait "$bg_pid" || rc=$?
  cat "$tmp/$name.console" >>"$tmp/$name.log" 2>/dev/null || true
  ((rc == 0)) || fail "vm-attach $name ($container $*) exited $rc: $(tail -n 40 "$tmp/$name.log")"
  log "guest $name ($container $*): ok in $((SECONDS - start)) s"
  check_guest_log "$tmp/$name.log"
}

# check_guest_log LOG: the guest's kernel reported no I/O error, NBD error, ext4 error or oops.
# "..MP-BIOS bug: 8254 timer not connected to IO-APIC" is not one: the kernel's boot-time timer
# check prints it when a TCG guest's vCPUs fall behind (a loaded host, or -smp 2).
check_guest_log() {
  local bad
  bad=$(grep -a -v 'MP-BIOS bug: 8254 timer not connected to IO-APIC' "$1" |
    grep -a -i -E 'I/O error|blk_update_request|critical medium|nbd[0-9]*: .*(error|fail)|EXT4-fs (error|warning)|Call Trace|BUG:|timed out' || true)
  [[ -z "$bad" ]] || fail "the guest's kernel reported errors: $bad"
}

# export_image CONTAINER SOCK FILE: copies the container out to FILE and e2fsck's it.
export_image() {
  nbdcopy "$(uri "$1" "$2")" "$3"
  e2fsck -fn "$3" >"$tmp/e2fsck.out" 2>&1 || fail "e2fsck of $1: $(cat "$tmp/e2fsck.out")"
}

# expect_file IMG PATH EXPECTED_FILE: /PATH in the ext4 image IMG equals EXPECTED_FILE.
expect_file() {
  debugfs -R "dump $2 $tmp/got" "$1" >/dev/null 2>&1 || true
  [[ -f "$tmp/got" ]] || fail "$2 is missing in $1"
  cmp "$3" "$tmp/got" || fail "$2 in $1 differs from what the guest wrote"
  rm -f "$tmp/got"
}
