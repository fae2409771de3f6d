#!/bin/bash
# test_predict.sh — the forecast (issue 14 item 4; docs/forecast.md) on synthetic history
# written through lib/stats's writer API (stats_seed), with a real server and a real libnbd
# client (qos_client.py):
# - `layer predict web --json`: six days busy 09-17 UTC give the next 24 hours busy exactly in
#   those hours (the hourly mean), each resting on the past days of its hour; the text table;
#   a container without history forecasts 0 ("none"); bad arguments exit 1;
# - `layer set flat --iops auto --iops-floor 20 --iops-ceiling 5000` on a served container with
#   a flat history (a busiest minute of 100 reads/s every hour): the server applies 150 (100 x
#   the 1.5 headroom) at once (`set --json` "applied", `inspect` shows the auto mode and the
#   derived limit), and 4 KiB reads measure at most 10% over it; a lower ceiling clamps it
#   live; a number ends auto; bad combinations exit 1;
# - `layer tier policy --prewarm 2h`: the image's base, moved to hdd, is planned for ssd by its
#   users' forecast (`tier run --dry-run`), then moved by `tier run`.
# shellcheck source=functions.sh
source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"
requires /usr/bin/python3 -c 'import nbd'
[[ -x "${LAYER_STATS_SEED:-}" ]] || skip "stats_seed not built (LAYER_STATS_SEED)"

pool=$tmp/pool
client=$LAYER_SRC/tests/integration/qos_client.py
nbd() { uri "$1" "$server_sock"; }
read_for() { /usr/bin/python3 "$client" "$(nbd "$2")" "$3" "$4" "$tmp/$1.tl"; }
rate() { /usr/bin/python3 "$client" rate "$tmp/$1.tl" "$2" "$3" "$4"; }

# The history is seeded up to the current hour: a test straddling an hour's end would see one
# idle hour more. Near the end of an hour, wait for the next.
left=$((3600 - $(date +%s) % 3600))
if ((left < 90)); then
  log "waiting ${left}s for the next hour"
  sleep $((left + 2))
fi

layer init >/dev/null
make_image "$tmp/base.raw" 16 7  # with data: a layer without any never moves
layer image import base:1 "$tmp/base.raw" >/dev/null
for c in web flat quiet; do layer clone base:1 "$c" >/dev/null; done

# ---- layer predict ----
# web: six days, two minutes an hour of 6000 reads from 09:00 to 17:00 UTC (12000 an hour:
# 3.33/s), of 60 otherwise (0.033/s).
"$LAYER_STATS_SEED" "$pool" web 6 9 17 6000 60 || fail "stats_seed web"
out=$(layer --json predict web)
python3 - "$out" <<'PY' || fail "predict web --json: $out"
import json, sys
j = json.loads(sys.argv[1])
assert j["ok"] and j["container"] == "web" and j["season"] == "daily", j
assert j["history_hours"] >= 6 * 24, j["history_hours"]
hours = j["hours"]
assert len(hours) == 24, len(hours)
assert hours[0]["time"] == j["now"] // 3600 * 3600
for h in hours:
    hod = h["time"] // 3600 % 24
    busy = 9 <= hod < 17
    want = 12000 / 3600 if busy else 120 / 3600
    assert abs(h["iops"] - want) < 1e-6, (hod, h, want)
    assert abs(h["bandwidth"] - want * 4096) < 1e-3, (hod, h)
    assert abs(h["peak_iops"] - (100 if busy else 1)) < 1e-6, (hod, h)
    assert h["basis"] == "slot" and h["samples"] >= 5, h
PY
log "predict web: busy 09-17 UTC, quiet otherwise, over the next 24 hours"
text=$(layer predict web --hours 3)
grep -q "^web: daily seasonality from [0-9]* hours of history" <<<"$text" || fail "predict text: $text"
grep -q "RESTS ON" <<<"$text" || fail "predict table: $text"
[[ $(grep -c " days$" <<<"$text") == 3 ]] || fail "predict --hours 3: $text"
[[ "$(layer --json predict quiet --hours 2 | json_get '[j["season"], [h["basis"] for h in j["hours"]], [h["iops"] for h in j["hours"]]]')" == '["none", ["none", "none"], [0.0, 0.0]]' ]] ||
  fail "predict without history: $(layer --json predict quiet --hours 2)"
expect_user_error "predict an unknown container" layer predict nope
expect_user_error "predict --hours 0" layer predict web --hours 0
expect_user_error "predict --hours 1000" layer predict web --hours 1000

