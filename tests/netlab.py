"""Network namespaces for kernel tests: a hypervisor with a real Linux bridge, guests,
an "internet", and ways to send real frames and TCP connections through them.

Every namespace is created here and always deleted (pyroute2's fixture model): tests
never touch this machine's own ruleset or links.  Sockets are opened inside a namespace
by switching the calling thread into it just for socket(): a socket stays in the
namespace it was created in, so one test process drives every namespace at once.
"""

import contextlib
import ctypes
import os
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple


REPO = Path(__file__).resolve().parent.parent
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def missing_kernel_features() -> Optional[str]:
    """A skip reason, or None when this machine can run the kernel tests."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and nftables)"
    for tool in ("ip", "nft"):
        if not any(os.access(os.path.join(d, tool), os.X_OK) for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin")):
            return f"needs the {tool!r} command"
    name = f"sgprobe{os.getpid()}"
    try:
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    except subprocess.CalledProcessError as exc:
        return f"cannot create a network namespace: {exc.stderr.decode().strip()}"
    try:
        probe = subprocess.run(
            ["ip", "netns", "exec", name, "nft", "add table bridge probe"], capture_output=True, text=True
        )
        if probe.returncode != 0:
            return f"nftables bridge family unavailable: {probe.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def run(args: Sequence[str], check: bool = True, **kwargs: object) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


class Netns:
    """A named network namespace that exists until close()."""

    def __init__(self, name: str) -> None:
        self.name = name
        run(["ip", "netns", "add", name])
        self.ip("link", "set", "lo", "up")

    def close(self) -> None:
        # processes left in the namespace (listeners) would keep it alive
        pids = run(["ip", "netns", "pids", self.name], check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        run(["ip", "netns", "del", self.name], check=False)

    def exec(self, args: Sequence[str], check: bool = True, **kwargs: object) -> subprocess.CompletedProcess:
        return run(["ip", "netns", "exec", self.name, *args], check=check, **kwargs)

    def ip(self, *args: str) -> subprocess.CompletedProcess:
        return run(["ip", "-n", self.name, *args])

    def sysctl(self, key: str, value: str) -> None:
        self.exec(["sysctl", "-q", "-w", f"{key}={value}"])

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Switch this thread into the namespace (for creating sockets), then back."""
        target = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
            try:
                yield
            finally:
                if _libc.setns(own, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back failed")
        finally:
            os.close(target)
            os.close(own)

    def socket(self, *args: int) -> socket.socket:
        with self.entered():
            return socket.socket(*args)

    def link_mac(self, dev: str) -> str:
        return self.exec(["cat", f"/sys/class/net/{dev}/address"]).stdout.strip()

    def ifindex(self, dev: str) -> int:
        return int(self.exec(["cat", f"/sys/class/net/{dev}/ifindex"]).stdout.strip())


@dataclass
class Guest:
    name: str
    ns: Netns
    port: str  # the hypervisor-side device
    mac: str
    ip4: str
    ip6: str


@dataclass
class Listener:
    """TCP listeners in a namespace; records which ports accepted a connection."""

    ns: Netns
    ports: Sequence[int]
    accepted: List[Tuple[int, str]] = field(default_factory=list)
    _sockets: List[socket.socket] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> "Listener":
        for port in self.ports:
            sock = self.ns.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", port))
            sock.listen(128)
            sock.setblocking(False)
            self._sockets.append(sock)
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def _serve(self) -> None:
        by_fd = {s.fileno(): (s, p) for s, p in zip(self._sockets, self.ports)}
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select(list(by_fd), [], [], 0.1)
            except (OSError, ValueError):  # stop() closed the sockets
                return
            for fd in ready:
                sock, port = by_fd[fd]
                with contextlib.suppress(OSError):
                    conn, addr = sock.accept()
                    self.accepted.append((port, addr[0]))
                    conn.close()

    def stop(self) -> None:
        self._stop.set()
        for sock in self._sockets:
            sock.close()


class BridgeLab:
    """A hypervisor namespace with bridge br0, an uplink to an "internet" namespace, and guests.

    hv:    br0 (protected), uplink0 (veth, uplink) <-> inet: eth0 10.77.0.1/24, fd77::1/64
    guest: hv:<port> (veth, on br0) <-> guest ns: eth0 10.77.0.N/24, fd77::N/64
    """

    INET4, INET6 = "10.77.0.1", "fd77::1"

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.tag = uuid.uuid4().hex[:6]
        self.namespaces: List[Netns] = []
        self.guests: Dict[str, Guest] = {}
        self.listeners: List[Listener] = []
        self.hv = self.netns("hv")
        self.inet = self.netns("inet")
        self.hv.ip("link", "add", "br0", "type", "bridge", "stp_state", "0")
        self.hv.ip("link", "set", "br0", "up")
        self.hv.sysctl("net.ipv6.conf.all.disable_ipv6", "0")
        self.connect(self.inet, "eth0", "uplink0", ip4=f"{self.INET4}/24", ip6=f"{self.INET6}/64")
        self.inet_mac = self.inet.link_mac("eth0")
        self.config_path = tmp / "smtp-gate.conf"
        self.write_config('UPLINKS="uplink0"\n')

    # -- topology ---------------------------------------------------------------------
    def netns(self, role: str) -> Netns:
        ns = Netns(f"sgt-{self.tag}-{role}")
        self.namespaces.append(ns)
        return ns

    def connect(
        self, ns: Netns, inner: str, port: str, ip4: str = "", ip6: str = "", mac: str = "", bridge: str = "br0"
    ) -> None:
        """A veth pair: PORT in the hypervisor (on BRIDGE), INNER in NS."""
        self.hv.ip("link", "add", port, "type", "veth", "peer", "name", inner, "netns", ns.name)
        if mac:
            ns.ip("link", "set", inner, "address", mac)
        ns.exec(["sysctl", "-q", "-w", f"net.ipv6.conf.{inner}.accept_dad=0"])
        if ip4:
            ns.ip("addr", "add", ip4, "dev", inner)
        if ip6:
            ns.ip("-6", "addr", "add", ip6, "dev", inner, "nodad")
        ns.ip("link", "set", inner, "up")
        if bridge:
            self.hv.ip("link", "set", port, "master", bridge)
        self.hv.ip("link", "set", port, "up")

    def add_guest(self, name: str, port: str, number: int, mac: str = "") -> Guest:
        ns = self.netns(name)
        mac = mac or f"52:54:00:77:00:{number:02x}"
        self.connect(ns, "eth0", port, ip4=f"10.77.0.{number}/24", ip6=f"fd77::{number:x}/64", mac=mac)
        guest = Guest(name, ns, port, mac, f"10.77.0.{number}", f"fd77::{number:x}")
        self.guests[name] = guest
        return guest

    def listen(self, ns: Netns, ports: Sequence[int]) -> Listener:
        listener = Listener(ns, ports).start()
        self.listeners.append(listener)
        return listener

    def close(self) -> None:
        for listener in self.listeners:
            listener.stop()
        for ns in reversed(self.namespaces):
            ns.close()

    # -- smtp-gate ----------------------------------------------------------------------
    def write_config(self, text: str) -> None:
        """Write the lab's config: TEXT plus a private run directory and, unless TEXT names
        one, a libvirt URI that nothing answers (the tests of the engine run without a hypervisor)."""
        extra = f'RUN_DIR="{self.tmp / "run"}"\n'
        if "LIBVIRT_URI" not in text:
            extra += f'LIBVIRT_URI="qemu:///system?socket={self.tmp}/no-libvirtd-here"\n'
        self.config_path.write_text(text + extra)

    def smtp_gate(self, *args: str, check: bool = True, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
        """Run the real CLI inside the hypervisor namespace (sysfs is remounted for it there)."""
        full_env = dict(os.environ, PYTHONPATH=str(REPO))
        full_env.update(env or {})
        return self.hv.exec(
            [sys.executable, "-m", "smtp_gate", "--config", str(self.config_path), *args], check=check, env=full_env
        )

    def nft(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.hv.exec(["nft", *args], check=check)

    def allow_in_kernel(self, port: str, mac: str) -> None:
        """Add an allowance the way a hook does (an element in the allowed set)."""
        index = self.hv.ifindex(port)
        self.nft("add", "element", "bridge", "smtp_gate", "allowed", f"{{ {index} . {mac} }}")

    # -- traffic --------------------------------------------------------------------------
    def tcp_connects(self, guest: Guest, addr: str, port: int, timeout: float = 1.0) -> bool:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        sock = guest.ns.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect((addr, port))
            return True
        except (socket.timeout, OSError):
            return False
        finally:
            sock.close()

    def frame_arrives(
        self, sender: Netns, frame: bytes, receiver: Optional[Netns] = None, dev: str = "eth0", wait: float = 0.3,
        sender_dev: str = "eth0",
    ) -> bool:
        """Send FRAME from SENDER's DEV and report whether it reached RECEIVER's DEV (the internet
        side by default).  The frame must carry a marker unique to this call."""
        receiver = receiver or self.inet
        rx = receiver.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        tx = sender.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        try:
            rx.bind((dev, 0))
            tx.bind((sender_dev, 0))
            rx.setblocking(False)
            marker = frame[-16:]
            tx.send(frame)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                ready, _, _ = select.select([rx], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    break
                data = rx.recv(65535)
                if marker in data:
                    return True
            return False
        finally:
            rx.close()
            tx.close()


def marker() -> bytes:
    return b"SGT" + uuid.uuid4().bytes[:13]
