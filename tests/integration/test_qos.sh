#!/bin/bash
# test_qos.sh — a container's resources (issue 14 item 1; docs/design.md "Resources and QoS")
# with a real server and a real libnbd client (qos_client.py, one request in flight):
# - `layer clone --cpu --memory --net --iops --bandwidth --priority`, `layer inspect` (text and
#   --json), bad values refused with one line and exit 1;
# - --iops 500, 4 KiB reads for 5 s (after the one-second burst): at most 10% over the limit,
#   and within 10% of it when the same client reads an unlimited container well above it;
# - --bandwidth 8M, 1 MiB reads: the same for bytes/s;
# - while a client reads: `layer set --iops 1000` applies live (the rate from a second after
#   the command on is the new one), `--iops 2000 --for 3s` applies and reverts by itself;
# - an unlimited container read beside a limited one is not held to the limit.
source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"
requires /usr/bin/python3 -c 'import nbd'

pool=$tmp/pool
client=$LAYER_SRC/tests/integration/qos_client.py
nbd() { uri "$1" "$server_sock"; }
now() { date +%s.%N; }
# read_for NAME EXPORT SIZE SECONDS: runs the client, timeline in $tmp/NAME.tl.
read_for() { /usr/bin/python3 "$client" "$(nbd "$2")" "$3" "$4" "$tmp/$1.tl"; }
# rate NAME T0 T1 ops|bytes: the rate of timeline NAME between T0 and T1 (seconds from its start).
rate() { /usr/bin/python3 "$client" rate "$tmp/$1.tl" "$2" "$3" "$4"; }
# check_limit WHAT MEASURED LIMIT UNLIMITED: MEASURED <= LIMIT*1.10, and >= LIMIT*0.90 when the
# client reaches UNLIMITED >= 1.5*LIMIT without a limit (else the machine, not the limit, is
# what holds it back).
check_limit() {
  local what=$1 measured=$2 limit=$3 unlimited=$4
  log "$what: $measured (limit $limit; unlimited $unlimited)"
  python3 -c "import sys; sys.exit(0 if $measured <= $limit * 1.10 else 1)" ||
    fail "$what: $measured is over the limit $limit by more than 10%"
  if python3 -c "import sys; sys.exit(0 if $unlimited >= $limit * 1.5 else 1)"; then
    python3 -c "import sys; sys.exit(0 if $measured >= $limit * 0.90 else 1)" ||
      fail "$what: $measured is under the limit $limit by more than 10% (unlimited: $unlimited)"
  else
    log "note: $what: the unlimited rate $unlimited is not well above $limit: lower bound not checked"
  fi
}

layer init >/dev/null
truncate -s 64M "$tmp/base.raw"
layer image import base:1 "$tmp/base.raw" >/dev/null

# ---- the record, the CLI ----
layer clone base:1 lim --cpu 2 --memory 1G --net 100M --iops 500 --priority 7 >/dev/null
layer clone base:1 bw --bandwidth 8M >/dev/null
layer clone base:1 free >/dev/null
out=$(layer --json inspect lim)
[[ "$(json_get '[j["resources"][k] for k in ("cpu","cpu_millis","memory","net","iops","bandwidth","priority")]' <<<"$out")" == '[2.0, 2000, 1073741824, 104857600, 500, 0, 7]' ]] ||
  fail "inspect --json resources: $out"
[[ "$(json_get 'j["resources"]["timed"]' <<<"$out")" == null ]] || fail "a timed change: $out"
layer inspect lim | grep -qx 'resources: cpu 2, memory 1.0 GiB, net 100.0 MiB/s, iops 500, bandwidth -, priority 7' ||
  fail "inspect: $(layer inspect lim)"
[[ "$(layer --json inspect free | json_get 'j["resources"]["effective"]')" == '{"iops": 0, "bandwidth": 0}' ]] ||
  fail "an unlimited container's resources: $(layer --json inspect free)"
