"""Hand-built Ethernet frames: 802.1Q/802.1ad tags, PPPoE, IPv4 with options and fragments,
IPv6 with extension headers and fragments, TCP.

Pure byte builders, shared by `smtp-gate selftest` and the kernel tests.  Tagged and
encapsulated frames are written byte by byte (no 8021q module, no PPPoE stack needed)
and sent through an AF_PACKET socket, so the bridge sees exactly what a guest would send.
"""

import socket
import struct
from typing import Iterable, Tuple

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_ARP = 0x0806
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
ETH_P_PPPOE_SESSION = 0x8864
PPP_IP = 0x0021
PPP_IPV6 = 0x0057
IPPROTO_TCP = 6
IPPROTO_FRAGMENT = 44
IPPROTO_DSTOPTS = 60


def mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_segment(src_ip: bytes, dst_ip: bytes, sport: int, dport: int, payload: bytes = b"", flags: int = 0x02) -> bytes:
    """A TCP segment (SYN by default) with a correct checksum over the pseudo header."""
    header = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 64240, 0, 0)
    if len(src_ip) == 4:
        pseudo = src_ip + dst_ip + struct.pack("!BBH", 0, 6, len(header) + len(payload))
    else:
        pseudo = src_ip + dst_ip + struct.pack("!IxxxB", len(header) + len(payload), 6)
    csum = _checksum(pseudo + header + payload)
    return header[:16] + struct.pack("!H", csum) + header[18:] + payload


def ipv4_packet(
    src: str,
    dst: str,
    payload: bytes,
    proto: int = 6,
    options: bytes = b"",
    frag_offset: int = 0,
    more_fragments: bool = False,
    ident: int = 0x4242,
) -> bytes:
    if len(options) % 4:
        raise ValueError(f"IPv4 options must fill whole 32-bit words, got {len(options)} bytes")
    ihl = 5 + len(options) // 4
    flags_frag = (0x2000 if more_fragments else 0) | (frag_offset // 8)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        (4 << 4) | ihl,
        0,
        ihl * 4 + len(payload),
        ident,
        flags_frag,
        64,
        proto,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    ) + options
    csum = _checksum(header)
    return header[:10] + struct.pack("!H", csum) + header[12:] + payload


def ipv6_packet(src: str, dst: str, payload: bytes, next_header: int = 6) -> bytes:
    header = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        len(payload),
        next_header,
        64,
        socket.inet_pton(socket.AF_INET6, src),
        socket.inet_pton(socket.AF_INET6, dst),
    )
    return header + payload


def ipv6_dest_options(next_header: int, length_units: int = 0) -> bytes:
    """A Destination Options header of (length_units+1)*8 bytes, padded with PadN."""
    size = (length_units + 1) * 8
    pad = size - 2
    body = struct.pack("!BB", 1, pad - 2) + b"\0" * (pad - 2)  # PadN option
    return struct.pack("!BB", next_header, length_units) + body


def ipv6_fragment_header(next_header: int, offset: int, more: bool, ident: int = 0x1234) -> bytes:
    return struct.pack("!BBHI", next_header, 0, (offset // 8) << 3 | (1 if more else 0), ident)


def ethernet(dst: str, src: str, ethertype: int, payload: bytes, tags: Iterable[Tuple[int, int]] = ()) -> bytes:
    """TAGS: (tag protocol id, VLAN id) from outermost to innermost."""
    frame = mac_bytes(dst) + mac_bytes(src)
    for tpid, vid in tags:
        frame += struct.pack("!HH", tpid, vid & 0x0FFF)
    frame += struct.pack("!H", ethertype) + payload
    if len(frame) < 60:
        frame += b"\0" * (60 - len(frame))
    return frame


def pppoe_session(ppp_protocol: int, payload: bytes, session: int = 0x0001) -> bytes:
    return struct.pack("!BBHHH", 0x11, 0x00, session, len(payload) + 2, ppp_protocol) + payload


def tcp4_frame(
    src_mac: str, dst_mac: str, src: str, dst: str, dport: int, marker: bytes, tags: Iterable[Tuple[int, int]] = (),
    options: bytes = b"",
) -> bytes:
    seg = tcp_segment(socket.inet_aton(src), socket.inet_aton(dst), 40000, dport, marker)
    return ethernet(dst_mac, src_mac, ETH_P_IP, ipv4_packet(src, dst, seg, options=options), tags)


def loose_source_route(via: str) -> bytes:
    """An IPv4 Loose Source Route option through VIA, padded to a whole word: a packet to a
    relay with this option would be forwarded on by a host that honours source routes."""
    return struct.pack("!BBB", 0x83, 7, 4) + socket.inet_aton(via) + b"\x00"


def ipv6_tcp_first_fragment(
    src_mac: str, dst_mac: str, src: str, dst: str, dport: int, marker: bytes, tags: Iterable[Tuple[int, int]] = ()
) -> bytes:
    """The first fragment of an IPv6 TCP segment to DPORT: its header and the marker."""
    s, d = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    seg = tcp_segment(s, d, 40000, dport, marker * 2)[:40]
    payload = ipv6_fragment_header(IPPROTO_TCP, 0, True) + seg + marker
    return ethernet(dst_mac, src_mac, ETH_P_IPV6, ipv6_packet(src, dst, payload, next_header=IPPROTO_FRAGMENT), tags)


def tcp6_frame(
    src_mac: str, dst_mac: str, src: str, dst: str, dport: int, marker: bytes, tags: Iterable[Tuple[int, int]] = ()
) -> bytes:
    s = socket.inet_pton(socket.AF_INET6, src)
    d = socket.inet_pton(socket.AF_INET6, dst)
    seg = tcp_segment(s, d, 40000, dport, marker)
    return ethernet(dst_mac, src_mac, ETH_P_IPV6, ipv6_packet(src, dst, seg), tags)


def pppoe_tcp4_frame(src_mac: str, dst_mac: str, src: str, dst: str, dport: int, marker: bytes) -> bytes:
    """IPv4 TCP inside a PPPoE session frame: an IP rule that reads only ether type IP never sees it."""
    seg = tcp_segment(socket.inet_aton(src), socket.inet_aton(dst), 40000, dport, marker)
    return ethernet(dst_mac, src_mac, ETH_P_PPPOE_SESSION, pppoe_session(PPP_IP, ipv4_packet(src, dst, seg)))


def ipv6_split_chain_first_fragment(src_mac: str, dst_mac: str, src: str, dst: str, marker: bytes) -> bytes:
    """The first fragment of an IPv6 datagram whose Destination Options header (40 bytes) goes
    on into the next fragment, so the TCP header after it, and its port, are in no first
    fragment at all: `meta l4proto` cannot be read (verified, DESIGN §1).  MARKER (16 bytes)
    fills the options' padding, keeping the fragment's data a multiple of 8 bytes."""
    if len(marker) != 16:
        raise ValueError("the marker must be 16 bytes")
    chain = ipv6_dest_options(IPPROTO_TCP, 4)[:16] + marker
    payload = ipv6_fragment_header(IPPROTO_DSTOPTS, 0, True) + chain
    return ethernet(dst_mac, src_mac, ETH_P_IPV6, ipv6_packet(src, dst, payload, next_header=IPPROTO_FRAGMENT))
