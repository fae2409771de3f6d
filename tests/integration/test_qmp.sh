#!/bin/bash
# test_qmp.sh — guests that follow their container's allocation (issue 14 item 8; docs/vm.md),
# without booting one (the guest boots in vm/test_vm_launch.sh):
# - scripts/vm-launch --dry-run: the qemu command line built from `layer inspect --json`: -smp
#   from cpu (rounded up, at least 1), -m from memory (512M unset; --max-memory when larger, and
#   then the balloon to the allocation), the NBD drive, the balloon device, the QMP socket at
#   POOL/run/vm-CONTAINER.qmp; an unknown container exits 1, bad options 2, a second launch of a
#   container whose qemu runs 1;
# - `layer set --memory` against a real qemu (-S: its CPU never runs) listening on that QMP
#   socket with a virtio-balloon: the balloon command is accepted (state applied, live), a size
#   above the -m it booted with is refused with the reason (above_maximum), `--memory none` asks
#   for all of it; a qemu without a balloon device: failed, with qemu's error; no qemu (no socket,
#   or a socket left behind): no_guest. The record changes in every case, exit 0.
source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"
requires qemu-system-x86_64
requires /usr/bin/python3 -c 'import json'

pool=$tmp/pool
launch=$LAYER_SRC/scripts/vm-launch
layer init >/dev/null
truncate -s 16M "$tmp/base.raw"
layer image import base:1 "$tmp/base.raw" >/dev/null
layer clone base:1 c1 --cpu 1.5 --memory 256M >/dev/null
layer clone base:1 plain >/dev/null
layer clone base:1 tiny --cpu 0.001 --memory 100M >/dev/null
: >"$tmp/kernel"
: >"$tmp/initrd"

# ---- vm-launch --dry-run ----

# dry CONTAINER [ARGS...]: vm-launch's dry run with a given kernel and initrd, into $tmp/dry.
dry() {
  "$launch" "$1" --pool "$pool" --kernel "$tmp/kernel" --initrd "$tmp/initrd" --accel tcg \
    --dry-run "${@:2}" >"$tmp/dry" 2>"$tmp/dry.err" || fail "vm-launch --dry-run $*: $(cat "$tmp/dry.err")"
}
# has TEXT: the dry run's command line holds TEXT (arguments with spaces or ? in single quotes).
has() { grep -qF -- "$1" "$tmp/dry" || fail "vm-launch --dry-run: no '$1' in: $(cat "$tmp/dry")"; }

dry c1
has "qemu-system-x86_64 -name layer-c1 -accel tcg -smp 2 -m 256M "
has "-kernel $tmp/kernel -initrd $tmp/initrd -append 'console=ttyS0 root=/dev/vda' "
has "-drive 'file=nbd+unix:///c1?socket=$pool/run/nbd.sock,format=raw,if=virtio,discard=unmap' "
has "-device virtio-balloon-pci,id=balloon0 -qmp unix:$pool/run/vm-c1.qmp,server=on,wait=off"
grep -q 'balloon to' "$tmp/dry" && fail "a balloon at start without --max-memory: $(cat "$tmp/dry")"
dry c1 --max-memory 384M --socket "$tmp/other.sock" -- -cpu max
has "-smp 2 -m 384M "
has "socket=$tmp/other.sock,"
has "wait=off -cpu max"
grep -q '^# then QMP balloon to 268435456 bytes' "$tmp/dry" || fail "no balloon at start: $(cat "$tmp/dry")"
dry plain
has "-smp 1 -m 512M "
grep -q 'unset: the default' "$tmp/dry" || fail "the default memory is not said: $(cat "$tmp/dry")"
dry tiny --append "console=ttyS0 quiet"
has "-smp 1 -m 100M "
has "-append 'console=ttyS0 quiet' "
rc=0
"$launch" nosuch --pool "$pool" --initrd "$tmp/initrd" --dry-run 2>"$tmp/err" || rc=$?
[[ $rc == 1 ]] || fail "vm-launch of an unknown container: exit $rc, want 1: $(cat "$tmp/err")"
grep -q 'not found' "$tmp/err" || fail "vm-launch of an unknown container: $(cat "$tmp/err")"
for bad in "--max-memory lots" "--accel fast" "--bogus"; do
  rc=0
  # shellcheck disable=SC2086 # the option and its value
  "$launch" c1 --pool "$pool" $bad --dry-run 2>"$tmp/err" || rc=$?
  [[ $rc == 2 ]] || fail "vm-launch $bad: exit $rc, want 2"
done
log "vm-launch --dry-run: ok"

# ---- layer set --memory through QMP ----

