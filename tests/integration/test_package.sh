#!/usr/bin/env bash
# test_package.sh — the Debian package. Builds layer_VERSION_ARCH.deb with scripts/package
# (dpkg-buildpackage, debhelper + cmake; lintian must report no error), or takes LAYER_DEB, then
# unpacks it into a scratch root with `dpkg -x` and checks: the files are where Debian and nbdkit
# look for them (the plugin in `pkg-config --variable=plugindir nbdkit`, so `nbdkit layer` works
# once installed); the packaged `layer version` reports the changelog's version; `nbdkit
# --dump-plugin` loads the packaged plugin; the packaged CLI and plugin make a pool and serve a
# container to nbdinfo; the packaged man pages render without warnings; the packaged units pass
# `systemd-analyze verify` with the packaged man pages on MANPATH; the logrotate rule parses;
# the maintainer scripts create the "layer" user; `layer serve` does not look in the build tree.
#
# Building the package compiles the project (minutes): without LAYER_TEST_PACKAGE=1 (or LAYER_DEB)
# the test is skipped. scripts/test sets LAYER_TEST_PACKAGE=1 for its normal (non-sanitizer) run.
# shellcheck source=functions.sh
source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

if [[ -z "${LAYER_DEB:-}" && "${LAYER_TEST_PACKAGE:-}" != 1 ]]; then
  skip "building the .deb takes minutes: set LAYER_TEST_PACKAGE=1 (or LAYER_DEB=FILE.deb)"
fi
requires dpkg-deb
requires nbdinfo

version=$(cd "$LAYER_SRC" && dpkg-parsechangelog -SVersion)
if [[ -n "${LAYER_DEB:-}" ]]; then
  deb=$LAYER_DEB
  [[ -f "$deb" ]] || fail "LAYER_DEB=$deb does not exist"
else
  requires dpkg-buildpackage
  requires dh
  requires lintian
  t0=$SECONDS
  bash "$LAYER_SRC/scripts/package" --out "$tmp/out" >"$tmp/package.log" 2>&1 ||
    fail "scripts/package failed: $(tail -n 40 "$tmp/package.log")"
  log "scripts/package: built and linted in $((SECONDS - t0)) s"
  deb=$(tail -n 1 "$tmp/package.log")
  # lintian's findings (warnings are allowed, errors fail scripts/package).
  grep -E '^[WIE]: ' "$tmp/package.log" >&2 || true
fi
log "package: $deb"
[[ $(basename "$deb") == layer_"${version}"_*.deb ]] || fail "unexpected file name $(basename "$deb")"

# ---- control data ----
dpkg-deb -f "$deb" Package Version Depends >"$tmp/control"
grep -qx 'Package: layer' "$tmp/control" || fail "package name: $(cat "$tmp/control")"
grep -qx "Version: $version" "$tmp/control" || fail "version: $(cat "$tmp/control")"
grep -q 'nbdkit' <(grep '^Depends:' "$tmp/control") || fail "does not depend on nbdkit"
mkdir "$tmp/control.d"
dpkg-deb -e "$deb" "$tmp/control.d"
grep -q 'adduser --quiet --system --group' "$tmp/control.d/postinst" ||
  fail "postinst does not create the layer user"

# ---- the files ----
root=$tmp/root
dpkg -x "$deb" "$root"
plugindir=$(pkg-config --variable=plugindir nbdkit)
plugin=$root$plugindir/nbdkit-layer-plugin.so
unitdir=$root/lib/systemd/system
for f in usr/bin/layer "${plugindir#/}/nbdkit-layer-plugin.so" \
  usr/share/man/man1/layer.1.gz usr/share/man/man1/nbdkit-layer-plugin.1.gz \
  lib/systemd/system/layer@.service lib/systemd/system/layer@.socket \
  usr/share/bash-completion/completions/layer etc/logrotate.d/layer \
  usr/share/doc/layer/copyright; do
  [[ -f "$root/$f" ]] || fail "the package lacks /$f: $(cd "$root" && find . -type f)"
done
# nbdkit finds `layer` in the same directory as its own plugins.
nbdkit --dump-config | grep -qx "plugindir=$plugindir" || fail "nbdkit's plugindir is not $plugindir"
[[ -f "$plugindir/nbdkit-file-plugin.so" ]] || log "note: no file plugin in $plugindir"

