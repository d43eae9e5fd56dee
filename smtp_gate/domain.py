"""A libvirt domain XML reduced to the few facts enforcement needs: guest, NICs, MACs, ports.

The hooks (XML on stdin), rebuild and add-vm (XML from libvirt) all read guests here, so
an allowance is always derived the same way from the hypervisor's own record (DESIGN §1).
Every path we read is listed once below; values pass through smtp_gate.validate and a
value that fails is kept as None, with the reason in Nic.problems, never guessed at.

Import cost is paid by the libvirt hook on every guest start, so this module imports only
what validate already imports (typing, re).  lxml (~20 ms) is imported inside parse();
the hook parses with xml.etree and calls from_element().  NamedTuple rather than a frozen
dataclass: `dataclasses` pulls in `inspect` and builds its classes with exec(), about
13 ms against 0.6 ms here.  No logging either (~12 ms): what was rejected travels in the
value itself, for the caller to report with whatever it already uses.
"""

import re
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple, Union

from smtp_gate import validate
from smtp_gate.errors import DomainXMLError, ValidationError

# An lxml.etree._Element or an xml.etree.ElementTree.Element: both are read by iterating
# over children, .tag, .get() and .text only, which both do alike.
Element = Any


def _path(spec: str) -> Tuple[str, Optional[str]]:
    """Split "source/@bridge" into ("source", "bridge"); "name" reads the element's text.
    One child step at most: see _read()."""
    path, at, attribute = spec.partition("@")
    path = path.rstrip("/") or "."
    if "/" in path:
        raise ValueError(f"path {spec!r} has more than one step")
    return (path, attribute) if at else (path, None)


# Every XPath we read from a domain XML, in one place (virt-manager style): the element
# itself or one child step, then an attribute or the text; no predicates, no namespaces.
DOMAIN_TYPE = _path("@type")  # kvm, qemu, lxc, xen, test...
DOMAIN_ID = _path("@id")  # only in a running guest's live XML: prepare..reconnect, not stopped/release
DOMAIN_NAME = _path("name")
DOMAIN_UUID = _path("uuid")
INTERFACES = ("devices", "interface")  # every <interface> child of every <devices> child
NIC_TYPE = _path("@type")
NIC_MAC = _path("mac/@address")
NIC_BRIDGE = _path("source/@bridge")  # type='bridge'; type='network' in live XML only
NIC_NETWORK = _path("source/@network")
NIC_TARGET = _path("target/@dev")  # auto-named vnetN only while the guest runs
NIC_VIRTUALPORT = _path("virtualport/@type")
# The fleet allowance (DESIGN §2 "Fleets"): <metadata><x:allow xmlns:x="urn:smtp-gate:1" by= at=
# reason=><nic mac=/>...</x:allow></metadata>.  Matched on the namespace URI, never the
# prefix.  libvirt namespaces only the element it was given (virDomainDefSetMetadata), so
# <nic> children may carry our namespace or none; both are read.
METADATA_NS = "urn:smtp-gate:1"
METADATA = "metadata"
ALLOW_TAG = "{%s}allow" % METADATA_NS
ALLOW_NIC_TAGS = ("nic", "{%s}nic" % METADATA_NS)
ALLOW_FIELDS = ("by", "at", "reason")  # attributes of <allow>, all optional
# optional too: the UUID of the guest the allowance was written for.  A definition copied
# to another guest (virt-clone, a dumpxml/define template) carries it along, and must not
# allow the copy: an allowance naming another guest allows nothing (with a problem line)
ALLOW_UUID = "uuid"
ALLOW_NIC_MAC = _path("@mac")
# <allow at=...>: a date, or a date and time with an optional zone (audit only: never gates)
_ISO_8601 = re.compile(r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}(:?\d{2})?)?)?\Z")

_HEX = frozenset("0123456789abcdef")
_SOCKET_TYPES = ("mcast", "udp", "server", "client")

# Why a Linux bridge rule cannot see a NIC of this <interface type>, as a status line says it.
_UNSEEN_TYPES = {
    "direct": "macvtap (type='direct'): frames leave by the host NIC, not through a bridge",
    "hostdev": "SR-IOV/PCI passthrough (type='hostdev'): the guest drives the NIC itself",
    "vdpa": "vDPA (type='vdpa'): the datapath is offloaded to hardware",
    "vhostuser": "vhost-user: a userspace switch (DPDK, OVS) carries the frames",
    "user": "user-mode networking: the guest's traffic leaves through the host's own sockets",
    "ethernet": "type='ethernet': libvirt attaches the tap to no bridge (routed or scripted)",
    "null": "type='null': no network backend, nothing to inspect",
}


