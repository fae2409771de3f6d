#!/bin/bash
# test_stats.sh — the I/O history (issue 14 item 3; docs/stats.md) with a real server and real
# libnbd clients:
# - a known sequence of reads, writes, trims, zeroes and flushes over two connections to one
#   container at once: `layer stats --json` shows exactly those counts and bytes, added up in
#   the container's minutes (stats-interval=1); the text table's totals agree; --per hour too;
# - the metrics socket (metrics=PATH) answers with the same cumulative counters, and again on a
#   second connection; `layer stats --prometheus` prints every container's current minute;
# - a server with a long stats-interval writes a connection's counts when it closes, and the
#   last ones when it stops;
# - bad arguments: one line, exit 1 (JSON with --json);
# - `layer rm` drops the container's rows from the index (mdb_stat), and a new container under
#   the old name starts empty.
# shellcheck source=functions.sh
source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"
requires /usr/bin/python3 -c 'import nbd'

pool=$tmp/pool
export LAYER_POOL=$pool
nbd() { uri "$1" "$server_sock"; }
totals() { layer stats "$1" --since 1d --json | json_get "j['totals']['$2']"; }
total_is() { [[ "$(totals "$1" "$2")" == "$3" ]]; }
# stats_rows: the rows of the index's stats db.
stats_rows() { mdb_stat -s stats "$pool/index" | awk '/Entries:/ {print $2}'; }
# metrics SOCK: what the metrics socket answers.
metrics() {
  /usr/bin/python3 -c 'import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
out = b""
while True:
    b = s.recv(65536)
    if not b:
        break
    out += b
sys.stdout.write(out.decode())' "$1"
}

layer init >/dev/null
truncate -s 8M "$tmp/base.raw"
layer image import base:1 "$tmp/base.raw" >/dev/null
layer clone base:1 c1 >/dev/null
layer clone base:1 c2 >/dev/null
[[ "$(layer stats c1 --json | json_get 'j["rows"]')" == "[]" ]] || fail "a new container has history"

start_server s "$pool" -- stats-interval=1 metrics="$tmp/metrics.sock" hasher=off
# Two connections to c1 at once, each a known sequence (nothing else reads or writes c1).
/usr/bin/python3 - "$(nbd c1)" <<'PY'
import sys, nbd
a, b = nbd.NBD(), nbd.NBD()
a.connect_uri(sys.argv[1])
b.connect_uri(sys.argv[1])
for i in range(10):
    a.pread(4096, i * 4096)
for i in range(5):
    b.pread(512, 1 << 20 | i * 512)
for i in range(3):
    a.pwrite(b"x" * 8192, 2 << 20 | i * 8192)
b.pwrite(b"y" * 4096, 3 << 20)
a.trim(65536, 4 << 20)
a.trim(65536, 5 << 20)
a.zero(4096, 6 << 20)
a.flush()
a.flush()
b.flush()
a.shutdown()
b.shutdown()
PY
# Reads 10 x 4096 + 5 x 512; writes 3 x 8192 + 4096; trims 2 x 64 KiB; one 4 KiB zero.
wait_until 30 total_is c1 flush_ops 3 || fail "the history never showed 3 flushes: $(layer stats c1 --json)"
out=$(layer stats c1 --since 1d --json)
log "stats --json: $out"
[[ "$(json_get '[j["totals"][k] for k in ("read_ops","write_ops","trim_ops","zero_ops","flush_ops")]' <<<"$out")" == "[15, 4, 2, 1, 3]" ]] ||
  fail "ops: $out"
[[ "$(json_get '[j["totals"][k] for k in ("read_bytes","write_bytes","trim_bytes","zero_bytes")]' <<<"$out")" == "[43520, 28672, 131072, 4096]" ]] ||
  fail "bytes: $out"
# The shape: the container, the minutes (each a multiple of 60, ascending), latency quantiles.
[[ "$(json_get '[j["ok"], j["container"], j["per"], sorted(j["totals"]["latency_us"])]' <<<"$out")" == '[true, "c1", "minute", ["flush", "read", "trim", "write", "zero"]]' ]] ||
  fail "shape: $out"
json_get 'all(r["time"] % 60 == 0 for r in j["rows"]) and [r["time"] for r in j["rows"]] == sorted({r["time"] for r in j["rows"]}) and 1 <= len(j["rows"]) <= 2' <<<"$out" | grep -qx True ||
  fail "rows: $out"
json_get 'sum(r["read_ops"] for r in j["rows"])' <<<"$out" | grep -qx 15 || fail "rows do not add up: $out"
json_get 'j["totals"]["latency_us"]["read"]["p50"] > 0 and j["totals"]["latency_us"]["read"]["p99"] >= j["totals"]["latency_us"]["read"]["p50"]' <<<"$out" |
  grep -qx True || fail "read latency: $out"
