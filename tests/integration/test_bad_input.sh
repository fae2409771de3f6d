#!/usr/bin/env bash
# test_bad_input.sh — the bad-input census (issue 15): a table of bad inputs, by category, each
# tried for real against a real nbdkit with the plugin and the real CLI:
# - nbd: requests beyond, straddling and far past the end (2^63, 2^64-512), huge and zero lengths,
#   writes, zeroes, trims, flushes and FUA on read-only exports (a snapshot, a server run with
#   -r); unaligned requests that must succeed and match a model;
# - export: unknown, empty, over-long, path-like, control-character, upper-case, unknown-snapshot
#   and malformed `@` export names: each fails to connect, the server keeps serving;
# - cli: for every subcommand, missing arguments, unknown flags, bad sizes, names, durations,
#   rates, counts, unknown objects, --pool at a non-pool and a missing path: exit 1, one line
#   `layer: error: ...` on stderr, and with --json one JSON error object there instead;
# - pool-damage (on copies of the pool): truncated index, missing index directory, missing,
#   truncated, extended and bit-flipped layer files, a read-only pool: fsck reports (exit 1 or
#   2, never a crash), nbdkit refuses with one line or serves with EIO where damaged;
# - full-disk: the whole pool on a small full tmpfs: clone, snapshot, import, commit, flatten and
#   a tier move fail with exit 1 and "No space left on device", fsck stays clean.
# Every case must fail cleanly (no signal, no exit >= 128, the server alive); the digests of every
# container and snapshot read over NBD, and fsck, are unchanged after each category. The last
# line counts the cases run per category.
# shellcheck source=functions.sh
source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"
requires /usr/bin/python3 -c 'import nbd'
requires nbdcopy

# The server's log is checked for refused export names: keep nbdkit's stderr.
export LAYER_TEST_VERBOSE=1
pool=$tmp/pool
declare -A count=()
categories=()
# counted CATEGORY: one more case run in CATEGORY.
counted() {
  [[ -n "${count[$1]:-}" ]] || categories+=("$1")
  count[$1]=$((${count[$1]:-0} + 1))
}

layer init "$pool" >/dev/null
make_image "$tmp/base.img" 4 11
layer image import base:1 "$tmp/base.img" >/dev/null
layer clone base:1 c1 >/dev/null
layer clone base:1 c2 --size 8M >/dev/null
layer clone base:1 scratch --size 80M >/dev/null

# Some writes into c1, then snapshot s1, more writes after it (c1 and c1@s1 differ).
start_server s "$pool"
/usr/bin/python3 - "$(uri c1 "$server_sock")" <<'PY'
import random, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
r = random.Random(3)
for _ in range(40):
    h.pwrite(r.randbytes(r.randrange(1, 20000)), r.randrange(h.get_size() - 20000))
h.flush()
PY
layer snapshot c1 s1 >/dev/null
nbdsh -u "$(uri c1 "$server_sock")" -c 'h.pwrite(b"after s1" * 512, 12345)' -c 'h.flush()'
layer image import base:2 "$tmp/base.img" >/dev/null
layer gc >/dev/null

intact=(c1 c2 c1@s1)
# digests: sha256 of every intact export's content, read over NBD, one "NAME DIGEST" per line.
digests() {
  local sock=$1 name
  for name in "${intact[@]}"; do
    echo "$name $(nbdcopy "$(uri "$name" "$sock")" - | sha256sum | cut -d' ' -f1)"
  done
}
digests "$server_sock" >"$tmp/digests.before"
layer fsck >"$tmp/fsck.before" 2>&1 || fail "fsck before the census: $(cat "$tmp/fsck.before")"

# intact_check WHAT: the server still runs, every digest is unchanged and fsck is clean.
intact_check() {
  pid_alive "$server_pid" || fail "$1: the server died"
  digests "$server_sock" >"$tmp/digests.now" || fail "$1: cannot read the exports back"
  diff -u "$tmp/digests.before" "$tmp/digests.now" >&2 || fail "$1: content changed"
  layer fsck >"$tmp/fsck.now" 2>&1 || fail "$1: fsck: $(cat "$tmp/fsck.now")"
}

# ================================ nbd: bad requests =======================================
# A read-only server beside it: -r, on a copy of the pool (one server per container).
cp -a "$pool" "$tmp/ropool"
rm -f "$tmp/ropool/run/"*.sock
start_server ro "$tmp/ropool" -r
ro_sock=$server_sock ro_pid=$server_pid
server_pid=$(cat "$tmp/s.pid") server_sock=$tmp/s.sock

/usr/bin/python3 - "$server_sock" "$ro_sock" >"$tmp/nbd.out" <<'PY' || fail "nbd census: $(cat "$tmp/nbd.out")"
import errno, random, sys, nbd
sock, ro_sock = sys.argv[1:3]
E = errno.errorcode
failures = []
n = 0

def connect(s, name):
    h = nbd.NBD()
    h.set_strict_mode(0)          # libnbd passes every request through to the server
    h.set_export_name(name)
    h.connect_unix(s)
    return h

def readall(h):
    size = h.get_size()
    return b"".join(h.pread(min(32 << 20, size - o), o) for o in range(0, size, 32 << 20))

def case(what, fn, want):
    """want: an errno (the request must fail with it), 'ok', or a set of acceptable outcomes."""
    global n
    n += 1
    try:
        fn()
        got = "ok"
    except nbd.Error as e:
        got = E.get(e.errno, str(e.errno)) if e.errno else "no-errno"
        msg = str(e.string or "")
        if not msg.strip() or "\n" in msg.strip():
            failures.append(f"{what}: error message {msg!r} is not one non-empty line")
    wants = want if isinstance(want, set) else {want}
    if got not in wants:
        failures.append(f"{what}: got {got}, want {'/'.join(sorted(wants))}")
    print(f"nbd: {what}: {got}", file=sys.stderr)