Children = Dict[str, Element]


def _children(element: Element) -> Children:
    """Each child tag's first element, which is what element.find(tag) returns, for every
    tag in one pass: a rebuild reads 1 000 guests, and each find() walks the children
    again, in lxml through its Python-level ElementPath (from_element of 1 000 sample
    guests: ~90 ms with find(), ~70 ms with this, measured)."""
    first: Children = {}
    for child in element:
        first.setdefault(child.tag, child)
    return first


def _read(element: Element, children: Children, spec: Tuple[str, Optional[str]]) -> Optional[str]:
    """SPEC's value in ELEMENT, whose _children() are CHILDREN."""
    path, attribute = spec
    node = element if path == "." else children.get(path)
    if node is None:
        return None
    return node.text if attribute is None else node.get(attribute)


def normalise_uuid(value: str) -> Optional[str]:
    """The canonical lower-case 8-4-4-4-12 form, or None if VALUE is not a UUID.

    libvirt accepts upper case and dashes anywhere; comparing UUIDs from an operator, a
    whitelist and libvirt needs one form.
    """
    if not isinstance(value, str):
        return None
    digits = value.strip().replace("-", "").lower()
    if len(digits) != 32 or not _HEX.issuperset(digits):
        return None
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


class Nic(NamedTuple):
    """One <interface> of a guest.  A value that failed validation is None, its reason in
    PROBLEMS; the NIC itself is always kept, so a guest is never silently shorter."""

    type: str  # <interface type=...>; '' if absent
    mac: Optional[str]  # lower-case colon form; None if absent, invalid or not unicast
    bridge: Optional[str]  # the Linux bridge: <source bridge=...> of type bridge/network
    network: Optional[str]  # <source network=...>: a libvirt network name, never sent to nft
    target: Optional[str]  # host-side device <target dev=...>
    virtualport: Optional[str]  # <virtualport type=...>: 'openvswitch', 'midonet'...
    problems: Tuple[str, ...] = ()  # one line per value dropped above

    @property
    def unprotected_reason(self) -> Optional[str]:
        """None if a Linux bridge rule sees this NIC's frames, else one line saying why not
        (DESIGN §4: status marks such NICs instead of pretending they are guarded).

        Says nothing about *which* bridge: whether BRIDGE is guarded is the caller's check.
        """
        if self.type in ("bridge", "network"):
            if self.virtualport == "openvswitch":
                return "Open vSwitch port: frames bypass the Linux bridge's hooks"
            if self.virtualport:
                return f"virtualport type {self.virtualport!r}: not a Linux bridge port"
            if self.type == "network" and self.bridge is None:
                return (
                    f"network {self.network!r} names no bridge here: a macvtap/hostdev network,"
                    " or not a running guest's live XML"
                )
            return None
        if self.type in _UNSEEN_TYPES:
            return _UNSEEN_TYPES[self.type]
        if self.type in _SOCKET_TYPES:
            return f"socket backend (type={self.type!r}): frames travel in the host's sockets"
        return f"interface type {self.type!r} is not known to attach to a Linux bridge"

    @property
    def bridge_visible(self) -> bool:
        """True if the frames of this NIC cross a Linux bridge port our rules can match."""
        return self.unprotected_reason is None


class Allow(NamedTuple):
    """The allowance a guest's own definition carries (libvirt metadata, urn:smtp-gate:1).

    MACS None: every NIC of the guest; a tuple: only those NICs (a <nic> child whose MAC
    is unusable is dropped with a line in PROBLEMS, so a bad entry never widens it: an
    allowance whose every <nic> is bad allows nothing)."""

    by: str = ""
    at: str = ""
    reason: str = ""
    macs: Optional[Tuple[str, ...]] = None
    problems: Tuple[str, ...] = ()
    uuid: str = ""  # the guest it was written for (normalised), "" when it does not say

    def allows(self, macs: Sequence[str]) -> Tuple[str, ...]:
        """Which of MACS (a guest's NIC MACs) this allowance covers."""
        if self.macs is None:
            return tuple(macs)
        return tuple(mac for mac in macs if mac in self.macs)