# ---- the packaged programs ----
"$root/usr/bin/layer" version >"$tmp/version" || fail "packaged layer version"
grep -q "^layer $version " "$tmp/version" || fail "layer version: $(cat "$tmp/version"), want $version"
"$root/usr/bin/layer" --json version | grep -q "\"version\":\"$version\"" || fail "layer --json version"
nbdkit --dump-plugin "$plugin" >"$tmp/dump" 2>&1 || fail "nbdkit --dump-plugin: $(cat "$tmp/dump")"
grep -qx 'name=layer' "$tmp/dump" || fail "dump-plugin: $(cat "$tmp/dump")"
grep -qx "version=$version" "$tmp/dump" || fail "dump-plugin version: $(cat "$tmp/dump")"
grep -q '^layer_format_version=' "$tmp/dump" || fail "dump-plugin: no layer_format_version"
log "packaged $(cat "$tmp/version"); nbdkit --dump-plugin: name=layer version=$version"
# `layer serve` of the package looks only for the installed plugin, never in the build tree it
# came from (a temporary directory anyone could re-create).
! grep -aq 'obj-[a-z0-9_]*-linux-gnu' "$root/usr/bin/layer" ||
  fail "the packaged layer refers to its build tree"

pool=$tmp/pool
"$root/usr/bin/layer" init "$pool" >/dev/null || fail "packaged layer init"
make_image "$tmp/base.img" 2 3
"$root/usr/bin/layer" --pool "$pool" image import base:1 "$tmp/base.img" >/dev/null
"$root/usr/bin/layer" --pool "$pool" clone base:1 pkg1 >/dev/null
LAYER_PLUGIN=$plugin start_server packaged "$pool"
nbdinfo --list "$(uri "" "$server_sock")" | grep -q 'export="pkg1"' ||
  fail "the packaged plugin does not list pkg1"
nbdcopy "$(uri pkg1 "$server_sock")" "$tmp/pkg1.img" || fail "nbdcopy from the packaged plugin"
cmp "$tmp/base.img" "$tmp/pkg1.img" || fail "pkg1 read through the packaged plugin differs"
stop_server packaged

# ---- man pages, units, logrotate ----
for page in layer nbdkit-layer-plugin; do
  warnings=$(MANWIDTH=80 man --warnings -l "$root/usr/share/man/man1/$page.1.gz" 2>&1 >/dev/null)
  [[ -z "$warnings" ]] || fail "man --warnings $page.1.gz: $warnings"
done
if command -v systemd-analyze >/dev/null; then
  MANPATH=$root/usr/share/man:/usr/share/man systemd-analyze verify "$unitdir/layer@.service" \
    "$unitdir/layer@.socket" >"$tmp/verify.log" 2>&1 ||
    fail "systemd-analyze verify of the packaged units: $(cat "$tmp/verify.log")"
  [[ ! -s "$tmp/verify.log" ]] || fail "systemd-analyze verify warns: $(cat "$tmp/verify.log")"
  log "systemd-analyze verify: the packaged units are clean"
else
  log "note: systemd-analyze missing: units not verified"
fi
if command -v logrotate >/dev/null; then
  # Its path and su line rewritten for this scratch directory (no "layer" user here).
  mkdir -p "$tmp/log"
  echo data >"$tmp/log/audit.log"
  sed -e "s|/var/log/layer/|$tmp/log/|" -e "s|su layer adm|su $(id -un) $(id -gn)|" \
    "$root/etc/logrotate.d/layer" >"$tmp/logrotate.conf"
  logrotate --debug --state "$tmp/logrotate.state" "$tmp/logrotate.conf" >"$tmp/logrotate.log" 2>&1 ||
    fail "logrotate rejects the rule: $(cat "$tmp/logrotate.log")"
  grep -q "$tmp/log/audit.log" "$tmp/logrotate.log" || fail "logrotate: rule does not match"
  ! grep -qi 'error' "$tmp/logrotate.log" || fail "logrotate: $(cat "$tmp/logrotate.log")"
  log "logrotate: the packaged rule parses and matches"
else
  log "note: logrotate missing: the rule is not checked"
fi
log "ok"
