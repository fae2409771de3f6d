#!/usr/bin/env bash
# test_cli.sh — the `layer` CLI contract (docs/cli-spec.md): user errors exit 1 with one line
# `layer: error: ...`; objects in use are refused; --json parses and matches golden files after
# filtering timestamps and paths; fsck is clean after a workload and reports a deleted layer
# file; `layer serve` serves.
#
# LAYER_UPDATE_GOLDEN=1 rewrites tests/integration/golden/*.json from this run.
# shellcheck source=functions.sh
source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires nbdinfo
requires nbdsh --version

golden_dir=$LAYER_SRC/tests/integration/golden
pool=$tmp/pool

# golden NAME: compares JSON on stdin, with timestamps and the pool path filtered out, to
# golden/NAME.json.
golden() {
  local name=$1 got=$tmp/golden-$1.json
  /usr/bin/python3 -c 'import json, sys
pool = sys.argv[1]
def scrub(v, key=None):
    if isinstance(v, dict):
        return {k: scrub(x, k) for k, x in v.items()}
    if isinstance(v, list):
        return [scrub(x) for x in v]
    if key == "created" and isinstance(v, int):
        return "<created>"
    if isinstance(v, str) and v.startswith(pool):
        return "<POOL>" + v[len(pool):]
    return v
print(json.dumps(scrub(json.load(sys.stdin)), indent=2, sort_keys=True))' "$pool" >"$got" ||
    fail "golden $name: not JSON"
  if [[ -n "${LAYER_UPDATE_GOLDEN:-}" ]]; then
    mkdir -p "$golden_dir"
    cp "$got" "$golden_dir/$name.json"
    log "updated $golden_dir/$name.json"
  elif ! diff -u "$golden_dir/$name.json" "$got" >&2; then
    fail "JSON of $name differs from golden/$name.json (LAYER_UPDATE_GOLDEN=1 rewrites it)"
  fi
}

# ---- version, init, the pool argument ----
"$LAYER_BIN" version >"$tmp/version" || fail "layer version"
[[ -s "$tmp/version" ]] || fail "layer version printed nothing"
"$LAYER_BIN" --json init "$pool" >"$tmp/init.json" || fail "layer init"
[[ $(json_get 'j["ok"]' <"$tmp/init.json") == True ]] || fail "init: $(cat "$tmp/init.json")"
expect_user_error "init over an existing pool" "$LAYER_BIN" init "$pool"
expect_user_error "wrong pool path" "$LAYER_BIN" --pool "$tmp/nonexistent" ls
mkdir "$tmp/notapool"
expect_user_error "a directory that is not a pool" "$LAYER_BIN" --pool "$tmp/notapool" ls
expect_user_error "no pool given" env -u LAYER_POOL "$LAYER_BIN" ls
LAYER_POOL=$pool "$LAYER_BIN" ls >/dev/null || fail "LAYER_POOL is not used"
"$LAYER_BIN" ls --pool "$pool" >/dev/null || fail "--pool after the command is refused"
"$LAYER_BIN" ls --json --pool "$pool" | /usr/bin/python3 -m json.tool >/dev/null ||
  fail "--json after the command"

# ---- images ----
make_image "$tmp/base.img" 4 5
head -c 1000 /dev/zero >"$tmp/odd.img"
layer image import base:1 "$tmp/base.img" --description "test image" >/dev/null
expect_user_error "NAME:VER without a version" layer image import base "$tmp/base.img"
expect_user_error "NAME:VER with an empty version" layer image import base: "$tmp/base.img"
expect_user_error "NAME:VER in upper case" layer image import Base:1 "$tmp/base.img"
expect_user_error "NAME:VER with .." layer image import a..b:1 "$tmp/base.img"
expect_user_error "NAME:VER with two colons" layer image import a:1:2 "$tmp/base.img"
expect_user_error "NAME:VER with a slash" layer image import ../a:1 "$tmp/base.img"
expect_user_error "missing import file" layer image import x:1 "$tmp/missing.img"
expect_user_error "image size not a multiple of 512" layer image import odd:1 "$tmp/odd.img"
expect_user_error "image already exists" layer image import base:1 "$tmp/base.img"
expect_user_error "bad block size" layer image import bs:1 "$tmp/base.img" --block-size 3000
layer --json image ls | golden image-ls

# ---- containers ----
layer clone base:1 c1 >/dev/null
layer --json clone base:1 c2 --size 8M >"$tmp/c2.json"
[[ $(json_get 'j["size"]' <"$tmp/c2.json") == $((8 << 20)) ]] || fail "clone --size 8M"
[[ $(json_get 'j["image"]' <"$tmp/c2.json") == base:1 ]] || fail "clone --json image"
expect_user_error "clone size not a multiple of 512" layer clone base:1 c3 --size 1000
expect_user_error "clone of an unknown image" layer clone nosuch:1 c3
expect_user_error "clone with a malformed image ref" layer clone base c3
expect_user_error "malformed container name" layer clone base:1 Bad/Name
expect_user_error "container name with .." layer clone base:1 ..
expect_user_error "container already exists" layer clone base:1 c1
expect_user_error "inspect an unknown container" layer inspect nosuch
expect_user_error "rm an unknown container" layer rm nosuch
expect_user_error "rm an unknown image" layer image rm nosuch:1
expect_user_error "unknown command" layer frobnicate

