#!/usr/bin/env bash
# test_apply.sh — `layer apply` (issue 14 item 6; docs/apply.md): a spec's images, containers
# (names and count patterns), resources, labels and snapshots are made; a second apply changes
# nothing (ls, inspect, image ls, the index's row counts and its copies all unchanged); --dry-run
# prints the plan and changes nothing; bad specs exit 1 with one line naming the field and
# apply nothing; a changed resource is set in place (same delta layer), live on a served
# container; --prune removes this spec's unnamed containers and refuses a served one (a real
# nbdkit with a client connected); a step failing half-way (a full tmpfs) undoes the run; the
# examples in scripts/examples/ apply, twice.
# shellcheck source=functions.sh
source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

pool=$tmp/pool
"$LAYER_BIN" init "$pool" >/dev/null
make_image "$tmp/base.img" 4 11
make_image "$tmp/other.img" 2 12

# state: everything apply may change, as text: containers and their details, images, the row
# count of every named db of the index, and the index copies.
state() {
  layer --json ls
  local name
  for name in $(layer --json ls | json_get '" ".join(c["name"] for c in j)'); do
    layer --json inspect "$name"
    layer --json snapshot ls "$name"
  done
  layer --json image ls
  # Rows of every named db but heat (a server counts reads there while it serves).
  if command -v mdb_stat >/dev/null; then
    mdb_stat -a "$pool/index" | awk '/^Status of/ { db = $3 } /Entries/ && db != "heat" { print db, $2 }'
  fi
  layer --json index ls | json_get 'len(j)'
}

spec=$tmp/spec.json
cat >"$spec" <<'EOF'
{
  "version": 1,
  "name": "t",
  "images": [
    {"ref": "base:1", "file": "base.img", "description": "four MiB"},
    {"ref": "other:1", "file": "other.img", "block_size": "64K"}
  ],
  "containers": [
    {"name": "web1", "image": "base:1", "size": "8M",
     "resources": {"cpu": 2, "memory": "1G", "net": "100M", "iops": 2000, "bandwidth": "50M",
                   "priority": 7},
     "labels": {"role": "web", "team/owner": "ops"},
     "snapshots": ["fresh", "second"]},
    {"name": "worker-{i}", "count": 3, "start": 0, "image": "other:1",
     "resources": {"cpu": 0.5, "iops": 100}, "labels": {"role": "worker"}}
  ]
}
EOF

# ---- dry run: the plan, nothing changed ----
before=$(state)
layer apply "$spec" --dry-run >"$tmp/plan.txt"
log "plan: $(tr '\n' '|' <"$tmp/plan.txt")"
for line in "import base:1 from $tmp/base.img" "import other:1 from $tmp/other.img" \
  "create web1 on base:1" "create worker-0 on other:1" "create worker-2 on other:1" \
  "snapshot web1@fresh" "snapshot web1@second" "8 changes planned (dry run: nothing changed)"; do
  grep -qF "$line" "$tmp/plan.txt" || fail "the plan lacks '$line': $(cat "$tmp/plan.txt")"
done
plan_json=$(layer --json apply "$spec" --dry-run)
[[ "$(json_get '[s["op"] for s in j["steps"]] == ["import"] * 2 + ["create"] * 4 + ["snapshot"] * 2 and j["dry_run"] and not j["changed"]' <<<"$plan_json")" == True ]] ||
  fail "dry-run JSON: $plan_json"
[[ "$(state)" == "$before" ]] || fail "--dry-run changed the pool"

# ---- apply: everything made ----
layer apply "$spec" >"$tmp/apply.txt" || fail "apply failed"
grep -q '^applied 8 changes (spec "t")$' "$tmp/apply.txt" || fail "apply said: $(cat "$tmp/apply.txt")"
web1=$(layer --json inspect web1)
[[ "$(json_get 'j["image"] == "base:1" and j["size"] == 8 << 20 and j["labels"] == {"role": "web", "team/owner": "ops", "layer/spec": "t"}' <<<"$web1")" == True ]] ||
  fail "web1: $web1"
[[ "$(json_get '[j["resources"][k] for k in ("cpu_millis", "memory", "net", "iops", "bandwidth", "priority")] == [2000, 1 << 30, 100 << 20, 2000, 50 << 20, 7]' <<<"$web1")" == True ]] ||
  fail "web1's resources: $web1"
