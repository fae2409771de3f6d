#!/usr/bin/env bash
# test_systemd.sh — the systemd units (packaging/systemd): `systemd-analyze verify` passes on
# layer@.service and layer@.socket (with this build's man pages on MANPATH, so their
# Documentation= pages resolve); the service keeps its hardening; and the service's own ExecStart
# line (pool /var/lib/layer/%i -> a pool in $tmp, plugin name -> this build's plugin) serves
# through socket activation: `systemd-socket-activate -l SOCK` execs nbdkit on the first
# connection, with LISTEN_FDS/LISTEN_PID, and real clients read and write through that socket;
# data written and flushed survives a restart of the activated server.
# shellcheck source=functions.sh
source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires systemd-analyze
requires systemd-socket-activate
requires nbdsh --version
requires nbdinfo

units=$LAYER_SRC/packaging/systemd
service=$units/layer@.service
socket=$units/layer@.socket

# ---- systemd-analyze verify ----
mkdir -p "$tmp/units" "$tmp/man/man1"
cp "$service" "$socket" "$tmp/units/"
verify_args=()
man_dir=${LAYER_BUILD_DIR:-}/packaging/man
if [[ -n "${LAYER_BUILD_DIR:-}" && -f "$man_dir/layer.1" && -f "$man_dir/nbdkit-layer-plugin.1" ]]; then
  cp "$man_dir"/*.1 "$tmp/man/man1/"
else
  log "note: no man pages built here (pandoc missing?): verifying with --man=no"
  verify_args=(--man=no)
fi
# A template is verified as an instance ("layer@i"); the socket is found beside the service.
MANPATH=$tmp/man:/usr/share/man systemd-analyze verify "${verify_args[@]}" \
  "$tmp/units/layer@.service" "$tmp/units/layer@.socket" >"$tmp/verify.log" 2>&1 ||
  fail "systemd-analyze verify: $(cat "$tmp/verify.log")"
[[ ! -s "$tmp/verify.log" ]] || fail "systemd-analyze verify warns: $(cat "$tmp/verify.log")"
log "systemd-analyze verify: clean"

# A broken unit must fail the same check (the check is not vacuous).
sed 's|^ExecStart=/usr/bin/nbdkit|ExecStart=/usr/bin/nbdkit-missing|' "$service" \
  >"$tmp/units/layer@.service"
if MANPATH=$tmp/man:/usr/share/man systemd-analyze verify "${verify_args[@]}" \
  "$tmp/units/layer@.service" >/dev/null 2>&1; then
  fail "systemd-analyze verify accepts a service whose binary is missing"
fi

# ---- the settings the service must keep ----
for setting in 'User=layer' 'Restart=on-failure' 'ProtectSystem=strict' 'NoNewPrivileges=yes' \
  'ReadWritePaths=/var/lib/layer/%i' 'Requires=layer@%i.socket'; do
  grep -qxF "$setting" "$service" || fail "layer@.service lacks $setting"
done
grep -qx 'ListenStream=/run/layer/%i.sock' "$socket" || fail "layer@.socket: unexpected ListenStream"
exec_line=$(sed -n 's/^ExecStart=//p' "$service")
[[ $(grep -c '^ExecStart=' "$service") == 1 ]] || fail "layer@.service: not one ExecStart"
read -r -a unit_argv <<<"$exec_line"
[[ "${unit_argv[0]}" == /usr/bin/nbdkit ]] || fail "ExecStart does not run /usr/bin/nbdkit: $exec_line"
for word in "${unit_argv[@]}"; do
  case $word in
    -U | -p | -i | -s | --unix | --port | --ipaddr | --single | --run | -U* | -p* | --unix=* | --port=*)
      fail "ExecStart has $word: nbdkit refuses it under socket activation"
      ;;
  esac
done

# ---- socket activation with the unit's own command line ----
pool=$tmp/pool
"$LAYER_BIN" init "$pool" >/dev/null
make_image "$tmp/base.img" 4 20
layer image import base:1 "$tmp/base.img" >/dev/null
layer clone base:1 c1 >/dev/null

argv=()
for word in "${unit_argv[@]}"; do
  word=${word//\/var\/lib\/layer\/%i/$pool}
  [[ "$word" == layer ]] && word=$LAYER_PLUGIN  # the plugin, by name once installed
  [[ "$word" != *%* ]] || fail "unexpanded specifier left in ExecStart word: $word"
  argv+=("$word")
done
argv[0]=$(command -v nbdkit)
log "activated command: ${argv[*]}"

sock=$tmp/nbd.sock
env_args=()
for kv in $(nbdkit_env "$tmp/activated.sanitizer"); do
  env_args+=(-E "$kv")
done

# start_activated NAME: systemd-socket-activate listening on $sock; sets act_pid.
start_activated() {
  rm -f "$sock"
  background "$1" systemd-socket-activate -l "$sock" "${env_args[@]}" "${argv[@]}"
  act_pid=$bg_pid
  wait_until 30 test -S "$sock" || fail "systemd-socket-activate did not listen on $sock"
  # Nothing runs nbdkit before a client connects: the process is still the activator.
  [[ $(cat "/proc/$act_pid/comm") == systemd-socket* ]] ||
    fail "pid $act_pid is $(cat "/proc/$act_pid/comm") before any connection"
}

start_activated activated1
# The first connection starts nbdkit (exec in place: same pid) on the inherited socket.
nbdinfo --list "$(uri "" "$sock")" >"$tmp/list" || fail "nbdinfo --list through the activated socket"
grep -q 'export="c1"' "$tmp/list" || fail "c1 is not listed: $(cat "$tmp/list")"
[[ $(cat "/proc/$act_pid/comm") == nbdkit ]] ||
  fail "after the first connection pid $act_pid is $(cat "/proc/$act_pid/comm"), not nbdkit"
tr '\0' '\n' <"/proc/$act_pid/environ" | grep -qx 'LISTEN_FDS=1' ||
  fail "nbdkit was not given LISTEN_FDS=1"

# Read the whole disk and compare it with the image; write a pattern and flush.
nbdsh -u "$(uri c1 "$sock")" -c "
import sys
ref = open('$tmp/base.img', 'rb').read()
assert h.get_size() == len(ref), h.get_size()
assert h.pread(len(ref), 0) == ref, 'the clone differs from its image'
h.pwrite(b'\\xa5' * 65536, 1048576)
h.pwrite(b'socket-activated', 4096 * 3 + 100)
h.flush()
" || fail "reading or writing c1 through the activated socket"
log "c1 read back equal to its image; wrote and flushed"

# Multiple connections through the same activated server (no second exec).
nbdinfo "$(uri c1 "$sock")" >/dev/null || fail "a second connection"
[[ $(cat "/proc/$act_pid/comm") == nbdkit ]] || fail "the activated server is gone"

kill_pid "$act_pid"
check_sanitizer_reports "$tmp/activated.sanitizer"

# A fresh activation sees the flushed data.
/usr/bin/python3 - "$tmp/base.img" "$tmp/expected.img" <<'PY'
import sys
data = bytearray(open(sys.argv[1], "rb").read())
data[1048576:1048576 + 65536] = b"\xa5" * 65536
off = 4096 * 3 + 100
data[off:off + 16] = b"socket-activated"
open(sys.argv[2], "wb").write(data)
PY
start_activated activated2
nbdsh -u "$(uri c1 "$sock")" -c "
ref = open('$tmp/expected.img', 'rb').read()
assert h.pread(len(ref), 0) == ref, 'data written before the restart is not there'
" || fail "data after re-activation"
kill_pid "$act_pid"
check_sanitizer_reports "$tmp/activated.sanitizer"
log "ok"