h = connect(sock, "scratch")
size = h.get_size()
model = bytearray(readall(h))
buf = b"\x5a" * 8192
big = 1 << 63

# Beyond, straddling and far past the end (nbdkit: ENOSPC for writes and zeroes, EINVAL else).
for off, length, where in [(size, 1, "at the end"), (size - 512, 1024, "straddling the end"),
                           (size + 4096, 4096, "past the end"), (big - 4096, 4096, "at 2^63"),
                           (big, 512, "at 2^63 exactly"), ((1 << 64) - 512, 512, "at 2^64-512"),
                           ((1 << 64) - 512, 1024, "wrapping past 2^64")]:
    case(f"read {length} {where}", lambda: h.pread(length, off), "EINVAL")
    case(f"write {length} {where}", lambda: h.pwrite(buf[:length], off), "ENOSPC")
    case(f"write+FUA {length} {where}", lambda: h.pwrite(buf[:length], off, nbd.CMD_FLAG_FUA),
         "ENOSPC")
    case(f"zero {length} {where}", lambda: h.zero(length, off), "ENOSPC")
    case(f"trim {length} {where}", lambda: h.trim(length, off), "EINVAL")
    case(f"cache {length} {where}", lambda: h.cache(length, off), "EINVAL")
    case(f"block-status {length} {where}",
         lambda: h.block_status(length, off, lambda *a: 0), "EINVAL")
# Huge lengths from offset 0 (past the end of the disk).
for length in [1 << 31, (1 << 32) - 1]:
    case(f"zero of {length} bytes", lambda: h.zero(length, 0), "ENOSPC")
    case(f"trim of {length} bytes", lambda: h.trim(length, 0), "EINVAL")
    # libnbd refuses a read over 64 MiB itself (ERANGE), even with strict mode off.
    case(f"read of {length} bytes", lambda: h.pread(length, 0), {"EINVAL", "ERANGE"})
# A 40 MiB read inside the disk: over the 32 MiB maximum the plugin advertises; served or
# refused with EINVAL, and if served, right.
def big_read():
    got = h.pread(40 << 20, 4096)
    assert got == bytes(model[4096:4096 + (40 << 20)]), "40 MiB read differs"
case("read of 40 MiB inside the disk", big_read, {"ok", "EINVAL"})
# Zero-length requests: nbdkit refuses them before the plugin (its range check wants count > 0),
# with its errno for a bad range: ENOSPC for writes and zeroes, EINVAL for the rest.
for what, fn, want in [("read", lambda: h.pread(0, 4096), "EINVAL"),
                       ("write", lambda: h.pwrite(b"", 4096), "ENOSPC"),
                       ("zero", lambda: h.zero(0, 4096), "ENOSPC"),
                       ("trim", lambda: h.trim(0, 4096), "EINVAL"),
                       ("read at the end", lambda: h.pread(0, size), "EINVAL")]:
    case(f"zero-length {what}", fn, want)
# The connection still serves after all of that, and nothing was written.
h.flush()
case("model after the refused requests", lambda: None if readall(h) == bytes(model) else
     (_ for _ in ()).throw(AssertionError("scratch changed")), "ok")

# Unaligned requests must succeed and match the model.
r = random.Random(15)
for i in range(24):
    off = r.randrange(size - 70000) | 1
    length = r.choice([1, 3, 511, 513, 4095, 4097, 65537])
    kind = i % 3
    if kind == 0:
        data = r.randbytes(length)
        def op(): h.pwrite(data, off, nbd.CMD_FLAG_FUA if i % 2 else 0)
        model[off:off + length] = data
    elif kind == 1:
        def op(): h.zero(length, off)
        model[off:off + length] = bytes(length)
    else:
        def op(): h.trim(length, off)
        model[off:off + length] = bytes(length)
    case(f"unaligned {['write', 'zero', 'trim'][kind]} of {length} at {off}", op, "ok")
    got = h.pread(length + 2, off - 1)
    if got != bytes(model[off - 1:off + length + 1]):
        failures.append(f"unaligned {['write', 'zero', 'trim'][kind]} of {length} at {off}: read back differs")
h.flush()
case("unaligned: the whole disk matches the model",
     lambda: None if readall(h) == bytes(model) else
     (_ for _ in ()).throw(AssertionError("differs")), "ok")
h.shutdown()

# Read-only exports: a snapshot (on the read-write server) and a container on a server run -r.
for s, name in [(sock, "c1@s1"), (ro_sock, "c1")]:
    ro = connect(s, name)
    before = ro.pread(65536, 0)
    case(f"{name}: read-only flag", lambda: None if ro.is_read_only() else
         (_ for _ in ()).throw(AssertionError("not read-only")), "ok")
    case(f"{name}: write", lambda: ro.pwrite(b"x" * 4096, 0), "EPERM")
    case(f"{name}: unaligned write", lambda: ro.pwrite(b"x" * 3, 4095), "EPERM")
    case(f"{name}: write+FUA", lambda: ro.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_FUA), "EPERM")
    case(f"{name}: zero", lambda: ro.zero(4096, 0), "EPERM")
    case(f"{name}: trim", lambda: ro.trim(4096, 0), "EPERM")
    case(f"{name}: write beyond the end", lambda: ro.pwrite(b"x", ro.get_size()),
         {"EPERM", "ENOSPC"})
    # A flush on a read-only export has nothing to do: served, or refused with EINVAL.
    case(f"{name}: flush", lambda: ro.flush(), {"ok", "EINVAL"})
    case(f"{name}: read still works", lambda: None if ro.pread(65536, 0) == before else
         (_ for _ in ()).throw(AssertionError("changed")), "ok")
    ro.shutdown()

