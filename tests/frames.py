"""Hand-built Ethernet frames: 802.1Q/802.1ad tags, PPPoE, IPv4 with options and fragments,
IPv6 with extension headers and fragments, TCP.

The kernel here has no 8021q module, so tagged frames are written byte by byte and sent
through an AF_PACKET socket; the bridge sees exactly what a guest would send.
"""

import socket
import struct
from typing import Iterable, List, Optional, Tuple

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_ARP = 0x0806
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
ETH_P_PPPOE_SESSION = 0x8864
PPP_IP = 0x0021
PPP_IPV6 = 0x0057


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
    assert len(options) % 4 == 0
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
    src_mac: str, dst_mac: str, src: str, dst: str, dport: int, marker: bytes, tags: Iterable[Tuple[int, int]] = ()
) -> bytes:
    seg = tcp_segment(socket.inet_aton(src), socket.inet_aton(dst), 40000, dport, marker)
    return ethernet(dst_mac, src_mac, ETH_P_IP, ipv4_packet(src, dst, seg), tags)


def tcp6_frame(
    src_mac: str, dst_mac: str, src: str, dst: str, dport: int, marker: bytes, tags: Iterable[Tuple[int, int]] = ()
) -> bytes:
    s = socket.inet_pton(socket.AF_INET6, src)
    d = socket.inet_pton(socket.AF_INET6, dst)
    seg = tcp_segment(s, d, 40000, dport, marker)
    return ethernet(dst_mac, src_mac, ETH_P_IPV6, ipv6_packet(src, dst, seg), tags)


def raw_socket(bind_to: Optional[str] = None) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    if bind_to:
        sock.bind((bind_to, 0))
    return sock


def frames_with(frames: List[bytes], marker: bytes) -> List[bytes]:
    return [f for f in frames if marker in f]
