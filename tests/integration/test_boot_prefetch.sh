#!/bin/bash
# test_boot_prefetch.sh — boot profiles and boot prefetch (issue 14 item 5; docs/design.md "Boot
# prefetch") with a real server and real libnbd clients:
# - a fresh clone's first reads (a known pattern) become its image's boot profile when the
#   connection closes: `layer image profile --json` shows exactly those ranges, coalesced, one
#   boot; the audit trail has the boot-profile line;
# - the image's layer moved to the hdd tier and its pages dropped from the page cache
#   (posix_fadvise DONTNEED): none of the profile's pages are resident; a second fresh clone's
#   first read starts the prefetch: its boot-prefetch audit line says it read the profile's
#   bytes ahead, complete, and mincore(2) shows every page of the profile resident;
# - the data read through the prefetched clone is the image's, and so is what a clone of a
#   server with boot-prefetch=off reads (that server logs no prefetch); the boots add up;
# - a container already written is not fresh (no profile line), `nbdinfo --list` (opens, no
#   reads) starts no window, boot-profile=0 records nothing;
# - the CLI: text, NAME for every version, --clear, unknown image and bad names (exit 1).
# shellcheck source=functions.sh
source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"
requires /usr/bin/python3 -c 'import nbd'
requires nbdinfo

pool=$tmp/pool
export LAYER_POOL=$pool
nbd() { uri "$1" "$server_sock"; }
pagecache() { /usr/bin/python3 "$LAYER_SRC/tests/integration/pagecache.py" "$@"; }
# events KIND CONTAINER: how many audit lines of that kind the container has.
events() {
  layer audit --json | json_get "len([e for e in j['events'] if e['event'] == '$1' and e.get('container') == '$2'])"
}
# event KIND CONTAINER: the last such line.
event() {
  layer audit --json | json_get "[e for e in j['events'] if e['event'] == '$1' and e.get('container') == '$2'][-1]"
}
has_event() { [[ "$(events "$1" "$2")" -ge 1 ]]; }
# read_pattern URI OUT: reads the boot pattern (QD1, in order) through URI into OUT (the bytes
# of every read, concatenated).
read_pattern() {
  /usr/bin/python3 - "$1" "$2" "$tmp/pattern.json" <<'PY'
import json, nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
with open(sys.argv[2], "wb") as out:
    for off, length in json.load(open(sys.argv[3])):
        out.write(h.pread(length, off))
h.shutdown()
PY
}

