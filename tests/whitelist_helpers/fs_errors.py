"""Write errors on a real filesystem: full, read-only, no permission (test_whitelist.py).

usage: unshare --mount --propagation private python fs_errors.py DIR

Mounts a 64 KiB tmpfs on DIR (and one on /tmp) inside the private mount namespace it runs
in, so nothing reaches the host's mount table even if it crashes, then checks that write() fails with
one clear line naming the file and the OS error, leaves the file byte for byte as it was
and leaves no temporary file.  Prints one JSON object per check.
"""

import json
import os
import subprocess
import sys
from datetime import datetime, timezone

from smtp_gate import whitelist
from smtp_gate.errors import SmtpGateError

NOW = datetime(2026, 11, 25, 14, 3, 7, tzinfo=timezone.utc)


def grown(path: str, rows: int) -> whitelist.Whitelist:
    model = whitelist.load(path)
    for i in range(rows):
        model.add_mac(f"52:54:00:aa:{i // 256:02x}:{i % 256:02x}", added_at=NOW, added_by="test",
                      reason="a reason long enough to need more room than is left")
    return model


def attempt(name: str, path: str, model: whitelist.Whitelist) -> None:
    before = open(path, "rb").read()
    result = {"check": name, "path": path, "error": None, "error_class": None}
    try:
        whitelist.write(path, model)
    except SmtpGateError as e:
        result["error"] = str(e)
        result["error_class"] = type(e).__name__
    result["unchanged"] = open(path, "rb").read() == before
    result["files"] = sorted(os.listdir(os.path.dirname(path)))
    print(json.dumps(result), flush=True)


def main() -> int:
    directory = sys.argv[1]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", directory], check=True)
    path = os.path.join(directory, "whitelist.csv")
    model = whitelist.Whitelist()
    model.add_guest("web1", added_at=NOW, added_by="test", reason="kept, \"as is\"")
    whitelist.write(path, model)

    # full: fill every free block, then try to write a larger file
    filler = os.path.join(directory, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 1024)
    except OSError:
        pass
    finally:
        os.close(fd)
    attempt("full", path, grown(path, 200))
    os.unlink(filler)

    # read-only: remount and try to write
    subprocess.run(["mount", "-o", "remount,ro", directory], check=True)
    attempt("read-only", path, grown(path, 1))
    subprocess.run(["mount", "-o", "remount,rw", directory], check=True)

    # permission: a user who may read the file but not write into its directory.  DIR may
    # lie where that user cannot even look (pytest's tmp_path is in a 0700 directory), so
    # this check runs in a tmpfs mounted over /tmp, in this namespace only.  A forked child
    # drops to nobody (the interpreter itself may live where nobody can run it).
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=1777", "tmpfs", "/tmp"], check=True)
    os.mkdir("/tmp/smtp-gate", 0o755)
    path = "/tmp/smtp-gate/whitelist.csv"
    whitelist.write(path, model)
    os.chmod(path, 0o644)
    model = whitelist.parse(open(path, encoding="utf-8").read() + "lbl,52:54:00:aa:bb:cc,x,y,z\n")
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            attempt("permission", path, model)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