for f in failures:
    print("FAIL", f)
print("count", n)
sys.exit(1 if failures else 0)
PY
count[nbd]=$(sed -n 's/^count //p' "$tmp/nbd.out")
categories+=(nbd)
pid_alive "$ro_pid" || fail "the read-only server died"
stop_server ro
intact_check "nbd"
log "nbd: ${count[nbd]} cases"

# ================================ export names ============================================
long4096=$(printf 'a%.0s' $(seq 4096))
long5000=$(printf 'b%.0s' $(seq 5000))
/usr/bin/python3 - "$server_sock" "$long4096" "$long5000" >"$tmp/export.out" <<'PY' ||
import sys, nbd
sock, long4096, long5000 = sys.argv[1:4]
names = ["nosuch", "", long4096, long5000, "c1" + "x" * 4094, "/c1", "c1/", "a/b", "../c1",
         "c1/..", "..", ".", "../../etc/passwd", "c1\x01", "c1\t", "c1\n", "c1\nforged: line", "c1\r\n", "\x7f", "c1\x1b[0m",
         "C1", "Scratch", "c1@nosuch", "c1@", "@s1", "@", "c1@S1", "c1@s1@s1", "c1@../s1",
         "c1@s1..", "c1@..s1", "c1@s1..nosuch", "c1@nosuch..s1", "nosuch@s1", " c1", "c1 ",
         "c1\u00e9", "c1%2f..", "c1@s1/x"]
failures = []
for name in names:
    h = nbd.NBD()
    try:
        h.set_export_name(name)  # libnbd may refuse one over 4096 bytes before the server sees it
        h.connect_unix(sock)
        failures.append(f"export {name[:40]!r}: connected")
        h.shutdown()
    except nbd.Error as e:
        # libnbd's message quotes the name as sent: judge the rest of it.
        msg = (e.string or "")
        msg = (msg.replace(name, "NAME") if name else msg).strip()
        if not msg or "\n" in msg:
            failures.append(f"export {name[:40]!r}: message {msg!r} is not one non-empty line")
        print(f"export {name[:40]!r}: {msg}", file=sys.stderr)
    # The server keeps serving.
    ok = nbd.NBD()
    ok.set_export_name("c2")
    ok.connect_unix(sock)
    ok.pread(512, 0)
    ok.shutdown()
for f in failures:
    print("FAIL", f)
print("count", len(names))
sys.exit(1 if failures else 0)
PY
  fail "export census: $(cat "$tmp/export.out")"
count[export]=$(sed -n 's/^count //p' "$tmp/export.out")
categories+=(export)
grep -q 'unknown export "nosuch"' "$tmp/s.log" || fail "the server log does not name the refused export"
# A name with a newline is one error line, its control characters escaped: it forges no line.
# (nbdkit's own debug lines, with -v, quote it raw: not the plugin's.)
! grep -q '^forged: line.*not a container name' "$tmp/s.log" ||
  fail "an export name forged a line in the server log"
grep -q 'unknown export "c1\\x0aforged: line"' "$tmp/s.log" ||
  fail "the server log does not show the name with a newline escaped"
# The same in `layer audit`'s table.
layer audit >"$tmp/audit.out" || fail "layer audit: $(cat "$tmp/audit.out")"
! grep -q '^forged: line' "$tmp/audit.out" || fail "an export name forged a line in layer audit"
grep -q 'c1\\x0aforged: line' "$tmp/audit.out" || fail "layer audit does not escape the name"
intact_check "export names"
log "export: ${count[export]} cases"

# ================================ cli: malformed arguments ================================
mkdir "$tmp/notapool"
echo data >"$tmp/afile"
long70=$(printf 'n%.0s' $(seq 70))
# cli_error DESCRIPTION ARGS...: `layer ARGS` (no --pool added) must exit 1 with one line
# "layer: error: ..." on stderr and nothing on stdout; the same with --json: one JSON object
# {"error": {"exit": 1, ...}} on stderr.
cli_error() {
  local what=$1 rc=0 run=("$LAYER_BIN")
  shift
  if [[ "$1" == NOPOOL ]]; then
    run=(env -u LAYER_POOL "$LAYER_BIN")
    shift
  fi
  timeout 20 "${run[@]}" "$@" >"$tmp/cli.out" 2>"$tmp/cli.err" || rc=$?
  ((rc < 128)) || fail "cli: $what: killed by a signal or timed out (exit $rc): $(cat "$tmp/cli.err")"
  [[ "$rc" == 1 ]] || fail "cli: $what: exit $rc, want 1: $(cat "$tmp/cli.err")"
  [[ $(wc -l <"$tmp/cli.err") == 1 ]] || fail "cli: $what: stderr is not one line: $(cat "$tmp/cli.err")"
  grep -q '^layer: error: .' "$tmp/cli.err" || fail "cli: $what: stderr: $(cat "$tmp/cli.err")"
  [[ ! -s "$tmp/cli.out" ]] || fail "cli: $what: printed on stdout: $(cat "$tmp/cli.out")"
  rc=0
  timeout 20 "${run[@]}" --json "$@" >"$tmp/cli.out" 2>"$tmp/cli.err" || rc=$?
  [[ "$rc" == 1 ]] || fail "cli --json: $what: exit $rc, want 1: $(cat "$tmp/cli.err")"
  [[ $(wc -l <"$tmp/cli.err") == 1 ]] || fail "cli --json: $what: stderr: $(cat "$tmp/cli.err")"
  # Checked all at once after the category (cli_json_check): one python, not 500.
  printf '%s\t%s\n' "${what//$'\n'/ }" "$(cat "$tmp/cli.err")" >>"$tmp/cli-json.tsv"
  counted cli
}
P=(--pool "$pool")

