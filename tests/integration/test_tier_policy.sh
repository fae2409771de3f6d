#!/bin/bash
# test_tier_policy.sh — heat and the tiering policy with a real server: `layer tier policy`
# (shown, changed, bad values refused), heat counted by nbdkit and written to the index
# (heat-interval=), `layer tier status --json` (heat, users, the policy's verdict), `layer tier
# run --dry-run`, and a server started with tier-interval= that demotes the cold layers (a
# shared image layer, an unserved container's delta) and promotes the image layer back when a
# client reads it hard, and demotes a served container's delta, live — every read checked,
# `layer fsck` clean at the end.
source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"
requires nbdcopy
requires /usr/bin/python3 -c 'import nbd'

pool=$tmp/pool
export LAYER_POOL=$pool
nbd() { uri "$1" "$server_sock"; }
digest() { nbdcopy "$(nbd "$1")" - | sha256sum | cut -c1-16; }
status() { layer tier status --json; }
# layer_field ID FIELD: a field of layer ID in `tier status --json`.
layer_field() { status | json_get "[l for l in j['layers'] if l['layer'] == $1][0]['$2']"; }
# For wait_until, which runs its command again each time: field_is ID FIELD VALUE, field_gt ID
# FIELD N, planned N (moves a dry run plans).
field_is() { [[ "$(layer_field "$1" "$2")" == "$3" ]]; }
field_gt() { [[ "$(layer_field "$1" "$2")" -gt "$3" ]]; }
planned() { [[ "$(layer tier run --dry-run --json | json_get 'len(j["planned"])')" == "$1" ]]; }

layer init >/dev/null
make_image "$tmp/base.raw" 8 5
layer image import base:1 "$tmp/base.raw" >/dev/null
layer clone base:1 c >/dev/null
layer clone base:1 d >/dev/null
base=$(layer inspect c --json | json_get 'j["chain"][-1]["layer"]')
delta_d=$(layer inspect d --json | json_get 'j["chain"][0]["layer"]')
h_base=$(sha256sum <"$tmp/base.raw" | cut -c1-16)

# ---- policy: defaults, changes, refusals ----
[[ "$(layer tier policy --json | json_get 'j["policy"]["cold_after_s"]')" == 600 ]] ||
  fail "default cold-after is not 10m"
expect_user_error "above the cold rate" layer tier policy --hot-rate 0.01
expect_user_error "not a duration" layer tier policy --cold-after 5x
expect_user_error "not 1 to 100%" layer tier policy --ssd-high-water 120%
expect_user_error "not a percentage" layer tier policy --ssd-high-water x%
[[ "$(layer tier policy --json | json_get 'j["policy"]["hot_rate"]')" == 1.0 ]] ||
  fail "a refused change changed the policy"
out=$(layer tier policy --cold-after 3s --cold-rate 1 --hot-rate 20 --half-life 1s)
[[ "$out" == *"cold after 3s at or below 1 ops/s; hot at or above 20 ops/s"* ]] ||
  fail "policy text: $out"
[[ "$(layer tier policy --json | json_get 'j["policy"]["half_life_s"]')" == 1 ]] ||
  fail "the half-life was not stored"
# The policy's moves are paced: 64 MiB/s unless told; none is unlimited.
[[ "$(layer tier policy --json | json_get 'j["policy"]["move_rate"]')" == $((64 << 20)) ]] ||
  fail "default move rate is not 64 MiB/s"
expect_user_error "--move-rate 5q" layer tier policy --move-rate 5q
expect_user_error "--rate fast" layer tier run --dry-run --rate fast
[[ "$(layer tier policy --move-rate none --json | json_get 'j["policy"]["move_rate"]')" == 0 ]] ||
  fail "--move-rate none is not unlimited"
out=$(layer tier policy --move-rate 32M)
[[ "$out" == *"moves copy at 32"*"/s"* ]] || fail "policy text with a move rate: $out"

