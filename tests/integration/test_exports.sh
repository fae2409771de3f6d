#!/usr/bin/env bash
# test_exports.sh — list_exports with more containers than nbdkit lists (10,000): the listing
# holds the first 10,000 names and succeeds.
# shellcheck source=functions.sh
source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires nbdinfo
[[ -x "${LAYER_CLONE_MANY:-}" ]] || skip "LAYER_CLONE_MANY (the clone_many helper) is not built"

pool=$tmp/pool
layer init "$pool" >/dev/null
make_image "$tmp/base.img" 1 3
layer image import base:1 "$tmp/base.img" >/dev/null
"$LAYER_CLONE_MANY" "$pool" base:1 c 10050 || fail "clone_many"
count=$(layer --json ls | json_get 'len(j)')
((count == 10050)) || fail "ls: $count containers, want 10050"

start_server s "$pool"
nbdinfo --list --json "nbd+unix:///?socket=$server_sock" >"$tmp/list.json" 2>"$tmp/list.err" ||
  fail "nbdinfo --list with 10050 containers failed: $(cat "$tmp/list.err")"
listed=$(json_get 'len(j["exports"])' <"$tmp/list.json")
((listed == 10000)) || fail "nbdinfo --list: $listed exports, want the first 10000"
# The first 10,000 in name order (c0, c1, c10, c100, ...): c9999 sorts before the cut.
json_get '"\n".join(e["export-name"] for e in j["exports"])' <"$tmp/list.json" | LC_ALL=C sort -c ||
  fail "exports are not in name order"
log "listed $listed of 10050 containers"
log "ok"
