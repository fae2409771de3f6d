#!/usr/bin/env bash
# test_provision.sh — scripts/provision-example as users run it: a fresh pool, 8 containers, one
# server, 8 clients at once (nbdfuse where FUSE works, else libnbd), each reading back what it
# wrote; the summary says so in JSON, and the pool is fsck-clean (the script checks it).
# shellcheck source=functions.sh
source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

[[ -x "$LAYER_SRC/images/busybox/build" ]] || skip "no busybox image recipe"
/usr/bin/python3 -c 'import nbd' 2>/dev/null || skip "no python3-libnbd"
out=$("$LAYER_SRC/scripts/provision-example" --containers 8 --json --dir "$tmp/prov" \
  --build-dir "$LAYER_BUILD_DIR" 2>"$tmp/prov.err") ||
  fail "provision-example failed: $(cat "$tmp/prov.err") $out"
log "summary: $out"
[[ "$(json_get 'j["containers"] == 8 and j["failed"] == 0' <<<"$out")" == True ]] ||
  fail "not every client read back its data: $out"
[[ "$(json_get 'j["ms"]["total"] > 0 and j["write_ms"]["max"] >= j["write_ms"]["min"]' <<<"$out")" == True ]] ||
  fail "the timings are not filled in: $out"
# Bad arguments are refused with exit 2 and a message.
for bad in "--containers 0" "--containers x" "--containers 201" "--frobnicate"; do
  rc=0
  # shellcheck disable=SC2086
  "$LAYER_SRC/scripts/provision-example" $bad >/dev/null 2>"$tmp/bad.err" || rc=$?
  [[ $rc == 2 && -s "$tmp/bad.err" ]] || fail "provision-example $bad: exit $rc, $(cat "$tmp/bad.err")"
done
# The kept directory holds the pool it made, and no server is left.
[[ -d "$tmp/prov/pool" ]] || fail "--dir was not kept"
! pgrep -f "nbdkit -U $tmp/prov" >/dev/null || fail "a server was left running"
log "ok"
