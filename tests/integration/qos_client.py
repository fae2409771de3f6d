"""qos_client.py — reads an NBD export as fast as it can, for test_qos.sh.

  qos_client.py URI SIZE SECONDS OUT [rate T0 T1]

Reads SIZE bytes at a time (one request in flight, offsets cycling over the disk) for SECONDS,
and writes its timeline to OUT: one line "UNIX_TIME OPS BYTES" (cumulative) every 20 ms, from
its first request on. `qos_client.py rate OUT T0 T1 ops|bytes` prints the rate between T0 and
T1, seconds from the timeline's first line (counts interpolated between samples).
"""
import sys
import time


def rate(path, t0, t1, field):
    rows = [tuple(float(x) for x in line.split()) for line in open(path)]
    start = rows[0][0]
    col = 1 if field == "ops" else 2

    def at(t):
        t += start
        for (ta, *a), (tb, *b) in zip(rows, rows[1:]):
            if ta <= t <= tb:
                f = 0 if tb == ta else (t - ta) / (tb - ta)
                return a[col - 1] + f * (b[col - 1] - a[col - 1])
        raise SystemExit(f"{path}: no sample at {t - start:.2f} s (it spans "
                         f"{rows[-1][0] - start:.2f} s)")

    return (at(t1) - at(t0)) / (t1 - t0)


def main():
    if sys.argv[1] == "rate":
        print(f"{rate(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]):.1f}")
        return
    import nbd
    uri, size, seconds, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    h = nbd.NBD()
    h.connect_uri(uri)
    disk = h.get_size()
    slots = max(1, disk // size)
    rows = []
    ops = 0
    start = time.time()
    rows.append(f"{start:.6f} 0 0")
    next_sample = start + 0.02
    end = start + seconds
    while True:
        h.pread(size, (ops % slots) * size)
        ops += 1
        now = time.time()
        if now >= next_sample:
            rows.append(f"{now:.6f} {ops} {ops * size}")
            next_sample = now + 0.02
            if now >= end:
                break
    h.shutdown()
    with open(out, "w") as f:
        f.write("\n".join(rows) + "\n")


main()