out=$(layer stats c1 --since 1d --per hour --json)
[[ "$(json_get '[j["per"], j["totals"]["read_ops"], sum(r["write_ops"] for r in j["rows"]), all(r["time"] % 3600 == 0 for r in j["rows"])]' <<<"$out")" == '["hour", 15, 4, true]' ]] ||
  fail "--per hour: $out"
layer stats c1 --since 1d | grep -E '^total +15 +4 +2 +1 +3 ' >/dev/null || fail "text: $(layer stats c1 --since 1d)"
[[ "$(layer stats c2 --json | json_get 'j["totals"]["read_ops"]')" == 0 ]] || fail "c2 has reads"

# The metrics socket: cumulative counters since the server started.
for round in 1 2; do
  text=$(metrics "$tmp/metrics.sock")
  for line in 'layer_read_ops_total{container="c1"} 15' 'layer_read_bytes_total{container="c1"} 43520' \
    'layer_write_ops_total{container="c1"} 4' 'layer_write_bytes_total{container="c1"} 28672' \
    'layer_trim_ops_total{container="c1"} 2' 'layer_zero_ops_total{container="c1"} 1' \
    'layer_flush_ops_total{container="c1"} 3' 'layer_request_duration_seconds_count{container="c1",op="read"} 15' \
    '# TYPE layer_read_ops_total counter'; do
    grep -qxF "$line" <<<"$text" || fail "metrics (round $round) lack '$line': $text"
  done
done
[[ "$(stat -c %a "$tmp/metrics.sock")" == 600 ]] || fail "metrics socket mode $(stat -c %a "$tmp/metrics.sock")"

# layer stats --prometheus: the current minute of every container, from the index. The same
# minute twice around a --json read, so that a minute's end between them does not count.
for _ in 1 2 3; do
  p1=$(layer stats --prometheus)
  js=$(layer stats c1 --since 1d --json)
  p2=$(layer stats --prometheus)
  [[ "$(grep '^layer_minute_start_seconds ' <<<"$p1")" == "$(grep '^layer_minute_start_seconds ' <<<"$p2")" ]] && break
done
minute=$(awk '/^layer_minute_start_seconds / {print $2}' <<<"$p1")
want=$(json_get "sum(r['read_ops'] for r in j['rows'] if r['time'] == $minute)" <<<"$js")
grep -qxF "layer_minute_read_ops{container=\"c1\"} $want" <<<"$p1" || fail "--prometheus: want $want reads: $p1"
grep -qxF 'layer_minute_read_ops{container="c2"} 0' <<<"$p1" || fail "--prometheus lacks c2: $p1"
grep -qxF '# TYPE layer_minute_write_bytes gauge' <<<"$p1" || fail "--prometheus types: $p1"
stop_server s

# A long interval: a connection's close writes its counts; the server's stop writes the rest.
start_server t "$pool" -- stats-interval=1h hasher=off
nbdsh -u "$(nbd c2)" -c 'for i in range(7): h.pwrite(b"z" * 4096, i * 4096)'
wait_until 30 total_is c2 write_ops 7 || fail "a closed connection's writes are not in the history"
hold_connection "$(nbd c2)"  # reads 512 bytes, then stays open
kill_pid "$holder_pid"
stop_server t
total_is c2 read_ops 1 || fail "the server's stop did not write the last read: $(layer stats c2 --json)"
total_is c2 read_bytes 512 || fail "read bytes: $(layer stats c2 --json)"

# Bad arguments: one line, exit 1.
expect_user_error "no container" layer stats
expect_user_error "an unknown container" layer stats nope
expect_user_error "a bad --per" layer stats c1 --per day
expect_user_error "a bad --since" layer stats c1 --since yesterday
expect_user_error "--prometheus with a container" layer stats --prometheus c1
expect_user_error "--prometheus with --since" layer stats --prometheus --since 1h
expect_user_error "a bad name" layer stats ../c1
rc=0
layer --json stats c1 --per day 2>"$tmp/err" >/dev/null || rc=$?
[[ "$rc" == 1 && "$(json_get 'j["error"]["errno"]' <"$tmp/err")" == EINVAL ]] ||
  fail "--json error: exit $rc, $(cat "$tmp/err")"

# rm drops the history from the index; a new c1 starts empty.
rows_before=$(stats_rows)
c1_rows=$(layer stats c1 --since 30d --json | json_get 'len(j["rows"])')
((c1_rows >= 1)) || fail "c1 has no rows"
layer rm c1 >/dev/null
[[ "$(stats_rows)" == $((rows_before - c1_rows)) ]] || fail "rm left rows: $rows_before before, $(stats_rows) after, c1 had $c1_rows"
layer clone base:1 c1 >/dev/null
[[ "$(layer stats c1 --since 30d --json | json_get 'j["rows"]')" == "[]" ]] || fail "a new c1 has the old history"
log "ok"
