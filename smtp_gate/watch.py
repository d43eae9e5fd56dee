"""`smtp-gate watch`: bring enforcement back at once when another tool removes it.

`nft flush ruleset` (Debian's /etc/nftables.conf begins with it, so does many a
script), `systemctl restart nftables`, or an admin's typo delete our table; the 60 s
rebuild timer would leave guests unblocked for up to a minute.  This process follows
`nft monitor` and, after every transaction that deleted our table, one of our chains,
or rules of ours without adding any back (our own rebuilds delete and add in one
transaction), restores enforcement from what hooks and rebuilds recorded, without
waiting for libvirt, then rebuilds from libvirt to be exact.

While the operator has switched enforcement off (`smtp-gate disable`, offswitch.py) it
restores nothing: the restore, like every unattended rebuild, refuses under the lock.  It
then stops following events and looks for the off-switch once a second; when it is gone
(`smtp-gate enable`, or the file removed by hand) it says so, follows events again and
repairs what is missing.
"""

import os
import pty
import subprocess
import sys
import time
from typing import Callable, Iterable, Iterator, List, Optional

from smtp_gate import nft, offswitch
from smtp_gate.config import Config
from smtp_gate.errors import EnforcementDisabled
from smtp_gate.ruleset import FAMILY, TABLE

OURS = f"{FAMILY} {TABLE}"


def transactions(lines: Iterable[str]) -> Iterator[List[str]]:
    """Group `nft monitor` output into transactions: each ends with a `# new generation` line."""
    block: List[str] = []
    for line in lines:
        line = line.rstrip("\n")
        if line.startswith("# new generation"):
            yield block
            block = []
        elif line and not line.startswith("#"):
            block.append(line)


def removes_enforcement(block: Iterable[str]) -> bool:
    """Whether a transaction took something of ours away without putting it back."""
    deleted_table = deleted_chains = deleted_rules = added_rules = added_chains = 0
    for line in block:
        if line == f"delete table {OURS}" or line.startswith(f"delete table {OURS} "):
            deleted_table += 1
        elif line.startswith(f"delete chain {OURS} "):
            deleted_chains += 1
        elif line.startswith(f"add chain {OURS} "):
            added_chains += 1
        elif line.startswith(f"delete rule {OURS} "):
            deleted_rules += 1
        elif line.startswith(f"add rule {OURS} "):
            added_rules += 1
    return bool(deleted_table or deleted_chains > added_chains or (deleted_rules and not added_rules))


def watch(
    restore: Callable[[], None],
    rebuild: Callable[[], None],
    log: Callable[[str], None],
    disabled: Callable[[], Optional[offswitch.Disabled]],
    poll: float = 1.0,
) -> None:
    """Run until killed.  RESTORE must be fast and must not ask libvirt; REBUILD may.  Both
    raise EnforcementDisabled while DISABLED() finds the operator's off-switch."""

    def repair(what: str) -> bool:
        """Restore and rebuild; False when the operator disabled enforcement (nothing restored)."""
        started = time.monotonic()
        try:
            restore()
        except EnforcementDisabled as exc:
            log(f"{what}, but {exc}")
            return False
        log(f"{what}; restored in {time.monotonic() - started:.3f}s")
        try:
            rebuild()
        except Exception as exc:  # noqa: BLE001 - the timer retries; the watch must go on
            log(f"rebuild after the restore failed (the timer retries): {exc}")
        return True

    def wait_until_enabled() -> None:
        while disabled() is not None:
            time.sleep(poll)
        log("enforcement was re-enabled (the off-switch is gone): following nft events again")

    while True:
        # nft block-buffers its output into a pipe; on a terminal it writes each event at once
        master, slave = pty.openpty()
        process = subprocess.Popen(
            [nft.nft_binary(), "monitor"], stdout=slave, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        os.close(slave)
        # at start, and between two monitors, a removal would go unseen: look once
        enforced = nft.table_exists() or repair("enforcement was missing")
        if enforced:
            with os.fdopen(master, "r", encoding="utf-8", errors="replace", newline=None) as events:
                try:
                    for block in transactions(events):
                        if removes_enforcement(block) and not repair("enforcement was removed by another tool"):
                            enforced = False
                            break
                except OSError:
                    pass  # EIO: the monitor exited and closed the terminal
        else:
            os.close(master)
        if not enforced:  # the operator's off-switch: no monitor while it lasts
            process.terminate()
            process.wait()
            wait_until_enabled()
            continue
        code = process.wait()
        log(f"nft monitor ended (exit {code}); restarting it")
        time.sleep(1)


def main_loop(config: Config) -> int:
    from smtp_gate import rebuild as rebuild_mod

    def log(message: str) -> None:
        print(f"smtp-gate watch: {message}", file=sys.stderr, flush=True)

    watch(
        restore=lambda: rebuild_mod.rebuild(config, use_libvirt=False),
        rebuild=lambda: rebuild_mod.rebuild(config),
        log=log,
        disabled=lambda: offswitch.read(config.disabled_path),
    )
    return 0
