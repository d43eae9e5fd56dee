"""Time the hook's fast path on a 10 000-row whitelist, the way the hook runs it.

usage: sudo .venv/bin/python bench/bench_whitelist.py [ROWS] [RUNS]

Every run is a fresh interpreter (like a hook): it imports smtp_gate.whitelist, reads the
file, and times its first fast_allowed_macs() call (cold: regexes compiled on the spot).
Prints the median and best over RUNS, per case and per share of quoted rows, next to a
full parse of the same file.
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from smtp_gate import whitelist  # noqa: E402
from tests.test_whitelist import big_file  # noqa: E402  (the suite's realistic large file)

CHILD = """
import sys, time
t0 = time.perf_counter()
from smtp_gate import whitelist
t1 = time.perf_counter()
text = whitelist.read_text(sys.argv[1])
t2 = time.perf_counter()
g = whitelist.Guest(sys.argv[2], sys.argv[3], tuple(sys.argv[4:]))
answer = whitelist.fast_allowed_macs(text, g)
t3 = time.perf_counter()
print((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, ",".join(answer))
"""


def main() -> int:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    env = dict(os.environ, PYTHONPATH=REPO)
    uuid = "6f1a2b3c-0000-4000-8000-123456789abc"
    for quoted in (0.0, 0.1, 0.3, 1.0):
        text, macs = big_file(rows, quoted)
        with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as f:
            f.write(text)
        cases = {
            "miss": ("vm-nope", uuid, "52:54:00:fe:ed:01"),
            "hit, row 5000 by MAC": ("x", uuid, macs[5000]),
            "hit, last row by name": (f"vm-{rows - 1:05d}", uuid, "52:54:00:fe:ed:01"),
        }
        start = time.perf_counter()
        model = whitelist.parse(text)
        full = (time.perf_counter() - start) * 1e3
        print(f"{rows} rows, {quoted:.0%} quoted, {len(text) // 1024} KiB; full parse {full:.1f} ms")
        for label, args in cases.items():
            times, imports, reads = [], [], []
            for _ in range(runs):
                out = subprocess.run([sys.executable, "-c", CHILD, f.name, *args], env=env,
                                     capture_output=True, text=True, check=True).stdout.split()
                imports.append(float(out[0]))
                reads.append(float(out[1]))
                times.append(float(out[2]))
                assert (out[3].split(",") if len(out) > 3 else []) == list(
                    model.allowed_macs(whitelist.Guest(args[0], args[1], args[2:])))
            print(f"  {label:24s} fast path median {statistics.median(times):.2f} ms, best {min(times):.2f} ms"
                  f"  (import {statistics.median(imports):.1f} ms, read {statistics.median(reads):.2f} ms)")
        os.unlink(f.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
