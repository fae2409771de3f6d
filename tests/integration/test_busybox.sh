#!/usr/bin/env bash
# test_busybox.sh — a real filesystem through the plugin: build the busybox sample image
# (images/busybox/build), import it, clone it, serve it; copy a clone out and e2fsck it; write a
# file into one clone's ext4 through NBD (nbdfuse + debugfs -w when FUSE works here, and always
# by nbdcopy out, debugfs -w, nbdcopy back in), read it back after a restart, and check that the
# untouched clone still equals the image.
# shellcheck source=functions.sh
source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

recipe=$LAYER_SRC/images/busybox/build
[[ -x "$recipe" ]] || skip "no busybox image recipe at images/busybox/build yet"
requires nbdcopy
requires e2fsck -V
requires debugfs -V
requires cmp --version

rc=0
"$recipe" "$tmp/busybox.img" >"$tmp/build.log" 2>&1 || rc=$?
((rc != 77)) || skip "the busybox recipe cannot run here: $(tail -n 1 "$tmp/build.log")"
((rc == 0)) || fail "images/busybox/build failed ($rc): $(cat "$tmp/build.log")"
e2fsck -fn "$tmp/busybox.img" >/dev/null 2>&1 || fail "the built image does not fsck clean"

pool=$tmp/pool
"$LAYER_BIN" init "$pool" >/dev/null
layer image import busybox:1 "$tmp/busybox.img" >/dev/null
for c in c1 c2 c3; do layer clone busybox:1 "$c" >/dev/null; done
start_server s "$pool"
sock=$server_sock

# A clone copied out is the image, and a clean filesystem.
nbdcopy "$(uri c1 "$sock")" "$tmp/c1.img"
cmp "$tmp/busybox.img" "$tmp/c1.img" || fail "clone c1 differs from the image"
e2fsck -fn "$tmp/c1.img" >"$tmp/e2fsck.out" 2>&1 || fail "e2fsck of c1: $(cat "$tmp/e2fsck.out")"

# A file spanning many blocks, with a known content.
head -c 300000 /dev/urandom >"$tmp/payload"

# check_payload IMG: the filesystem in IMG is clean and /payload is the payload.
check_payload() {
  e2fsck -fn "$1" >"$tmp/e2fsck.out" 2>&1 || fail "e2fsck of $1: $(cat "$tmp/e2fsck.out")"
  debugfs -R "dump /payload $tmp/payload.got" "$1" >/dev/null 2>&1
  cmp "$tmp/payload" "$tmp/payload.got" || fail "/payload in $1 differs"
  rm -f "$tmp/payload.got"
}

unmount_quietly() { umount "$1" 2>/dev/null || true; }

# c1: through the NBD export mounted as a file by nbdfuse, when FUSE works here.
fuse_done=
if [[ -c /dev/fuse ]] && command -v nbdfuse >/dev/null; then
  mkdir "$tmp/mnt"
  background nbdfuse nbdfuse "$tmp/mnt/disk" "$(uri c1 "$sock")"
  fuse_pid=$bg_pid
  cleanup_fn unmount_quietly "$tmp/mnt"
  if wait_until 20 eval "test -e '$tmp/mnt/disk' || ! pid_alive $fuse_pid" &&
    [[ -e "$tmp/mnt/disk" ]]; then
    debugfs -w -R "write $tmp/payload payload" "$tmp/mnt/disk" >"$tmp/debugfs.out" 2>&1 ||
      fail "debugfs -w through nbdfuse: $(cat "$tmp/debugfs.out")"
    check_payload "$tmp/mnt/disk"
    umount "$tmp/mnt"
    wait_until 20 eval "! pid_alive $fuse_pid" || fail "nbdfuse did not exit after umount"
    fuse_done=1
    log "wrote /payload into c1 through nbdfuse"
  else
    log "nbdfuse cannot mount here ($(cat "$tmp/nbdfuse.log")); only the nbdcopy path runs"
  fi
fi

# c3: out with nbdcopy, debugfs -w on the copy, back in with nbdcopy.
nbdcopy "$(uri c3 "$sock")" "$tmp/c3.img"
debugfs -w -R "write $tmp/payload payload" "$tmp/c3.img" >"$tmp/debugfs.out" 2>&1 ||
  fail "debugfs -w: $(cat "$tmp/debugfs.out")"
nbdcopy "$tmp/c3.img" "$(uri c3 "$sock")"
rm "$tmp/c3.img"

# Read back after a restart.
stop_server s
start_server s2 "$pool"
sock=$server_sock
changed=(c3)
[[ -z "$fuse_done" ]] || changed+=(c1)
for c in "${changed[@]}"; do
  nbdcopy "$(uri "$c" "$sock")" "$tmp/$c.after"
  check_payload "$tmp/$c.after"
  ! cmp -s "$tmp/busybox.img" "$tmp/$c.after" || fail "$c did not change"
  rm "$tmp/$c.after"
done

# The clone nobody wrote is still the image.
nbdcopy "$(uri c2 "$sock")" "$tmp/c2.img"
cmp "$tmp/busybox.img" "$tmp/c2.img" || fail "clone c2 changed"
stop_server s2
layer fsck >"$tmp/fsck.out" 2>&1 || fail "fsck: $(cat "$tmp/fsck.out")"
log "ok"
