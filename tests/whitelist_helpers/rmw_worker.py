"""One of many concurrent read-modify-write workers on one whitelist (test_whitelist.py).

usage: rmw_worker.py PATH LOCK filelock|flock|none WORKER ITERATIONS

Each iteration, under the lock: load, add this worker's MAC for the iteration (in an odd
spelling) and one of four MACs that every worker adds, write.  Every third iteration it
also removes, in another spelling, the MAC it added two iterations before.  The sleep
inside the critical section widens the window a broken lock would leave open.
"""

import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from smtp_gate import lock, whitelist


def own_mac(worker: int, i: int) -> str:
    return f"52:54:00:{worker:02x}:{i:02x}:01"


def shared_mac(i: int) -> str:
    return f"52:54:00:ff:ff:{i % 4:02x}"


@contextmanager
def no_lock(_path: Path):  # type: ignore[no-untyped-def]
    yield


def main() -> int:
    path, lock_path, kind = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    worker, iterations = int(sys.argv[4]), int(sys.argv[5])
    take = {"filelock": lock.command_lock, "flock": lock.flock, "none": no_lock}[kind]
    now = datetime(2026, 11, 25, 14, 3, 7, tzinfo=timezone.utc)
    for i in range(iterations):
        with take(lock_path):
            model = whitelist.load(path)
            changed = model.add_mac(own_mac(worker, i).upper().replace(":", "-"), added_at=now,
                                    added_by=f"worker{worker}", reason=f"iteration {i}, \"{kind}\"",
                                    label=f"w{worker}").changed
            changed |= model.add_mac(shared_mac(i), added_at=now, added_by=f"worker{worker}", reason="shared").changed
            if i % 3 == 2:
                digits = own_mac(worker, i - 2).replace(":", "")
                changed |= any(e.changed for e in model.remove_mac(f"{digits[:4]}.{digits[4:8]}.{digits[8:]}"))
            time.sleep(0.001)
            if changed:
                whitelist.write(path, model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
