"""A minimal TCP bulk sender/receiver: bench_throughput.py's fallback when iperf3 is missing.

    _tcpbulk.py recv --port P [--bind ADDR]        accept one connection, count bytes, print JSON
    _tcpbulk.py send --host H --port P --seconds S send for S seconds, print JSON

The receiver reports bytes and the time between the first and the last byte.
"""

import argparse
import json
import socket
import sys
import time

CHUNK = 1 << 20


def recv(port: int, bind: str) -> int:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((bind, port))
    server.listen(1)
    print("listening", flush=True)
    conn, _ = server.accept()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    first = last = 0.0
    while True:
        n = conn.recv_into(view)
        if not n:
            break
        last = time.perf_counter()
        if not total:
            first = last
        total += n
    conn.close()
    server.close()
    seconds = max(last - first, 1e-9)
    print(json.dumps({"bytes": total, "seconds": seconds, "bits_per_second": total * 8 / seconds}))
    return 0


def send(host: str, port: int, seconds: float) -> int:
    sock = socket.create_connection((host, port), timeout=10)
    payload = b"\0" * CHUNK
    total = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sock.sendall(payload)
        total += CHUNK
    sock.close()
    print(json.dumps({"bytes": total}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("recv")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--bind", default="0.0.0.0")
    s = sub.add_parser("send")
    s.add_argument("--host", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    if args.mode == "recv":
        return recv(args.port, args.bind)
    return send(args.host, args.port, args.seconds)


if __name__ == "__main__":
    sys.exit(main())