# ---- layer set --iops auto ----
# flat: the same every hour, a busiest minute of 6000 reads (100/s).
"$LAYER_STATS_SEED" "$pool" flat 2 0 24 6000 6000 || fail "stats_seed flat"
expect_user_error "a floor for a limit that is not auto" layer set flat --iops-floor 10
expect_user_error "auto with --for" layer set flat --iops auto --for 1h
expect_user_error "a floor above the ceiling" layer set flat --iops auto --iops-floor 500 --iops-ceiling 100
expect_user_error "a floor with a number" layer set flat --iops 300 --iops-floor 10

start_server srv "$pool" --threads 8
hold_connection "$(nbd flat)"  # the server holds flat (and its limiter) from here on
out=$(layer --json set flat --iops auto --iops-floor 20 --iops-ceiling 5000)
[[ "$(json_get '[j["live"], j["applied"]["iops"], j["resources"]["auto"]["iops"]["limit"], j["resources"]["effective"]["iops"]]' <<<"$out")" == '[true, 150, 150, 150]' ]] ||
  fail "set --iops auto: $out"
out=$(layer --json inspect flat)
[[ "$(json_get '[j["resources"]["auto"]["iops"], j["resources"]["auto"]["bandwidth"], j["resources"]["effective"]["iops"]]' <<<"$out")" == '[{"floor": 20, "ceiling": 5000, "limit": 150, "peak": 100.0}, null, 150]' ]] ||
  fail "inspect --json with auto: $out"
layer inspect flat | grep -q '^auto limits: iops 150 (follows the forecast: peak 100.0 x 1.5, floor 20, ceiling 5000)$' ||
  fail "inspect: $(layer inspect flat)"
[[ "$(layer --json inspect web | json_get 'j["resources"].get("auto")')" == null ]] || fail "auto on web"

read_for auto flat 4096 6.5
measured=$(rate auto 1.2 6.2 ops)
log "--iops auto (150): $measured 4 KiB reads/s"
python3 -c "import sys; sys.exit(0 if $measured <= 150 * 1.10 else 1)" ||
  fail "--iops auto: $measured reads/s is over the derived limit 150 by more than 10%"
python3 -c "import sys; sys.exit(0 if $measured >= 150 * 0.5 else 1)" ||
  fail "--iops auto: $measured reads/s, far under the derived limit 150"

# A lower ceiling clamps it, live; a number ends auto.
out=$(layer --json set flat --iops-ceiling 120)
[[ "$(json_get '[j["applied"]["iops"], j["resources"]["auto"]["iops"]["ceiling"]]' <<<"$out")" == '[120, 120]' ]] ||
  fail "set --iops-ceiling: $out"
out=$(layer --json set flat --iops 300)
[[ "$(json_get '[j["applied"]["iops"], j["resources"].get("auto"), j["resources"]["iops"]]' <<<"$out")" == '[300, null, 300]' ]] ||
  fail "set --iops 300 after auto: $out"

# ---- pre-promotion ----
layer tier move base:1 hdd >/dev/null
out=$(layer --json tier policy --prewarm 2h)
[[ "$(json_get 'j["policy"]["prewarm_s"]' <<<"$out")" == 7200 ]] || fail "tier policy --prewarm: $out"
layer tier policy | grep -q "prewarm 2h" || fail "tier policy text: $(layer tier policy)"
base=$(layer --json inspect web | json_get 'j["chain"][-1]["layer"]')
out=$(layer --json tier run --dry-run)
# flat (3.33/s every hour) and web (at least 0.033/s) use the base: hot (1 ops/s) ahead.
python3 - "$out" "$base" <<'PY' || fail "tier run --dry-run with prewarm: $out"
import json, sys
j, base = json.loads(sys.argv[1]), int(sys.argv[2])
planned = [l for l in j["planned"] if l["layer"] == base]
assert planned and planned[0]["action"] == "promote", j["planned"]
assert "predicted hot within 2h" in planned[0]["reason"], planned[0]
assert planned[0]["predicted_rate"] >= 3.3, planned[0]
PY
layer tier run >/dev/null
[[ "$(layer --json inspect web | json_get 'j["chain"][-1]["tier"]')" == ssd ]] ||
  fail "the base was not promoted: $(layer --json inspect web)"
layer tier policy --prewarm off | grep -q "prewarm off" || fail "--prewarm off"
log "ok"
