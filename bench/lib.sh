# bench/lib.sh — helpers shared by bench/run and bench/snapshots. Sourced, not run.
#
# The sourcing script sets, before calling these: BENCH_SELF (its name, for messages), REPO,
# BENCH_DIR, BASE_SIZE, THREADS, SHARED, BUILD_DIR; and, before start_server, RUN-based SOCK and
# PIDFILE and the POOL a layer server serves. Sets, for the caller: PRIORITY, PLUGIN, LAYER, RUN,
# BASE, BASE_BYTES, CACHE_NOTE, CMDLINE (peer -> the exact command line of its last server).
# shellcheck shell=bash disable=SC2034

die() { echo "$BENCH_SELF: $*" >&2; exit 1; }
say() { printf '%s\n' "$*"; }
has() { [[ " $2 " == *" $1 "* ]]; }

# ---- priority ----
# Everything started from here (servers, fio) inherits this: on a shared 2-core machine a
# build running beside the bench then takes CPU only when the bench leaves it idle.
bench_priority() {  # sets PRIORITY
  PRIORITY="normal (not root: could not raise it)"
  if [[ ${BENCH_NICE:-1} == 1 && $EUID == 0 ]] && renice -n -20 -p $$ >/dev/null 2>&1; then
    PRIORITY="nice -20"
    if ionice -c 1 -n 0 -p $$ 2>/dev/null; then PRIORITY+=", ionice realtime"; fi
  elif [[ ${BENCH_NICE:-1} != 1 ]]; then
    PRIORITY="normal (BENCH_NICE=0)"
  fi
}

# ---- build ----
bench_build() {  # builds BUILD_DIR unless BENCH_NO_BUILD=1; sets PLUGIN and LAYER
  if [[ ${BENCH_NO_BUILD:-0} != 1 ]]; then
    say "building $BUILD_DIR (Release) ..."
    cmake -S "$REPO" -B "$BUILD_DIR" -DLAYER_TESTS=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null
    cmake --build "$BUILD_DIR" -j"$(nproc)" >/dev/null
  fi
  PLUGIN=$BUILD_DIR/plugin/nbdkit-layer-plugin.so
  LAYER=$BUILD_DIR/tools/layer
  [[ -f $PLUGIN && -x $LAYER ]] || die "no plugin or CLI in $BUILD_DIR"
}

# ---- work dir, cleanup ----
CUR_PID=""      # the one server running, if any
EXTRA_PIDS=()   # other processes of the bench to stop at exit (clients held open, fio)
EXTRA_DIRS=()   # more dirs to remove at exit (e.g. a tmpfs run dir)
bench_rundir() {  # makes BENCH_DIR/cache and a fresh run dir RUN, removed at exit
  mkdir -p "$BENCH_DIR/cache"
  BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
  RUN=$(mktemp -d "$BENCH_DIR/run.XXXXXX")
  trap cleanup EXIT
  trap 'exit 130' INT TERM
}
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  local pid
  for pid in "${EXTRA_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  [[ -z $CUR_PID ]] || stop_pid "$CUR_PID"
  if [[ ${BENCH_KEEP:-0} == 1 ]]; then
    echo "$BENCH_SELF: kept $RUN ${EXTRA_DIRS[*]}" >&2
  else
    rm -rf "$RUN" "${EXTRA_DIRS[@]}"
  fi
}

stop_pid() {  # stop_pid PID: SIGTERM, wait (a layer server flushes on exit), then SIGKILL
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 600; i++)); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  echo "$BENCH_SELF: server $pid ignored SIGTERM for 60 s; killing it" >&2
  kill -KILL "$pid" 2>/dev/null || true
}

# ---- page cache ----
CACHE_NOTE=""
drop_caches() {
  sync
  if ! { echo 3 > /proc/sys/vm/drop_caches; } 2>/dev/null; then
    CACHE_NOTE="could not drop the page cache (not root?): the 'cold' reads started warm"
    return 1
  fi
}

# ---- base images (cached) ----
to_bytes() { numfmt --from=iec "$1"; }
bench_base() {  # sets BASE_BYTES and BASE, the random raw image of BASE_SIZE (made once, cached)
  BASE_BYTES=$(to_bytes "$BASE_SIZE")
  BASE=$BENCH_DIR/cache/base-$BASE_SIZE.raw
  if [[ ! -f $BASE || $(stat -c %s "$BASE") != "$BASE_BYTES" ]]; then
    say "generating $BASE ($BASE_SIZE of random data, cached for later runs) ..."
    # AES-CTR keystream: incompressible, fast, and the same bytes on every machine.
    # (head closes the pipe early: openssl's SIGPIPE is expected, hence no pipefail here.)
    (set +o pipefail
     openssl enc -aes-128-ctr -nosalt -pass pass:layer-bench -pbkdf2 -in /dev/zero 2>/dev/null \
       | head -c "$BASE_BYTES" > "$BASE.tmp")
    [[ $(stat -c %s "$BASE.tmp") == "$BASE_BYTES" ]] || die "could not write $BASE"
    mv "$BASE.tmp" "$BASE"
  fi
}
BIG_NAME=sparse-16G.raw
make_big() {  # make_big PATH: the 16 GiB sparse image (64 MiB of data in 16 places), from BASE
  local big=$1 i
  [[ -f $big ]] && return 0
  say "generating $big (16 GiB sparse, 64 MiB of data in 16 places) ..."
  truncate -s 16G "$big.tmp"
  for i in $(seq 0 15); do
    head -c 4M "$BASE" | dd of="$big.tmp" bs=1M seek=$((i * 1024)) conv=notrunc status=none
  done
  mv "$big.tmp" "$big"
}

