"""Validation and normal forms for every value that may reach an nft command.

Nothing from outside (configuration, domain XML, whitelist, sysfs) is pasted into
nft text unchecked: interface names, name patterns, MACs and ports pass through
here first and come out in one normal form.  Pure functions, no I/O.
"""

import re
from typing import Iterable, List, Tuple

from smtp_gate.errors import ValidationError

IFNAMSIZ = 16  # the kernel's limit includes the terminating NUL: names are at most 15 bytes

# Linux forbids '/', ':' and whitespace in names; we also refuse what nft could read
# as syntax inside a quoted string ('"', '\\') or as a wildcard ('*'), and anything
# that is not printable ASCII.  Every name libvirt, LXC, Xen, Docker or a distribution
# installer generates fits.
_IFNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+@-]{0,14}")
_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+@-]{0,13}\*")
_MAC_NORMAL = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
# Exactly two digits per byte and one separator throughout: a dropped or doubled digit
# ("52:54:00:ab:cd:e") must be an error, never another NIC's address ("...:0e").
_MAC_SEPARATED = re.compile(r"[0-9a-f]{2}([:-])[0-9a-f]{2}(?:\1[0-9a-f]{2}){4}")
_MAC_CISCO = re.compile(r"[0-9a-f]{4}\.[0-9a-f]{4}\.[0-9a-f]{4}")
MAC_SPELLINGS = "52:54:00:ab:cd:ef, 52-54-00-ab-cd-ef or 5254.00ab.cdef"
# Unicode category Cc (C0, DEL, C1: every line break but two) and the line and paragraph
# separators: str.splitlines() breaks at each, and a terminal obeys them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def ifname(value: str) -> str:
    """Return VALUE if it is a safe interface name, else raise ValidationError."""
    if not isinstance(value, str) or not _IFNAME.fullmatch(value) or value in (".", ".."):
        raise ValidationError(
            f"bad interface name {value!r}: expected 1-15 characters of letters, digits and . _ - + @"
        )
    if value.isdigit():
        # nft reads a bare number as an interface index: "12" would name another device
        raise ValidationError(f"bad interface name {value!r}: an all-digit name is ambiguous for nft")
    return value


def ifname_pattern(value: str) -> str:
    """Return VALUE if it is an exact interface name or a prefix ending in one '*'."""
    if isinstance(value, str) and value.endswith("*"):
        if _PATTERN.fullmatch(value):
            return value
        raise ValidationError(
            f"bad interface pattern {value!r}: expected a name prefix of 1-14 characters followed by one '*'"
        )
    return ifname(value)


def pattern_matches(pattern: str, name: str) -> bool:
    """True if NAME matches PATTERN the way an nft ifname set element does."""
    if pattern.endswith("*"):
        return name.startswith(pattern[:-1])
    return name == pattern


def mac(value: str) -> str:
    """Normalise a MAC to lower-case colon form.

    Accepts only the documented spellings, in any case: six two-digit hex bytes joined by
    ':' or by '-' (52:54:00:AB:CD:EF, 52-54-00-ab-cd-ef) and Cisco's 5254.00ab.cdef.
    Anything else (a missing digit, mixed separators, bare digits, spaces) is refused,
    so that a typo cannot become another NIC's address.
    """
    if isinstance(value, str) and _MAC_NORMAL.fullmatch(value):
        return value  # already the normal form: the common case, thousands of times per rebuild
    text = value.lower() if isinstance(value, str) else ""
    if _MAC_SEPARATED.fullmatch(text) or _MAC_CISCO.fullmatch(text):
        digits = text.replace(":", "").replace("-", "").replace(".", "")
    else:
        raise ValidationError(
            f"bad MAC address {value!r}: expected six hex bytes of two digits each, as {MAC_SPELLINGS}"
        )
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def one_line(what: str, value: str) -> str:
    """Return VALUE if it holds no control character or line break, else raise.

    Labels and reasons are shown one per line by `list` and `status`; a line break in
    one would forge or break the lines after it.
    """
    if not isinstance(value, str):
        raise ValidationError(f"bad {what} {value!r}: expected text")
    found = _CONTROL.search(value)
    if found:
        raise ValidationError(
            f"bad {what} {value!r}: expected one line of text without control characters "
            f"(found {found.group()!r} at position {found.start() + 1})"
        )
    return value


