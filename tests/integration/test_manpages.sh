#!/usr/bin/env bash
# test_manpages.sh — the man pages built by this build (packaging/man/*.md, pandoc): `man -l`
# renders both without a warning at 80 columns; layer(1) names every command `layer --help` and
# `layer image --help` list and documents exit statuses 0, 1 and 2; nbdkit-layer-plugin(1)
# documents every parameter the plugin's own help (`nbdkit PLUGIN --help`) lists.
# shellcheck source=functions.sh
source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

requires man
man_dir=${LAYER_BUILD_DIR:-}/packaging/man
[[ -f "$man_dir/layer.1" && -f "$man_dir/nbdkit-layer-plugin.1" ]] ||
  skip "no man pages in $man_dir (pandoc was not found when configuring)"

for page in layer.1 nbdkit-layer-plugin.1; do
  warnings=$(MANWIDTH=80 man --warnings -l "$man_dir/$page" 2>&1 >/dev/null)
  [[ -z "$warnings" ]] || fail "man --warnings $page: $warnings"
  MANWIDTH=80 MAN_KEEP_FORMATTING=0 man -l "$man_dir/$page" 2>/dev/null | col -b >"$tmp/$page.txt"
  for section in NAME SYNOPSIS DESCRIPTION EXAMPLES "SEE ALSO"; do
    grep -qx "$section" "$tmp/$page.txt" || fail "$page has no $section section"
  done
done

# CLI11's help lists subcommands under "Subcommands:" (upper case in newer CLI11), one per
# indented line, name first, up to a blank line.
subcommands() {
  "$LAYER_BIN" "$@" --help | sed -n '/^[Ss][Uu][Bb][Cc][Oo][Mm][Mm][Aa][Nn][Dd][Ss]:$/,/^$/p' |
    awk 'NR > 1 && NF { print $1 }'
}
mapfile -t commands < <(subcommands)
mapfile -t image_commands < <(subcommands image)
((${#commands[@]} >= 9 && ${#image_commands[@]} >= 3)) ||
  fail "cannot read the commands from layer --help: ${commands[*]} / ${image_commands[*]}"
synopsis=$(sed -n '/^SYNOPSIS$/,/^DESCRIPTION$/p' "$tmp/layer.1.txt")
for cmd in "${commands[@]}"; do
  [[ "$cmd" == image ]] && continue
  grep -qE "^ *layer +$cmd( |$)" <<<"$synopsis" || fail "layer(1) SYNOPSIS lacks 'layer $cmd'"
  grep -qE "^ {7}$cmd( |$)" "$tmp/layer.1.txt" || fail "layer(1) COMMANDS does not describe $cmd"
done
for cmd in "${image_commands[@]}"; do
  grep -qE "^ *layer +image +$cmd( |$)" <<<"$synopsis" ||
    fail "layer(1) SYNOPSIS lacks 'layer image $cmd'"
  grep -qE "^ {7}image $cmd( |$)" "$tmp/layer.1.txt" || fail "layer(1) does not describe image $cmd"
done
exit_section=$(sed -n '/^EXIT STATUS$/,/^ENVIRONMENT$/p' "$tmp/layer.1.txt")
for status in 0 1 2; do
  grep -qE "^ +$status( |$)" <<<"$exit_section" || fail "layer(1) EXIT STATUS lacks $status"
done
grep -q 'docs/cli.md' "$tmp/layer.1.txt" || fail "layer(1) does not refer to docs/cli.md"
log "layer(1): ${#commands[@]} commands and ${#image_commands[@]} image commands documented"

# The plugin's parameters, from its config_help ("pool=<DIR> ..." lines).
# shellcheck disable=SC2046 # NAME=VALUE words
env $(nbdkit_env "$tmp/help.sanitizer") nbdkit "$LAYER_PLUGIN" --help >"$tmp/plugin-help" 2>&1 ||
  fail "nbdkit $LAYER_PLUGIN --help"
mapfile -t params < <(grep -oE '^[a-z_-]+=' "$tmp/plugin-help" | sort -u)
((${#params[@]} >= 2)) || fail "no parameters in the plugin's help: $(cat "$tmp/plugin-help")"
params_section=$(sed -n '/^PARAMETERS$/,/^EXPORTS$/p' "$tmp/nbdkit-layer-plugin.1.txt")
for p in "${params[@]}"; do
  grep -qE "^ {7}(\[)?$p" <<<"$params_section" ||
    fail "nbdkit-layer-plugin(1) PARAMETERS does not describe $p"
done
for section in EXPORTS "BLOCK SIZES" "FLUSH SEMANTICS"; do
  grep -qx "$section" "$tmp/nbdkit-layer-plugin.1.txt" ||
    fail "nbdkit-layer-plugin(1) has no $section section"
done
log "nbdkit-layer-plugin(1): parameters ${params[*]} documented"