# ---- machine and versions ----
bench_machine() {  # the "== machine ==" section, up to the priority line
  say ""
  say "== machine =="
  say "date:       $(date -u '+%Y-%m-%d %H:%M UTC')"
  say "cpu:        $(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
  say "memory:     $(free -g | awk '/^Mem:/ {print $2 " GiB"}')"
  say "bench dir:  $BENCH_DIR ($(df -T "$BENCH_DIR" | awk 'NR==2 {print $2 " on " $1}'))"
  say "kernel:     $(uname -r)"
  say "layer:      $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet HEAD -- lib plugin 2>/dev/null || echo ' (lib/plugin modified)'), $BUILD_DIR (Release)"
  say "nbdkit:     $(nbdkit --version)"
  say "qemu-nbd:   $(qemu-nbd --version | head -1)"
  say "fio:        $(fio --version)"
  say "priority:   $PRIORITY (servers and fio inherit it)"
}

# ---- servers ----
declare -A CMDLINE
# One server at a time, on SOCK (RUN/nbd.sock), its PID in CUR_PID. POOL is the layer pool.
QCOW2_OPTS_DEFAULT=""                                  # cluster_size=64k, extended_l2=off
QCOW2_OPTS_XL2="-o extended_l2=on,cluster_size=128k"
qcow2_opts() { [[ $1 == qcow2-xl2 ]] && echo "$QCOW2_OPTS_XL2" || echo "$QCOW2_OPTS_DEFAULT"; }
start_server() {  # start_server PEER TARGET LOG  (TARGET: container name or image file)
  local peer=$1 target=$2 log=$3
  rm -f "$SOCK" "$PIDFILE"
  local -a cmd
  # hasher=off: the background hasher would read snapshot layers beside the measured I/O
  # and, holding a layer's lock, keep a measured merge from happening.
  # shellcheck disable=SC2206  # BENCH_LAYER_OPTS splits into parameters on purpose
  case $peer in
    layer) cmd=(nbdkit --log=stderr -U "$SOCK" -P "$PIDFILE" --threads "$THREADS" "$PLUGIN"
                "pool=$POOL" hasher=off ${BENCH_LAYER_OPTS:-}) ;;
    file|file-sparse)
           cmd=(nbdkit --log=stderr -U "$SOCK" -P "$PIDFILE" --threads "$THREADS" file
                "file=$target") ;;
    qcow2|qcow2-xl2)
           cmd=(qemu-nbd --fork --pid-file="$PIDFILE" -t -k "$SOCK" -x "$peer" --shared="$SHARED"
                --cache=writeback --aio=threads -f qcow2 "$target") ;;
  esac
  CMDLINE[$peer]="${cmd[*]}"
  if ! "${cmd[@]}" >>"$log" 2>&1; then
    cat "$log" >&2
    die "$peer: server failed to start: ${cmd[*]}"
  fi
  local i
  for ((i = 0; i < 100; i++)); do [[ -s $PIDFILE && -S $SOCK ]] && break; sleep 0.05; done
  [[ -s $PIDFILE && -S $SOCK ]] || { cat "$log" >&2; die "$peer: server did not come up: ${cmd[*]}"; }
  CUR_PID=$(cat "$PIDFILE")
}
HZ=$(getconf CLK_TCK)
server_cpu() {  # "TOTAL USER" CPU seconds (all threads) the current server has used
  awk -v hz="$HZ" '{print ($14 + $15) / hz, $14 / hz}' "/proc/$CUR_PID/stat" 2>/dev/null || echo "0 0"
}
machine_user() { awk -v hz="$HZ" '/^cpu / {print ($2 + $3) / hz; exit}' /proc/stat; }
stop_server() { stop_pid "$CUR_PID"; CUR_PID=""; }

uri_for() {  # uri_for PEER TARGET
  case $1 in
    layer) echo "nbd+unix:///$2?socket=$SOCK" ;;
    file|file-sparse) echo "nbd+unix:///?socket=$SOCK" ;;
    *) echo "nbd+unix:///$1?socket=$SOCK" ;;
  esac
}

# ---- other load on the machine ----
# On 2 cores any other busy process (a build, a test suite) distorts a cell. Before each cell
# we wait (up to BENCH_WAIT_IDLE s, default 60) until user CPU on the machine is under 10% of
# a core, and after it we count the user CPU time spent by processes other than the server and
# fio; a cell where that exceeds 10% of a core is marked '*'.
# Once a wait has timed out the machine is taken to be busy for good: no more waiting.
WAIT_IDLE=${BENCH_WAIT_IDLE:-60}
wait_quiet() {
  local waited=0 a b busy
  (( WAIT_IDLE > 0 )) || return 0
  while :; do
    a=$(machine_user); sleep 1; b=$(machine_user)
    busy=$(awk -v a="$a" -v b="$b" 'BEGIN {print (b - a > 0.1) ? 1 : 0}')
    (( busy )) || return 0
    if (( waited == 0 )); then echo "  (machine busy: waiting up to ${WAIT_IDLE}s for it to go quiet)" >&2; fi
    if (( ++waited >= WAIT_IDLE )); then
      echo "  (still busy; running anyway, and not waiting again)" >&2
      WAIT_IDLE=0
      return 0
    fi
  done
}
