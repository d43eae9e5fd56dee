"""Throwaway networks in network namespaces: namespaces, veth ports on a bridge, TCP
listeners, and real TCP connections and hand-built frames sent through them.

Shared by `smtp-gate selftest` and the kernel tests.  Every command names its
namespace (`ip -n NS`, `ip netns exec NS`), so nothing here can touch the host's own
links or ruleset.  Sockets are opened inside a namespace by switching only the calling
thread into it for socket(): a socket stays in the namespace it was created in, so one
process drives every namespace at once, from as many threads as it likes.
"""

import contextlib
import ctypes
import os
import select
import shutil
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator, List, Mapping, Optional, Sequence, Tuple

from smtp_gate.errors import SmtpGateError

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"
ETH_P_ALL = 0x0003
# an operator's sudo may not have the sbin directories in PATH
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
_TOOLS = {
    "ip": "the iproute2 package (apt-get install iproute2)",
    "nft": "the nftables package (apt-get install nftables)",
}


class LabError(SmtpGateError):
    """A command that builds or drives the lab failed."""


def tool(name: str) -> Optional[str]:
    return shutil.which(name, path=_SEARCH_PATH)


def run(
    args: Sequence[str],
    check: bool = True,
    timeout: float = 60.0,
    env: Optional[Mapping[str, str]] = None,
    input: Optional[str] = None,
) -> subprocess.CompletedProcess:
    """Run ARGS, capturing text output; with CHECK, a non-zero exit is a LabError naming the command."""
    argv = list(args)
    found = tool(argv[0]) if argv and not os.path.isabs(argv[0]) else None
    if found:
        argv[0] = found
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, input=input)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{' '.join(args)}: {exc}") from None
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def missing_features(probe_name: str) -> List[str]:
    """What this machine lacks to build a lab, one line each with how to get it; empty if nothing.

    PROBE_NAME is a throwaway namespace, created and deleted here, that proves namespaces,
    a bridge, veth and the nftables bridge family work."""
    if os.geteuid() != 0:
        return ["root: network namespaces and nftables need it (run it with sudo)"]
    missing = [f"the {name!r} command: install {how}" for name, how in _TOOLS.items() if not tool(name)]
    if missing:
        return missing
    try:
        created = run(["ip", "netns", "add", probe_name], check=False)
        if created.returncode != 0:
            return [
                f"network namespaces ({created.stderr.strip()}): the kernel needs CONFIG_NET_NS; "
                "in a container, run it privileged"
            ]
        probes = [
            (["ip", "-n", probe_name, "link", "add", "sgprobebr", "type", "bridge"],
             "Linux bridges: load the bridge module (modprobe bridge)"),
            (["ip", "-n", probe_name, "link", "add", "sgprobe0", "type", "veth", "peer", "name", "sgprobe1"],
             "veth pairs: load the veth module (modprobe veth)"),
            (["ip", "netns", "exec", probe_name, "nft", "add table bridge sgprobe"],
             "the nftables bridge family: a kernel with CONFIG_NF_TABLES_BRIDGE (modprobe nf_tables)"),
        ]
        for args, what in probes:
            result = run(args, check=False)
            if result.returncode != 0:
                missing.append(f"{what} ({result.stderr.strip()})")
    finally:  # also when interrupted half-way through `ip netns add`
        run(["ip", "netns", "del", probe_name], check=False)
    return missing