# Every command that takes arguments, without them, and with an unknown flag.
while read -r -a cmd; do
  cli_error "${cmd[*]}: a required argument missing" "${P[@]}" "${cmd[@]}"
done <<'EOF'
image import
image import x:1
image history
image rm
clone
clone base:1
inspect
rm
snapshot create
snapshot create c1
snapshot ls
snapshot rm
snapshot rm c1
rollback
rollback c1
commit
commit c1
diff
diff c1
flatten
access
pool set
tier move
tier move c1
apply
EOF
while read -r -a cmd; do
  cli_error "${cmd[*]}: an unknown flag" "${P[@]}" "${cmd[@]}" --no-such-flag
  cli_error "${cmd[*]}: an extra argument" "${P[@]}" "${cmd[@]}" extra1 extra2 extra3
done <<'EOF'
init
image import x:1 /dev/null
image ls
image history base:1
image rm base:9
clone base:1 x
ls
inspect c1
rm nosuch
snapshot create c1 x
snapshot ls c1
snapshot rm c1 nosuch
rollback c1 s1
commit c1 x:1
diff c1 c2
gc
flatten c1
serve
access c1
audit
pool show
pool set --access open
tier move c1 ssd
tier status
tier policy
tier run
fsck
scrub
index backup
index ls
index restore
version
apply /dev/null
EOF
cli_error "an unknown command" "${P[@]}" frobnicate
cli_error "an unknown image subcommand" "${P[@]}" image frobnicate
cli_error "an unknown tier subcommand" "${P[@]}" tier frobnicate
cli_error "an unknown index subcommand" "${P[@]}" index frobnicate
cli_error "an unknown global flag" "${P[@]}" --verbose ls
# Specs of layer apply that are not specs (test_apply.sh has the bad fields).
cli_error "apply: an empty spec" "${P[@]}" apply /dev/null
cli_error "apply: a directory" "${P[@]}" apply "$tmp"
cli_error "apply: no such spec" "${P[@]}" apply "$tmp/no-such-spec.json"

# Bad sizes, wherever a size is taken.
for bad in -5 1.5X 99999999999999999999T 0 1000 12Q "" " " 1e9 0x1000 4K4 -0 18446744073709551616; do
  cli_error "clone --size '$bad'" "${P[@]}" clone base:1 x --size "$bad"
done
for bad in -4096 1.5X 3000 0 2M 99999999999999999999T abc; do
  cli_error "image import --block-size '$bad'" "${P[@]}" image import x:1 "$tmp/base.img" --block-size "$bad"
done
cli_error "clone --size smaller than the image" "${P[@]}" clone base:1 x --size 1M
for bad in -5 1.5X 99999999999999999999T abc; do
  cli_error "tier move --rate '$bad'" "${P[@]}" tier move c2 hdd --rate "$bad"
  cli_error "tier run --rate '$bad'" "${P[@]}" tier run --rate "$bad"
  cli_error "tier policy --move-rate '$bad'" "${P[@]}" tier policy --move-rate "$bad"
  cli_error "scrub --rate '$bad'" "${P[@]}" scrub --rate "$bad"
done
for bad in 150% 0% -1% abc% 1.5X -5; do
  cli_error "tier policy --ssd-high-water '$bad'" "${P[@]}" tier policy --ssd-high-water "$bad"
done
# Bad durations, rates and counts.
for bad in 5q -1s "" 1.5h 99999999999999999999d s 1m1 10x -; do
  cli_error "tier policy --cold-after '$bad'" "${P[@]}" tier policy --cold-after "$bad"
  cli_error "tier policy --half-life '$bad'" "${P[@]}" tier policy --half-life "$bad"
  cli_error "serve --tier-interval '$bad'" "${P[@]}" serve --tier-interval "$bad" --socket "$tmp/never.sock"
done
for bad in xyz -1h 1.5h 99999999999999999999d 1e10 "$(printf '9%.0s' $(seq 400))"; do
  cli_error "audit --since '$bad'" "${P[@]}" audit --since "$bad"
done
for bad in -1 abc 1.5 99999999999999999999; do
  cli_error "audit --limit '$bad'" "${P[@]}" audit --limit "$bad"
done
for bad in -1 abc nan inf 1e400; do
  cli_error "tier policy --cold-rate '$bad'" "${P[@]}" tier policy --cold-rate "$bad"
  cli_error "tier policy --hot-rate '$bad'" "${P[@]}" tier policy --hot-rate "$bad"
done
cli_error "tier policy: hot rate under the cold rate" "${P[@]}" tier policy --cold-rate 5 --hot-rate 1
for bad in 0 1025 -1 abc; do
  cli_error "serve --threads '$bad'" "${P[@]}" serve --threads "$bad" --socket "$tmp/never.sock"
done
for bad in 0 65536 -1 abc; do
  cli_error "serve --port '$bad'" "${P[@]}" serve --port "$bad"
done
cli_error "serve --max-connections -1" "${P[@]}" serve --max-connections -1 --socket "$tmp/never.sock"
cli_error "serve --socket and --port" "${P[@]}" serve --socket "$tmp/never.sock" --port 10999
cli_error "serve --listen without --port" "${P[@]}" serve --listen 127.0.0.1
cli_error "serve off loopback without TLS" "${P[@]}" serve --port 10999 --listen 0.0.0.0
cli_error "serve --tls-psk of a missing file" "${P[@]}" serve --port 10999 --tls-psk "$tmp/nosuch.psk"
cli_error "serve --default of an unknown container" "${P[@]}" serve --default nosuch --socket "$tmp/never.sock"
cli_error "serve --default of a bad name" "${P[@]}" serve --default ../x --socket "$tmp/never.sock"

