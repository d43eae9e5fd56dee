"""What ON_BLOCKED's sliding window costs per blocked event (abuse.Trigger.add), for
ON_BLOCKED_WINDOW 600, 3 600 and 86 400 s, once a guest has made one connection attempt a
second for a whole window (a slow, steady spammer: every bucket of the window is in use),
with the threshold never reached (so no command runs); and the buckets kept per guest.

    .venv/bin/python bench/bench_on_blocked.py [--events 20000]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smtp_gate.abuse import Recent, Trigger  # noqa: E402
from smtp_gate.nflog import Attempt, Guest  # noqa: E402


def main(argv=None) -> int:  # type: ignore[no-untyped-def]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    args = parser.parse_args(argv)
    guest = Guest("spam1", "u-1", "vnet1")
    recent = Recent()
    print("| ON_BLOCKED_WINDOW | µs per event | buckets kept per guest |")
    print("|---:|---:|---:|")
    for window in (600, 3600, 86400):
        trigger = Trigger(("/bin/true",), 10**9, float(window), 30.0, print)
        for second in range(window):
            attempt = Attempt(1, "02:00:00:00:00:01", 4, "10.0.0.1", "192.0.2.1", 40000 + second % 20000, 25,
                              "enforce", float(second), syn=True, seq=second)
            trigger.add(attempt, guest, float(second), recent)
        attempt = Attempt(1, "02:00:00:00:00:01", 4, "10.0.0.1", "192.0.2.1", 40000, 25, "enforce", 0.0, syn=True)
        start = time.process_time()
        for i in range(args.events):
            trigger.add(attempt, guest, window + i / 1000, recent)
        per = (time.process_time() - start) / args.events
        print(f"| {window} | {per * 1e6:.2f} | {len(trigger.buckets['u-1'].buckets)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
