"""A real systemd-journald of our own, for the abuse desk's tests and bench_flood.

The command under test runs in a private mount namespace (unshare -m, private propagation)
where a tmpfs hides /run/systemd (so /run/systemd/journal/socket is our journald's), a
temporary directory is bound over /run/log (where Storage=volatile keeps the journal
files), and a journald.conf of ours over /etc/systemd/journald.conf (volatile, nothing
forwarded).  Every mount point already exists: nothing is created or changed outside the
namespace, and the machine's own /run/systemd and journal are never touched.

Read the entries back with `journalctl -D <tmp>/log/journal -o json FIELD=value` (entries()).
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

JOURNALD = next((p for p in ("/lib/systemd/systemd-journald", "/usr/lib/systemd/systemd-journald") if os.path.exists(p)), "")
CONF = """[Journal]
Storage=volatile
RuntimeMaxUse=64M
RateLimitIntervalSec=0
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
"""


def missing() -> Optional[str]:
    """A skip reason, or None when a private journald can run here."""
    for tool in ("unshare", "journalctl"):
        if not shutil.which(tool):
            return f"needs {tool}"
    if not JOURNALD:
        return "needs systemd-journald (Debian package systemd)"
    for path in ("/run/systemd", "/run/log", "/etc/systemd/journald.conf"):
        if not os.path.exists(path):
            return f"needs {path} to exist as a mount point for a private journald"
    return None


def wrap(tmp: Path, argv: Sequence[str]) -> List[str]:
    """ARGV run beside a private journald (see the module's docstring); the journal files end
    up under TMP/log/journal.  journald and ARGV share one process group: kill that group."""
    log = tmp / "log"
    log.mkdir(parents=True, exist_ok=True)
    conf = tmp / "journald.conf"
    conf.write_text(CONF)
    script = f"""set -e
mount -t tmpfs -o mode=0755 smtp-gate-test /run/systemd
mkdir /run/systemd/journal
mount --bind {shlex.quote(str(log))} /run/log
mount --bind {shlex.quote(str(conf))} /etc/systemd/journald.conf
if [ -d /var/log/journal ]; then mount -t tmpfs smtp-gate-test /var/log/journal; fi
{shlex.quote(JOURNALD)} >{shlex.quote(str(tmp / 'journald.out'))} 2>&1 &
i=0; while [ ! -S /run/systemd/journal/socket ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
exec {' '.join(shlex.quote(a) for a in argv)}
"""
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script]


def entries(tmp: Path, *matches: str) -> List[Dict[str, str]]:
    """The journal's entries under TMP matching MATCHES (FIELD=value), as journalctl's JSON."""
    result = subprocess.run(["journalctl", "-D", str(tmp / "log" / "journal"), "-o", "json", "--no-pager", *matches],
                            capture_output=True, text=True, timeout=30)
    if result.returncode != 0 and "No journal files" not in result.stderr:
        raise AssertionError(f"journalctl failed ({result.returncode}): {result.stderr}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def _group_members(proc: "subprocess.Popen[bytes]") -> List[int]:
    """The live processes of PROC's group (PROC itself reaped when it has ended: a zombie
    keeps its group id until its parent, this process, waits for it)."""
    proc.poll()
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) != proc.pid:
                    continue
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z":
                members.append(int(entry))
    return members


def _wait_gone(proc: "subprocess.Popen[bytes]", timeout: float) -> bool:
    """Whether PROC's group has no live process left within TIMEOUT seconds."""
    deadline = time.monotonic() + timeout
    while _group_members(proc):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def stop_group(proc: "subprocess.Popen[bytes]", timeout: float = 15.0) -> None:
    """End everything wrap() started under PROC (started with start_new_session=True, so its
    pid is the group's): SIGTERM to the group, whether or not PROC itself already exited (a
    test may have stopped the watcher alone: journald is still there), then SIGKILL to what
    is left after TIMEOUT.  Returns when no process of the group is left, so no private
    journald outlives its test."""
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    if not _wait_gone(proc, timeout):  # after SIGTERM's grace, what is left is killed
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _wait_gone(proc, timeout)
    left = _group_members(proc)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        left.append(pgid)
    if left:
        raise AssertionError(f"processes {left} of the private journald's group did not end")