# ---- heat: counted by the server, written every second ----
start_server srv "$pool" -- heat-interval=1s hasher=off
/usr/bin/python3 - "$(nbd c)" "$(nbd d)" "$tmp/base.raw" <<'EOF'
import random, sys, nbd
c_uri, d_uri, image = sys.argv[1:4]
data = open(image, "rb").read()
c = nbd.NBD(); c.connect_uri(c_uri)
rng = random.Random(1)
for _ in range(60):
    off = rng.randrange(len(data) // 4096) * 4096
    assert c.pread(4096, off) == data[off:off + 4096], f"c read wrong at {off}"
d = nbd.NBD(); d.connect_uri(d_uri)
d.pwrite(b"\x5a" * (1 << 20), 0)
d.flush()
c.shutdown(); d.shutdown()
EOF
wait_until 10 field_gt "$base" read_ops 0 || fail "no read heat for the image layer"
[[ "$(layer_field "$delta_d" write_ops)" -ge 1 ]] || fail "no write heat for d's delta"
[[ "$(layer_field "$base" last_access)" != null ]] || fail "no last access for the image layer"
users=$(layer_field "$base" users)
[[ "$users" == '["c", "d", "base:1"]' ]] || fail "users of the image layer: $users"
text=$(layer tier status)
[[ "$text" == *"LAST ACCESS"* && "$text" == *"c +2"* ]] || fail "tier status text: $text"
stop_server srv

# Just read: active, nothing to move yet.
[[ "$(layer tier run --dry-run --json | json_get 'len(j["planned"])')" == 0 ]] ||
  fail "a dry run planned moves of active layers"
# Cold (3 s idle, heat decayed below 1 op/s with a 1 s half-life): both would move; a dry run
# moves nothing.
wait_until 20 planned 2 ||
  fail "the dry run did not plan the two cold layers: $(layer tier run --dry-run)"
[[ "$(layer_field "$base" tier)" == ssd ]] || fail "a dry run moved a layer"
[[ "$(layer_field "$base" action)" == demote ]] || fail "tier status does not say demote"

# ---- a server with tier-interval: demotes the cold layers, promotes a hot one ----
rm -f "$tmp/srv.sock"
start_server srv "$pool" -v --log=stderr -- heat-interval=1s tier-interval=1s hasher=off
wait_until 30 field_is "$base" tier hdd || fail "the image layer was not demoted"
wait_until 30 field_is "$delta_d" tier hdd || fail "d's delta was not demoted"
[[ -e "$pool/tiers/hdd/$base.layer" && ! -e "$pool/tiers/ssd/$base.layer" ]] ||
  fail "the image layer's file is not only on hdd"

# Read c hard (4K random reads of the image layer) until the server promotes the layer, every
# read checked; d's data and c's whole disk checked after.
/usr/bin/python3 - "$(nbd c)" "$tmp/base.raw" "$pool/tiers/ssd/$base.layer" <<'EOF' ||
import os, random, sys, time, nbd
uri, image, promoted = sys.argv[1:4]
data = open(image, "rb").read()
h = nbd.NBD(); h.connect_uri(uri)
rng = random.Random(2)
deadline = time.time() + 60
n = 0
while not os.path.exists(promoted) or n < 200:
    if time.time() > deadline:
        sys.exit(f"not promoted after {n} reads")
    off = rng.randrange(len(data) // 4096) * 4096
    assert h.pread(4096, off) == data[off:off + 4096], f"c read wrong at {off}"
    n += 1
# Reads go on from the new file.
for _ in range(200):
    off = rng.randrange(len(data) // 4096) * 4096
    assert h.pread(4096, off) == data[off:off + 4096], f"c read wrong at {off} after the move"
h.shutdown()
print(n, "reads")
EOF
  fail "reads of c while the image layer was promoted"
wait_until 10 field_is "$base" tier ssd || fail "the index does not say ssd"
[[ "$(digest c)" == "$h_base" ]] || fail "c reads wrong after the moves"
want_d=$( (head -c $((1 << 20)) /dev/zero | tr '\0' '\132'; tail -c +$(((1 << 20) + 1)) "$tmp/base.raw") |
  sha256sum | cut -c1-16)
[[ "$(digest d)" == "$want_d" ]] || fail "d reads wrong after its delta moved"
[[ -n "$(layer_field "$base" moved)" && "$(layer_field "$base" moved)" != null ]] ||
  fail "the move was not recorded in the heat row"
# c's delta gets data while c is served; once cold, its own server demotes it, live, while a
# client holds c open; what was written reads back.
delta_c=$(layer inspect c --json | json_get 'j["chain"][0]["layer"]')
/usr/bin/python3 - "$(nbd c)" "$tmp/base.raw" "$pool/tiers/hdd/$delta_c.layer" <<'EOF' ||
import os, sys, time, nbd
uri, image, demoted = sys.argv[1:4]
data = open(image, "rb").read()
h = nbd.NBD(); h.connect_uri(uri)
h.pwrite(b"\xc3" * 65536, 1 << 20)
h.flush()
deadline = time.time() + 60
while not os.path.exists(demoted):
    if time.time() > deadline:
        sys.exit("c's delta was not demoted")
    time.sleep(0.2)
assert h.pread(65536, 1 << 20) == b"\xc3" * 65536, "c's write reads wrong after the move"
assert h.pread(4096, 0) == data[:4096], "c's image data reads wrong after the move"
h.shutdown()
EOF
  fail "c's delta, served, was not moved live by the policy"
wait_until 10 field_is "$delta_c" tier hdd || fail "the index does not say hdd for c's delta"
stop_server srv
grep -q "tiering: pass failed\|tiering: layer" "$tmp/srv.log" &&
  fail "the tiering thread reported failures: $(grep tiering "$tmp/srv.log")"
grep -q "tiering: moved layer $delta_c from ssd to hdd" "$tmp/srv.log" ||
  fail "the server's log does not show its move of c's delta"

layer fsck >/dev/null || fail "fsck after the policy's moves: $(layer fsck)"
for id in "$base" "$delta_d" "$delta_c"; do
  n=$(find "$pool/tiers" -name "$id.layer*" | wc -l)
  [[ "$n" == 1 ]] || fail "layer $id has $n files"
done
log "ok"
