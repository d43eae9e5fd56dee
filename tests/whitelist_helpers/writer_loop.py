"""Rewrite a whitelist forever, alternating two large contents, until killed (test_whitelist.py).

usage: writer_loop.py PATH A_FILE B_FILE

Prints "ready" once the first rewrite is done, so the test kills it while it writes,
not while Python starts.
"""

import sys

from smtp_gate import whitelist


def main() -> int:
    path = sys.argv[1]
    models = [whitelist.load(sys.argv[2]), whitelist.load(sys.argv[3])]
    n = 0
    while True:
        whitelist.write(path, models[n % 2])
        if n == 0:
            print("ready", flush=True)
        n += 1


if __name__ == "__main__":
    sys.exit(main())
