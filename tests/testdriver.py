"""libvirt's test driver as a hypervisor for tests and benchmarks: real libvirt-python
calls, no daemon.  write_node() writes a node file and returns its `test:///...` URI;
populate_default() starts guests in the process-wide `test:///default` instead.

What the test driver does with a node file (libvirt 9.0, checked here):
- a <domain> is *running* unless it carries <test:runstate>5</test:runstate>
  (VIR_DOMAIN_SHUTOFF, in the test namespace); running guests get ids 1, 2, ...
- every `test:///PATH` connection loads its own private copy of the file: what one
  connection changes, another never sees.  Only `test:///default` is one shared
  instance per process.
- a <target dev> starting with vnet, macvtap or macvlan is dropped by libvirt's parser
  (those prefixes are reserved for names libvirt generates), and every NIC left without
  a target, shut-off guests' too, is named testnet0, testnet1... counting per domain: the
  same names in every guest.  Other names (tap..., vif3.0) are kept in live and inactive
  XML alike.  So guests here get explicit, unique tap<guest>n<nic> targets.
- a NIC without <mac> gets a random one, an Open vSwitch virtualport a random
  interfaceid; a domain without <uuid> a random UUID.  So all of them are written here.
"""

from pathlib import Path
from typing import List, Tuple

DEFAULT_URI = "test:///default"

TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"
SHUTOFF = 5  # VIR_DOMAIN_SHUTOFF, for <test:runstate>
MAX_NICS = 16  # per guest: mac() packs guest and NIC index into the MAC's low 24 bits


def name(i: int) -> str:
    return f"vm{i:05d}"


def uuid(i: int) -> str:
    return f"5a7e0000-0000-4000-8000-{i:012x}"


def mac(i: int, k: int) -> str:
    """Unique per (guest I, NIC K), unicast, in QEMU's 52:54:00 range."""
    if not 0 <= k < MAX_NICS or not 0 <= i < (1 << 24) // MAX_NICS:
        raise ValueError(f"guest {i} / NIC {k} out of range")
    n = i * MAX_NICS + k
    return f"52:54:00:{n >> 16:02x}:{(n >> 8) & 0xFF:02x}:{n & 0xFF:02x}"


def target(i: int, k: int) -> str:
    return f"tap{i}n{k}"


ODD_NAME = "oddball"
# (interface type, XML body after <mac/>) for the odd guest; {t} is the NIC's target.
ODD_NICS: Tuple[Tuple[str, str], ...] = (
    ("bridge", "<source bridge='{bridge}'/><target dev='{t}'/>"),
    ("direct", "<source dev='eth0' mode='bridge'/><target dev='{t}'/>"),
    ("network", "<source network='default'/><target dev='{t}'/>"),
    ("bridge", "<source bridge='ovsbr0'/><virtualport type='openvswitch'/><target dev='{t}'/>"),
    ("user", "<target dev='{t}'/>"),
    (
        "hostdev",
        "<source><address type='pci' domain='0x0000' bus='0x03' slot='0x10' function='0x1'/></source>"
        "<target dev='{t}'/>",
    ),
    ("vhostuser", "<source type='unix' path='/run/vhu0' mode='server'/><target dev='{t}'/><model type='virtio'/>"),
    ("ethernet", "<target dev='{t}'/>"),
)
ODD_VISIBLE = (True, False, False, False, False, False, False, False)  # bridge_visible per NIC


def domain_xml(i: int, nics: int = 1, bridge: str = "br0", running: bool = True, guest: str = "") -> str:
    """One guest's <domain>: NICs on BRIDGE with mac(i, k) and target(i, k)."""
    interfaces = "".join(
        f"<interface type='bridge'><mac address='{mac(i, k)}'/><source bridge='{bridge}'/>"
        f"<target dev='{target(i, k)}'/></interface>"
        for k in range(nics)
    )
    return _domain(guest or name(i), uuid(i), interfaces, running)


def odd_domain_xml(i: int, bridge: str = "br0") -> str:
    """A running guest with one NIC of each shape a bridge rule does or does not see."""
    interfaces = "".join(
        f"<interface type='{kind}'><mac address='{mac(i, k)}'/>"
        + body.format(t=target(i, k), bridge=bridge)
        + "</interface>"
        for k, (kind, body) in enumerate(ODD_NICS)
    )
    return _domain(ODD_NAME, uuid(i), interfaces, True)


def _domain(guest: str, guest_uuid: str, interfaces: str, running: bool) -> str:
    state = "" if running else f"<test:runstate>{SHUTOFF}</test:runstate>"
    return (
        f"<domain type='test' xmlns:test='{TEST_NS}'><name>{guest}</name><uuid>{guest_uuid}</uuid>"
        f"<memory>65536</memory><os><type>hvm</type></os><devices>{interfaces}</devices>{state}</domain>\n"
    )


def write_node(
    directory: Path,
    running: int = 2,
    nics: int = 1,
    shutoff: int = 0,
    odd: bool = False,
    bridge: str = "br0",
    filename: str = "node.xml",
) -> str:
    """Write a node file and return its URI.

    Guests 0 .. RUNNING-1 run and RUNNING .. RUNNING+SHUTOFF-1 are shut off, each with
    NICS bridge NICs named by name(i), uuid(i), mac(i, k), target(i, k).  ODD adds the
    running guest ODD_NAME (index RUNNING+SHUTOFF) with one NIC of each type in ODD_NICS.
    """
    parts: List[str] = ["<node>\n"]
    parts.extend(domain_xml(i, nics, bridge, True) for i in range(running))
    parts.extend(domain_xml(i, nics, bridge, False) for i in range(running, running + shutoff))
    if odd:
        parts.append(odd_domain_xml(running + shutoff, bridge))
    parts.append("</node>\n")
    path = Path(directory).resolve() / filename
    path.write_text("".join(parts), encoding="utf-8")
    return f"test://{path}"


def populate_default(running: int, nics: int = 1, first: int = 0, bridge: str = "br0") -> str:
    """Start guests FIRST .. FIRST+RUNNING-1 (transient, as domain_xml) in the shared
    test:///default instance and return its URI.

    For timing list_running alone: each connection to a node *file* re-parses the whole
    file (about 0.35 s of libvirt's own work for 1 000 guests here), while test:///default
    is loaded once per process.  The guests live until destroyed or the process ends.
    """
    import libvirt

    conn = libvirt.open(DEFAULT_URI)
    try:
        for i in range(first, first + running):
            conn.createXML(domain_xml(i, nics, bridge), 0)
    finally:
        conn.close()
    return DEFAULT_URI