# Bad names, wherever a name is taken.
for bad in "" ../x "$long70" a/b A .. a..b -x .hidden "a b" "x@y" $'a\nb' $'a\rb' $'\xff' "é"; do
  cli_error "clone to '$bad'" "${P[@]}" clone base:1 "$bad"
  cli_error "snapshot named '$bad'" "${P[@]}" snapshot create c1 "$bad"
  cli_error "inspect '$bad'" "${P[@]}" inspect "$bad"
  cli_error "commit as '$bad:1'" "${P[@]}" commit c1 "$bad:1"
  cli_error "image import '$bad:1'" "${P[@]}" image import "$bad:1" "$tmp/base.img"
done
for bad in base base: :1 base:1:2 a..b:1 ../a:1 "base:$long70" "Base:1" "base:1@s"; do
  cli_error "clone of image '$bad'" "${P[@]}" clone "$bad" x
  cli_error "image history '$bad'" "${P[@]}" image history "$bad"
  cli_error "image rm '$bad'" "${P[@]}" image rm "$bad"
done
cli_error "rollback --keep-as a bad name" "${P[@]}" rollback c1 s1 --keep-as ../x
cli_error "index restore ../x" "${P[@]}" index restore ../x
cli_error "index restore /etc/passwd" "${P[@]}" index restore /etc/passwd
cli_error "tier move to a bad tier" "${P[@]}" tier move c2 nvme
cli_error "tier move to an empty tier" "${P[@]}" tier move c2 ""
cli_error "pool set --access closed" "${P[@]}" pool set --access closed
for bad in 1000 user:no-such-user-here addr:10.0.0.0/33 addr:nonsense uid: uid:-1 gid:abc \
  "uid:99999999999999999999" ""; do
  cli_error "access --allow '$bad'" "${P[@]}" access c2 --allow "$bad"
done
cli_error "access --read-only alone" "${P[@]}" access c2 --read-only
cli_error "access --remove of no rule" "${P[@]}" access c2 --remove uid:4242

# Unknown objects.
cli_error "clone of an unknown image" "${P[@]}" clone nosuch:1 x
cli_error "clone of an unknown snapshot" "${P[@]}" clone c1@nosuch x
cli_error "clone of an unknown container's snapshot" "${P[@]}" clone nosuch@s1 x
cli_error "clone to an existing name" "${P[@]}" clone base:1 c2
cli_error "inspect an unknown container" "${P[@]}" inspect nosuch
cli_error "rm an unknown container" "${P[@]}" rm nosuch
cli_error "image rm an unknown image" "${P[@]}" image rm nosuch:1
cli_error "image rm an image in use" "${P[@]}" image rm base:1
cli_error "image history of an unknown image" "${P[@]}" image history nosuch:1
cli_error "image import over an existing image" "${P[@]}" image import base:1 "$tmp/base.img"
cli_error "image import of a missing file" "${P[@]}" image import x:1 "$tmp/missing.img"
cli_error "image import of a directory" "${P[@]}" image import x:1 "$tmp"
cli_error "image import of a 5-byte file" "${P[@]}" image import x:1 "$tmp/afile"
cli_error "snapshot of an unknown container" "${P[@]}" snapshot create nosuch s
cli_error "snapshot that exists" "${P[@]}" snapshot create c1 s1
cli_error "snapshot ls of an unknown container" "${P[@]}" snapshot ls nosuch
cli_error "snapshot rm of an unknown snapshot" "${P[@]}" snapshot rm c1 nosuch
cli_error "rollback to an unknown snapshot" "${P[@]}" rollback c1 nosuch
cli_error "rollback of an unknown container" "${P[@]}" rollback nosuch s1
cli_error "rollback of a served container without --force" "${P[@]}" rollback c1 s1 --keep-as s1
cli_error "commit of an unknown container" "${P[@]}" commit nosuch x:1
cli_error "commit over an existing image" "${P[@]}" commit c2 base:1
cli_error "diff with an unknown snapshot" "${P[@]}" diff c1@nosuch c1
cli_error "diff with an unknown container" "${P[@]}" diff c1 nosuch
cli_error "flatten an unknown container" "${P[@]}" flatten nosuch
cli_error "access of an unknown container" "${P[@]}" access nosuch
cli_error "audit of a bad container name" "${P[@]}" audit ../x
cli_error "tier move of an unknown layer" "${P[@]}" tier move 99999 ssd
cli_error "tier move of layer 0" "${P[@]}" tier move 0 ssd
cli_error "tier move of an unknown container" "${P[@]}" tier move nosuch ssd
cli_error "tier move of an unknown image" "${P[@]}" tier move nosuch:1 ssd
cli_error "scrub of an unknown container" "${P[@]}" scrub nosuch
cli_error "scrub of an unknown snapshot" "${P[@]}" scrub c1@nosuch
cli_error "scrub of an unknown layer" "${P[@]}" scrub 99999
cli_error "index restore of an unknown copy" "${P[@]}" index restore nosuch
cli_error "index restore while served" "${P[@]}" index restore
cli_error "init over an existing pool" init "$pool"
cli_error "init in a non-empty directory" init "$tmp"
cli_error "init on a file" init "$tmp/afile"
cli_error "init with no pool" NOPOOL init
cli_error "init with a tier dir that is a file" init "$tmp/newpool" --ssd "$tmp/afile"
cli_error "init with the pool's own ssd dir" init "$tmp/newpool2" --ssd "$pool/tiers/ssd"
[[ ! -e "$tmp/newpool" && ! -e "$tmp/newpool2" ]] || log "note: a refused init left its directory"

