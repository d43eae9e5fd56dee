"""A libvirt daemon that accepts connections and never answers: the hang every libvirt call
must survive (a wedged libvirtd, a daemon stopped with SIGSTOP, a socket held by a dead proxy)."""

import os
import socket
import threading
from pathlib import Path
from typing import List


class SilentDaemon:
    """A unix socket at PATH whose thread accepts every connection, keeps it open and never
    reads or writes.  `uri` is a qemu:///system URI that talks to it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.accepted: List[socket.socket] = []
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        self._server.listen(16)
        self._thread = threading.Thread(target=self._accept, name="silent-libvirtd", daemon=True)
        self._thread.start()

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.path}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:  # closed by close()
                return
            self.accepted.append(conn)

    def close(self) -> None:
        try:
            self._server.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone does not
        except OSError:
            pass
        self._server.close()
        for conn in self.accepted:
            conn.close()
        self._thread.join(timeout=5)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