[[ "$(layer --json snapshot ls web1 | json_get '[s["name"] for s in j["snapshots"]]')" == '["fresh", "second"]' ]] ||
  fail "web1's snapshots: $(layer --json snapshot ls web1)"
[[ "$(layer --json ls | json_get '[c["name"] for c in j]')" == '["web1", "worker-0", "worker-1", "worker-2"]' ]] ||
  fail "containers: $(layer --json ls)"
w2=$(layer --json inspect worker-2)
[[ "$(json_get 'j["image"] == "other:1" and j["block_size"] == 65536 and j["resources"]["cpu_millis"] == 500 and j["labels"]["role"] == "worker"' <<<"$w2")" == True ]] ||
  fail "worker-2: $w2"
[[ "$(layer --json image ls | json_get '[(i["ref"], i["description"]) for i in j]')" == '[["base:1", "four MiB"], ["other:1", ""]]' ]] ||
  fail "images: $(layer --json image ls)"
layer fsck >/dev/null || fail "fsck after apply"

# ---- idempotent: a second apply changes nothing ----
before=$(state)
out=$(layer apply "$spec") || fail "second apply failed"
[[ "$out" == 'nothing to do: the pool matches spec "t"' ]] || fail "second apply said: $out"
[[ "$(layer --json apply "$spec" | json_get 'j["steps"] == [] and not j["changed"]')" == True ]] ||
  fail "second apply's JSON"
[[ "$(layer --json apply "$spec" --prune | json_get 'j["steps"]')" == "[]" ]] ||
  fail "second apply --prune planned something"
[[ "$(state)" == "$before" ]] || fail "a second apply changed the pool: $(diff <(echo "$before") <(state))"
log "second apply: nothing to do, pool unchanged"

# ---- bad specs: exit 1, one line naming the field, nothing applied ----
# bad_spec WHAT FIELD JSON: the spec (images to import included, so a partial apply would show)
# is refused naming FIELD, and the pool is as before.
bad_spec() {
  local what=$1 field=$2
  printf '%s\n' "$3" >"$tmp/bad.json"
  expect_user_error "$what" layer apply "$tmp/bad.json"
  [[ "$error_line" == "layer: error: $tmp/bad.json: $field"* ]] ||
    fail "$what: the error does not name $field: $error_line"
  expect_user_error "$what (dry run)" layer apply "$tmp/bad.json" --dry-run
  [[ "$(state)" == "$before" ]] || fail "$what: the pool changed"
}
new_image='{"ref": "new:1", "file": "base.img"}'
bad_spec "unknown field" "containers[0].imag" \
  "{\"version\":1,\"name\":\"t\",\"images\":[$new_image],\"containers\":[{\"name\":\"n1\",\"imag\":\"new:1\"}]}"
bad_spec "wrong type" "containers[0].resources.iops" \
  "{\"version\":1,\"name\":\"t\",\"images\":[$new_image],\"containers\":[{\"name\":\"n1\",\"image\":\"new:1\",\"resources\":{\"iops\":\"lots\"}}]}"
bad_spec "bad name" "containers[0].name" \
  "{\"version\":1,\"name\":\"t\",\"images\":[$new_image],\"containers\":[{\"name\":\"N 1\",\"image\":\"new:1\"}]}"
bad_spec "missing image" "containers[1].image" \
  "{\"version\":1,\"name\":\"t\",\"images\":[$new_image],\"containers\":[{\"name\":\"n1\",\"image\":\"new:1\"},{\"name\":\"n2\",\"image\":\"gone:1\"}]}"
bad_spec "duplicate names" "containers[1].name" \
  "{\"version\":1,\"name\":\"t\",\"images\":[$new_image],\"containers\":[{\"name\":\"n-2\",\"image\":\"new:1\"},{\"name\":\"n-{i}\",\"count\":3,\"image\":\"new:1\"}]}"
bad_spec "count too large" "containers[0].count" \
  "{\"version\":1,\"name\":\"t\",\"images\":[$new_image],\"containers\":[{\"name\":\"n-{i}\",\"count\":5000,\"image\":\"new:1\"}]}"
bad_spec "priority out of range" "containers[0].resources.priority" \
  "{\"version\":1,\"name\":\"t\",\"images\":[$new_image],\"containers\":[{\"name\":\"n1\",\"image\":\"new:1\",\"resources\":{\"priority\":11}}]}"
