"""The kernel tests' lab: a hypervisor namespace with a real Linux bridge, guests and an
"internet", built on smtp_gate.netlab (namespaces, veth ports, listeners, TCP and frames),
which `smtp-gate selftest` shares.

Every namespace is created here and always deleted (pyroute2's fixture model): tests
never touch this machine's own ruleset or links.
"""

import os
import subprocess
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

from smtp_gate import netlab
from smtp_gate.netlab import Guest, Listener, Netns

REPO = Path(__file__).resolve().parent.parent


def missing_kernel_features() -> Optional[str]:
    """A skip reason, or None when this machine can run the kernel tests."""
    missing = netlab.missing_features(f"sgprobe{os.getpid()}")
    return "needs " + "; ".join(missing) if missing else None


@contextmanager
def immutable(path: Path) -> Iterator[None]:
    """PATH made immutable (chattr +i) meanwhile: no file can be created, replaced or removed
    in it even by root, as in a full /run (ENOSPC) but at once.  Always made mutable again."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True, capture_output=True)


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
        netlab.veth(self.hv, port, ns, inner, ip4=ip4, ip6=ip6, mac=mac, bridge=bridge)

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
        if "METRICS_DIR" not in text:  # never the host's node_exporter directory
            extra += 'METRICS_DIR=""\n'
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

    def run_hook(self, op: str, sub: str, xml: bytes, driver: str = "qemu", name: str = "guest") -> subprocess.CompletedProcess:
        """Run hooks/<driver> in the hypervisor namespace as libvirt runs it: argv, the domain
        XML on stdin, libvirt's environment plus SMTP_GATE_CONFIG."""
        env = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
               "SMTP_GATE_CONFIG": str(self.config_path)}
        return subprocess.run(
            ["ip", "netns", "exec", self.hv.name, "/usr/bin/python3", str(REPO / "hooks" / driver), name, op, sub, "-"],
            input=xml, capture_output=True, env=env, timeout=30,
        )

    def start_guest(self, *guests: Guest, bridge: str = "br0") -> None:
        """Tell smtp-gate that GUESTS are libvirt guests, as libvirt does: `start begin` with a
        domain XML naming each one's port (which then becomes a known guest port)."""
        for guest in guests:
            xml = (
                f"<domain type='kvm'><name>{guest.name}</name><uuid>{uuid.uuid5(uuid.NAMESPACE_DNS, guest.name)}</uuid>"
                f"<devices><interface type='bridge'><mac address='{guest.mac}'/><source bridge='{bridge}'/>"
                f"<target dev='{guest.port}'/></interface></devices></domain>"
            ).encode()
            result = self.run_hook("start", "begin", xml, name=guest.name)
            assert (result.returncode, result.stdout) == (0, b"") and b"failed" not in result.stderr, result.stderr

    def allow_in_kernel(self, port: str, mac: str) -> None:
        """Add an allowance the way a hook does (an element in the allowed set)."""
        index = self.hv.ifindex(port)
        self.nft("add", "element", "bridge", "smtp_gate", "allowed", f"{{ {index} . {mac} }}")

    # -- traffic --------------------------------------------------------------------------
    def tcp_connects(self, guest: Guest, addr: str, port: int, timeout: float = 1.0) -> bool:
        return netlab.tcp_connects(guest.ns, addr, port, timeout)

    def frame_arrives(
        self, sender: Netns, frame: bytes, receiver: Optional[Netns] = None, dev: str = "eth0", wait: float = 0.3,
        sender_dev: str = "eth0", marker: Optional[bytes] = None,
    ) -> bool:
        """Send FRAME from SENDER and report whether it reached RECEIVER's DEV (the internet
        side by default).  The frame must end with (or MARKER be) a marker unique to this call."""
        return netlab.frame_arrives(
            sender, frame, receiver or self.inet, dev=dev, wait=wait, sender_dev=sender_dev, marker=marker
        )
