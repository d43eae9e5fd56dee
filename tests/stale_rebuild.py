"""`smtp-gate rebuild` whose libvirt listing is held back: run as
`python -m tests.stale_rebuild CONFIG LISTED_FILE GO_FILE`.  After listing libvirt it
creates LISTED_FILE and waits for GO_FILE, then commits as usual: a rebuild that read
libvirt before an operator's command and commits after it (tests/test_fleet_kernel.py).
A test helper only: it wraps hypervisor.list_running in this process."""

import os
import sys
import time
from typing import Any

from smtp_gate import hypervisor
from smtp_gate.cli import main


def held_back(listed: str, go: str) -> Any:
    real = hypervisor.list_running

    def list_running(*args: Any, **kwargs: Any) -> hypervisor.Listing:
        listing = real(*args, **kwargs)
        open(listed, "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.02)
        return listing

    return list_running


if __name__ == "__main__":
    config, listed_file, go_file = sys.argv[1:4]
    hypervisor.list_running = held_back(listed_file, go_file)  # type: ignore[assignment]
    sys.exit(main(["--config", config, "rebuild"]))
