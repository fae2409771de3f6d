"""flood.py — a connection flood against an nbdkit server, for test_security.sh.

  flood.py SOCKET SERVER_PID COUNT

Opens COUNT unix-socket connections to SOCKET as fast as it can and holds every one that stays
open (a client that connects and never speaks), while sampling the server's threads and RSS
(/proc/SERVER_PID/status) every 10 ms; then closes them all. Writes {"attempts", "held" (still
open after the burst: greeted by the server), "refused" (closed by the server), "pending" (neither
within 60 s), "connect_failed", "max_threads",
"max_rss_kib", "threads_before", "rss_before_kib"} on stdout (it may run as a uid that can write
nowhere).
"""
import json
import resource
import socket
import sys
import threading
import time


def status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return int(out["Threads"]), int(out["VmRSS"].split()[0])


def main():
    path, pid, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, count + 64)), hard))
    threads_before, rss_before = status(pid)
    peak = {"threads": threads_before, "rss": rss_before}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                t, r = status(pid)
            except OSError:
                return
            peak["threads"] = max(peak["threads"], t)
            peak["rss"] = max(peak["rss"], r)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    conns, failed = [], 0
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(path)
            conns.append(s)
        except OSError:
            failed += 1
            s.close()
    # Each connection ends up greeted (nbdkit's first bytes: the server holds it) or closed
    # (turned away); until then it waits in the server's queue. A slow server (a sanitizer
    # build) takes a while to get through 5,000.
    held, pending = 0, list(conns)
    for s in pending:
        s.setblocking(False)
    deadline = time.monotonic() + 60
    while pending and time.monotonic() < deadline:
        still = []
        for s in pending:
            try:
                data = s.recv(1)
                held += 1 if data else 0
            except BlockingIOError:
                still.append(s)
            except OSError:
                pass
        pending = still
        if pending:
            time.sleep(0.1)
    stop.set()
    sampler.join()
    for s in conns:
        s.close()
    json.dump({"attempts": count, "held": held, "refused": count - held - len(pending),
               "pending": len(pending),
               "connect_failed": failed, "max_threads": peak["threads"],
               "max_rss_kib": peak["rss"], "threads_before": threads_before,
               "rss_before_kib": rss_before}, sys.stdout)


if __name__ == "__main__":
    main()
