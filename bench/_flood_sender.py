"""Send prebuilt blocked SMTP frames (TCP SYN to port 25) at a target rate, from spoofed MACs
and PORTS source ports (so each frame is a connection attempt, not a retransmission).

    _flood_sender.py --dev eth0 --dst-mac M --src IP --dst IP --rate 70000 --seconds 5 --macs 4096

Run inside a guest namespace (raw AF_PACKET sends of prebuilt frames: no TCP stack, so the
rate is the wire's).  Prints JSON: frames sent, seconds, frames/s achieved.
"""

import argparse
import json
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smtp_gate import frames  # noqa: E402

BATCH = 500
PORTS = 16384


def syn_frame(src_mac: str, dst_mac: str, src: str, dst: str, sport: int) -> bytes:
    """A TCP SYN to port 25 from SPORT."""
    seg = frames.tcp_segment(socket.inet_aton(src), socket.inet_aton(dst), sport, 25, b"SGT-flood-bench!")
    return frames.ethernet(dst_mac, src_mac, frames.ETH_P_IP, frames.ipv4_packet(src, dst, seg))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dev", default="eth0")
    parser.add_argument("--dst-mac", required=True)
    parser.add_argument("--src", required=True)
    parser.add_argument("--dst", required=True)
    parser.add_argument("--rate", type=float, default=70000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--macs", type=int, default=4096)
    args = parser.parse_args()
    # one frame per source port (PORTS of them, the MACs cycled): each a new connection
    # attempt for the desk's counting until the ports come round again
    prebuilt = [syn_frame(f"02:00:5e:{m >> 16 & 255:02x}:{m >> 8 & 255:02x}:{m & 255:02x}", args.dst_mac,
                          args.src, args.dst, 1024 + i)
                for i, m in ((i, i % args.macs) for i in range(max(PORTS, args.macs)))]
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((args.dev, 0))
    send = sock.send
    sent = 0
    start = time.perf_counter()
    end = start + args.seconds
    n = len(prebuilt)
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        due = int((now - start) * args.rate)  # frames that should have left by now
        if sent >= due:
            time.sleep(min(0.001, end - now))
            continue
        for _ in range(min(BATCH, due - sent)):
            send(prebuilt[sent % n])
            sent += 1
    seconds = time.perf_counter() - start
    print(json.dumps({"sent": sent, "seconds": seconds, "rate": sent / seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
