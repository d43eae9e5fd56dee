"""Blocked attempts as the kernel reports them: an nfnetlink_log (NFLOG) subscriber, from
the standard library alone (the style of nfnetlink.py, whose message helpers it reuses).

The `smtp4`/`smtp6` chains send each blocked attempt, metered per guest port
(ruleset.LOG_METER_SET), to the NFLOG group LOG_GROUP with the prefix `SMTPGATE4 `,
`SMTPGATE6 ` (or `... audit `).  open_group() binds that group (NFULNL_CFG_CMD_BIND) with
NFULNL_COPY_PACKET and a copy range of COPY_RANGE bytes: the IP header, IPv6 extension
headers and the TCP header, never a message body.  The kernel batches up to QTHRESH packets per datagram (or flushes after
FLUSH_CS hundredths of a second), so a flood costs few system calls.

A listener that falls behind loses events: the kernel counts them as the socket's drops
(/proc/net/netlink) and the next read fails with ENOBUFS.  Nothing else depends on this
socket: the drop is a rule of its own.

Attribution (Attributor): the frame's ingress port (in the bridge family the kernel gives
the bridge as NFULA_IFINDEX_INDEV and the port as NFULA_IFINDEX_PHYSINDEV) is looked up in
the run directory's records (a guest's ports, foreign ones included, as (name, index)); a port no record names is "unknown port" with its index and name.
"""

import errno
import ipaddress
import struct
import time
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

from smtp_gate import nfnetlink
from smtp_gate.runstate import Record
from smtp_gate.nfnetlink import (  # one netlink dialect for both
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    NetlinkError,
    _attr,
    _attrs,
    _errno_text,
    _error_reply,
    _grow,
    _message,
    _messages,
)

socket = nfnetlink.socket  # _socket: the C core (see nfnetlink.py)

NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_NLBUFSIZ = 3
NFULA_CFG_TIMEOUT = 4
NFULA_CFG_QTHRESH = 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_UNBIND = 2
NFULNL_COPY_PACKET = 2

NFULA_PACKET_HDR = 1
NFULA_TIMESTAMP = 3
NFULA_IFINDEX_INDEV = 4
NFULA_IFINDEX_PHYSINDEV = 6
NFULA_HWADDR = 8
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10

AF_UNSPEC = 0
COPY_RANGE = 256  # IPv6 (40) + extension headers (up to 156) + TCP's first 60 bytes; no message body
QTHRESH = 64  # packets per datagram at most
FLUSH_CS = 5  # hundredths of a second before a partial batch is sent
NLBUFSIZ = 65536  # the kernel's batch buffer
RECV_BUFFER = 4 * 1024 * 1024
PREFIX = "SMTPGATE"


class Attempt(NamedTuple):
    """One blocked attempt as the kernel logged it."""

    ifindex: int  # the ingress port
    mac: str  # the frame's source MAC ("" if not given)
    family: int  # 4 or 6
    src: str
    dst: str
    sport: Union[int, str]  # "?" (UNREAD) when the copied bytes do not hold it
    dport: Union[int, str]
    mode: str  # "enforce" or "audit", from the rule's prefix
    at: float  # wall-clock seconds
    # TCP SYN without ACK (from the copied header's flags): a connection attempt, unless it is
    # a retransmission (same ports and sequence number: abuse.Connections tells them apart)
    syn: bool = False
    seq: int = 0  # the TCP sequence number


class Guest(NamedTuple):
    """Who an attempt is attributed to."""

    name: str  # the guest's name, or "unknown port"
    uuid: str  # "" for an unknown port
    iface: str  # the port's name (from the record, else the kernel's), or the index


UNKNOWN = "unknown port"