class Netns:
    """A named network namespace that exists until close()."""

    def __init__(self, name: str) -> None:
        self.name = name
        run(["ip", "netns", "add", name])
        self.ip("link", "set", "lo", "up")

    def close(self) -> None:
        delete_netns(self.name)

    def exec(
        self,
        args: Sequence[str],
        check: bool = True,
        timeout: float = 60.0,
        env: Optional[Mapping[str, str]] = None,
        input: Optional[str] = None,
    ) -> subprocess.CompletedProcess:
        """ARGS inside the namespace; `ip netns exec` also mounts the namespace's own /sys for it."""
        return run(["ip", "netns", "exec", self.name, *args], check=check, timeout=timeout, env=env, input=input)

    def ip(self, *args: str) -> subprocess.CompletedProcess:
        return run(["ip", "-n", self.name, *args])

    def sysctl(self, key: str, value: str) -> None:
        self.exec(["sysctl", "-q", "-w", f"{key}={value}"])

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Switch this thread into the namespace (for creating sockets), then back."""
        libc = ctypes.CDLL(None, use_errno=True)
        target = os.open(f"{NETNS_DIR}/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {self.name} failed")
            try:
                yield
            finally:
                if libc.setns(own, CLONE_NEWNET) != 0:
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


def delete_netns(name: str) -> None:
    """Delete namespace NAME, killing what runs in it first (a process left inside would keep
    it alive).  Never this process itself, whatever `ip netns pids` says."""
    pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
    for pid in pids:
        if pid.isdigit() and int(pid) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
    run(["ip", "netns", "del", name], check=False)


def netns_names() -> List[str]:
    """Names of the named network namespaces (`ip netns list`)."""
    return [line.split()[0] for line in run(["ip", "netns", "list"]).stdout.splitlines() if line.strip()]


def veth(
    hv: Netns, port: str, ns: Netns, inner: str, ip4: str = "", ip6: str = "", mac: str = "", bridge: str = "br0"
) -> None:
    """A veth pair: PORT in HV (a port of BRIDGE unless BRIDGE is empty), INNER in NS with the
    given addresses (CIDR) and MAC.  IPv6 addresses skip duplicate detection: usable at once."""
    hv.ip("link", "add", port, "type", "veth", "peer", "name", inner, "netns", ns.name)
    if mac:
        ns.ip("link", "set", inner, "address", mac)
    ns.exec(["sysctl", "-q", "-w", f"net.ipv6.conf.{inner}.accept_dad=0"])
    if ip4:
        ns.ip("addr", "add", ip4, "dev", inner)
    if ip6:
        ns.ip("-6", "addr", "add", ip6, "dev", inner, "nodad")
    ns.ip("link", "set", inner, "up")
    if bridge:
        hv.ip("link", "set", port, "master", bridge)
    hv.ip("link", "set", port, "up")


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
    """TCP listeners (IPv4 and IPv6) in a namespace; records which ports accepted a connection."""

    ns: Netns
    ports: Sequence[int]
    accepted: List[Tuple[int, str]] = field(default_factory=list)
    _sockets: List[socket.socket] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> "Listener":
        for port in self.ports:
            sock = self.ns.socket(socket.AF_INET6, socket.SOCK_STREAM)
            self._sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", port))
            sock.listen(128)
            sock.setblocking(False)
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


CONNECTED = "connected"
TIMED_OUT = "timed out"


def tcp_probe(ns: Netns, addr: str, port: int, timeout: float = 1.0) -> str:
    """Open a TCP connection from NS: CONNECTED, TIMED_OUT (nothing came back: a dropped SYN),
    or the error, e.g. "connection refused" (the SYN did reach a host)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = ns.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((addr, port))
        return CONNECTED
    except socket.timeout:
        return TIMED_OUT
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()
    finally:
        sock.close()


def tcp_connects(ns: Netns, addr: str, port: int, timeout: float = 1.0) -> bool:
    return tcp_probe(ns, addr, port, timeout) == CONNECTED


def frame_arrives(
    sender: Netns, frame: bytes, receiver: Netns, dev: str = "eth0", wait: float = 0.3, sender_dev: str = "eth0",
    marker: Optional[bytes] = None,
) -> bool:
    """Send FRAME from SENDER's SENDER_DEV and report whether it reached RECEIVER's DEV within
    WAIT seconds.  MARKER (by default the frame's last 16 bytes) is unique to this call (marker())."""
    rx = receiver.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        tx = sender.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            rx.bind((dev, 0))
            tx.bind((sender_dev, 0))
            rx.setblocking(False)
            marker_bytes = marker or frame[-16:]
            tx.send(frame)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                ready, _, _ = select.select([rx], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    break
                if marker_bytes in rx.recv(65535):
                    return True
            return False
        finally:
            tx.close()
    finally:
        rx.close()


def marker() -> bytes:
    """16 bytes that tell one test frame from every other frame on the wire."""
    return b"SGT" + uuid.uuid4().bytes[:13]