# A 16 MiB image of random bytes (every block data) and a pattern over it: scattered 4 KiB
# reads, a 256 KiB run read in 64 KiB pieces, two adjacent reads, an unaligned one.
/usr/bin/python3 - "$tmp/img.raw" "$tmp/pattern.json" "$tmp/expected.json" "$tmp/image_pattern.bin" <<'PY'
import json, random, sys
rng = random.Random(14)
size = 16 << 20
data = rng.randbytes(size)
open(sys.argv[1], "wb").write(data)
reads = [(rng.randrange(0, size // 4096) * 4096, 4096) for _ in range(40)]
reads += [((8 << 20) + i * 65536, 65536) for i in range(4)]
reads += [(1 << 20, 4096), ((1 << 20) + 4096, 4096), ((3 << 20) + 100, 1000)]
rng.shuffle(reads)
json.dump(reads, open(sys.argv[2], "w"))
# What the profile must hold: the bytes read, coalesced (overlapping and adjacent reads merged).
ranges = []
for off, n in sorted(reads):
    if ranges and off <= ranges[-1][0] + ranges[-1][1]:
        ranges[-1][1] = max(ranges[-1][0] + ranges[-1][1], off + n) - ranges[-1][0]
    else:
        ranges.append([off, n])
json.dump(ranges, open(sys.argv[3], "w"))
with open(sys.argv[4], "wb") as out:
    for off, n in reads:
        out.write(data[off:off + n])
PY

layer init >/dev/null
layer image import img:1 "$tmp/img.raw" >/dev/null
top=$(layer image profile img:1 --json | json_get 'j["top_layer"]')
[[ "$(layer image profile img:1 --json | json_get 'j["profile"]')" == null ]] || fail "a new image has a profile"
layer image profile img:1 | grep -q "no boot profile yet" || fail "text without a profile: $(layer image profile img:1)"
layer tier move img:1 hdd >/dev/null
layer_file=$pool/tiers/hdd/$top.layer
[[ -f "$layer_file" ]] || fail "no $layer_file after the move"
for c in c1 c2 c3 c4 w; do layer clone img:1 "$c" >/dev/null; done

start_server s "$pool" -- boot-profile=60s hasher=off
# A container written first (before the image has a profile: nothing to prefetch, and a window
# that records no read); from then on it is not fresh.
/usr/bin/python3 -c 'import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"w" * 4096, 0)
h.flush()
h.shutdown()' "$(nbd w)"
# ---- the first boot records the profile ----
read_pattern "$(nbd c1)" "$tmp/c1.bin"
cmp -s "$tmp/c1.bin" "$tmp/image_pattern.bin" || fail "c1 read other bytes than the image's"
wait_until 20 has_event boot-profile c1 || fail "no boot-profile line for c1: $(layer audit --json)"
out=$(layer image profile img:1 --json)
log "profile: $(json_get '{k: v for k, v in j["profile"].items() if k != "layers"}' <<<"$out")"
[[ "$(json_get '[j["ok"], j["image"], j["profile"]["boots"], [l["layer"] for l in j["profile"]["layers"]]]' <<<"$out")" == "[true, \"img:1\", 1, [$top]]" ]] ||
  fail "profile shape: $out"
[[ "$(json_get 'j["profile"]["layers"][0]["ranges"]' <<<"$out")" == "$(json_get 'j' <"$tmp/expected.json")" ]] ||
  fail "profile ranges $(json_get 'j["profile"]["layers"][0]["ranges"]' <<<"$out"), want $(cat "$tmp/expected.json")"
want_bytes=$(json_get 'sum(n for _, n in j)' <"$tmp/expected.json")
[[ "$(json_get 'j["profile"]["bytes"]' <<<"$out")" == "$want_bytes" ]] || fail "profile bytes: $out"
[[ "$(event boot-profile c1 | json_get '[j["bytes"], j["boots"], j["image"]]')" == "[$want_bytes, 1, \"img:1\"]" ]] ||
  fail "boot-profile line: $(event boot-profile c1)"
[[ "$(events boot-prefetch c1)" == 0 ]] || fail "the first boot prefetched: $(event boot-prefetch c1)"
layer image profile img:1 | grep -q "boot profile of 1 boot, .* ranges" || fail "text: $(layer image profile img:1)"

# ---- the second boot prefetches it ----
pagecache drop "$layer_file"
read -r res total < <(pagecache resident "$layer_file" "$(cat "$tmp/expected.json")")
log "before the prefetch: $res of $total bytes of the profile's pages resident"
[[ "$res" == 0 ]] || fail "$res bytes of the profile still cached after DONTNEED"
# The first read, far from the pattern's blocks (its readahead must not be what fills them); the
# connection stays open (a disk that closes stops its prefetch) until $tmp/c2.done exists.
/usr/bin/python3 -c 'import nbd, os, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pread(512, (16 << 20) - 512)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.05)
h.shutdown()' "$(nbd c2)" "$tmp/c2.done" &
c2_holder=$!
echo "$c2_holder" >"$tmp/c2_holder.pid"
cleanup_fn kill_pid "$c2_holder"
wait_until 20 has_event boot-prefetch c2 || fail "no boot-prefetch line for c2: $(layer audit --json)"
line=$(event boot-prefetch c2)
log "prefetch: $line"
[[ "$(json_get '[j["bytes"], j["profile_bytes"], j["complete"], j["boots"]]' <<<"$line")" == "[$want_bytes, $want_bytes, true, 1]" ]] ||
  fail "boot-prefetch line: $line"
layer audit c2 | grep -qE "boot-prefetch +c2 .*read ahead .* of img:1 in [0-9]+ ms$" ||
  fail "layer audit's text for the prefetch: $(layer audit c2)"
read -r res total < <(pagecache resident "$layer_file" "$(cat "$tmp/expected.json")")
log "after the prefetch: $res of $total bytes of the profile's pages resident"
[[ "$res" == "$total" ]] || fail "after the prefetch only $res of $total bytes are resident"
# The whole pattern through the prefetched clone: the image's bytes.
read_pattern "$(nbd c2)" "$tmp/c2.bin"
cmp -s "$tmp/c2.bin" "$tmp/image_pattern.bin" || fail "c2 (prefetched) read other bytes than the image's"
touch "$tmp/c2.done"
wait "$c2_holder" || fail "the holder of c2's connection failed"
wait_until 20 eval '[[ "$(events boot-profile c2)" -ge 1 ]]' || fail "no boot-profile line for c2"

# ---- not fresh: a written container; opens without reads ----
read_pattern "$(nbd w)" "$tmp/w.bin"
nbdinfo --list "nbd+unix://?socket=$server_sock" >/dev/null
stop_server s
[[ "$(events boot-profile w)" == 0 ]] || fail "a written container recorded a profile: $(event boot-profile w)"
[[ "$(events boot-prefetch w)" == 0 ]] || fail "a written container was prefetched"
[[ "$(events boot-prefetch c3)$(events boot-prefetch c4)" == 00 ]] || fail "nbdinfo --list started a prefetch"

# ---- boot-prefetch=off: the same bytes, no prefetch, the boot still counted ----
start_server s2 "$pool" -- boot-profile=60s boot-prefetch=off hasher=off
pagecache drop "$layer_file"
read_pattern "$(nbd c3)" "$tmp/c3.bin"
cmp -s "$tmp/c3.bin" "$tmp/image_pattern.bin" || fail "c3 (not prefetched) read other bytes than the image's"
wait_until 20 has_event boot-profile c3 || fail "no boot-profile line for c3"
[[ "$(events boot-prefetch c3)" == 0 ]] || fail "boot-prefetch=off prefetched: $(event boot-prefetch c3)"
[[ "$(layer image profile img:1 --json | json_get 'j["profile"]["boots"]')" == 3 ]] ||
  fail "boots after three: $(layer image profile img:1 --json)"
stop_server s2

# ---- boot-profile=0: nothing recorded ----
start_server s3 "$pool" -- boot-profile=0 hasher=off
read_pattern "$(nbd c4)" "$tmp/c4.bin"
cmp -s "$tmp/c4.bin" "$tmp/image_pattern.bin" || fail "c4 read other bytes than the image's"
stop_server s3
[[ "$(events boot-profile c4)" == 0 ]] || fail "boot-profile=0 recorded a profile"

# ---- the CLI ----
layer image import img:2 "$tmp/img.raw" >/dev/null
out=$(layer image profile img --json)
[[ "$(json_get '[(i["image"], i["profile"] and i["profile"]["boots"]) for i in j["images"]]' <<<"$out")" == "[[\"img:1\", 3], [\"img:2\", null]]" ]] ||
  fail "profile of every version: $out"
layer image profile img:1 --ranges | grep -q "^$top *$(json_get 'j[0][0]' <"$tmp/expected.json") " ||
  fail "--ranges: $(layer image profile img:1 --ranges)"
expect_user_error "unknown image" layer image profile nope:1
expect_user_error "unknown name" layer image profile nope
expect_user_error "bad name" layer image profile 'Bad!'
rc=0
layer image profile nope:1 --json >/dev/null 2>"$tmp/err" || rc=$?
[[ "$rc" == 1 && "$(json_get 'j["error"]["exit"]' <"$tmp/err")" == 1 ]] || fail "--json error: exit $rc, $(cat "$tmp/err")"
[[ "$(layer image profile img:1 --clear --json | json_get 'j["images"]')" == '[{"image": "img:1", "cleared": true}]' ]] ||
  fail "--clear"
[[ "$(layer image profile img:1 --json | json_get 'j["profile"]')" == null ]] || fail "a profile after --clear"
layer image profile img:1 --clear | grep -q "no boot profile" || fail "a second --clear"
log "ok"
