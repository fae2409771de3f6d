#!/usr/bin/env bash
# test_fuse_fs.sh — a filesystem on a clone, mounted without the kernel's NBD or ext4 drivers:
# nbdfuse exposes the export as a file, fuse2fs mounts the ext4 in it. A tarball of 3,000 files
# is unpacked into a clone of the busybox image and checked file by file (sha256), the clone is
# snapshotted, changed (files added, rewritten, deleted) and rolled back; after the rollback the
# filesystem holds exactly the snapshot's files and `e2fsck -fn` over NBD is clean. Where FUSE
# cannot mount here the test skips (77) and says why; it never passes without mounting.
# shellcheck source=functions.sh
source "$(dirname "${BASH_SOURCE[0]}")/functions.sh"

recipe=$LAYER_SRC/images/busybox/build
[[ -x "$recipe" ]] || skip "no busybox image recipe at images/busybox/build"
requires nbdfuse
requires fuse2fs -V
requires fusermount3 -V
requires e2fsck -V
requires tar --version
[[ -c /dev/fuse ]] || skip "no /dev/fuse here"

rc=0
"$recipe" "$tmp/busybox.img" 96M >"$tmp/build.log" 2>&1 || rc=$?
((rc != 77)) || skip "the busybox recipe cannot run here: $(tail -n 1 "$tmp/build.log")"
((rc == 0)) || fail "images/busybox/build failed ($rc): $(cat "$tmp/build.log")"

pool=$tmp/pool
"$LAYER_BIN" init "$pool" >/dev/null
layer image import busybox:1 "$tmp/busybox.img" >/dev/null
layer clone busybox:1 c >/dev/null
start_server s "$pool"
sock=$server_sock

mkdir "$tmp/nbd" "$tmp/fs"
unmount_quietly() { fusermount3 -uz "$1" 2>/dev/null || umount -l "$1" 2>/dev/null || true; }
cleanup_fn unmount_quietly "$tmp/nbd"
cleanup_fn unmount_quietly "$tmp/fs"

# attach [ro]: the export as $tmp/nbd/disk (nbdfuse), its ext4 on $tmp/fs (fuse2fs).
attach() {
  local ro=() fsro=()
  [[ "${1:-}" == ro ]] && ro=(-r) && fsro=(-o ro)
  background nbdfuse nbdfuse "${ro[@]}" "$tmp/nbd/disk" "$(uri c "$sock")"
  nbdfuse_pid=$bg_pid
  wait_until 20 eval "test -e '$tmp/nbd/disk' || ! pid_alive $nbdfuse_pid" &&
    [[ -e "$tmp/nbd/disk" ]] ||
    skip "nbdfuse cannot mount here: $(cat "$tmp/nbdfuse.log" 2>/dev/null)"
  # In the foreground (-f): its pid tells when it has written its last blocks and let go.
  background fuse2fs fuse2fs "$tmp/nbd/disk" "$tmp/fs" "${fsro[@]}" -o fakeroot -f
  fuse2fs_pid=$bg_pid
  wait_until 20 eval "grep -q ' $tmp/fs ' /proc/mounts || ! pid_alive $fuse2fs_pid" &&
    pid_alive "$fuse2fs_pid" || skip "fuse2fs cannot mount here: $(cat "$tmp/fuse2fs.log")"
}

# detach: unmount both; nbdfuse exits once nothing holds the export.
detach() {
  fusermount3 -u "$tmp/fs" || fail "cannot unmount the filesystem"
  # fuse2fs writes its last blocks (the superblock, the journal) as it exits.
  wait_until 30 eval "! pid_alive $fuse2fs_pid" || fail "fuse2fs did not exit after unmount"
  fusermount3 -u "$tmp/nbd" || fail "cannot unmount nbdfuse"
  wait_until 20 eval "! pid_alive $nbdfuse_pid" || fail "nbdfuse did not exit after unmount"
}

# fsck_over_nbd: e2fsck -fn reading the export through nbdfuse (read-only).
fsck_over_nbd() {
  background nbdfuse nbdfuse -r "$tmp/nbd/disk" "$(uri c "$sock")"
  local pid=$bg_pid
  wait_until 20 eval "test -e '$tmp/nbd/disk'" || fail "nbdfuse -r did not start"
  e2fsck -fn "$tmp/nbd/disk" >"$tmp/e2fsck.out" 2>&1 || fail "e2fsck -fn over NBD ($1): $(
    cat "$tmp/e2fsck.out"
  )"
  fusermount3 -u "$tmp/nbd"
  wait_until 20 eval "! pid_alive $pid" || fail "nbdfuse -r did not exit"
}