# --pool at a directory that is not a pool, a missing path, a file; and no pool at all.
while read -r -a cmd; do
  for bad in "$tmp/notapool" "$tmp/missing" "$tmp/afile" ""; do
    cli_error "${cmd[*]} --pool '$bad'" --pool "$bad" "${cmd[@]}"
  done
  cli_error "${cmd[*]} with no pool" NOPOOL "${cmd[@]}"
done <<'EOF'
image import x:1 /dev/null
image ls
image history base:1
image rm base:1
clone base:1 x
ls
inspect c1
rm c1
snapshot create c1 x
snapshot ls c1
snapshot rm c1 s1
rollback c1 s1
commit c1 x:1
diff c1 c2
gc
flatten c1
serve
access c1
audit
pool show
pool set --access rules
tier move c1 hdd
tier status
tier policy
tier run
fsck
scrub
index backup
index ls
index restore
EOF
# Every --json error: one object {"error": {"exit": 1, "errno": "E...", "message": "..."}}.
/usr/bin/python3 - "$tmp/cli-json.tsv" >"$tmp/cli-json.out" <<'PY' || fail "cli --json: $(tail -3 "$tmp/cli-json.out")"
import json, sys
bad, n = [], 0
for line in open(sys.argv[1], encoding="utf-8", errors="surrogateescape", newline="\n"):
    what, _, err = line.rstrip("\n").partition("\t")
    n += 1
    try:
        e = json.loads(err)["error"]
        ok = e["exit"] == 1 and e["message"].strip() and e["errno"].startswith("E")
    except Exception:
        ok = False
    if not ok:
        bad.append(f"{what}: {err}")
print("\n".join(bad) or f"{n} JSON errors ok")
sys.exit(1 if bad else 0)
PY
log "cli --json: $(cat "$tmp/cli-json.out")"
intact_check "cli"
log "cli: ${count[cli]} cases"

# ================================ pool-damage: on copies ==================================
# Each damaged copy is bind-mounted over the pool's path in a private mount namespace
# (unshare -m, root only), where fsck and nbdkit see the copy alone: a pool made before tiers
# were stored relative to it (or with tiers outside it) names the original's tier directories.
stop_server s
pool_files() {
  (cd "$pool" && find . -type f ! -name lock.mdb ! -path './run/*' ! -path './log/*' -print0 |
    sort -z | xargs -0 sha256sum)
}
damage_ok=1
unshare -m --propagation private true 2>/dev/null || damage_ok=0
if ((damage_ok == 0)); then
  log "pool-damage: skipped (unshare -m needs root)"