# --json errors are JSON on stderr.
rc=0
layer --json rm nosuch >/dev/null 2>"$tmp/err.json" || rc=$?
[[ $rc == 1 ]] || fail "--json rm nosuch: exit $rc"
[[ $(json_get 'j["error"]["exit"]' <"$tmp/err.json") == 1 ]] || fail "$(cat "$tmp/err.json")"
[[ $(json_get 'j["error"]["errno"]' <"$tmp/err.json") == ENOENT ]] || fail "$(cat "$tmp/err.json")"

# Every --json output parses.
for args in "image ls" "ls" "inspect c1" "fsck"; do
  # shellcheck disable=SC2086
  layer --json $args >"$tmp/out.json" || fail "layer --json $args"
  /usr/bin/python3 -m json.tool "$tmp/out.json" >/dev/null || fail "layer --json $args: not JSON"
done
layer --json inspect c1 | golden inspect-c1
layer --json ls | golden ls

# ---- objects in use ----
start_server s "$pool"
hold_connection "$(uri c1 "$server_sock")"
expect_user_error "rm of a served container" layer rm c1
[[ "$error_line" == *"pid $server_pid"* || "$error_line" == *serv* ]] ||
  fail "rm of a served container does not name the server: $error_line"
served_by=$(layer --json ls | json_get '[c["served_by"] for c in j if c["name"] == "c1"][0]')
[[ "$served_by" == "pid $server_pid" ]] || fail "ls: c1 served_by $served_by, want pid $server_pid"
served_by=$(layer --json ls | json_get '[c["served_by"] for c in j if c["name"] == "c2"][0]')
[[ "$served_by" == null ]] || fail "ls: c2 served_by $served_by"
expect_user_error "image rm while containers use it" layer image rm base:1
kill_pid "$holder_pid"
stop_server s
layer rm c1 >/dev/null || fail "rm after the server stopped"
[[ $(layer --json ls | json_get '" ".join(c["name"] for c in j)') == c2 ]] || fail "c1 not removed"
expect_user_error "image rm while c2 uses it" layer image rm base:1
layer --json rm c2 | json_get 'j["ok"]' | grep -qx True || fail "rm --json"
layer image rm base:1 >/dev/null || fail "image rm when unused"
[[ $(layer --json image ls) =~ ^[[:space:]]*\[[[:space:]]*\][[:space:]]*$ ]] ||
  fail "image ls after rm: $(layer --json image ls)"

# ---- layer serve ----
layer image import base:2 "$tmp/base.img" >/dev/null
layer clone base:2 w1 >/dev/null
# shellcheck disable=SC2046
background serve env $(nbdkit_env "$tmp/serve.sanitizer") "$LAYER_BIN" --pool "$pool" serve \
  --socket "$tmp/serve.sock" --threads 4
serve_pid=$bg_pid
wait_until 30 eval "nbdinfo --size '$(uri w1 "$tmp/serve.sock")' >/dev/null 2>&1" ||
  fail "layer serve did not serve: $(cat "$tmp/serve.log")"
size=$(nbdinfo --size "$(uri w1 "$tmp/serve.sock")")
((size == 4 << 20)) || fail "layer serve: size $size"
nbdinfo --list "nbd+unix://?socket=$tmp/serve.sock" | grep -qx 'export="w1":' ||
  fail "layer serve: w1 not listed"
# A workload, then stop the server (and whatever it started) by PID.
nbdsh -u "$(uri w1 "$tmp/serve.sock")" \
  -c 'import random; r = random.Random(7)' \
  -c 'for i in range(200): h.pwrite(r.randbytes(r.randrange(1, 9000)), r.randrange((4 << 20) - 9000))' \
  -c 'h.zero(65536, 65536)' -c 'h.trim(8192, 1 << 20)' -c 'h.flush()'
children=$(ps -o pid= --ppid "$serve_pid" || true)
if [[ -n "${LAYER_NBDKIT_PRELOAD:-}" ]]; then
  kill -TERM "$serve_pid"
  tolerate_exit_hang "$serve_pid"
fi
kill_pid "$serve_pid"
for child in $children; do
  if pid_alive "$child"; then
    kill_pid "$child"
    fail "layer serve left process $child running after it was stopped"
  fi
done
check_sanitizer_reports "$tmp/serve.sanitizer"
! nbdinfo --size "$(uri w1 "$tmp/serve.sock")" >/dev/null 2>&1 || fail "still served after stop"