def escape_controls(value: str) -> str:
    """VALUE with each control character and line break written as a Python escape (\\n, \\x1b):
    for showing text read from a file, which may hold them, on one line of a terminal."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], value)


def unicast_mac(value: str) -> str:
    """Normalise VALUE and refuse the MACs no guest NIC can own (multicast, broadcast, zero)."""
    normal = mac(value)
    if normal == "00:00:00:00:00:00":
        raise ValidationError(f"bad MAC address {value!r}: the all-zero address belongs to no NIC")
    if normal == "ff:ff:ff:ff:ff:ff":
        raise ValidationError(f"bad MAC address {value!r}: that is the broadcast address, not a NIC")
    if int(normal[:2], 16) & 1:
        raise ValidationError(
            f"bad MAC address {value!r}: a multicast address (odd first byte) belongs to no NIC"
        )
    return normal


PortRange = Tuple[int, int]


def port_list(value: str) -> List[PortRange]:
    """Parse "25,465,2525-2530" into sorted, non-overlapping (first, last) ranges.

    Duplicates and overlaps are errors rather than silently merged: they are almost
    always a typo in a list an operator meant to read back.
    """
    items = [item.strip() for item in re.split(r"[,\s]+", value.strip()) if item.strip()]
    if not items:
        raise ValidationError(f"bad port list {value!r}: expected ports 1-65535 such as \"25,465\"")
    ranges: List[PortRange] = []
    for item in items:
        m = re.fullmatch(r"(\d{1,5})(?:-(\d{1,5}))?", item)
        if not m:
            raise ValidationError(
                f"bad port {item!r} in {value!r}: expected a number 1-65535 or a range like 2525-2530"
            )
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) else first
        for port in (first, last):
            if not 1 <= port <= 65535:
                raise ValidationError(f"bad port {port} in {value!r}: expected 1-65535")
        if last < first:
            raise ValidationError(f"bad port range {item!r} in {value!r}: the first port exceeds the last")
        ranges.append((first, last))
    ranges.sort()
    for (a_first, a_last), (b_first, b_last) in zip(ranges, ranges[1:]):
        if b_first <= a_last:
            shown = f"{b_first}" if b_first == b_last else f"{b_first}-{b_last}"
            raise ValidationError(f"duplicate port {shown} in {value!r}: each port may appear once")
    return ranges


def format_ports(ranges: Iterable[PortRange]) -> str:
    """The inverse of port_list: "25,465,2525-2530"."""
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


Relay = Tuple[int, str, PortRange]  # (4 or 6, address or prefix in normal form, port range)
ANY_PORT: PortRange = (1, 65535)
# A relay is the provider's smarthost(s): anything wider would open mail to a whole network
# (a /0 would switch blocking off for every guest, with no other sign of it).
WIDEST_RELAY = {4: 24, 6: 64}


def relay_destination(value: str) -> Relay:
    """Parse one ALLOWED_DESTINATIONS entry: an IPv4/IPv6 address or prefix, optionally with
    a port (`192.0.2.25`, `192.0.2.0/28:25`, `2001:db8::25`, `[2001:db8::/64]:587`).
    Without a port, every port.  Host bits set under a prefix are refused, not masked:
    `192.0.2.7/24` is almost always a typo for something narrower."""
    import ipaddress  # only configs that name relays pay for it (the hook loads the config)

    text = value.strip() if isinstance(value, str) else ""
    address, port = text, ""
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or (close + 1 < len(text) and text[close + 1] != ":"):
            raise ValidationError(f"bad destination {value!r}: expected [IPv6 address or prefix] or [..]:PORT")
        address, port = text[1:close], text[close + 2 :]
        if close + 1 < len(text) and not port:
            raise ValidationError(f"bad destination {value!r}: a port is missing after ':'")
    elif text.count(":") == 1:
        address, port = text.split(":")
        if not port:
            raise ValidationError(f"bad destination {value!r}: a port is missing after ':'")
    try:
        network = ipaddress.ip_network(address, strict=True)
    except ValueError as exc:
        raise ValidationError(
            f"bad destination {value!r}: expected an IPv4 or IPv6 address or prefix, optionally "
            f"with :PORT (IPv6 with a port in brackets, [2001:db8::25]:25): {exc}"
        ) from None
    widest = WIDEST_RELAY[network.version]
    if network.prefixlen < widest:
        raise ValidationError(
            f"destination {value!r} is wider than a /{widest}: a relay is your smarthost(s), "
            "not a network; name each relay's address or a narrow prefix"
        )
    ports = ANY_PORT
    if port:
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValidationError(f"bad port {port!r} in destination {value!r}: expected 1-65535")
        ports = (int(port), int(port))
    full = network.prefixlen == network.max_prefixlen
    return (network.version, str(network.network_address) if full else str(network), ports)


def relay_list(value: str) -> Tuple[Relay, ...]:
    """Parse a space- or comma-separated list of relays.  Overlapping entries (the same
    addresses and ports twice) are refused, as duplicate ports are: nft would refuse the
    set, and an operator means one of them."""
    import ipaddress

    relays: List[Relay] = []
    for item in re.split(r"[,\s]+", value.strip()):
        if not item:
            continue
        relay = relay_destination(item)
        for other in relays:
            same_family = other[0] == relay[0]
            if same_family and ipaddress.ip_network(other[1]).overlaps(ipaddress.ip_network(relay[1])):
                if other[2][0] <= relay[2][1] and relay[2][0] <= other[2][1]:
                    raise ValidationError(
                        f"destination {item!r} overlaps {format_relay(other)!r}: list each destination once"
                    )
        relays.append(relay)
    return tuple(relays)


def format_relay(relay: Relay) -> str:
    """The inverse of relay_destination, in the form it accepts."""
    family, network, ports = relay
    if ports == ANY_PORT:
        return network
    return f"[{network}]:{ports[0]}" if family == 6 else f"{network}:{ports[0]}"


_TIMEOUT = re.compile(r"[1-9][0-9]{0,5}[smhd]")


def timeout(value: str) -> str:
    """An nft timeout such as `1d` or `90s`."""
    if not isinstance(value, str) or not _TIMEOUT.fullmatch(value):
        raise ValidationError(f"bad timeout {value!r}: expected a number and s, m, h or d, e.g. 1d")
    return value
