#!/usr/bin/env bash
# test_completion.sh — the bash completion (packaging/bash-completion/layer), loaded as
# bash-completion loads it: commands, image and snapshot subcommands, options of a command,
# container names from `layer ls --json`, image references (with their colon) from `layer image ls
# --json`, snapshot names from `layer snapshot ls CONTAINER --json` and index copies from `layer
# index ls --json` of the pool named by --pool or LAYER_POOL, and directories for --pool.
# shellcheck source=functions.sh
source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

bash_completion=/usr/share/bash-completion/bash_completion
[[ -r "$bash_completion" ]] || skip "bash-completion is not installed"

pool=$tmp/pool
"$LAYER_BIN" init "$pool" >/dev/null
make_image "$tmp/base.img" 1 7
layer image import busybox:1 "$tmp/base.img" >/dev/null
layer image import busybox:1.36 "$tmp/base.img" >/dev/null
layer image import alpine:3 "$tmp/base.img" >/dev/null
layer clone busybox:1 web1 >/dev/null
layer clone busybox:1 web2 >/dev/null
layer clone alpine:3 db1 >/dev/null
layer snapshot web1 monday >/dev/null
layer snapshot create web1 tuesday >/dev/null
mkdir -p "$tmp/bin" "$tmp/dirs/pool-a" "$tmp/dirs/pool-b"
ln -s "$LAYER_BIN" "$tmp/bin/layer"

# complete LINE: prints the completions of LINE (the cursor at its end), one per line, sorted,
# in an interactive-like bash with bash-completion and our completion loaded. The line is split
# into words as readline does: at blanks, and with each run of COMP_WORDBREAKS characters
# (here ':' and '=') a word of its own.
complete() {
  PATH=$tmp/bin:$PATH bash --norc --noprofile -c '
    source "$1" && source "$2" || exit 1
    line=$3 word="" i=0 c=""
    words=()
    for ((i = 0; i < ${#line}; i++)); do
      c=${line:i:1}
      if [[ $c == " " ]]; then
        [[ -n $word ]] && words+=("$word")
        word=""
      elif [[ $c == [:=] ]]; then
        [[ -n $word && $word != [:=]* ]] && { words+=("$word"); word=""; }
        word+=$c
      else
        [[ $word == [:=]* ]] && { words+=("$word"); word=""; }
        word+=$c
      fi
    done
    words+=("$word")
    COMP_WORDS=("${words[@]}") COMP_CWORD=$((${#words[@]} - 1))
    COMP_LINE=$line COMP_POINT=${#line} COMP_TYPE=9 COMP_KEY=9
    _layer layer "${words[-1]}" "${words[-2]}"
    printf "%s\n" "${COMPREPLY[@]}" | sort' \
    complete "$bash_completion" "$LAYER_SRC/packaging/bash-completion/layer" "$1"
}

# expect LINE WANT...: the completions of LINE are exactly WANT (sorted).
expect() {
  local line=$1 got want
  shift
  got=$(complete "$line") || fail "completing '$line' failed"
  want=$(printf '%s\n' "$@" | sort)
  [[ "$got" == "$want" ]] || fail "completing '$line': got [${got//$'\n'/ }], want [${want//$'\n'/ }]"
  log "'$line' -> ${got//$'\n'/ }"
}

expect "layer " access apply audit clone commit diff flatten fsck gc image index init inspect ls pool predict rm rollback scrub serve set snapshot stats tier version
expect "layer a" access apply audit
expect "layer apply spec.json --" --dry-run --prune --pool --json --help
expect "layer i" image index init inspect
expect "layer index " backup ls restore
expect "layer image " history import ls profile rm
expect "layer --json fsck --" --full --repair --pool --json --help
expect "layer gc --" --no-hash --pool --json --help
expect "layer pool " set show status
expect "layer pool set --" --access --iops --bandwidth --ssd-bytes --overcommit --pool --json --help
expect "layer pool set --access " open rules
expect "layer --pool $pool access w" web1 web2
expect "layer access --" --allow --read-only --deny --remove --clear --pool --json --help
expect "layer --pool $pool set w" web1 web2
expect "layer set web1 --" --cpu --memory --net --iops --bandwidth --priority --for --iops-floor --iops-ceiling --bandwidth-floor --bandwidth-ceiling --pool --json --help
expect "layer set web1 --iops " auto none
expect "layer predict web1 --" --hours --pool --json --help
expect "layer set web1 --priority 1" 1 10
expect "layer stats web1 --" --since --per --prometheus --pool --json --help
expect "layer --pool $pool stats w" web1 web2
expect "layer --pool $tmp/dirs/pool-" "$tmp/dirs/pool-a" "$tmp/dirs/pool-b"
expect "layer --pool $pool inspect " db1 web1 web2
expect "layer rm --pool $pool w" web1 web2
LAYER_POOL=$pool expect "layer rm w" web1 web2
expect "layer --pool $pool clone " alpine:3 busybox:1 busybox:1.36
expect "layer --pool $pool clone busy" busybox:1 busybox:1.36
# After the colon readline completes only the part after it.
expect "layer --pool $pool image rm busybox:" 1 1.36
expect "layer --pool $pool serve --default d" db1
# The second positional of clone is a new name: nothing to offer.
expect "layer --pool $pool clone busybox:1 "
expect "layer --pool $pool image history busybox:" 1 1.36
# Snapshots: the subcommands or a container, then the container's snapshot names.
expect "layer --pool $pool snapshot " create ls rm db1 web1 web2
expect "layer --pool $pool snapshot ls w" web1 web2
expect "layer --pool $pool snapshot rm web1 " monday tuesday
# The index copies the imports and clones above left (taken before each import).
mapfile -t copies < <(layer --json index ls | json_get '"\n".join(c["name"] for c in j)')
((${#copies[@]} > 0)) || fail "no index copies in the pool"
expect "layer --pool $pool index restore " "${copies[@]}"
expect "layer --pool $pool snapshot web1 "
expect "layer --pool $pool rollback web1 t" tuesday
expect "layer --pool $pool rollback web1 monday --" --keep-as --force --pool --json --help
expect "layer --pool $pool commit w" web1 web2
expect "layer --pool $pool tier " move policy run status
expect "layer --pool $pool tier run --d" --dry-run
expect "layer --pool $pool tier move w" web1 web2
expect "layer --pool $pool tier move web1 " hdd ssd
expect "layer --pool $pool commit web1 "
expect "layer --pool $pool diff " db1 web1 web2
expect "layer --pool $pool diff web1 w" web1 web2
# After an @, the container's snapshots; where @ breaks words (bash's default, unless something
# removed it), readline completes only the part after it.
if bash --norc --noprofile -c 'source "$1"; [[ $COMP_WORDBREAKS == *@* ]]' _ "$bash_completion"; then
  expect "layer --pool $pool diff web1@" monday tuesday
  expect "layer --pool $pool clone web1@m" monday
else
  expect "layer --pool $pool diff web1@" web1@monday web1@tuesday
  expect "layer --pool $pool clone web1@m" web1@monday
fi
# No pool, or a bad one: no names, and no error text on the terminal.
expect "layer --pool $tmp/nonexistent inspect "
log "ok"
