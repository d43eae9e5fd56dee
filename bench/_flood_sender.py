"""Send prebuilt blocked SMTP frames (TCP SYN to port 25) at a target rate, from spoofed MACs.

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
    prebuilt = [
        frames.tcp4_frame(f"02:00:5e:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}", args.dst_mac, args.src,
                          args.dst, 25, b"SGT-flood-bench!")
        for i in range(args.macs)
    ]
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
