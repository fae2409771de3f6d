#!/bin/bash
# test_hasher.sh — checksums of snapshot layers. A container written through a real client and
# snapshotted live gets its snapshot's layer hashed by the serving server's background hasher
# (`inspect` shows it `frozen`) and `fsck --full` verifies its groups; a server started with
# hasher=off leaves its layers unhashed, and `layer gc` skips the layers a server holds, hashes
# the offline ones (saying so), and `--no-hash` leaves them; a corrupted byte is found; a layer
# whose file is gone fails alone (gc exits 2).
source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"
requires qemu-io
requires /usr/bin/python3 -c 'import nbd'

export LAYER_POOL=$tmp/pool
"$LAYER_BIN" init >/dev/null
make_image "$tmp/base.img" 8 31
"$LAYER_BIN" image import base:1 "$tmp/base.img" >/dev/null
"$LAYER_BIN" clone base:1 c >/dev/null
"$LAYER_BIN" clone base:1 d >/dev/null

# state CONTAINER LAYER: the layer's state in the container's chain (`inspect --json`).
state() {
  "$LAYER_BIN" --json inspect "$1" | json_get "[l['state'] for l in j['chain'] if l['layer'] == $2][0]"
}
groups_verified() {
  local out
  out=$("$LAYER_BIN" --json fsck --full) || fail "fsck --full: $out"
  [[ $(json_get 'j["ok"]' <<<"$out") == True ]] || fail "fsck --full: $out"
  json_get 'j["groups_verified"]' <<<"$out"
}
uri() { echo "nbd+unix:///$1?socket=$server_sock"; }

image_groups=$(groups_verified)

# 1. A live snapshot of a served container is hashed by the server, soon.
start_server srv "$LAYER_POOL" -- hash-rate=32M
qemu-io -f raw -c 'write -P 0x5a 1M 3M' "$(uri c)" >/dev/null
hold_connection "$(uri c)"
out=$("$LAYER_BIN" --json snapshot c s1)
[[ $(json_get 'j["live"]' <<<"$out") == True ]] || fail "the snapshot was not live: $out"
s1=$(json_get 'j["layer"]' <<<"$out")
wait_until 60 eval "[[ \$(state c $s1) == frozen ]]" ||
  fail "layer $s1 is still $(state c "$s1") a minute after a live snapshot"
log "layer $s1 hashed by the server"
# 3 MiB of data: 48 groups of 64 KiB beside the image's.
got=$(groups_verified)
((got == image_groups + 48)) || fail "fsck --full verified $got groups, want $image_groups + 48"
kill_pid "$holder_pid"
stop_server srv

# 2. hasher=off: nothing is hashed by that server, and gc leaves what it holds.
start_server off "$LAYER_POOL" -- hasher=off
qemu-io -f raw -c 'write -P 0x77 0 2M' "$(uri d)" >/dev/null
hold_connection "$(uri d)"
out=$("$LAYER_BIN" --json snapshot d s)
[[ $(json_get 'j["live"]' <<<"$out") == True ]] || fail "the snapshot was not live: $out"
s=$(json_get 'j["layer"]' <<<"$out")
out=$("$LAYER_BIN" --json gc) || fail "gc beside the server: $out"
[[ $(json_get 'j["hashed_layers"]' <<<"$out") == 0 ]] || fail "gc hashed a layer a server holds: $out"
[[ $(json_get 'j["unhashed_layers"]' <<<"$out") == 1 ]] || fail "gc: $out"
"$LAYER_BIN" gc | grep -q '1 frozen layer not hashed yet (a running server reads them' ||
  fail "gc does not say why it left a layer: $("$LAYER_BIN" gc)"
kill_pid "$holder_pid"
stop_server off
[[ $(state d "$s") == frozen-unhashed ]] || fail "layer $s is $(state d "$s") after a hasher=off server"

# 3. gc --no-hash leaves it; gc hashes it and says so.
out=$("$LAYER_BIN" --json gc --no-hash)
[[ $(json_get 'j["hashed_layers"]' <<<"$out") == 0 ]] || fail "gc --no-hash hashed: $out"
[[ $(json_get 'j["unhashed_layers"]' <<<"$out") == 1 ]] || fail "gc --no-hash: $out"
"$LAYER_BIN" gc >"$tmp/gc.out" || fail "gc: $(cat "$tmp/gc.out")"
grep -qx "layer $s: hashed (2.0 MiB of data, 32 checksum groups)" "$tmp/gc.out" ||
  fail "gc did not say it hashed layer $s: $(cat "$tmp/gc.out")"
[[ $(state d "$s") == frozen ]] || fail "layer $s is $(state d "$s") after gc"
got=$(groups_verified)
((got == image_groups + 48 + 32)) || fail "fsck --full verified $got groups after gc"
out=$("$LAYER_BIN" --json gc)
[[ $(json_get '[j["hashed_layers"], j["hashed_bytes"], j["unhashed_layers"]]' <<<"$out") == "[0, 0, 0]" ]] ||
  fail "a second gc: $out"
[[ $("$LAYER_BIN" gc) == "nothing to collect" ]] || fail "a third gc: $("$LAYER_BIN" gc)"

# 4. A byte flipped in the snapshot's file: fsck --full names the layer and the group.
path=$("$LAYER_BIN" --json inspect d | json_get "[l['path'] for l in j['chain'] if l['layer'] == $s][0]")
printf '\x01' | dd of="$path" bs=1 seek=$((1024 * 1024 + 5)) conv=notrunc status=none
rc=0
out=$("$LAYER_BIN" --json fsck --full) || rc=$?
[[ "$rc" == 1 ]] || fail "fsck --full over a corrupted layer exited $rc: $out"
grep -q "layer $s: checksum mismatch at offset 1048576" <<<"$out" || fail "fsck --full: $out"

# 5. A layer gc cannot hash (its file is gone): the others are done, the failure is reported
# and gc exits 2 after its output.
start_server again "$LAYER_POOL" -- hasher=off
qemu-io -f raw -c 'write -P 0x33 0 64k' "$(uri c)" >/dev/null
stop_server again
s2=$("$LAYER_BIN" --json snapshot c s2 | json_get 'j["layer"]')
rm "$("$LAYER_BIN" --json inspect c | json_get "[l['path'] for l in j['chain'] if l['layer'] == $s2][0]")"
rc=0
"$LAYER_BIN" gc >"$tmp/gc.out" 2>"$tmp/gc.err" || rc=$?
[[ "$rc" == 2 ]] || fail "gc over a missing layer file exited $rc: $(cat "$tmp/gc.out" "$tmp/gc.err")"
grep -q "^layer $s2: file .* is missing" "$tmp/gc.out" || fail "gc: $(cat "$tmp/gc.out")"
[[ $(cat "$tmp/gc.err") == "layer: error: gc could not hash 1 layer (see above)" ]] ||
  fail "gc's error line: $(cat "$tmp/gc.err")"
rc=0
out=$("$LAYER_BIN" --json gc 2>"$tmp/gc.err") || rc=$?
[[ "$rc" == 2 && ! -s "$tmp/gc.err" ]] || fail "gc --json exited $rc: $(cat "$tmp/gc.err")"
[[ $(json_get '[j["ok"], len(j["problems"]), j["unhashed_layers"]]' <<<"$out") == "[false, 1, 1]" ]] ||
  fail "gc --json over a missing layer file: $out"
log "ok"
