#!/usr/bin/python3
# snapshot_model.py — snapshot tests through a real nbdkit server and the `layer` CLI, run by
# test_snapshots.sh (needs Debian's python3 with the nbd module, python3-libnbd).
#
#   snapshot_model.py model SOCK SEED STEPS
#       A seeded random sequence of writes, zeroes, trims and flushes over NBD, and snapshots,
#       rollbacks, snapshot removals, clones from snapshots, commits and gc through the CLI
#       (live while clients are connected, offline otherwise). Every read, of containers and of
#       CONTAINER@SNAP exports, is checked against an in-test model; every `layer diff` must
#       cover every block that differs. Prints the seed; a failure names the step.
#   snapshot_model.py live SOCK
#       Four connections write their own blocks with increasing generations while the CLI takes
#       live snapshots: each snapshot export holds every write acknowledged before the request
#       (a write in flight may land on either side).
#   snapshot_model.py writers SOCK CONTAINER SEED STOPFILE
#       Four connections, each on its own quarter of CONTAINER with its own model of it: seeded
#       random writes (aligned or not), zeroes, trims, flushes and reads checked against the
#       model, until STOPFILE exists; then each flushes and reads its whole quarter back. Any
#       NBD error or wrong read fails it. Touches STOPFILE.ready once all four run. Used by
#       test_tier.sh while the container's delta moves between tiers, live.
#
# Environment: LAYER_BIN (the CLI), LAYER_POOL (the pool the server serves).
import json
import os
import random
import subprocess
import sys
import threading
import time

import nbd

BS = 4096
LAYER = os.environ["LAYER_BIN"]