class Domain(NamedTuple):
    """A guest as one domain XML describes it.  Equal XML gives equal Domains, whichever
    parser read it."""

    name: str  # never enters the ruleset (DESIGN §3); kept exactly as libvirt wrote it
    uuid: str  # canonical lower-case form
    type: str  # <domain type=...>; '' if absent
    nics: Tuple[Nic, ...]
    id: Optional[int] = None  # libvirt's runtime id: present only while the guest runs
    uri: Optional[str] = None  # the libvirt URI it was listed from; None for a hook's XML
    allow: Optional[Allow] = None  # the allowance in its <metadata>, if any


def _checked(value: Optional[str], check: Any, what: str, problems: list) -> Optional[str]:
    if value is None:
        return None
    try:
        return check(value)
    except ValidationError as exc:
        problems.append(f"{what}: {exc}")
        return None


def _nic(element: Element) -> Nic:
    problems: list = []
    children = _children(element)
    nic_type = _read(element, children, NIC_TYPE) or ""
    # a multicast or all-zero MAC belongs to no NIC, so no allowance may name it
    mac = _checked(_read(element, children, NIC_MAC), validate.unicast_mac, "<mac address>", problems)
    bridge = network = None
    if nic_type in ("bridge", "network"):
        bridge = _checked(_read(element, children, NIC_BRIDGE), validate.ifname, "<source bridge>", problems)
    if nic_type == "network":
        network = _read(element, children, NIC_NETWORK)
    target = _checked(_read(element, children, NIC_TARGET), validate.ifname, "<target dev>", problems)
    return Nic(
        type=nic_type,
        mac=mac,
        bridge=bridge,
        network=network,
        target=target,
        virtualport=_read(element, children, NIC_VIRTUALPORT),
        problems=tuple(problems),
    )


def _allow(metadata: Optional[Element], guest_uuid: str) -> Optional[Allow]:
    """The first <allow> of our namespace in <metadata>, or None.  One whose uuid= is not
    GUEST_UUID (or no UUID at all) was written for another guest: it allows nothing."""
    if metadata is None:
        return None
    for element in metadata:
        if element.tag == ALLOW_TAG:
            break
    else:
        ours = [str(e.tag) for e in metadata if str(e.tag).startswith(ALLOW_TAG[: -len("allow")])]
        if ours:  # a typo (<allowed>, <Allow>) was meant to allow: it allows nothing, said loudly
            return Allow(macs=(), problems=(f"<metadata> holds {ours[0]} where <allow> of {METADATA_NS} was expected",))
        return None
    problems: list = []
    fields = {}
    for field in ALLOW_FIELDS:
        value = element.get(field) or ""
        try:
            fields[field] = validate.one_line(f"<allow {field}>", value) if value else ""
        except ValidationError as exc:
            problems.append(str(exc))
            fields[field] = validate.escape_controls(value)
    if fields["at"] and not _ISO_8601.match(fields["at"]):
        problems.append(f"<allow at> {fields['at']!r} is not an ISO 8601 time such as 2026-12-01T10:00:00+00:00")
    macs = None
    nics = [child for child in element if child.tag in ALLOW_NIC_TAGS]
    strangers = sorted({str(child.tag) for child in element if child.tag not in ALLOW_NIC_TAGS})
    if strangers:
        # an element we do not know (<nics>, <NIC>, a <nic> of another namespace...) was
        # meant to say something, most likely to narrow the allowance: allow nothing rather
        # than every NIC, and say why
        problems.append(f"<allow> has unknown child element(s) {', '.join(strangers)}: expected only <nic mac=...>")
    if nics or strangers:
        wanted = []
        for nic in nics:
            mac = _checked(_read(nic, {}, ALLOW_NIC_MAC), validate.unicast_mac, "<allow><nic mac>", problems)
            if mac is None and nic.get("mac") is None:
                problems.append("<allow><nic> has no mac attribute")
            if mac is not None and mac not in wanted:
                wanted.append(mac)
        macs = tuple(wanted)
    owner = ""
    raw_owner = element.get(ALLOW_UUID)
    if raw_owner is not None:
        owner = normalise_uuid(raw_owner) or ""
        if not owner:
            problems.append(
                f"<allow uuid>: bad UUID {validate.escape_controls(raw_owner)!r}: expected the guest's own UUID, "
                "32 hex digits"
            )
            macs = ()
        elif owner != guest_uuid:
            problems.append(
                f"<allow> belongs to guest {owner}, not to this one ({guest_uuid}): a clone or a copied definition? "
                "remove it, or set it anew for this guest"
            )
            macs = ()
    return Allow(macs=macs, problems=tuple(problems), uuid=owner, **fields)


