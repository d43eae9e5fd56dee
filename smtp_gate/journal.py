"""Structured entries for the systemd journal, over its native protocol, stdlib only.

One datagram per entry to /run/systemd/journal/socket: `KEY=value\\n` per field, or, for a
value holding a newline, `KEY\\n` + its length as a little-endian 64-bit number + the
bytes + `\\n` (the binary-safe form).  No python-systemd dependency.  Field names are
upper-case letters, digits and underscores, not starting with an underscore (journald
drops other fields).

Without a journal (no socket: a container, a system without journald), each entry is one
line on stderr instead: `smtp-gate watch: MESSAGE (KEY=value ...)`.
"""

import errno
import re
import socket
import struct
import sys
from typing import IO, Mapping, Optional, Tuple

SOCKET = "/run/systemd/journal/socket"
PRIORITY_WARNING = 4
_FIELD = re.compile(r"[A-Z0-9][A-Z0-9_]*")


def encode(fields: Mapping[str, object]) -> bytes:
    """FIELDS in the journal's native datagram format."""
    out = []
    for key, value in fields.items():
        if not _FIELD.fullmatch(key) or len(key) > 64:
            raise ValueError(f"bad journal field name {key!r}: expected A-Z, 0-9 and _, not starting with _")
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
        if b"\n" in raw:
            out.append(key.encode() + b"\n" + struct.pack("<Q", len(raw)) + raw + b"\n")
        else:
            out.append(key.encode() + b"=" + raw + b"\n")
    return b"".join(out)


def decode(data: bytes) -> dict:
    """The inverse of encode(), for tests and for reading back what was sent."""
    fields, offset = {}, 0
    while offset < len(data):
        end = data.index(b"\n", offset)
        line = data[offset:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            offset = end + 1
        else:
            key = line
            (length,) = struct.unpack_from("<Q", data, end + 1)
            value = data[end + 9 : end + 9 + length]
            offset = end + 9 + length + 1
        fields[key.decode()] = value.decode("utf-8", "replace")
    return fields


class Journal:
    """A writer: to the journal's socket while there is one, else to FALLBACK (stderr)."""

    def __init__(self, path: str = SOCKET, fallback: Optional[IO[str]] = None) -> None:
        self.path = path
        self.fallback = fallback
        self.sock: Optional[socket.socket] = None
        self.sent = 0  # entries the journal took
        self.fell_back = 0  # entries written to stderr instead
        self.lost = 0  # entries neither took (journal busy: EAGAIN)

    def _socket(self) -> socket.socket:
        if self.sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)  # a stalled journald never stalls the watcher
            self.sock = sock
        return self.sock

    def send(self, fields: Mapping[str, object]) -> str:
        """Write one entry; say where it went: "journal", "stderr" or "lost"."""
        data = encode(fields)
        try:
            self._socket().sendto(data, self.path)
            self.sent += 1
            return "journal"
        except (FileNotFoundError, ConnectionRefusedError):
            pass  # no journal here
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.ENOBUFS):
                self.lost += 1
                return "lost"
            if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.EACCES):
                raise
        stream = self.fallback if self.fallback is not None else sys.stderr
        stream.write(line(fields) + "\n")
        stream.flush()
        self.fell_back += 1
        return "stderr"

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def line(fields: Mapping[str, object]) -> str:
    """An entry as one line (the fallback): the message, then the other fields."""
    message = str(fields.get("MESSAGE", "")).replace("\n", " ")
    rest: Tuple[str, ...] = tuple(
        f"{k}={str(v).replace(chr(10), ' ')}" for k, v in fields.items()
        if k not in ("MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER")
    )
    return f"smtp-gate watch: {message} ({' '.join(rest)})"
