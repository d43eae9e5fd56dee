"""The operator's off-switch (DESIGN §2 "Disable means disabled").

`smtp-gate disable` writes a small JSON file beside the config, `config/disabled`: who
switched enforcement off, when, and why.  Every part that could put our table back (the
watcher, the timer's rebuild, the boot service, the hooks' prepare and start) reads it first
and installs nothing while it exists; `smtp-gate enable`, or an operator's own `apply`,
removes it.

Beside the config, not in /run: it survives a reboot, so an operator who switched
enforcement off in an emergency never gets it back silently because the host restarted.
Its existence is the switch (an empty file made by hand counts too); its content only says
who, when and why.  Standard library only, and read with one open(): the libvirt hook
checks it on every guest start.
"""

import json
from typing import Dict, NamedTuple, Optional

MAX_REASON = 500  # characters: a ticket reference and a sentence, not a log


class Disabled(NamedTuple):
    """The off-switch as found on disk."""

    path: str
    by: str = "?"
    at: str = "?"
    reason: str = ""

    def by_line(self) -> str:
        """'by alice at 2026-11-25T14:03:07+00:00 (why)'."""
        return f"by {self.by} at {self.at}" + (f" ({self.reason})" if self.reason else "")

    def describe(self) -> str:
        """One line for logs and warnings: 'enforcement is disabled by alice at T (why)'."""
        return f"enforcement is disabled {self.by_line()}"

    def to_json(self) -> Dict[str, str]:
        return {"path": self.path, "by": self.by, "at": self.at, "reason": self.reason}


def _field(data: object, key: str, default: str) -> str:
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, str) and printable(value) else default


def read(path: str) -> Optional[Disabled]:
    """The off-switch at PATH, or None when enforcement is not disabled.

    A file that exists but cannot be read or parsed still means disabled: the operator
    asked for it, and only `smtp-gate enable` (or removing the file) undoes that."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(65536)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        return Disabled(path, reason=f"(the file cannot be read: {exc.strerror or exc})")
    try:
        parsed = json.loads(data.decode("utf-8")) if data.strip() else {}
    except ValueError:
        parsed = {}
    return Disabled(path, _field(parsed, "by", "?"), _field(parsed, "at", "?"), _field(parsed, "reason", ""))


def printable(text: str) -> bool:
    """No control characters (C0, DEL, C1): they would forge lines in logs and status."""
    return not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text)


def write(path: str, by: str, at: str, reason: str) -> Disabled:
    """Record that BY switched enforcement off at AT (ISO 8601) for REASON, atomically."""
    from smtp_gate import files
    from smtp_gate.errors import ValidationError

    for what, value in (("reason", reason), ("user name", by)):
        if not printable(value):
            raise ValidationError(f"bad {what} {value!r}: control characters are not allowed")
    if len(reason) > MAX_REASON:
        raise ValidationError(f"reason too long ({len(reason)} characters): at most {MAX_REASON}")
    record = Disabled(path, by, at, reason)
    data = json.dumps({"by": by, "at": at, "reason": reason}, sort_keys=True) + "\n"
    files.atomic_write(path, data.encode("utf-8"), "off-switch file", new_mode=0o644)
    return record


def clear(path: str) -> None:
    """Remove the off-switch, durably: a removal lost in a power cut would leave enforcement off."""
    from smtp_gate import files

    files.remove(path, "the off-switch file")