bad_spec "image file missing" "images[1].file" \
  "{\"version\":1,\"name\":\"t\",\"images\":[$new_image,{\"ref\":\"new:2\",\"file\":\"nope.img\"}],\"containers\":[{\"name\":\"n1\",\"image\":\"new:1\"}]}"
bad_spec "another image for an existing container" "containers[0].image" \
  "{\"version\":1,\"name\":\"t\",\"images\":[$new_image],\"containers\":[{\"name\":\"web1\",\"image\":\"new:1\"}]}"
bad_spec "not JSON" "not valid JSON" '{"version": 1,'
bad_spec "wrong version" "version" '{"version": 2}'
# --json: the error as JSON, naming the field too.
rc=0
layer --json apply "$tmp/bad.json" >/dev/null 2>"$tmp/err" || rc=$?
[[ $rc == 1 && "$(json_get 'j["error"]["errno"]' <"$tmp/err")" == EINVAL ]] ||
  fail "--json error: exit $rc, $(cat "$tmp/err")"
expect_user_error "a missing spec file" layer apply "$tmp/nonexistent.json"

# ---- a changed resource is set in place, not re-created ----
delta=$(layer --json inspect web1 | json_get 'j["delta_layer"]')
created=$(layer --json inspect web1 | json_get 'j["created"]')
sed -i 's/"iops": 2000/"iops": 3000/' "$spec"
out=$(layer apply "$spec" --dry-run)
[[ "$out" == *"set web1: resources"*"iops 2000"*"-> "*"iops 3000"* ]] || fail "plan of a resource change: $out"
layer apply "$spec" >/dev/null
web1=$(layer --json inspect web1)
[[ "$(json_get "j['resources']['iops'] == 3000 and j['delta_layer'] == $delta and j['created'] == $created" <<<"$web1")" == True ]] ||
  fail "web1 after a resource change: $web1"
[[ "$(layer --json snapshot ls web1 | json_get 'len(j["snapshots"])')" == 2 ]] || fail "web1 lost its snapshots"
[[ "$(layer apply "$spec")" == nothing* ]] || fail "not idempotent after a resource change"

# ---- served containers: changes go live; --prune refuses to remove one ----
start_server srv "$pool"
hold_connection "$(uri worker-2 "$server_sock")"
holders=("$holder_pid")
hold_connection "$(uri web1 "$server_sock")"
holders+=("$holder_pid")
[[ "$(layer --json ls | json_get '[c["name"] for c in j if c["served_by"]]')" == '["web1", "worker-2"]' ]] ||
  fail "not served: $(layer --json ls)"
sed -i 's/"iops": 3000/"iops": 4000/; s/"second"\]/"second", "live"]/' "$spec"
out=$(layer --json apply "$spec") || fail "apply to a served container failed"
[[ "$(json_get '[(s["op"], s.get("live")) for s in j["steps"]]' <<<"$out")" == '[["resources", true], ["snapshot", true]]' ]] ||
  fail "served changes were not live: $out"
[[ "$(layer --json inspect web1 | json_get 'j["resources"]["iops"]')" == 4000 ]] || fail "iops not 4000"
[[ "$(layer --json snapshot ls web1 | json_get '[s["name"] for s in j["snapshots"]]')" == '["fresh", "second", "live"]' ]] ||
  fail "the live snapshot is missing"
# Prune: worker-1 goes; worker-2 is served, so the plan is refused and nothing goes.
sed -i 's/"count": 3/"count": 1/' "$spec"
before=$(state)
expect_user_error "prune of a served container" layer apply "$spec" --prune
[[ "$error_line" == *'--prune: container "worker-2" is served'* ]] || fail "prune refusal: $error_line"
[[ "$(state)" == "$before" ]] || fail "a refused prune changed the pool"
# Without --prune nothing is removed: the pool already matches.
[[ "$(layer apply "$spec")" == nothing* ]] || fail "apply without --prune planned something"
for pid in "${holders[@]}"; do kill_pid "$pid"; done
stop_server srv
out=$(layer apply "$spec" --prune --dry-run)
[[ "$out" == *"remove worker-1"*"remove worker-2"* ]] || fail "prune plan: $out"
layer apply "$spec" --prune >/dev/null
[[ "$(layer --json ls | json_get '[c["name"] for c in j]')" == '["web1", "worker-0"]' ]] ||
  fail "after prune: $(layer --json ls)"
# A container made by hand is never pruned.
layer clone base:1 handmade >/dev/null
[[ "$(layer apply "$spec" --prune)" == nothing* ]] || fail "prune wants to remove a hand-made container"
layer fsck >/dev/null || fail "fsck after prune"

