"""inflight.py — many connections, each with many requests in flight, on one export.

  inflight.py URI CONNECTIONS IN_FLIGHT OPS_PER_CONNECTION SEED

Each connection (a thread of its own, a libnbd handle of its own) owns one slice of the export;
each of its IN_FLIGHT slots owns one stripe of that slice and keeps one request in flight at all
times: writes, zeroes and trims at unaligned offsets and lengths, reads checked against the
model, now and then a flush with FUA writes. Requests of one slot never overlap in time, so the
model is exact while the server sees CONNECTIONS x IN_FLIGHT concurrent requests on one disk,
many of them into the same blocks (stripes are not block-aligned: neighbours share blocks, so
the server's copy-ups race). At the end every slice is read back whole and compared.
Prints one summary line; exits 1 on any wrong byte or failed request.
"""
import random
import sys
import threading

import nbd


def main():
    uri, conns, inflight, ops, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
        int(sys.argv[4]), int(sys.argv[5])
    probe = nbd.NBD()
    probe.connect_uri(uri)
    size = probe.get_size()
    probe.shutdown()
    slice_bytes = size // conns
    stripe = slice_bytes // inflight
    errors, done = [], [0] * conns

    def run(c):
        rng = random.Random(seed * 1000 + c)
        base = c * slice_bytes
        h = nbd.NBD()
        h.connect_uri(uri)
        model = bytearray(h.pread(slice_bytes, base))
        # slot -> (cookie, kind, offset in the slice, length, buffer) of its request in flight
        pending = {}
        issued = 0

        def issue(slot):
            nonlocal issued
            lo = slot * stripe
            off = lo + rng.randrange(stripe - 1)
            n = 1 + rng.randrange(min(stripe - (off - lo), 3 * 4096 + 1))
            op = rng.randrange(100)
            if op < 45:
                fill = rng.randrange(1, 256)
                data = bytes((fill + i) % 251 + 1 for i in range(n))
                flags = nbd.CMD_FLAG_FUA if rng.randrange(10) == 0 else 0
                cookie = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), base + off,
                                      flags=flags)
                model[off:off + n] = data
                pending[slot] = (cookie, "write", off, n, None)
            elif op < 55:
                cookie = (h.aio_zero if op < 50 else h.aio_trim)(n, base + off)
                model[off:off + n] = bytes(n)
                pending[slot] = (cookie, "zero", off, n, None)
            elif op < 57:
                cookie = h.aio_flush()
                pending[slot] = (cookie, "flush", off, 0, None)
            else:
                buf = nbd.Buffer(n)
                cookie = h.aio_pread(buf, base + off)
                pending[slot] = (cookie, "read", off, n, buf)
            issued += 1

        try:
            for slot in range(inflight):
                issue(slot)
            while pending:
                h.poll(-1)
                for slot, (cookie, kind, off, n, buf) in list(pending.items()):
                    if not h.aio_command_completed(cookie):
                        continue
                    del pending[slot]
                    done[c] += 1
                    if kind == "read":
                        got = buf.to_bytearray()
                        if got != model[off:off + n]:
                            at = next(i for i in range(n) if got[i] != model[off + i])
                            raise AssertionError(f"connection {c}: read at {base + off} for {n} "
                                                 f"bytes differs at {base + off + at}")
                    if issued < ops:
                        issue(slot)
            h.flush()
            got = h.pread(slice_bytes, base)
            if got != bytes(model):
                at = next(i for i in range(slice_bytes) if got[i] != model[i])
                raise AssertionError(f"connection {c}: the slice differs at {base + at}")
            h.shutdown()
        except Exception as e:  # reported by the main thread
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(c,)) for c in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        print("inflight: " + "; ".join(errors), flush=True)
        sys.exit(1)
    print(f"inflight: {conns} connections x {inflight} in flight, {sum(done)} requests, "
          f"every read and the final contents as modelled (seed {seed})", flush=True)


if __name__ == "__main__":
    main()