def _config(group: int, payload: bytes, seq: int) -> bytes:
    return _message((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, AF_UNSPEC, payload,
                    res_id=group)


def open_group(group: int, buffer: int = RECV_BUFFER, timeout: float = 5.0) -> "socket.socket":
    """A socket bound to NFLOG group GROUP, configured to copy COPY_RANGE bytes of each packet.
    Raises NetlinkError (EPERM: another socket holds the group)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, nfnetlink.NETLINK_NETFILTER)
    try:
        _grow(sock, socket.SO_RCVBUF, nfnetlink.SO_RCVBUFFORCE, buffer)
        sock.bind((0, 0))
        sock.settimeout(timeout)
        requests = [
            _attr(NFULA_CFG_CMD, struct.pack("B", NFULNL_CFG_CMD_BIND)),
            _attr(NFULA_CFG_MODE, struct.pack("!IBB", COPY_RANGE, NFULNL_COPY_PACKET, 0))
            + _attr(NFULA_CFG_QTHRESH, struct.pack("!I", QTHRESH))
            + _attr(NFULA_CFG_TIMEOUT, struct.pack("!I", FLUSH_CS))
            + _attr(NFULA_CFG_NLBUFSIZ, struct.pack("!I", NLBUFSIZ)),
        ]
        for seq, payload in enumerate(requests, start=1):
            sock.sendto(_config(group, payload, seq), (0, 0))
            while True:
                replies = [m for m in _messages(sock.recv(65536)) if m[0] == NLMSG_ERROR and m[2] == seq]
                if replies:
                    code = _error_reply(replies[0][1], replies[0][3])[0]
                    if code:
                        why = " (another listener holds the group: pick a free LOG_GROUP)" if code == errno.EPERM else ""
                        raise NetlinkError(f"cannot bind NFLOG group {group}: {_errno_text(code)}{why}", code)
                    break
        sock.settimeout(None)
    except socket.timeout:
        sock.close()
        raise NetlinkError(f"nfnetlink_log did not answer the binding of group {group}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def _mac(value: bytes) -> str:
    if len(value) < 4:
        return ""
    (length,) = struct.unpack_from("!H", value)
    raw = value[4 : 4 + min(length, 8)]
    return ":".join(f"{b:02x}" for b in raw[:6]) if length >= 6 else ""


TCP_SYN, TCP_ACK = 0x02, 0x10


def _syn(payload: bytes, tcp: int) -> bool:
    """Whether the TCP header at offset TCP opens a connection: SYN set, ACK clear."""
    return len(payload) > tcp + 13 and payload[tcp + 13] & (TCP_SYN | TCP_ACK) == TCP_SYN


def _seq(payload: bytes, tcp: int) -> int:
    return struct.unpack_from("!I", payload, tcp + 4)[0] if len(payload) >= tcp + 8 else 0


IPV6_HOP_BY_HOP, IPV6_ROUTING, IPV6_FRAGMENT, IPV6_AH, IPV6_DSTOPTS = 0, 43, 44, 51, 60
IPV6_EXTENSIONS = (IPV6_HOP_BY_HOP, IPV6_ROUTING, IPV6_FRAGMENT, IPV6_AH, IPV6_DSTOPTS)
UNREAD = "?"  # an address or port the copied bytes do not hold

Packet = Tuple[int, str, str, Union[int, str], Union[int, str], bool, int]


def _ipv6_transport(payload: bytes) -> Optional[int]:
    """The offset of the TCP header behind IPv6's extension headers (hop-by-hop, routing,
    destination options, AH, a first fragment), or None if the chain names something else,
    is a later fragment, or runs past the copied bytes."""
    next_header, offset = payload[6], 40
    for _ in range(len(IPV6_EXTENSIONS) * 2):  # each may appear, destination options twice
        if next_header == 6:
            return offset
        if next_header not in IPV6_EXTENSIONS or len(payload) < offset + 8:
            return None
        if next_header == IPV6_FRAGMENT:
            if struct.unpack_from("!H", payload, offset + 2)[0] & 0xFFF8:
                return None  # a later fragment: no TCP header
            length = 8
        elif next_header == IPV6_AH:
            length = (payload[offset + 1] + 2) * 4
        else:
            length = (payload[offset + 1] + 1) * 8
        next_header, offset = payload[offset], offset + length
    return None


def parse_payload(payload: bytes, family: int = 0) -> Optional[Packet]:
    """(family, source, destination, source port, destination port, SYN without ACK, TCP
    sequence number) of an IPv4 or IPv6 packet carrying TCP, IPv6 extension headers walked.
    The rule that logs matched TCP to a blocked port, so a packet is never dropped here: what
    the copied bytes do not tell is UNREAD ("?"), its family FAMILY (the prefix's) when the
    bytes do not say; None only without a family."""
    version = payload[0] >> 4 if payload else 0
    if version == 4 and len(payload) >= 20:
        ihl = (payload[0] & 0x0F) * 4
        src, dst = str(ipaddress.IPv4Address(payload[12:16])), str(ipaddress.IPv4Address(payload[16:20]))
        if payload[9] != 6 or ihl < 20 or len(payload) < ihl + 4:
            return 4, src, dst, UNREAD, UNREAD, False, 0
        sport, dport = struct.unpack_from("!HH", payload, ihl)
        return 4, src, dst, sport, dport, _syn(payload, ihl), _seq(payload, ihl)
    if version == 6 and len(payload) >= 40:
        src, dst = str(ipaddress.IPv6Address(payload[8:24])), str(ipaddress.IPv6Address(payload[24:40]))
        tcp = _ipv6_transport(payload)
        if tcp is None or len(payload) < tcp + 4:
            return 6, src, dst, UNREAD, UNREAD, False, 0
        sport, dport = struct.unpack_from("!HH", payload, tcp)
        return 6, src, dst, sport, dport, _syn(payload, tcp), _seq(payload, tcp)
    if family in (4, 6):
        return family, UNREAD, UNREAD, UNREAD, UNREAD, False, 0
    return None


def parse(data: bytes, now: Optional[float] = None) -> List[Attempt]:
    """The attempts in one datagram: NFULNL_MSG_PACKET messages whose prefix is ours (each
    one, what its copied bytes do not tell as "?"); anything else is skipped."""
    out = []
    for msg_type, _flags, _seq, body in _messages(data):
        if msg_type != (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET or len(body) < 4:
            continue
        values: Dict[int, bytes] = dict(_attrs(body[4:]))
        prefix = values.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode("ascii", "replace")
        if not prefix.startswith(PREFIX):
            continue
        family = 6 if prefix.startswith(PREFIX + "6") else 4 if prefix.startswith(PREFIX + "4") else 0
        packet = parse_payload(values.get(NFULA_PAYLOAD, b""), family)
        if packet is None:
            continue
        # bridge family: INDEV is the bridge, PHYSINDEV the port the frame came in by
        index = values.get(NFULA_IFINDEX_PHYSINDEV) or values.get(NFULA_IFINDEX_INDEV) or b"\0\0\0\0"
        at = now if now is not None else time.time()
        stamp = values.get(NFULA_TIMESTAMP)
        if stamp is not None and len(stamp) >= 16:
            sec, usec = struct.unpack_from("!QQ", stamp)
            at = sec + usec / 1e6
        family, src, dst, sport, dport, syn, seq = packet
        out.append(Attempt(
            ifindex=struct.unpack_from("!I", index)[0], mac=_mac(values.get(NFULA_HWADDR, b"")),
            family=family, src=src, dst=dst, sport=sport, dport=dport,
            mode="audit" if " audit" in prefix else "enforce", at=at, syn=syn, seq=seq,
        ))
    return out


def read(sock: "socket.socket") -> Tuple[List[Attempt], bool]:
    """The attempts of one datagram, and whether events were lost before it (ENOBUFS)."""
    try:
        return parse(sock.recv(1 << 20)), False
    except OSError as exc:
        if exc.errno == errno.ENOBUFS:
            return [], True
        raise


def socket_drops(sock: "socket.socket", proc: str = "/proc/net/netlink") -> Optional[int]:
    """How many datagrams the kernel could not queue to SOCK (its sk_drops), from PROC of
    this network namespace; None if it does not say."""
    portid = sock.getsockname()[0]
    try:
        with open(proc, encoding="ascii") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    for line in lines[1:]:
        fields = line.split()
        if len(fields) >= 9 and fields[1] == str(nfnetlink.NETLINK_NETFILTER) and fields[2] == str(portid):
            return int(fields[8])
    return None


class Attributor:
    """Ingress port index -> Guest, from the run directory's records, re-read at most once a
    second (when a port is not known, or REFRESH seconds after the last read)."""

    REFRESH = 5.0

    def __init__(self, records: Callable[[], Iterable["Record"]], ifname: Optional[Callable[[int], str]] = None) -> None:
        self._records = records
        self._ifname = ifname or _kernel_ifname
        self._ports: Dict[int, Guest] = {}
        self._read_at = float("-inf")

    def _reload(self, now: float) -> None:
        ports: Dict[int, Guest] = {}
        for record in self._records():
            # a guest's ports on bridges we do not protect are its own too (as metrics.owners)
            for name, index in (*record.guest_ports, *record.foreign_ports):
                ports[index] = Guest(record.name, record.uuid, name)
        self._ports, self._read_at = ports, now

    def __call__(self, ifindex: int, now: Optional[float] = None) -> Guest:
        now = time.monotonic() if now is None else now
        if now - self._read_at >= self.REFRESH or (ifindex not in self._ports and now - self._read_at >= 1.0):
            self._reload(now)
        guest = self._ports.get(ifindex)
        if guest is not None:
            return guest
        return Guest(UNKNOWN, "", self._ifname(ifindex))


def _kernel_ifname(ifindex: int) -> str:
    try:
        return f"{socket.if_indextoname(ifindex)}"
    except OSError:
        return f"ifindex {ifindex}"


def who(guest: Guest) -> str:
    """A guest's name, or "unknown port vnet3": the one way every message names an unknown port."""
    return guest.name if guest.uuid else f"{UNKNOWN} {guest.iface}"


def describe(attempt: Attempt, guest: Guest) -> str:
    """The journal's MESSAGE: who (port, source address, MAC), where to, and, in audit mode,
    that the attempt was let through."""
    port = f"ifindex {attempt.ifindex}" if not guest.uuid else guest.iface
    dst = f"[{attempt.dst}]" if attempt.family == 6 else attempt.dst
    what = "SMTP that would be blocked (audit mode: delivered)" if attempt.mode == "audit" else "blocked SMTP"
    return (f"{what} from {who(guest)} ({port}, {attempt.src}, {attempt.mac or 'no MAC'}) "
            f"to {dst}:{attempt.dport}")
