"""One time budget for a whole hook call (hook.DEADLINE).

libvirt holds the guest's lock while a hook runs, so every wait of a hook (the lock, each
netlink answer, an `nft` process) takes its timeout from what is left of one budget,
instead of each having a timeout of its own that could add up to minutes.  Only `time`
is imported: the hook's import time is most of its cost.
"""

import time

from smtp_gate.errors import DeadlineExceeded


class Deadline:
    """SECONDS from now.  remaining() is the timeout for the next wait, or DeadlineExceeded
    (naming what was not done) once nothing is left: a timeout of 0 would mean "no
    timeout" to setitimer and subprocess alike."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.monotonic()
        self.end = self.start + seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self, before: str) -> float:
        """What is left of the budget for the step BEFORE names ("sending the changes over
        netlink"); raises DeadlineExceeded when nothing is."""
        left = self.end - time.monotonic()
        if left <= 0.0:
            raise DeadlineExceeded(f"the hook's {self.seconds:g}s ran out before {before}")
        return left
