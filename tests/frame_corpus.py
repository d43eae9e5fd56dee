"""Every frame case of the kernel suite as data: who sends it, to whom, and whether it must
arrive.  The kernel tests send each case untagged and with a single tag (VID 0 priority tag,
802.1Q, 802.1ad), and compare the verdicts with and without the fast path (docs/verdicts.md).
"""

import socket
import struct
from typing import Callable, List, NamedTuple, Optional, Tuple

from smtp_gate import frames, netlab
from smtp_gate.netlab import Guest

DSTOPTS, FRAG, TCP, UDP = 60, 44, 6, 17
TAGS = {
    "untagged": (),
    "VID 0": ((frames.ETH_P_8021Q, 0),),
    "802.1Q": ((frames.ETH_P_8021Q, 10),),
    "802.1ad": ((frames.ETH_P_8021AD, 10),),
}


class Case(NamedTuple):
    name: str
    sender: str  # a guest's name, or "inet"
    receiver: str  # a guest's name, or "inet"
    arrives: bool
    build: Callable[[Tuple[Tuple[int, int], ...], bytes], bytes]  # (tags, marker) -> frame


def _seg(src: str, dst: str, dport: int, payload: bytes) -> bytes:
    fam = socket.AF_INET6 if ":" in src else socket.AF_INET
    return frames.tcp_segment(socket.inet_pton(fam, src), socket.inet_pton(fam, dst), 40000, dport, payload)


