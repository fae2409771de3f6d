"""reqflood.py — a request flood against an nbdkit server, for test_security.sh.

  reqflood.py SOCKET SERVER_PID EXPORT CONNECTIONS REQUESTS SIZE [OTHER_EXPORT]

Opens CONNECTIONS unix-socket connections to EXPORT (the NBD handshake by hand: fixed newstyle,
NBD_OPT_GO, simple replies), and on each sends REQUESTS read requests of SIZE bytes back to back
without reading a reply: the worst a client can do to the server's memory, since every request
the server takes up is a buffer it fills and cannot send. The server's RSS and threads are
sampled (/proc/SERVER_PID/status) every 10 ms for 3 s; meanwhile another client (libnbd) reads
OTHER_EXPORT whole, again and again, as a neighbour of the flood would. Then every reply is read
(and checked: no error, the handle asked for) and the connections closed. Writes
{"connections", "requests", "size", "rss_before_kib", "max_rss_kib", "threads_before",
"max_threads", "replies", "other_reads" (whole reads of OTHER_EXPORT done in the 3 s),
"other_sha256" (of what the first one read)} on stdout.
"""
import hashlib
import json
import socket
import struct
import sys
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
from flood import status  # noqa: E402 — the server's threads and RSS, as flood.py samples them

OPTS_MAGIC = b"IHAVEOPT"
REP_MAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
NBD_OPT_GO = 7
NBD_REP_ACK = 1
NBD_CMD_READ = 0


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("server closed the connection")
        buf += chunk
    return bytes(buf)


def connect(path, export):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    hello = recv_exact(s, 18)
    if hello[:16] != b"NBDMAGIC" + OPTS_MAGIC:
        raise RuntimeError("not a newstyle NBD server")
    s.sendall(struct.pack(">I", 1 | 2))  # FIXED_NEWSTYLE | NO_ZEROES
    name = export.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(OPTS_MAGIC + struct.pack(">II", NBD_OPT_GO, len(data)) + data)
    export_size = 0
    while True:
        magic, _opt, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
        if magic != REP_MAGIC:
            raise RuntimeError("bad option reply magic")
        payload = recv_exact(s, length)
        if rtype == 3 and length >= 12 and struct.unpack(">H", payload[:2])[0] == 0:
            export_size = struct.unpack(">Q", payload[2:10])[0]  # NBD_INFO_EXPORT
        if rtype == NBD_REP_ACK:
            return s, export_size
        if rtype & 0x80000000:
            raise RuntimeError(f"export {export} refused: reply type {rtype:#x}")


def main():
    path, pid, export = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    conns, requests, size = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    threads_before, rss_before = status(pid)
    opened = [connect(path, export) for _ in range(conns)]
    socks = [s for s, _ in opened]
    size = min(size, opened[0][1])  # every request reads from offset 0
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peak = {"threads": threads_before, "rss": rss_before}
    for i, s in enumerate(socks):
        for h in range(requests):
            s.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, NBD_CMD_READ, i * requests + h,
                                  0, size))
    end = time.monotonic() + 3
    other = {"reads": 0, "sha256": None, "error": None}

    def neighbour(name):
        import nbd
        try:
            while time.monotonic() < end:
                h = nbd.NBD()
                h.connect_uri(f"nbd+unix:///{name}?socket={path}")
                n, digest, off = h.get_size(), hashlib.sha256(), 0
                while off < n:
                    chunk = min(n - off, 1 << 20)
                    digest.update(h.pread(chunk, off))
                    off += chunk
                h.shutdown()
                if other["sha256"] is None:
                    other["sha256"] = digest.hexdigest()
                other["reads"] += 1
        except Exception as e:  # noqa: BLE001 — reported in the output
            other["error"] = str(e)

    probe = None
    if len(sys.argv) > 7:
        probe = threading.Thread(target=neighbour, args=(sys.argv[7],))
        probe.start()
    while time.monotonic() < end:
        t, r = status(pid)
        peak["threads"] = max(peak["threads"], t)
        peak["rss"] = max(peak["rss"], r)
        time.sleep(0.01)
    if probe:
        probe.join()
    replies = 0
    errors = []

    def drain(i, s):
        try:
            drain_one(i, s)
        except Exception as e:  # noqa: BLE001 — reported below, with the others
            errors.append(str(e))

    def drain_one(i, s):
        nonlocal replies
        for _ in range(requests):
            magic, err, handle = struct.unpack(">IIQ", recv_exact(s, 16))
            if magic != SIMPLE_REPLY_MAGIC or err != 0:
                raise RuntimeError(f"bad reply: magic {magic:#x} error {err}")
            if not i * requests <= handle < (i + 1) * requests:
                raise RuntimeError(f"reply to a handle never sent: {handle}")
            recv_exact(s, size)
            replies += 1

    ts = [threading.Thread(target=drain, args=(i, s)) for i, s in enumerate(socks)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for s in socks:
        s.close()
    if errors:
        sys.exit("reqflood: " + "; ".join(errors))
    json.dump({"connections": conns, "requests": requests, "size": size,
               "rss_before_kib": rss_before, "max_rss_kib": peak["rss"],
               "threads_before": threads_before, "max_threads": peak["threads"],
               "replies": replies, "other_reads": other["reads"],
               "other_sha256": other["sha256"], "other_error": other["error"]}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