def from_element(root: Element) -> Domain:
    """Read a <domain> element from lxml or xml.etree (the hook's cheap stdlib parse).

    Raises DomainXMLError when the root is not <domain> or lacks a usable <name> or
    <uuid>; any other odd shape yields a Domain with what could be read.
    """
    getroot = getattr(root, "getroot", None)  # an ElementTree rather than its root
    if getroot is not None:
        root = getroot()
    tag = getattr(root, "tag", None)
    if tag != "domain":
        raise DomainXMLError(f"domain XML has root element <{tag}>, expected <domain>")
    children = _children(root)
    name = _read(root, children, DOMAIN_NAME)
    if not name:
        raise DomainXMLError("domain XML has no <name>")
    raw_uuid = _read(root, children, DOMAIN_UUID)
    if raw_uuid is None or not raw_uuid.strip():
        raise DomainXMLError(f"domain XML of {name!r} has no <uuid>")
    uuid = normalise_uuid(raw_uuid)
    if uuid is None:
        raise DomainXMLError(f"domain XML of {name!r} has a bad <uuid> {raw_uuid!r}: expected 32 hex digits")
    raw_id = _read(root, children, DOMAIN_ID)
    devices, interface = INTERFACES
    return Domain(
        name=name,
        uuid=uuid,
        type=_read(root, children, DOMAIN_TYPE) or "",
        nics=tuple(_nic(nic) for parent in root if parent.tag == devices for nic in parent if nic.tag == interface),
        id=int(raw_id) if raw_id is not None and raw_id.isascii() and raw_id.isdigit() else None,
        allow=_allow(children.get(METADATA), uuid),
    )


def _make_parser(encoding: Optional[str]) -> Any:
    from lxml import etree  # not at module level: the hook must not pay for it

    return etree.XMLParser(
        encoding=encoding,
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        huge_tree=False,
        # xml.etree drops both too: the two parsers must read the same text
        remove_comments=True,
        remove_pis=True,
    )


def text_parser() -> Any:
    """A parser for domain XML given as text (what libvirt's XMLDesc returns).  A rebuild
    reuses one for every guest: building a parser costs more than parsing a guest."""
    return _make_parser("utf-8")


def parse(xml: Union[str, bytes], parser: Any = None) -> Domain:
    """Parse domain XML with lxml, refusing entity expansion and network access.

    For callers outside the hook (rebuild, add-vm, status), whatever the XML's source.
    PARSER (from text_parser(), for text only) may be shared across calls.
    Raises DomainXMLError naming what is wrong.
    """
    from lxml import etree

    if isinstance(xml, str):
        # lxml refuses str with an encoding declaration; ours is UTF-8 once encoded
        data = xml.encode("utf-8")
        parser = parser if parser is not None else text_parser()
    elif isinstance(xml, bytes):
        data, parser = xml, _make_parser(None)  # the bytes' own declaration decides
    else:
        raise DomainXMLError(f"domain XML must be text or bytes, not {type(xml).__name__}")
    try:
        root = etree.fromstring(data, parser)
    except (etree.XMLSyntaxError, ValueError) as exc:
        raise DomainXMLError(f"domain XML is not well-formed XML: {exc}") from None
    if root is None:
        raise DomainXMLError("domain XML is empty")
    return from_element(root)


def parse_allow(xml: str, guest_uuid: str) -> Optional[Allow]:
    """Our element alone, as virDomainGetMetadata(ELEMENT, METADATA_NS) returns it, read as
    _allow reads it inside a whole domain XML: for a running guest whose domain XML cannot
    be read (too big for libvirt's RPC), whose allowance must still be known.  libvirt
    matched the namespace already and returns the element without it (libvirt 9.0:
    `<allow by="p">`), so an <allow> in no namespace counts here, and only here.  GUEST_UUID:
    the guest it was read from (an allowance bound to another allows nothing).  None when
    the element is not <allow>; DomainXMLError when it is not XML."""
    from lxml import etree

    try:
        root = etree.fromstring(xml.encode("utf-8"), text_parser())
    except (etree.XMLSyntaxError, ValueError) as exc:
        raise DomainXMLError(f"the smtp-gate metadata element is not well-formed XML: {exc}") from None
    if root.tag not in ("allow", ALLOW_TAG):
        return None
    root.tag = ALLOW_TAG
    return _allow([root], normalise_uuid(guest_uuid) or guest_uuid)