qmp=$pool/run/vm-c1.qmp
# start_qemu NAME [QEMU_ARGS...]: a paused qemu (-S) with 256 MiB and its QMP socket at $qmp.
start_qemu() {
  local name=$1
  shift
  rm -f "$qmp"
  background "$name" qemu-system-x86_64 -accel tcg -M pc -S -nodefaults -no-user-config \
    -display none -m 256M -qmp "unix:$qmp,server=on,wait=off" "$@"
  qemu_pid=$bg_pid
  wait_until 30 test -S "$qmp" || fail "qemu $name did not open $qmp: $(cat "$tmp/$name.log")"
}
# set_memory SIZE: `layer --json set c1 --memory SIZE` (exit 0), its "guest" in $guest.
set_memory() {
  layer --json set c1 --memory "$1" >"$tmp/set.json" 2>"$tmp/set.err" ||
    fail "layer set c1 --memory $1: $(cat "$tmp/set.err")"
  guest=$(json_get 'j["guest"]' <"$tmp/set.json")
  log "set --memory $1: $guest"
}
# field NAME: the "guest" object's field.
field() { json_get "j[\"$1\"]" <<<"$guest"; }
memory_record() { layer --json inspect c1 | json_get 'j["resources"]["memory"]'; }

# No guest: no socket.
set_memory 192M
[[ "$(field state) $(field live)" == "no_guest False" ]] || fail "no socket: $guest"
[[ "$(field qmp)" == "$qmp" ]] || fail "the QMP path: $guest"
[[ $(memory_record) == 201326592 ]] || fail "the record after set: $(memory_record)"
layer set c1 --memory 200M | grep -q '; guest: no guest running' ||
  fail "set's text does not say there is no guest: $(layer set c1 --memory 200M)"
# Without --memory, nothing about a guest.
[[ "$(layer --json set c1 --cpu 2 | json_get 'j.get("guest", "absent")')" == absent ]] ||
  fail "set --cpu reports a guest"

start_qemu q1 -device virtio-balloon-pci,id=balloon0
# One guest per container: vm-launch refuses (exit 1) while the qemu of its PID file runs.
echo "$qemu_pid" >"$pool/run/vm-c1.pid"
rc=0
"$launch" c1 --pool "$pool" --socket "$qmp" --initrd "$tmp/initrd" --accel tcg 2>"$tmp/err" || rc=$?
[[ $rc == 1 ]] && grep -q "c1 already has a guest (qemu pid $qemu_pid" "$tmp/err" ||
  fail "a second vm-launch: exit $rc: $(cat "$tmp/err")"
rm -f "$pool/run/vm-c1.pid"
set_memory 192M
[[ "$(field state) $(field live) $(field target) $(field maximum)" == "applied True 201326592 268435456" ]] ||
  fail "set --memory 192M on a guest: $guest"
# The CPU never runs: no balloon driver moves, the guest still has all of it.
[[ "$(field actual)" == 268435456 ]] || fail "the paused guest's size: $guest"
layer set c1 --memory 128M | grep -q '; guest: balloon set to 128.0 MiB live' ||
  fail "set's text: $(layer set c1 --memory 128M)"
set_memory 512M
[[ "$(field state) $(field live) $(field target)" == "above_maximum False 536870912" ]] ||
  fail "set --memory above -m: $guest"
[[ "$(field message)" == *"more than the 256.0 MiB the guest booted with"* ]] ||
  fail "the reason: $guest"
[[ $(memory_record) == 536870912 ]] || fail "the record after set 512M: $(memory_record)"
set_memory none
[[ "$(field state) $(field target)" == "applied 268435456" ]] || fail "set --memory none: $guest"
[[ $(memory_record) == 0 ]] || fail "the record after set none: $(memory_record)"
kill_pid "$qemu_pid"

# A socket left behind by a qemu that died: no guest.
[[ -S "$qmp" ]] || background stale /usr/bin/python3 -c 'import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); time.sleep(0.2)' "$qmp"
wait_until 10 test -S "$qmp" || fail "no stale socket"
sleep 0.5
set_memory 192M
[[ "$(field state)" == no_guest && "$(field message)" == *"nothing answers"* ]] ||
  fail "a stale socket: $guest"

# A qemu without a balloon device: qemu's refusal, the record changed all the same.
start_qemu q2
set_memory 160M
[[ "$(field state) $(field live)" == "failed False" && "$(field message)" == *"balloon"* ]] ||
  fail "no balloon device: $guest"
[[ $(memory_record) == 167772160 ]] || fail "the record after a failed balloon: $(memory_record)"
kill_pid "$qemu_pid"
log "ok"
