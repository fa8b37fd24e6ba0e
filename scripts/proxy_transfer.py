#!/usr/bin/env python3
"""Byte-exact transfers through `handoff proxy`, and the proxy's CPU per byte.

Run with:
    cargo build --release
    scripts/proxy_transfer.py --transfers 10000 --relay splice
    scripts/proxy_transfer.py --transfers 2000 --relay copy

Starts echo backends (threads of this script) on 127.0.0.1 port 0 and `handoff proxy` in
front of them; each transfer sends SIZE random bytes, half-closes (shutdown(SHUT_WR)),
reads everything echoed back to the end of stream and compares SHA-256 digests of what
went and what came back. Prints transfers, errors, bytes, wall time, and the CPU time of
the proxy's processes (master and workers, from /proc/PID/stat) per GiB relayed (both
directions counted).
"""

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


def echo_backend():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)

    def serve(conn):
        with conn:
            buf = bytearray(256 * 1024)
            view = memoryview(buf)
            while True:
                n = conn.recv_into(buf)
                if n == 0:
                    break
                conn.sendall(view[:n])

    def accept():
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return "127.0.0.1:%d" % listener.getsockname()[1]


def status(control):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(control)
        s.sendall(b"status\n")
        reply = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    return json.loads(reply)


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def transfer(addr, size):
    payload = os.urandom(size)
    sent = hashlib.sha256(payload).hexdigest()
    s = socket.create_connection(addr, timeout=30)
    try:
        def send():
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        got = hashlib.sha256()
        received = 0
        while True:
            chunk = s.recv(256 * 1024)
            if not chunk:
                break
            got.update(chunk)
            received += len(chunk)
        sender.join()
    finally:
        s.close()
    return received == size and got.hexdigest() == sent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/handoff")
    ap.add_argument("--transfers", type=int, default=10000)
    ap.add_argument("--size", type=int, default=1 << 20)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--backends", type=int, default=2)
    ap.add_argument("--relay", default="splice")
    ap.add_argument("extra", nargs="*", help="more `handoff proxy` flags")
    args = ap.parse_args()

    backends = [echo_backend() for _ in range(args.backends)]
    tmp = tempfile.mkdtemp()
    control = os.path.join(tmp, "control.sock")
    cmd = [args.bin, "proxy", "--listen", "127.0.0.1:0", "--control", control,
           "--workers", str(args.workers), "--relay", args.relay] + args.extra
    for b in backends:
        cmd += ["--backend", b]
    proxy = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, env=dict(os.environ, HANDOFF_LOG="warn"))
    try:
        deadline = time.time() + 20
        while True:
            try:
                st = status(control)
                if sum(w["phase"] == "ready" for w in st["workers"]) == args.workers:
                    break
            except (OSError, ValueError):
                pass
            if time.time() > deadline:
                sys.exit("the proxy did not start")
            time.sleep(0.05)
        host, port = st["listening"][0].rsplit(":", 1)
        addr = (host, int(port))
        pids = [proxy.pid] + [w["pid"] for w in st["workers"]]
        cpu_before = sum(cpu_seconds(p) for p in pids)

        next_i = [0]
        errors = [0]
        lock = threading.Lock()

        def client():
            while True:
                with lock:
                    if next_i[0] >= args.transfers:
                        return
                    next_i[0] += 1
                try:
                    ok = transfer(addr, args.size)
                except OSError as e:
                    print("error:", e, file=sys.stderr)
                    ok = False
                if not ok:
                    with lock:
                        errors[0] += 1

        start = time.time()
        threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.time() - start
        cpu = sum(cpu_seconds(p) for p in pids) - cpu_before
        relayed = 2 * args.transfers * args.size
        gib = relayed / (1 << 30)
        print(json.dumps({
            "relay": args.relay,
            "transfers": args.transfers,
            "size": args.size,
            "errors": errors[0],
            "relayed_gib": round(gib, 3),
            "wall_s": round(wall, 2),
            "proxy_cpu_s": round(cpu, 2),
            "proxy_cpu_s_per_gib": round(cpu / gib, 3),
            "metrics": {k: v for k, v in status(control)["metrics"].items() if "refused" in k or "bytes" in k},
        }))
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)


if __name__ == "__main__":
    main()