# ---- layer serve: the printed URI percent-encodes the socket path ----
odd="$tmp/my pool%41"
"$LAYER_BIN" init "$odd" >/dev/null || fail "init of a pool path with a space and %"
"$LAYER_BIN" --pool "$odd" image import base:1 "$tmp/base.img" >/dev/null
"$LAYER_BIN" --pool "$odd" clone base:1 w2 >/dev/null
# shellcheck disable=SC2046
# Under a soft fd limit of 512 (300 connections below need ~900 fds): serve raises it to the hard.
# shellcheck disable=SC2016
background serve-odd bash -c 'ulimit -Sn 512 && exec "$@"' _ env $(nbdkit_env "$tmp/serve-odd.sanitizer") \
  "$LAYER_BIN" --pool "$odd" --json serve --threads 4 --default w2
serve_odd_pid=$bg_pid
wait_until 30 eval "grep -q '\"uri\"' '$tmp/serve-odd.log'" ||
  fail "layer serve printed no URI: $(cat "$tmp/serve-odd.log")"
printed_uri=$(grep '"uri"' "$tmp/serve-odd.log" | json_get 'j["uri"]')
[[ "$printed_uri" == "nbd+unix:///w2?socket=$tmp/my%20pool%2541/run/nbd.sock" ]] ||
  fail "layer serve printed $printed_uri, want the socket path percent-encoded"
wait_until 30 eval "nbdinfo --size '$printed_uri' >/dev/null 2>&1" ||
  fail "nbdinfo does not accept the printed URI $printed_uri: $(nbdinfo --size "$printed_uri" 2>&1)"
size=$(nbdinfo --size "$printed_uri")
((size == 4 << 20)) || fail "layer serve with an odd pool path: size $size"
# On its unix socket, serve lets one peer (here: this uid) hold as many connections as the
# server (1,000 VMs of a host may all be qemu's): 300, past the plugin's own default of 256,
# spread over 5 containers (each takes 64).
grep '"argv"' "$tmp/serve-odd.log" | json_get '" ".join(j["argv"])' |
  grep -q 'max-connections-per-peer=1024' || fail "serve's argv: $(grep '"argv"' "$tmp/serve-odd.log")"
for i in 3 4 5 6 7; do "$LAYER_BIN" --pool "$odd" clone base:1 "w$i" >/dev/null; done
held=$(/usr/bin/python3 - "$odd/run/nbd.sock" <<'EOF2'
import sys, nbd
handles = []
for i in range(300):
    h = nbd.NBD()
    h.set_export_name(f"w{3 + i % 5}")
    try:
        h.connect_unix(sys.argv[1])
        h.pread(512, 0)
    except nbd.Error as e:
        print(f"{len(handles)}: {e}")
        break
    handles.append(h)
print(len(handles))
EOF2
) || fail "300 connections: $held"
[[ $held == 300 ]] || fail "one peer held $held connections of 300 under layer serve's defaults"
read -r soft hard < <(awk '/^Max open files/ {print $4, $5}' "/proc/$serve_odd_pid/limits")
[[ $soft == "$hard" ]] || fail "serve left the soft fd limit at $soft (hard $hard)"
if [[ -n "${LAYER_NBDKIT_PRELOAD:-}" ]]; then
  kill -TERM "$serve_odd_pid"
  tolerate_exit_hang "$serve_odd_pid"
fi
kill_pid "$serve_odd_pid"
check_sanitizer_reports "$tmp/serve-odd.sanitizer"

# ---- fsck ----
layer fsck >"$tmp/fsck.out" 2>&1 || fail "fsck after a workload: $(cat "$tmp/fsck.out")"
[[ $(layer --json fsck | json_get 'j["ok"]') == True ]] || fail "fsck --json not ok"
delta=$(layer --json inspect w1 | json_get 'j["chain"][0]["path"]')
[[ "$delta" == /* ]] || delta=$pool/$delta
[[ -f "$delta" ]] || fail "delta layer file $delta does not exist after a flushed workload"
rm "$delta"
rc=0
layer fsck >"$tmp/fsck.out" 2>&1 || rc=$?
[[ $rc == 1 ]] || fail "fsck with a deleted layer file: exit $rc: $(cat "$tmp/fsck.out")"
layer_id=$(layer --json inspect w1 | json_get 'j["chain"][0]["layer"]')
grep -Eq "$(basename "$delta")|layer $layer_id" "$tmp/fsck.out" ||
  fail "fsck does not name the missing file: $(cat "$tmp/fsck.out")"
log "fsck: $(cat "$tmp/fsck.out")"
rc=0
layer --json fsck >"$tmp/fsck.json" 2>/dev/null || rc=$?
[[ $(json_get 'j["ok"]' <"$tmp/fsck.json") == False ]] || fail "fsck --json: $(cat "$tmp/fsck.json")"
[[ $(json_get 'len(j["problems"])' <"$tmp/fsck.json") -ge 1 ]] || fail "fsck --json: no problems"
log "ok"