# manifest DIR: "sha256  ./path" of every file under DIR, sorted; and the file count.
manifest() { (cd "$1" && find . -type f -print0 | sort -z | xargs -0r sha256sum); }

# A tarball of 3,000 files in 30 directories, sizes from 0 to 40 KiB, random contents.
/usr/bin/python3 - "$tmp/tree" <<'PY'
import os, random, sys
root = sys.argv[1]
rng = random.Random(20261207)
for d in range(30):
    os.makedirs(f"{root}/data/d{d:02}", exist_ok=True)
for i in range(3000):
    size = rng.choice([0, 1, 100, 511, 4096, 4097, 9000, rng.randrange(40960)])
    with open(f"{root}/data/d{i % 30:02}/f{i:04}", "wb") as f:
        f.write(rng.randbytes(size))
PY
tar -C "$tmp/tree" -cf "$tmp/tree.tar" data
manifest "$tmp/tree/data" >"$tmp/want.sums"
[[ $(wc -l <"$tmp/want.sums") == 3000 ]] || fail "the tree has $(wc -l <"$tmp/want.sums") files"

start=$(date +%s%N)
attach
tar -C "$tmp/fs" -xf "$tmp/tree.tar" || fail "tar -x onto the clone failed"
manifest "$tmp/fs/data" >"$tmp/got.sums"
cmp -s "$tmp/want.sums" "$tmp/got.sums" || fail "the unpacked files differ: $(
  diff "$tmp/want.sums" "$tmp/got.sums" | head -5
)"
detach
unpack_ms=$((($(date +%s%N) - start) / 1000000))
log "unpacked 3000 files ($(du -sh "$tmp/tree/data" | cut -f1)) through nbdfuse + fuse2fs in ${unpack_ms} ms"
fsck_over_nbd "after the unpack"

# A snapshot, changes, a rollback.
layer snapshot c s1 >/dev/null
attach
manifest "$tmp/fs/data" >"$tmp/got.sums"
cmp -s "$tmp/want.sums" "$tmp/got.sums" || fail "the snapshot's files differ before the changes"
rm -r "$tmp/fs/data/d00" "$tmp/fs/data/d07"
head -c 123456 /dev/urandom >"$tmp/fs/data/d01/f0001"
mkdir "$tmp/fs/data/new"
for i in $(seq 50); do head -c $((i * 997)) /dev/urandom >"$tmp/fs/data/new/n$i"; done
manifest "$tmp/fs/data" >"$tmp/changed.sums"
! cmp -s "$tmp/want.sums" "$tmp/changed.sums" || fail "the changes changed nothing"
detach
fsck_over_nbd "after the changes"

layer rollback c s1 >"$tmp/rollback.out" 2>&1 || fail "rollback: $(cat "$tmp/rollback.out")"
fsck_over_nbd "after the rollback"
attach ro
manifest "$tmp/fs/data" >"$tmp/got.sums"
cmp -s "$tmp/want.sums" "$tmp/got.sums" || fail "after the rollback the files are not the snapshot's: $(
  diff "$tmp/want.sums" "$tmp/got.sums" | head -5
)"
[[ ! -e "$tmp/fs/data/new" ]] || fail "a directory made after the snapshot survived the rollback"
detach

# After the rollback the clone reads exactly as its snapshot, byte for byte, and the image
# under both never changed.
nbdcopy "$(uri c "$sock")" "$tmp/c.now"
nbdcopy "$(uri c@s1 "$sock")" "$tmp/s1.now"
cmp "$tmp/c.now" "$tmp/s1.now" || fail "after the rollback c differs from c@s1"
layer clone busybox:1 fresh >/dev/null
nbdcopy "$(uri fresh "$sock")" "$tmp/fresh.now"
cmp "$tmp/busybox.img" "$tmp/fresh.now" || fail "the image changed"
stop_server s
layer fsck >"$tmp/fsck.out" 2>&1 || fail "fsck: $(cat "$tmp/fsck.out")"
log "ok"