else
  pool_files >"$tmp/pool-files.before"
  base_layer=$(layer --json inspect c2 | json_get 'j["chain"][-1]["layer"]')
  base_file=$(layer --json inspect c2 | json_get 'j["chain"][-1]["path"]')
  c1_delta=$(layer --json inspect c1 | json_get 'j["chain"][0]["path"]')
  copy=$tmp/copy
  # in_copy CMD...: CMD with the damaged copy at the pool's path.
  # shellcheck disable=SC2016 # expanded by the inner shell
  in_copy() {
    unshare -m --propagation private bash -c 'mount --bind "$1" "$2" && shift 2 && exec "$@"' \
      _ "$copy" "$pool" "$@"
  }
  new_copy() {
    rm -rf "$copy"
    cp -a "$pool" "$copy"
    rm -f "$copy/run/"*.sock
  }
  # damaged_fsck WHAT WANT_RC PATTERN [FSCK_ARGS...]: fsck of the copy exits WANT_RC (1: problems,
  # 2: a damaged index), its last line is "layer: error: ...", and its output matches PATTERN.
  damaged_fsck() {
    local what=$1 want=$2 pattern=$3 rc=0
    shift 3
    in_copy "$LAYER_BIN" --pool "$pool" fsck "$@" >"$tmp/dfsck.out" 2>&1 || rc=$?
    ((rc < 128)) || fail "pool-damage: $what: fsck $*: killed (exit $rc)"
    [[ "$rc" == "$want" ]] || fail "pool-damage: $what: fsck $*: exit $rc, want $want: $(cat "$tmp/dfsck.out")"
    [[ $(tail -n 1 "$tmp/dfsck.out") == "layer: error: "?* ]] ||
      fail "pool-damage: $what: fsck $*: no error line: $(cat "$tmp/dfsck.out")"
    grep -Eq "$pattern" "$tmp/dfsck.out" || fail "pool-damage: $what: fsck $*: $(cat "$tmp/dfsck.out")"
  }
  # damaged_serve WHAT EXPECT: nbdkit (verify=on) on the copy. EXPECT "refuse": it exits 1 with
  # one line "nbdkit: error: ..."; else "EXPORT=ok|EIO ..." for each export read whole.
  # shellcheck disable=SC2016 # expanded by the inner shell
  damaged_serve() {
    local what=$1 expect=$2
    rm -f "$tmp/d.pid" "$tmp/d.sock"
    in_copy bash -c '
      tmp=$1 plugin=$2 pool=$3 expect=$4
      nbdkit -f -U "$tmp/d.sock" -P "$tmp/d.pid" "$plugin" pool="$pool" verify=on \
        2>"$tmp/d.err" &
      pid=$!
      for _ in $(seq 1500); do
        [[ -s "$tmp/d.pid" ]] && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.02
      done
      if [[ ! -s "$tmp/d.pid" ]]; then
        rc=0
        wait "$pid" || rc=$?
        echo "refused $rc"
        exit 0
      fi
      /usr/bin/python3 - "$tmp/d.sock" $expect <<"PY"
import hashlib, errno, sys, nbd
sock = sys.argv[1]
for item in sys.argv[2:]:
    name = item.split("=")[0]
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///{name}?socket={sock}")
    size = h.get_size()
    try:
        for off in range(0, size, 1 << 20):
            h.pread(min(1 << 20, size - off), off)
        print(f"{name}=ok")
    except nbd.Error as e:
        print(f"{name}={errno.errorcode.get(e.errno, e.errno)}")
    h.shutdown()
PY
      kill "$pid"
      wait "$pid" || true
      echo "stopped"' _ "$tmp" "$LAYER_PLUGIN" "$pool" "$expect" >"$tmp/dserve.out" 2>&1 ||
      fail "pool-damage: $what: the server check failed: $(cat "$tmp/dserve.out")"
    if [[ "$expect" == refuse ]]; then
      grep -qx 'refused 1' "$tmp/dserve.out" ||
        fail "pool-damage: $what: nbdkit did not refuse with exit 1: $(cat "$tmp/dserve.out" "$tmp/d.err")"
      [[ $(grep -c . "$tmp/d.err") == 1 && $(cat "$tmp/d.err") == "nbdkit: error: "?* ]] ||
        fail "pool-damage: $what: nbdkit's refusal is not one line: $(cat "$tmp/d.err")"
      log "pool-damage: $what: nbdkit: $(cat "$tmp/d.err")"
    else
      local want
      for want in $expect; do
        grep -qx "$want" "$tmp/dserve.out" ||
          fail "pool-damage: $what: want $want, got: $(cat "$tmp/dserve.out"); log: $(tail -5 "$tmp/d.err")"
      done
      grep -qx stopped "$tmp/dserve.out" || fail "pool-damage: $what: $(cat "$tmp/dserve.out")"
      if [[ "$expect" == *EIO* ]]; then
        grep -q "layer [0-9]" "$tmp/d.err" ||
          fail "pool-damage: $what: no log line names the layer: $(tail -5 "$tmp/d.err")"
      fi
    fi
  }

  # The index: truncated to 0, to 4096 bytes, to half; its directory gone.
  mdb=$copy/index/data.mdb
  for cut in 0 4096 half; do
    new_copy
    if [[ "$cut" == half ]]; then truncate -s $(($(stat -c %s "$mdb") / 2)) "$mdb"; else truncate -s "$cut" "$mdb"; fi
    damaged_fsck "data.mdb cut to $cut" 2 'index .* is damaged'
    damaged_serve "data.mdb cut to $cut" refuse
    counted pool-damage
  done
  new_copy
  rm -rf "$copy/index"
  damaged_fsck "no index directory" 1 'not a layer pool'
  damaged_serve "no index directory" refuse
  counted pool-damage

  # The image's layer file (every export reads it): missing, truncated, extended.
  rel=${base_file#"$pool"/}
  new_copy
  rm "$copy/$rel"
  damaged_fsck "missing layer file" 1 "layer $base_layer: file .* is missing"
  damaged_serve "missing layer file" "c2=EIO c1=EIO c1@s1=EIO"
  counted pool-damage
  new_copy
  truncate -s 1M "$copy/$rel"
  damaged_fsck "truncated layer file" 1 "layer $base_layer: file .* is 1048576 bytes, index says"
  damaged_serve "truncated layer file" "c2=EIO"
  counted pool-damage
  new_copy
  truncate -s 5M "$copy/$rel"
  damaged_fsck "extended layer file" 1 "layer $base_layer: file .* is 5242880 bytes, index says"
  counted pool-damage
  # c1's delta gone: c1 fails, c2 (which does not use it) still reads.
  new_copy
  rm "$copy/${c1_delta#"$pool"/}"
  damaged_fsck "missing delta file" 1 "file .* is missing"
  damaged_serve "missing delta file" "c1=EIO c2=ok"
  counted pool-damage

  # A flipped byte in the frozen image layer: fsck --full and scrub name the layer, plain fsck
  # does not read data; a server with verify=on fails the reads of that block with EIO.
  new_copy
  off=$(/usr/bin/python3 -c '
import os, sys
f = os.open(sys.argv[1], os.O_RDONLY)
print(os.lseek(f, 0, os.SEEK_DATA) + 100)' "$copy/$rel")
  printf '\xa5' | dd of="$copy/$rel" bs=1 seek="$off" conv=notrunc status=none
  cmp -s "$copy/$rel" "$base_file" && fail "the byte flip changed nothing"
  damaged_fsck "flipped byte (fsck --full)" 1 "layer $base_layer: checksum mismatch at offset" --full
  rc=0
  in_copy "$LAYER_BIN" --pool "$pool" scrub >"$tmp/scrub.out" 2>&1 || rc=$?
  [[ "$rc" == 1 ]] || fail "pool-damage: scrub of a flipped byte: exit $rc: $(cat "$tmp/scrub.out")"
  grep -q "layer $base_layer" "$tmp/scrub.out" || fail "pool-damage: scrub: $(cat "$tmp/scrub.out")"
  damaged_serve "flipped byte (verify=on)" "c2=EIO"
  counted pool-damage

  # A read-only pool, as an unprivileged uid: fsck reads it or says why; a change is refused
  # with exit 1 (EACCES); nbdkit refuses with one line or serves what it can read.
  if command -v setpriv >/dev/null; then
    new_copy
    chmod -R a-w "$copy"
    chmod a+rx "$tmp"
    rc=0
    in_copy setpriv --reuid 65534 --regid 65534 --clear-groups \
      "$LAYER_BIN" --pool "$pool" clone base:1 x >"$tmp/ro.out" 2>&1 || rc=$?
    [[ "$rc" == 1 && $(wc -l <"$tmp/ro.out") == 1 && $(cat "$tmp/ro.out") == "layer: error: "?* ]] ||
      fail "pool-damage: clone in a read-only pool: exit $rc: $(cat "$tmp/ro.out")"
    log "pool-damage: read-only pool: clone: $(cat "$tmp/ro.out")"
    rc=0
    in_copy setpriv --reuid 65534 --regid 65534 --clear-groups \
      "$LAYER_BIN" --pool "$pool" fsck >"$tmp/ro.out" 2>&1 || rc=$?
    ((rc == 0 || rc == 1 || rc == 2)) || fail "pool-damage: fsck of a read-only pool: exit $rc"
    ((rc == 0)) || [[ $(tail -n 1 "$tmp/ro.out") == "layer: error: "?* ]] ||
      fail "pool-damage: fsck of a read-only pool: $(cat "$tmp/ro.out")"
    log "pool-damage: read-only pool: fsck exit $rc: $(tail -n 1 "$tmp/ro.out")"
    chmod 700 "$tmp"
    chmod -R u+w "$copy"
    counted pool-damage
  else
    log "pool-damage: read-only pool skipped (no setpriv)"
  fi
  rm -rf "$copy"
  pool_files >"$tmp/pool-files.after"
  diff -u "$tmp/pool-files.before" "$tmp/pool-files.after" >&2 ||
    fail "pool-damage: the original pool's files changed"
  log "pool-damage: ${count[pool-damage]} cases"
fi
start_server s2 "$pool"
intact_check "pool-damage"

# ================================ full-disk: the CLI on a full pool =======================
# test_faults.sh fills a tier under a server's writes; here the whole pool (index and tiers) is
# on a small tmpfs, filled up, and the CLI's own writes meet ENOSPC: exit 1 with one line
# naming it, or success where nothing needed space; never exit 2 or a crash; fsck clean after
# each, and after the space comes back everything works again.
full=$tmp/full
mkdir -p "$full"
if ! mount -t tmpfs -o size=8M tmpfs "$full" 2>/dev/null; then
  log "full-disk: skipped (cannot mount a tmpfs here: need root)"
else
  cleanup_fn umount -l "$full"
  fpool=$full/pool
  "$LAYER_BIN" init "$fpool" >/dev/null
  make_image "$tmp/small.img" 1 5
  "$LAYER_BIN" --pool "$fpool" image import small:1 "$tmp/small.img" >/dev/null
  "$LAYER_BIN" --pool "$fpool" clone small:1 f1 >/dev/null
  # A snapshot under f1, so that its chain is two layers deep and a flatten has data to copy.
  "$LAYER_BIN" --pool "$fpool" snapshot create f1 s0 >/dev/null
  # Fill it: a filler file until ENOSPC.
  dd if=/dev/zero of="$full/filler" bs=64k status=none 2>/dev/null || true
  [[ $(df --output=avail -B1 "$full" | tail -n 1) -lt 65536 ]] || fail "full-disk: not full"
  # full_case WHAT MUST_FAIL ARGS...: `layer --pool FPOOL ARGS`.
  full_case() {
    local what=$1 must_fail=$2 rc=0
    shift 2
    timeout 30 "$LAYER_BIN" --pool "$fpool" "$@" >"$tmp/full.out" 2>"$tmp/full.err" || rc=$?
    ((rc < 128)) || fail "full-disk: $what: killed or timed out (exit $rc)"
    if ((rc == 0)); then
      ((must_fail == 0)) || fail "full-disk: $what: succeeded on a full disk"
      log "full-disk: $what: succeeded (needed no space)"
    else
      [[ "$rc" == 1 ]] || fail "full-disk: $what: exit $rc, want 1: $(cat "$tmp/full.err")"
      [[ $(wc -l <"$tmp/full.err") == 1 && $(cat "$tmp/full.err") == "layer: error: "* ]] ||
        fail "full-disk: $what: stderr: $(cat "$tmp/full.err")"
      grep -qi "no space left\|disk full\|ENOSPC" "$tmp/full.err" ||
        fail "full-disk: $what: the error does not say the disk is full: $(cat "$tmp/full.err")"
      log "full-disk: $what: $(cat "$tmp/full.err")"
    fi
    "$LAYER_BIN" --pool "$fpool" fsck >"$tmp/full.fsck" 2>&1 ||
      fail "full-disk: $what: fsck after: $(cat "$tmp/full.fsck")"
    counted full-disk
  }
  full_case "image import" 1 image import small:2 "$tmp/small.img"
  full_case "flatten" 1 flatten f1
  full_case "tier move to hdd" 1 tier move small:1 hdd
  full_case "clone" 0 clone small:1 f2
  full_case "snapshot" 0 snapshot create f1 s1
  full_case "commit" 0 commit f1 small:3
  full_case "index backup" 1 index backup
  # The space comes back: the same commands work, nothing was left behind.
  rm "$full/filler"
  "$LAYER_BIN" --pool "$fpool" fsck --repair >"$tmp/full.fsck" 2>&1 ||
    fail "full-disk: fsck --repair after: $(cat "$tmp/full.fsck")"
  ! grep -q 'repaired:' "$tmp/full.fsck" || fail "full-disk: something was left to repair: $(cat "$tmp/full.fsck")"
  "$LAYER_BIN" --pool "$fpool" image import small:2 "$tmp/small.img" >/dev/null ||
    fail "full-disk: import after the space came back"
  "$LAYER_BIN" --pool "$fpool" flatten f1 >/dev/null || fail "full-disk: flatten after the space came back"
  "$LAYER_BIN" --pool "$fpool" fsck --full >"$tmp/full.fsck" 2>&1 ||
    fail "full-disk: fsck --full at the end: $(cat "$tmp/full.fsck")"
  log "full-disk: ${count[full-disk]} cases"
fi
intact_check "full-disk"

total=0
summary=""
for c in "${categories[@]}"; do
  summary+="$c ${count[$c]}, "
  total=$((total + count[$c]))
done
log "census: ${summary}total $total"
log "ok"
