# shellcheck shell=bash
# functions.sh — shared helpers of the shell integration tests. Source it first:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"
#
# After sourcing: `set -euo pipefail`, a temp dir "$tmp", and an EXIT trap (`cleanup`) that runs
# the registered cleanup hooks in reverse order, then (after a failure) prints the servers' logs
# and removes "$tmp", also when a test fails half-way. A test that cannot run here calls
# `skip REASON` or `requires CMD...`, which exit 77 (ctest's SKIP_RETURN_CODE).
#
# Environment (from tests/integration/CMakeLists.txt): LAYER_BIN, LAYER_PLUGIN, LAYER_SRC, and
# in sanitizer builds LAYER_NBDKIT_PRELOAD (the ASan runtime, preloaded into nbdkit only).

set -euo pipefail

# nbdsh and other Python tools need the distribution's python3 (with the nbd module), not one
# earlier in PATH.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH

test_name=$(basename "$0" .sh)

log() { echo "$test_name: $*" >&2; }
fail() {
  echo "$test_name: FAIL: $*" >&2
  exit 1
}
skip() {
  echo "$test_name: SKIP: $*" >&2
  exit 77
}

# requires CMD [ARGS...]: skips unless the command runs successfully (e.g. `requires fio
# --version`); with only CMD, unless CMD is in PATH.
requires() {
  if (($# == 1)); then
    command -v "$1" >/dev/null 2>&1 || skip "$1 is not installed"
  else
    "$@" >/dev/null 2>&1 || skip "'$*' does not work here"
  fi
}

for var in LAYER_BIN LAYER_PLUGIN LAYER_SRC; do
  [[ -n "${!var:-}" ]] || skip "$var is not set (run the test through ctest)"
done
requires nbdkit

# ---- cleanup hooks ----

_cleanup_hooks=()
# cleanup_fn CMD [ARGS...]: run at exit, last registered first.
cleanup_fn() {
  local quoted
  printf -v quoted '%q ' "$@"
  _cleanup_hooks+=("$quoted")
}
cleanup() {
  local rc=$?
  trap - EXIT
  set +e
  local i
  for ((i = ${#_cleanup_hooks[@]} - 1; i >= 0; i--)); do
    eval "${_cleanup_hooks[i]}"
  done
  if [[ "$rc" != 0 && "$rc" != 77 && -n "${tmp:-}" ]]; then
    local f
    for f in "$tmp"/*.log; do
      [[ -s "$f" ]] || continue
      echo "---- $f (last 30 lines)" >&2
      tail -n 30 "$f" >&2
    done
  fi
  if [[ "$rc" == 0 && -n "${_sanitizer_failed:-}${_stop_failed:-}" ]]; then
    rc=1
  fi
  [[ -z "${tmp:-}" ]] || rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

tmpbase=${TMPDIR:-/tmp}
# Unix socket paths are limited to 108 bytes.
((${#tmpbase} <= 60)) || tmpbase=/tmp
tmp=$(mktemp -d "$tmpbase/layer-it.XXXXXX")

# ---- processes ----

# pid_alive PID: true while any thread of PID runs (a zombie counts as dead: a daemon's parent
# is gone and PID 1 may never reap it). Every thread, not just the first: a killed process
# whose main thread is a zombie may still have a thread finishing an fdatasync, and its files
# (and the locks on them) stay open until the last thread is gone.
pid_alive() {
  local task stat
  for task in "/proc/$1/task/"*/stat; do
    stat=$(cat "$task" 2>/dev/null) || continue
    stat=${stat##*) }
    [[ "${stat:0:1}" == Z || "${stat:0:1}" == X ]] || return 0
  done
  return 1
}

# wait_until TIMEOUT_SECONDS CMD [ARGS...]: polls CMD every 10 ms until it succeeds; fails after
# the timeout.
wait_until() {
  local timeout=$1
  shift
  local deadline=$((SECONDS + timeout))
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.01
  done
}

# kill_pid PID: SIGTERM, wait up to 15 s, then SIGKILL (and fail the test: a process that
# ignores SIGTERM is a bug).
kill_pid() {
  local pid=$1
  pid_alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_until 15 eval "! pid_alive $pid"; then
    # A process that cannot shut down is a bug (a server's final flush may never run).
    log "FAIL: pid $pid ($(tr '\0' ' ' <"/proc/$pid/cmdline")) did not exit within 15 s of" \
      "SIGTERM; sending SIGKILL"
    _stop_failed=1
    kill -KILL "$pid" 2>/dev/null || true
    wait_until 10 eval "! pid_alive $pid" || true
  fi
  # Reap it if it is our child (foreground mode); ignore it otherwise.
  wait "$pid" 2>/dev/null || true
}

# The watchdog: a detached process (its own session, so a ctest timeout, which SIGKILLs the
# test's process tree, does not reach it) that waits for this script to die. After a normal exit
# the EXIT trap has already cleaned up and $tmp is gone; when the script was killed without
# running its trap, it SIGKILLs every process recorded in a $tmp/*.pid file (daemonized servers
# are not in the script's tree), unmounts what is mounted under $tmp and removes $tmp. It polls
# every 0.2 s: bash cannot wait for a process that is not its child.
# shellcheck disable=SC2016 # expanded by the watchdog's shell
setsid -f bash -c '
  script=$1 tmp=$2
  trap "" INT TERM HUP
  alive() {
    local s
    s=$(cat "/proc/$script/stat" 2>/dev/null) || return 1
    s=${s##*) }
    [[ "${s:0:1}" != Z && "${s:0:1}" != X ]]
  }
  while alive; do sleep 0.2; done
  [[ -d "$tmp" ]] || exit 0
  for f in "$tmp"/*.pid; do
    [[ -s "$f" ]] && kill -KILL "$(cat "$f")" 2>/dev/null
  done
  while read -r _ mnt _; do
    [[ "$mnt" != "$tmp"/* ]] || umount -l "$mnt"
  done </proc/mounts
  rm -rf "$tmp"' watchdog "$$" "$tmp" </dev/null >/dev/null 2>&1

# The environment additions for nbdkit (ASan runtime in sanitizer builds), as NAME=VALUE words.
nbdkit_env() {
  local prefix=$1
  if [[ -n "${LAYER_NBDKIT_PRELOAD:-}" ]]; then
    echo "LD_PRELOAD=$LAYER_NBDKIT_PRELOAD" \
      "ASAN_OPTIONS=detect_leaks=0:log_path=$prefix" \
      "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$prefix"
  fi
}

# check_sanitizer_reports PREFIX: prints reports nbdkit's sanitizers wrote; fails the test.
check_sanitizer_reports() {
  local f
  for f in "$1".*; do
    [[ -e "$f" ]] || continue
    echo "$test_name: sanitizer report from nbdkit ($f):" >&2
    cat "$f" >&2
    _sanitizer_failed=1
  done
}

# start_server NAME POOL [NBDKIT_ARGS...] [-- PLUGIN_PARAMS...]: starts a daemonized nbdkit
# serving POOL on $tmp/NAME.sock with pidfile $tmp/NAME.pid (plugin parameters such as
# hasher=off after pool=POOL), waits for the pidfile (written once nbdkit accepts connections)
# and registers a hook stopping it. Sets server_pid and server_sock.
start_server() {
  local name=$1 pool=$2
  shift 2
  local nbdkit_args=() params=()
  while (($#)); do
    if [[ "$1" == -- ]]; then
      shift
      params=("$@")
      break
    fi
    nbdkit_args+=("$1")
    shift
  done
  local pidfile=$tmp/$name.pid sock=$tmp/$name.sock
  rm -f "$pidfile"
  local verbose=()
  # Without -v a daemonized nbdkit sends its stderr to /dev/null after the fork. Sanitizer runs
  # keep the debug log: stop_server reads it.
  [[ -z "${LAYER_TEST_VERBOSE:-}${LAYER_NBDKIT_PRELOAD:-}" ]] || verbose=(-v --log=stderr)
  # shellcheck disable=SC2046
  env $(nbdkit_env "$tmp/$name.sanitizer") \
    nbdkit "${verbose[@]}" -P "$pidfile" -U "$sock" "${nbdkit_args[@]}" "$LAYER_PLUGIN" \
    "pool=$pool" "${params[@]}" 2>>"$tmp/$name.log" ||
    fail "nbdkit $name did not start: $(cat "$tmp/$name.log")"
  wait_until 30 test -s "$pidfile" || fail "nbdkit $name wrote no pidfile"
  wait_until 5 grep -q '^[0-9][0-9]*$' "$pidfile" || fail "bad pidfile $pidfile"
  # shellcheck disable=SC2034 # used by the tests
  server_pid=$(cat "$pidfile") server_sock=$sock
  cleanup_fn stop_server "$name"
  log "started nbdkit $name (pid $server_pid)"
}

# stop_server NAME: stops the server started as NAME by its PID (no-op when already stopped).
stop_server() {
  local name=$1 pidfile=$tmp/$1.pid pid
  [[ -s "$pidfile" ]] || return 0
  pid=$(cat "$pidfile")
  if [[ -n "${LAYER_NBDKIT_PRELOAD:-}" ]] && pid_alive "$pid"; then
    kill -TERM "$pid"
    tolerate_exit_hang "$pid" "$tmp/$name.log"
  fi
  kill_pid "$pid"
  rm -f "$pidfile"
  check_sanitizer_reports "$tmp/$name.sanitizer"
}

# tolerate_exit_hang PID [LOG]: after SIGTERM, with libasan preloaded, an nbdkit whose worker
# threads called strerror() hangs in its exit handlers after the plugin is gone (p11-kit's
# destructor waits in freelocale for glibc's locale lock). When LOG (nbdkit -v) shows the
# plugin unloaded, or without a log after 15 s, SIGKILL it with a note instead of failing.
tolerate_exit_hang() {
  local pid=$1 log=${2:-}
  if [[ -n "$log" ]]; then
    wait_until 15 eval "! pid_alive $pid || grep -q 'debug: layer: unload plugin' '$log'" || return 0
    wait_until 2 eval "! pid_alive $pid" || true
  else
    wait_until 15 eval "! pid_alive $pid" || true
  fi
  if pid_alive "$pid"; then
    log "note: nbdkit $pid hangs in its exit handlers (known issue with libasan preloaded); SIGKILL"
    kill -KILL "$pid"
    wait_until 10 eval "! pid_alive $pid" || true
  fi
}

# hold_connection URI: keeps one NBD connection to URI open (after one read), so the server
# holds the export open, until killed; registers a hook killing it. Sets holder_pid.
hold_connection() {
  local ready=$tmp/holder.$RANDOM.ready
  /usr/bin/python3 -c 'import nbd, signal, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pread(512, 0)
open(sys.argv[2], "w").close()
signal.pause()' "$1" "$ready" &
  holder_pid=$!
  echo "$holder_pid" >"$tmp/holder-$holder_pid.pid"
  cleanup_fn kill_pid "$holder_pid"
  wait_until 30 eval "test -e $ready || ! pid_alive $holder_pid" || true
  [[ -e "$ready" ]] || fail "cannot hold a connection to $1"
}

# background NAME CMD [ARGS...]: runs CMD in the background (stdout and stderr to $tmp/NAME.log),
# recorded for the watchdog and stopped by PID at exit. Sets bg_pid.
background() {
  local name=$1
  shift
  "$@" >"$tmp/$name.log" 2>&1 &
  bg_pid=$!
  echo "$bg_pid" >"$tmp/$name.pid"
  cleanup_fn kill_pid "$bg_pid"
}

# uri NAME SOCK: the NBD URI of export NAME on unix socket SOCK.
uri() { echo "nbd+unix:///$1?socket=$2"; }

# ---- the CLI ----

# layer ARGS...: the CLI on $pool.
layer() { "$LAYER_BIN" --pool "$pool" "$@"; }

# expect_user_error DESCRIPTION CMD [ARGS...]: CMD must exit 1 with exactly one line on stderr,
# starting "layer: error:". Leaves that line in $error_line.
expect_user_error() {
  local what=$1
  shift
  local rc=0
  "$@" >"$tmp/out" 2>"$tmp/err" || rc=$?
  [[ "$rc" == 1 ]] || fail "$what: exit $rc, want 1; stderr: $(cat "$tmp/err")"
  [[ $(wc -l <"$tmp/err") == 1 ]] || fail "$what: stderr is not one line: $(cat "$tmp/err")"
  error_line=$(cat "$tmp/err")
  [[ "$error_line" == "layer: error: "* ]] || fail "$what: stderr: $error_line"
  log "$what: $error_line"
}

# json_get EXPR: reads JSON on stdin and prints the Python expression EXPR of it (`j` is the
# document), e.g. json_get 'j[0]["name"]'.
json_get() {
  /usr/bin/python3 -c 'import json, sys
j = json.load(sys.stdin)
v = eval(sys.argv[1])
print(json.dumps(v) if isinstance(v, (dict, list)) or v is None else v)' "$1"
}

# ---- data ----

# make_image FILE SIZE_MIB SEED: a raw image with holes, zeroes and pseudo-random data
# (reproducible from SEED).
make_image() {
  /usr/bin/python3 - "$1" "$2" "$3" <<'EOF'
import random, sys
path, mib, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
region = 64 * 1024
with open(path, "wb") as f:
    f.truncate(mib << 20)
    for off in range(0, mib << 20, region):
        kind = rng.randrange(4)
        if kind == 0:
            continue
        f.seek(off)
        if kind == 1:
            f.write(bytes(region))
        elif kind == 2:
            f.write(rng.randbytes(region))
        else:
            buf = bytearray(region)
            for _ in range(rng.randrange(1, 8)):
                at = rng.randrange(region - 100)
                buf[at:at + 100] = rng.randbytes(100)
            f.write(buf)
EOF
}