def cases(src: Guest, dst_mac: str, dst4: str, dst6: str, sender: str, receiver: str) -> List[Case]:
    """The frames SRC sends toward (DST_MAC, DST4, DST6), each with the verdict an outbound
    frame from a guest that is not allowed must get."""

    def eth4(packet: bytes, tags, ethertype: int = frames.ETH_P_IP) -> bytes:
        return frames.ethernet(dst_mac, src.mac, ethertype, packet, tags)

    def eth6(packet: bytes, tags) -> bytes:
        return frames.ethernet(dst_mac, src.mac, frames.ETH_P_IPV6, packet, tags)

    def v4(dport: int, **kw) -> Callable:
        def build(tags, marker: bytes) -> bytes:
            seg = _seg(src.ip4, dst4, dport, marker * 2)
            return eth4(frames.ipv4_packet(src.ip4, dst4, seg, **kw), tags)

        return build

    def v4_first_fragment(dport: int, keep: int) -> Callable:
        def build(tags, marker: bytes) -> bytes:
            seg = _seg(src.ip4, dst4, dport, marker * 2)
            return eth4(frames.ipv4_packet(src.ip4, dst4, seg[:keep], more_fragments=True), tags)

        return build

    def v4_later_fragment(tags, marker: bytes) -> bytes:
        seg = _seg(src.ip4, dst4, 25, marker * 2)
        return eth4(frames.ipv4_packet(src.ip4, dst4, seg[24:], frag_offset=24), tags)

    def v4_udp(tags, marker: bytes) -> bytes:
        udp = struct.pack("!HHHH", 40000, 25, 8 + 32, 0) + marker * 2
        return eth4(frames.ipv4_packet(src.ip4, dst4, udp, proto=UDP), tags)

    def v6(payload: Callable[[bytes], bytes], first: int) -> Callable:
        def build(tags, marker: bytes) -> bytes:
            return eth6(frames.ipv6_packet(src.ip6, dst6, payload(marker), next_header=first), tags)

        return build

    def tcp6(dport: int) -> Callable[[bytes], bytes]:
        return lambda m: _seg(src.ip6, dst6, dport, m * 2)

    def chain_only_with_fake_tcp(tags, marker: bytes) -> bytes:
        # the marker rides in the options' PadN bytes; the fake TCP header trails the packet
        options = frames.ipv6_dest_options(TCP, 2)
        chain = frames.ipv6_fragment_header(DSTOPTS, 0, True) + options[:8] + marker
        fake = _seg(src.ip6, dst6, 80, b"")
        return eth6(frames.ipv6_packet(src.ip6, dst6, chain, next_header=FRAG) + fake, tags)

    def chain_into_a_trailer_naming_udp(tags, marker: bytes) -> bytes:
        # the packet ends after a Destination Options header that names another one; the
        # frame's trailer holds that one, naming UDP: nft reads UDP, while the receiver
        # takes the rest of the chain (on to TCP 25) from the next fragment
        options = frames.ipv6_dest_options(DSTOPTS, 2)
        chain = frames.ipv6_fragment_header(DSTOPTS, 0, True) + options[:8] + marker
        trailer = frames.ipv6_dest_options(UDP, 0) + struct.pack("!HHHH", 40000, 53, 8, 0)
        return eth6(frames.ipv6_packet(src.ip6, dst6, chain, next_header=FRAG) + trailer, tags)

    def split_chain(tags, marker: bytes) -> bytes:
        chain = frames.ipv6_dest_options(TCP, 4)[:16] + marker
        payload = frames.ipv6_fragment_header(DSTOPTS, 0, True) + chain
        return eth6(frames.ipv6_packet(src.ip6, dst6, payload, next_header=FRAG), tags)

    def pppoe(tags, marker: bytes) -> bytes:
        packet = frames.ipv4_packet(src.ip4, dst4, _seg(src.ip4, dst4, 80, marker))
        return eth4(frames.pppoe_session(frames.PPP_IP, packet), tags, frames.ETH_P_PPPOE_SESSION)

    def double_tag(tags, marker: bytes) -> bytes:  # QinQ: one tag more than the variant's, at least two
        packet = frames.ipv4_packet(src.ip4, dst4, _seg(src.ip4, dst4, 80, marker))
        outer = tuple(tags) or ((frames.ETH_P_8021AD, 30),)
        return frames.ethernet(dst_mac, src.mac, frames.ETH_P_IP, packet, outer + ((frames.ETH_P_8021Q, 20),))

    def arp(tags, marker: bytes) -> bytes:
        body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, frames.mac_bytes(src.mac), socket.inet_aton(src.ip4),
                           b"\0" * 6, socket.inet_aton(dst4))
        return frames.ethernet("ff:ff:ff:ff:ff:ff", src.mac, frames.ETH_P_ARP, body + marker, tags)

    nops = b"\x01\x01\x01\x00"
    table = [
        ("IPv4 TCP 25", False, v4(25)),
        ("IPv4 TCP 465", False, v4(465)),
        ("IPv4 TCP 80", True, v4(80)),
        ("IPv4 UDP 25", True, v4_udp),
        ("IPv4 TCP 25, IP options", False, v4(25, options=nops * 3)),
        ("IPv4 TCP 80, IP options", True, v4(80, options=nops)),
        ("IPv4 first fragment, TCP 25", False, v4_first_fragment(25, 40)),
        ("IPv4 first fragment, TCP 80", True, v4_first_fragment(80, 40)),
        ("IPv4 later fragment alone", True, v4_later_fragment),
        ("IPv6 TCP 25", False, v6(tcp6(25), TCP)),
        ("IPv6 TCP 80", True, v6(tcp6(80), TCP)),
        ("IPv6 UDP", True, v6(lambda m: struct.pack("!HHHH", 40000, 25, 8 + 32, 0) + m * 2, UDP)),
        ("IPv6 UDP to port 80", True, v6(lambda m: struct.pack("!HHHH", 40000, 80, 8 + 32, 0) + m * 2, UDP)),
        ("IPv6 no next header (59)", True, v6(lambda m: m * 2, 59)),
        ("IPv6 IPv4-in-IPv6 tunnel", True, v6(lambda m: frames.ipv4_packet("10.1.1.1", "10.2.2.2", m * 2, proto=17), 4)),
        ("IPv6 dest-opts, TCP 25", False, v6(lambda m: frames.ipv6_dest_options(TCP, 1) + tcp6(25)(m), DSTOPTS)),
        ("IPv6 dest-opts, TCP 80", True, v6(lambda m: frames.ipv6_dest_options(TCP, 1) + tcp6(80)(m), DSTOPTS)),
        ("IPv6 first fragment, TCP 25", False, v6(lambda m: frames.ipv6_fragment_header(TCP, 0, True) + tcp6(25)(m)[:40], FRAG)),
        ("IPv6 first fragment, TCP 80", False, v6(lambda m: frames.ipv6_fragment_header(TCP, 0, True) + tcp6(80)(m)[:40], FRAG)),
        ("IPv6 first fragment, split dest-opts chain", False, split_chain),
        ("IPv6 first fragment, chain ends at a fake TCP 80 beyond the packet", False, chain_only_with_fake_tcp),
        ("IPv6 first fragment, chain runs into a trailer that names UDP", False, chain_into_a_trailer_naming_udp),
        ("IPv6 first fragment of UDP", True, v6(lambda m: frames.ipv6_fragment_header(UDP, 0, True) + struct.pack("!HHHH", 40000, 53, 200, 0) + m * 2, FRAG)),
        ("IPv6 later fragment of TCP", False, v6(lambda m: frames.ipv6_fragment_header(TCP, 24, False) + m * 2, FRAG)),
        ("IPv6 later fragment of UDP", True, v6(lambda m: frames.ipv6_fragment_header(UDP, 24, False) + m * 2, FRAG)),
        ("PPPoE carrying IPv4 TCP 80", False, pppoe),
        ("double tag (QinQ), TCP 80", False, double_tag),
        ("ARP", True, arp),
    ]
    return [Case(name, sender, receiver, arrives, build) for name, arrives, build in table]


def run(
    cases_: List[Case], send: Callable[[str, str, bytes, bytes], bool], tags: Optional[List[str]] = None, workers: int = 8
) -> List[Tuple[str, str, bool, bool]]:
    """Send every case with every tag variant: (case, tag variant, expected, arrived).  Every
    frame carries its marker inside the packet, not in a trailer: a bridge with br_netfilter
    trims untagged IP frames to their IP length before our hooks see them."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(case, tag) for case in cases_ for tag in (tags or list(TAGS))]

    def one(job):  # type: ignore[no-untyped-def]
        case, tag = job
        marker = netlab.marker()
        frame = case.build(TAGS[tag], marker)
        assert marker in frame and len(frame) >= 60, case.name
        return (case.name, tag, case.arrives, send(case.sender, case.receiver, frame, marker))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, jobs))