def cli(*args, ok=True):
    r = subprocess.run([LAYER, "--json", *args], capture_output=True, text=True)
    if ok and r.returncode != 0:
        raise AssertionError(f"layer {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def cli_offline(*args):
    """As cli(), for a container no client uses any more: the server closes a disk just after
    its last client left, so an EBUSY may be seen briefly: "served by" while the server holds
    the container, or "in use by a running server" in the instant after it removed its holder
    record (run/holders) and before it unlocked the container."""
    for _ in range(100):
        r = cli(*args, ok=False)
        busy = "is served by" in r.stderr or "is in use by a running server" in r.stderr
        if r.returncode == 0 or not busy:
            break
        time.sleep(0.05)
    if r.returncode != 0:
        raise AssertionError(f"layer {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def connect(sock, name):
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///{name}?socket={sock}")
    return h


def model(sock, seed, steps):
    rng = random.Random(seed)
    print(f"snapshot_model: seed {seed} (replay: LAYER_TEST_SEED={seed})", flush=True)
    base = "base:1"
    info = json.loads(cli("inspect", "c").stdout)
    size = info["size"]
    h = connect(sock, "c")
    first = h.pread(size, 0)
    h.shutdown()
    containers = {"c": bytearray(first)}
    snaps = {}  # "c@s" -> bytes
    handles = {}  # container -> nbd handle (connected = served: changes go live)
    counter = [0]

    def new_name(prefix):
        counter[0] += 1
        return f"{prefix}{counter[0]}"

    def handle(c):
        if c not in handles:
            handles[c] = connect(sock, c)
        return handles[c]

    def disconnect(c):
        if c in handles:
            # Flushed first: the server's own flush on the last close runs after shutdown()
            # returns, so a command right after could see the index without these writes.
            h = handles.pop(c)
            h.flush()
            h.shutdown()

    def check_container(c):
        got = handle(c).pread(size, 0)
        if got != bytes(containers[c]):
            off = next(i for i in range(size) if got[i] != containers[c][i])
            raise AssertionError(f"container {c}: first difference at {off}")

    def check_snapshot(ref):
        h = connect(sock, ref)
        try:
            assert h.is_read_only(), f"{ref} is not read-only"
            got = h.pread(size, 0)
        finally:
            h.shutdown()
        if got != snaps[ref]:
            off = next(i for i in range(size) if got[i] != snaps[ref][i])
            raise AssertionError(f"snapshot {ref}: first difference at {off}")

    for step in range(steps):
        c = rng.choice(sorted(containers))
        m = containers[c]
        op = rng.randrange(100)
        where = f"step {step} op {op} container {c}"
        try:
            if op < 35:
                off = rng.randrange(size - 1)
                n = 1 + rng.randrange(min(3 * BS, size - off))
                data = bytes(rng.randrange(1, 256) for _ in range(min(n, 64))) * (n // 64 + 1)
                data = data[:n]
                handle(c).pwrite(data, off)
                m[off:off + n] = data
            elif op < 43:
                off = rng.randrange(size - 1)
                n = 1 + rng.randrange(min(6 * BS, size - off))
                if rng.randrange(2):
                    handle(c).zero(n, off)
                else:
                    handle(c).trim(n, off)
                m[off:off + n] = bytes(n)
            elif op < 48:
                handle(c).flush()
            elif op < 53:
                # A reconnect: the server closes the disk (flushing) when the last client goes.
                disconnect(c)
            elif op < 63:
                s = new_name("s")
                live = c in handles
                r = json.loads(cli("snapshot", c, s).stdout)
                # Without a client the server may still be closing the disk: either way is fine.
                assert r["live"] or not live, f"snapshot of a served container was not live"
                snaps[f"{c}@{s}"] = bytes(m)
            elif op < 70:
                mine = [k for k in snaps if k.split("@")[0] == c]
                if not mine:
                    continue
                ref = rng.choice(sorted(mine))
                args = ["rollback", c, ref.split("@")[1]]
                if c in handles:
                    # A served container needs --force.
                    r = cli(*args, ok=False)
                    assert r.returncode == 1, f"live rollback without --force: {r.returncode}"
                    args.append("--force")
                if rng.randrange(3) == 0:
                    keep = new_name("k")
                    args += ["--keep-as", keep]
                    snaps[f"{c}@{keep}"] = bytes(m)
                (cli if c in handles else cli_offline)(*args)
                containers[c] = bytearray(snaps[ref])
            elif op < 78:
                if not snaps:
                    continue
                ref = rng.choice(sorted(snaps))
                cc, s = ref.split("@")
                r = json.loads(cli("snapshot", "rm", cc, s).stdout)
                assert r["layer_fate"] in ("dropped", "merged", "hidden"), r
                del snaps[ref]
                assert connect_fails(sock, ref), f"{ref} still exported after rm"
            elif op < 84:
                if not snaps or len(containers) > 5:
                    continue
                ref = rng.choice(sorted(snaps))
                name = new_name("n")
                cli("clone", ref, name)
                containers[name] = bytearray(snaps[ref])
            elif op < 87:
                if rng.randrange(2):
                    cli("commit", c, f"img:{new_name('v')}")
                else:
                    # flatten: by the server while a client is attached, else offline (or by
                    # the server still letting go of a client that just left).
                    r = json.loads(cli("flatten", c).stdout)
                    assert r["live"] or c not in handles, r
            elif op < 89:
                cli("gc")
            elif op < 94:
                # diff between two points covers every block whose content differs.
                points = [k for k in snaps] + sorted(containers)
                a, b = rng.choice(points), rng.choice(points)
                for p in (a, b):
                    if "@" not in p and p in handles:
                        handles[p].flush()  # diff sees a live head as of its last flush
                r = json.loads(cli("diff", a, b).stdout)
                ca = snaps[a] if "@" in a else bytes(containers[a])
                cb = snaps[b] if "@" in b else bytes(containers[b])
                covered = set()
                for rg in r["ranges"]:
                    covered.update(range(rg["offset"] // BS, (rg["offset"] + rg["length"]) // BS))
                for blk in range(size // BS):
                    if ca[blk * BS:(blk + 1) * BS] != cb[blk * BS:(blk + 1) * BS]:
                        assert blk in covered, f"diff {a} {b} misses block {blk}"
            else:
                for k in sorted(containers):
                    check_container(k)
                for k in sorted(snaps):
                    check_snapshot(k)
        except Exception as e:
            raise AssertionError(f"{where}: {e}") from e
    for k in sorted(containers):
        check_container(k)
    for k in sorted(snaps):
        check_snapshot(k)
    for k in list(handles):
        disconnect(k)
    print(f"snapshot_model: {steps} steps, {len(containers)} containers, {len(snaps)} snapshots ok",
          flush=True)


def connect_fails(sock, name):
    try:
        connect(sock, name).shutdown()
        return False
    except nbd.Error:
        return True


def live(sock):
    size = json.loads(cli("inspect", "live").stdout)["size"]
    writers, blocks_each = 4, 64
    assert writers * blocks_each * BS <= size
    acked = [[0] * blocks_each for _ in range(writers)]
    stop = threading.Event()
    errors = []

    def writer(w):
        try:
            h = connect(sock, "live")
            gen = 0
            while not stop.is_set():
                gen += 1
                for i in range(blocks_each):
                    blk = w * blocks_each + i
                    h.pwrite(gen.to_bytes(4, "little") + bytes(BS - 4), blk * BS)
                    acked[w][i] = gen
            h.flush()
            h.shutdown()
        except Exception as e:  # reported by the main thread
            errors.append(e)

    # Generation 0 everywhere first: a block no writer reached yet reads 0, not the image.
    h0 = connect(sock, "live")
    h0.pwrite(bytes(writers * blocks_each * BS), 0)
    h0.flush()
    h0.shutdown()
    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    pauses = []
    for s in range(6):
        time.sleep(0.1)
        before = [list(a) for a in acked]
        t0 = time.monotonic()
        r = json.loads(cli("snapshot", "live", f"l{s}").stdout)
        pauses.append(time.monotonic() - t0)
        after = [list(a) for a in acked]
        assert r["live"], f"snapshot l{s} was not taken live: {r}"
        h = connect(sock, f"live@l{s}")
        for w in range(writers):
            for i in range(blocks_each):
                got = int.from_bytes(h.pread(4, (w * blocks_each + i) * BS), "little")
                assert before[w][i] <= got <= after[w][i] + 1, (
                    f"snapshot l{s} block {w * blocks_each + i}: {got}, acknowledged before "
                    f"{before[w][i]}, after {after[w][i]}")
        h.shutdown()
    stop.set()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    print(f"snapshot_model: 6 live snapshots under 4 writers ok; CLI round trip "
          f"max {max(pauses) * 1000:.1f} ms", flush=True)


def writers(sock, name, seed, stop_file):
    print(f"snapshot_model writers: seed {seed} (replay: LAYER_TEST_SEED={seed})", flush=True)
    h = connect(sock, name)
    size = h.get_size()
    h.shutdown()
    n = 4
    quarter = size // n // BS * BS
    errors, ops, started = [], [0] * n, threading.Barrier(n + 1)

    def run(q):
        rng = random.Random(seed * 10 + q)
        base = q * quarter
        try:
            h = connect(sock, name)
            model = bytearray(h.pread(quarter, base))
            started.wait()
            while not os.path.exists(stop_file):
                off = rng.randrange(quarter // BS) * BS if rng.randrange(2) else rng.randrange(quarter - 1)
                n_bytes = min(quarter - off, 1 + rng.randrange(3 * BS))
                op = rng.randrange(100)
                where = f"connection {q}: op {op} at {base + off} for {n_bytes} bytes"
                if op < 45:
                    fill = rng.randrange(1, 256)
                    data = bytes((fill + i % 7) % 256 for i in range(min(n_bytes, 64)))
                    data = (data * (n_bytes // len(data) + 1))[:n_bytes]
                    h.pwrite(data, base + off)
                    model[off:off + n_bytes] = data
                elif op < 60:
                    if rng.randrange(2):
                        h.zero(n_bytes, base + off)
                    else:
                        h.trim(n_bytes, base + off)
                    model[off:off + n_bytes] = bytes(n_bytes)
                elif op < 63:
                    h.flush()
                else:
                    got = h.pread(n_bytes, base + off)
                    assert got == bytes(model[off:off + n_bytes]), f"{where}: read differs"
                ops[q] += 1
            h.flush()
            got = h.pread(quarter, base)
            if got != bytes(model):
                at = next(i for i in range(quarter) if got[i] != model[i])
                raise AssertionError(f"connection {q}: first difference at {base + at}")
            h.shutdown()
        except threading.BrokenBarrierError:
            pass
        except Exception as e:  # reported by the main thread
            errors.append(e)
            started.abort()

    threads = [threading.Thread(target=run, args=(q,)) for q in range(n)]
    for t in threads:
        t.start()
    try:
        started.wait()
        open(stop_file + ".ready", "w").close()
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    print(f"snapshot_model writers: {sum(ops)} operations on 4 connections ok", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "model":
        model(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1] == "live":
        live(sys.argv[2])
    elif sys.argv[1] == "writers":
        writers(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        sys.exit(f"usage: {sys.argv[0]} model SOCK SEED STEPS | live SOCK | "
                 "writers SOCK CONTAINER SEED STOPFILE")
