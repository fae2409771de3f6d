#!/usr/bin/env bash
# test_vm_launch.sh — a guest follows its container's allocation (issue 14 item 8): a clone of the
# busybox image with --cpu 1.5 --memory 256M boots under scripts/vm-launch --max-memory 320M (TCG)
# from the pool's server; its rcS (replaced through NBD) prints the guest's CPU count and
# MemTotal every half second on the serial console. Checked: qemu runs with -smp 2 and the guest
# sees 2 CPUs; the balloon holds it at 256 MiB from boot (QMP query-balloon, read by the test's
# own client); `layer set --memory 192M` shrinks it live (query-balloon 192 MiB, the guest's
# MemTotal 64 MiB lower), `--memory 320M` grows it back (MemTotal up by 128 MiB), `--memory 1G`
# is refused live with the reason (above the 320 MiB it booted with) — all in the same qemu
# process; and stopping vm-launch stops qemu and removes its QMP socket and PID file.
# shellcheck source=vm_functions.sh
source "$(dirname "${BASH_SOURCE[0]}")/vm_functions.sh"

busybox_pool
layer clone busybox:1 g1 --cpu 1.5 --memory 256M >/dev/null
start_server s "$pool"
sock=$server_sock
qmp=$pool/run/vm-g1.qmp

# The guest's rcS: the image's own, then a report line every half second.
cat >"$tmp/rcS" <<'RCS'
#!/bin/sh
mount -a
while :; do
  echo "vm-launch-test: cpus $(grep -c ^processor /proc/cpuinfo) $(grep MemTotal /proc/meminfo)"
  sleep 0.5
done &
RCS
nbdcopy "$(uri g1 "$sock")" "$tmp/g1.img"
debugfs -w -f - "$tmp/g1.img" >"$tmp/debugfs.out" 2>&1 <<DEBUGFS
rm /etc/init.d/rcS
cd /etc/init.d
write $tmp/rcS rcS
sif rcS mode 0100755
DEBUGFS
expect_file "$tmp/g1.img" /etc/init.d/rcS "$tmp/rcS"
nbdcopy "$tmp/g1.img" "$(uri g1 "$sock")"
rm -f "$tmp/g1.img"

# qmp_actual: the guest's size now (query-balloon "actual"), through a QMP client of the test's own.
qmp_actual() {
  /usr/bin/python3 - "$qmp" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
f = s.makefile("rw")
def reply():
    while True:
        m = json.loads(f.readline())
        if "event" not in m:
            return m
reply()
for cmd in ("qmp_capabilities", "query-balloon"):
    f.write(json.dumps({"execute": cmd}) + "\n")
    f.flush()
    r = reply()
print(r["return"]["actual"])
PY
}
# mem_total: the guest's last reported MemTotal (kB).
mem_total() { grep -a -o 'vm-launch-test: cpus [0-9]* MemTotal: *[0-9]*' "$tmp/launch.log" | tail -n 1 | awk '{print $NF}'; }
# wait_actual BYTES: query-balloon reaches BYTES within 60 s (TCG is slow).
wait_actual() {
  local got deadline=$((SECONDS + 60))
  while got=$(qmp_actual) && [[ "$got" != "$1" ]]; do
    ((SECONDS < deadline)) || fail "the balloon stays at $got, want $1"
    sleep 0.2
  done
  [[ "$got" == "$1" ]] || fail "query-balloon failed"
}
# wait_mem_total KB: the guest reports that MemTotal (to 1 MiB) within 30 s (it prints twice a
# second).
mem_total_near() {
  local got
  got=$(mem_total)
  [[ -n "$got" ]] && ((got - $1 <= 1024 && $1 - got <= 1024))
}
wait_mem_total() {
  wait_until 30 mem_total_near "$1" || fail "the guest's MemTotal is $(mem_total) kB, want $1"
}
# set_memory SIZE: `layer --json set g1 --memory SIZE`, its "guest" in $guest.
set_memory() {
  layer --json set g1 --memory "$1" >"$tmp/set.json" 2>"$tmp/set.err" ||
    fail "layer set g1 --memory $1: $(cat "$tmp/set.err")"
  guest=$(json_get 'j["guest"]' <"$tmp/set.json")
  log "set --memory $1: $guest"
}
field() { json_get "j[\"$1\"]" <<<"$guest"; }

start=$SECONDS
background launch "$LAYER_SRC/scripts/vm-launch" g1 --pool "$pool" --socket "$sock" --accel tcg \
  --max-memory 320M --cache "$LAYER_VM_CACHE"
launch_pid=$bg_pid
wait_until 120 eval 'grep -a -q "vm-launch-test: cpus" "$tmp/launch.log" || ! pid_alive $launch_pid' || true
grep -a -q "vm-launch-test: cpus" "$tmp/launch.log" ||
  fail "the guest did not report within 120 s: $(tail -n 30 "$tmp/launch.log")"
log "the guest reported after $((SECONDS - start)) s"
qemu_pid=$(cat "$pool/run/vm-g1.pid")
pid_alive "$qemu_pid" || fail "no qemu at pid $qemu_pid"
tr '\0' ' ' <"/proc/$qemu_pid/cmdline" | grep -q -- '-smp 2 -m 320M ' ||
  fail "qemu's command line: $(tr '\0' ' ' <"/proc/$qemu_pid/cmdline")"
grep -a -q 'vm-launch-test: cpus 2 ' "$tmp/launch.log" ||
  fail "the guest does not see 2 CPUs: $(grep -a 'vm-launch-test' "$tmp/launch.log" | tail -n 1)"

# From boot: 320 MiB of -m, ballooned to the container's 256 MiB.
wait_actual $((256 << 20))
sleep 1 # a report after the balloon settled
at256=$(mem_total)
log "at 256 MiB: MemTotal $at256 kB"

set_memory 192M
[[ "$(field state) $(field live) $(field target)" == "applied True $((192 << 20))" ]] ||
  fail "set --memory 192M: $guest"
wait_actual $((192 << 20))
wait_mem_total $((at256 - 65536))
log "at 192 MiB: MemTotal $(mem_total) kB"

set_memory 320M
[[ "$(field state) $(field live)" == "applied True" ]] || fail "set --memory 320M: $guest"
wait_actual $((320 << 20))
wait_mem_total $((at256 + 65536))
log "at 320 MiB: MemTotal $(mem_total) kB"

set_memory 1G
[[ "$(field state) $(field live)" == "above_maximum False" ]] || fail "set --memory 1G: $guest"
[[ "$(field message)" == *"more than the 320.0 MiB the guest booted with"* ]] ||
  fail "the reason: $guest"
[[ $(qmp_actual) == $((320 << 20)) ]] || fail "the refused change moved the balloon"

# One qemu all along.
[[ "$(cat "$pool/run/vm-g1.pid")" == "$qemu_pid" ]] && pid_alive "$qemu_pid" ||
  fail "qemu $qemu_pid is gone or was replaced"
check_guest_log "$tmp/launch.log"

# Stopping vm-launch stops its guest and clears its run files.
kill_pid "$launch_pid"
wait_until 15 eval "! pid_alive $qemu_pid" || fail "qemu $qemu_pid outlived vm-launch"
[[ ! -e "$qmp" && ! -e "$pool/run/vm-g1.pid" && ! -e "$pool/run/vm-g1" ]] ||
  fail "run files left: $(ls "$pool/run")"
log "ok in $((SECONDS - start)) s"