expect_user_error "a bad count" layer set lim --iops lots
expect_user_error "a priority out of range" layer set lim --priority 11
expect_user_error "a bad rate" layer clone base:1 bad --bandwidth 5Q
expect_user_error "--for with cpu" layer set lim --cpu 4 --for 1h
expect_user_error "nothing to set" layer set lim
expect_user_error "an unknown container" layer set nope --iops 5
layer ls --json | json_get '[c["name"] for c in j]' | grep -q bad && fail "a refused clone was made"

start_server srv "$pool" --threads 8
# A change to a container this server does not serve: recorded, not live.
[[ "$(layer --json set free --priority 3 | json_get 'j["live"]')" == False ]] || fail "live without a server's disk"

# ---- what the client does without a limit ----
read_for u4k free 4096 2
u4k=$(rate u4k 0.5 2 ops)
read_for u1m free 1048576 2
u1m=$(rate u1m 0.5 2 bytes)
log "unlimited: $u4k 4 KiB reads/s, $u1m bytes/s in 1 MiB reads"

# ---- iops 500, and an unlimited container beside it ----
read_for free_beside free 4096 6.5 &
beside=$!
read_for iops lim 4096 6.5
wait "$beside"
check_limit "--iops 500, 4 KiB reads over 5 s" "$(rate iops 1.2 6.2 ops)" 500 "$u4k"
free_rate=$(rate free_beside 1.2 6.2 ops)
log "an unlimited container read at the same time: $free_rate reads/s"
if python3 -c "import sys; sys.exit(0 if $u4k >= 4 * 500 else 1)"; then
  python3 -c "import sys; sys.exit(0 if $free_rate >= 2 * 500 else 1)" ||
    fail "the unlimited container was slowed to $free_rate reads/s beside a limited one"
fi

# ---- bandwidth 8 MiB/s ----
read_for bw bw 1048576 6.5
check_limit "--bandwidth 8M, 1 MiB reads over 5 s" "$(rate bw 1.2 6.2 bytes)" $((8 << 20)) "$u1m"

# ---- live changes while the client reads ----
read_for live lim 4096 11.5 &
live=$!
sleep 0.3
t_start=$(now)
sleep 2
t_set=$(now)
out=$(layer --json set lim --iops 1000)
[[ "$(json_get 'j["live"]' <<<"$out")" == True ]] || fail "set was not applied live: $out"
sleep $(python3 -c "print(max(0, 5 - ($(now) - $t_start)))")
t_for=$(now)
out=$(layer --json set lim --iops 2000 --for 3s)
[[ "$(json_get 'j["live"]' <<<"$out")" == True ]] || fail "set --for was not applied live: $out"
[[ "$(json_get '[j["resources"]["timed"]["iops"], j["resources"]["effective"]["iops"]]' <<<"$out")" == '[2000, 2000]' ]] ||
  fail "set --for: $out"
layer inspect lim | grep -q '^resources: .*iops 1000, .*; for now iops 2000 until ' ||
  fail "inspect during --for: $(layer inspect lim)"
wait "$live"
[[ "$(layer --json inspect lim | json_get '[j["resources"]["timed"], j["resources"]["effective"]["iops"]]')" == '[null, 1000]' ]] ||
  fail "after --for ended: $(layer --json inspect lim)"
# Seconds from the timeline's start of each change (the client started before t_start).
t0=$(head -1 "$tmp/live.tl" | cut -d' ' -f1)
s_set=$(python3 -c "print($t_set - $t0)")
s_for=$(python3 -c "print($t_for - $t0)")
log "changes at ${s_set}s (--iops 1000) and ${s_for}s (--iops 2000 --for 3s) of the live run"
check_limit "before the change (500)" "$(rate live 1.2 "$s_set" ops)" 500 "$u4k"
check_limit "from 1 s after --iops 1000" "$(rate live "$(python3 -c "print($s_set + 1)")" "$s_for" ops)" 1000 "$u4k"
check_limit "during --for 3s (2000)" \
  "$(rate live "$(python3 -c "print($s_for + 1)")" "$(python3 -c "print($s_for + 2.9)")" ops)" 2000 "$u4k"
check_limit "after --for ended (1000 again)" \
  "$(rate live "$(python3 -c "print($s_for + 4)")" 11.4 ops)" 1000 "$u4k"
log "ok"