# ---- a step failing half-way: the run is undone ----
full=$tmp/full
mkdir -p "$full"
if mount -t tmpfs -o size=16M tmpfs "$full" 2>/dev/null; then
  cleanup_fn umount -l "$full"
  fpool=$full/pool
  "$LAYER_BIN" init "$fpool" >/dev/null
  # small.img fits, big.img (24 MiB of random data) does not: the second import fails.
  make_image "$tmp/small.img" 1 13
  head -c $((24 << 20)) /dev/urandom >"$tmp/big.img"
  cat >"$tmp/full.json" <<EOF
{"version":1,"images":[{"ref":"small:1","file":"$tmp/small.img"},{"ref":"big:1","file":"$tmp/big.img"}],
 "containers":[{"name":"c1","image":"small:1"}]}
EOF
  rc=0
  "$LAYER_BIN" --pool "$fpool" apply "$tmp/full.json" >/dev/null 2>"$tmp/err" || rc=$?
  [[ $rc == 1 && $(wc -l <"$tmp/err") == 1 ]] || fail "apply on a full disk: exit $rc, $(cat "$tmp/err")"
  grep -q "import big:1 (images\[1\]).*undone: removed image small:1" "$tmp/err" ||
    fail "the error does not say what was undone: $(cat "$tmp/err")"
  [[ "$("$LAYER_BIN" --pool "$fpool" --json image ls)" == "[]" ]] || fail "small:1 was not removed"
  [[ "$("$LAYER_BIN" --pool "$fpool" --json ls)" == "[]" ]] || fail "a container was left"
  "$LAYER_BIN" --pool "$fpool" fsck >/dev/null || fail "fsck after an undone apply"
  log "full disk: $(cat "$tmp/err")"
else
  log "full disk: skipped (cannot mount a tmpfs here: need root)"
fi

# ---- the examples ----
# The schema is JSON; with python3-jsonschema, it is a valid 2020-12 schema that the examples and
# this test's spec meet and some of the bad specs above do not.
schema=$LAYER_SRC/docs/apply-spec.schema.json
/usr/bin/python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$schema" || fail "$schema is not JSON"
if /usr/bin/python3 -c 'import jsonschema' 2>/dev/null; then
  /usr/bin/python3 - "$schema" "$spec" "$LAYER_SRC"/scripts/examples/*.json <<'EOF' || fail "schema check"
import json, sys, jsonschema
schema = json.load(open(sys.argv[1]))
jsonschema.Draft202012Validator.check_schema(schema)
v = jsonschema.Draft202012Validator(schema)
for f in sys.argv[2:]:
    errors = [e.message for e in v.iter_errors(json.load(open(f)))]
    if errors:
        sys.exit(f"{f}: {errors}")
for bad in ({"version": 1, "containers": [{"name": "n1", "imag": "new:1"}]},
            {"version": 1, "containers": [{"name": "n1", "image": "new:1", "resources": {"priority": 11}}]},
            {"version": 2}):
    if v.is_valid(bad):
        sys.exit(f"the schema takes {bad}")
EOF
  log "schema: valid; the examples meet it"
else
  log "schema: not checked (no python3-jsonschema)"
fi
for example in "$LAYER_SRC"/scripts/examples/*.json; do
  name=$(basename "$example" .json)
  dir=$tmp/examples/scripts/examples
  mkdir -p "$dir"
  cp "$example" "$dir/"
  # Stand-in image files where the spec names them (relative to the spec).
  /usr/bin/python3 -c 'import json, os, sys
spec = json.load(open(sys.argv[1]))
for img in spec.get("images", []):
    path = os.path.join(os.path.dirname(sys.argv[1]), img["file"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(8 << 20)
        f.write(b"layer example")' "$dir/$name.json"
  pool=$tmp/example-$name
  "$LAYER_BIN" init "$pool" >/dev/null
  layer apply "$dir/$name.json" >"$tmp/example.out" || fail "example $name: $(cat "$tmp/example.out")"
  before=$(state)
  [[ "$(layer apply "$dir/$name.json")" == nothing* ]] || fail "example $name: not idempotent"
  [[ "$(state)" == "$before" ]] || fail "example $name: a second apply changed the pool"
  log "example $name: $(tail -n 1 "$tmp/example.out"), $(layer --json ls | json_get 'len(j)') containers"
done
log "ok"
