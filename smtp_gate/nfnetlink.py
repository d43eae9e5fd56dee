"""Set element changes over netlink, from the standard library alone.

Why not `nft` for these: a hook runs at every guest start and stop, and each `nft` call
costs a process spawn, and, for any `iface_index` value, a dump of every network link of
the host first (nft 1.0.6 resolves the value through its interface cache: ~13 µs per
link, +40 ms with 3 000 links; JSON input too).  Here the kernel gets the key bytes
nft would have built, in ONE nfnetlink batch (BATCH_BEGIN, NEWSETELEM/DELSETELEM...,
BATCH_END): it commits the batch whole or not at all.  Every change asks for an ACK,
and every ACK is read, so a refusal names the change the kernel refused.

Only os, struct, errno and socket's C core are imported: import time is most of a hook's
cost, and socket.py itself adds ~3 ms (its IntEnum tables, selectors) for nothing we use.
Each call opens its own socket, in the network namespace of the calling thread, and
closes it.  A signal during a send or receive is retried by Python itself (PEP 475).
"""

import errno
import os
import struct
from typing import List, NamedTuple, Optional, Sequence, Tuple

try:
    import _socket as socket  # the C module socket.py wraps: same socket type, constants, timeout
except ImportError:  # an interpreter that has no _socket
    import socket  # type: ignore[no-redef]

from smtp_gate.errors import NftError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNETLINK_V0 = 0
NFNL_MSG_BATCH_BEGIN = 0x10  # NLMSG_MIN_TYPE
NFNL_MSG_BATCH_END = 0x11
NFT_MSG_GETCHAIN = 4
NFT_MSG_NEWSETELEM = 12
NFT_MSG_GETSETELEM = 13
NFT_MSG_DELSETELEM = 14

NFPROTO_BRIDGE = 7
FAMILY_NAMES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100  # in an error reply: the request's payload is not echoed
NLM_F_ACK_TLVS = 0x200  # in an error reply: extended-ACK attributes follow
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
NLMSGERR_ATTR_MSG = 1
NLMSGERR_ATTR_OFFS = 2
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
# asm-generic values (x86, arm, arm64, riscv, s390, powerpc); needed only for huge batches
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33

NFTA_CHAIN_TABLE = 1
NFTA_CHAIN_NAME = 3
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_FLAGS = 3
NFT_SET_ELEM_INTERVAL_END = 1
NFTA_DATA_VALUE = 1

IFNAMSIZ = 16
NFT_DATA_VALUE_MAXLEN = 64
NFT_NAME_MAXLEN = 256

_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr: len, type, flags, seq, portid
_ATTR = struct.Struct("=HH")  # struct nlattr: len, type
_DEFAULT_BUFFER = 200 * 1024  # below the usual 212 992-byte socket buffers
_ACK_TRUESIZE = 1024  # generous kernel memory per queued ACK (an skb), for the receive buffer
_DUMP_RETRIES = 5

Change = Tuple[str, bytes]  # (set name, key bytes)


class NetlinkError(NftError):
    """The kernel refused (or never answered) a netlink request.  ERRNO is the kernel's errno
    (0 when unknown); ENOENT from a batch means our table or one of its sets does not exist.
    REFUSED: the request itself was refused (by the kernel's answer, or as malformed before
    it was sent), so `nft` would be refused too; otherwise netlink failed us (no socket, a
    send error, no answer in time, lost or unreadable answers) and `nft` may still work."""

    def __init__(self, message: str, errno_value: int = 0, refused: bool = False) -> None:
        super().__init__(message)
        self.errno = errno_value
        self.refused = refused

    @property
    def missing(self) -> bool:
        return self.errno == errno.ENOENT


# -- keys -----------------------------------------------------------------------------------


def ifname_key(name: str) -> bytes:
    """A `type ifname` key as nft stores it: the name's bytes, NUL-padded to IFNAMSIZ (16)."""
    raw = name.encode("utf-8") if isinstance(name, str) else b""
    if not 0 < len(raw) < IFNAMSIZ or b"\0" in raw:
        raise ValueError(f"bad interface name {name!r}: expected 1-15 bytes without NUL")
    return raw.ljust(IFNAMSIZ, b"\0")


def index_key(ifindex: int) -> bytes:
    """A `type iface_index` key as nft stores it: the index in host byte order, 4 bytes."""
    if not isinstance(ifindex, int) or isinstance(ifindex, bool) or not 0 < ifindex < 2**32:
        raise ValueError(f"bad interface index {ifindex!r}: expected a positive 32-bit integer")
    return struct.pack("=I", ifindex)


def pair_key(ifindex: int, mac: str) -> bytes:
    """A `type iface_index . ether_addr` key as nft lays it out: each part of a concatenation
    padded to a 4-byte multiple, so the index in host byte order (4 bytes), then the 6 MAC
    bytes and 2 bytes of zero padding: 12 bytes."""
    if not isinstance(ifindex, int) or isinstance(ifindex, bool) or not 0 < ifindex < 2**32:
        raise ValueError(f"bad interface index {ifindex!r}: expected a positive 32-bit integer")
    try:
        raw = bytes.fromhex(mac.replace(":", "")) if isinstance(mac, str) and mac.count(":") == 5 else b""
    except ValueError:
        raw = b""
    if len(raw) != 6:
        raise ValueError(f"bad MAC address {mac!r}: expected six hex bytes, e.g. 52:54:00:ab:cd:ef")
    return struct.pack("=I", ifindex) + raw + b"\0\0"


def describe_key(key: bytes) -> str:
    """KEY in nft's words, for messages: a quoted name, `index . mac`, or hex."""
    if len(key) == IFNAMSIZ and key.endswith(b"\0"):
        name = key.rstrip(b"\0")
        if name and b"\0" not in name:
            return '"' + name.decode("utf-8", "replace") + '"'
    if len(key) == 4:
        return str(struct.unpack("=I", key)[0])
    if len(key) == 12 and key[10:] == b"\0\0":
        (index,) = struct.unpack("=I", key[:4])
        return f"{index} . " + ":".join(f"{b:02x}" for b in key[4:10])
    return "0x" + key.hex()


# -- message building -------------------------------------------------------------------------


def _attr(kind: int, payload: bytes) -> bytes:
    length = _ATTR.size + len(payload)
    return _ATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def _name_attr(kind: int, name: str, what: str) -> bytes:
    raw = name.encode("utf-8") if isinstance(name, str) else b""
    if not 0 < len(raw) < NFT_NAME_MAXLEN or b"\0" in raw:
        raise ValueError(f"bad {what} name {name!r}")
    return _attr(kind, raw + b"\0")


def _message(msg_type: int, flags: int, seq: int, family: int, payload: bytes, res_id: int = 0) -> bytes:
    """nlmsghdr + nfgenmsg (family, version, big-endian resource id) + PAYLOAD."""
    body = struct.pack("=BB", family, NFNETLINK_V0) + struct.pack("!H", res_id) + payload
    return _HEADER.pack(_HEADER.size + len(body), msg_type, flags, seq, 0) + body


def _element_list(key: bytes) -> bytes:
    if not 0 < len(key) <= NFT_DATA_VALUE_MAXLEN:
        raise ValueError(f"bad set element key of {len(key)} bytes")
    key_attr = _attr(NFTA_SET_ELEM_KEY | NLA_F_NESTED, _attr(NFTA_DATA_VALUE, key))
    return _attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, _attr(NFTA_LIST_ELEM | NLA_F_NESTED, key_attr))


class _Op:
    """One element change of a batch: what it is (for messages) and where its attributes sit
    (so that an extended ACK's offset can name the table, the set or the element)."""

    __slots__ = ("verb", "set_name", "key", "table_end", "set_end")

    def __init__(self, verb: str, set_name: str, key: bytes, table_len: int, set_len: int) -> None:
        self.verb, self.set_name, self.key = verb, set_name, key
        self.table_end = _HEADER.size + 4 + table_len
        self.set_end = self.table_end + set_len


def _build_batch(
    add: Sequence[Change], delete: Sequence[Change], table: str, family: int
) -> Tuple[bytes, List[_Op]]:
    """The batch datagram and, per sequence number - 2 (1 is BATCH_BEGIN), its change.

    A delete of an element that may be absent is an add then a delete of the same key,
    both in this batch: one atomic no-op or removal (DELSETELEM of an absent key is
    ENOENT, and NFT_MSG_DESTROYSETELEM exists only from Linux 6.3)."""
    table_attr = _name_attr(NFTA_SET_ELEM_LIST_TABLE, table, "table")
    steps = [(NFT_MSG_NEWSETELEM, "add", s, k) for s, k in add]
    for set_name, key in delete:
        steps.append((NFT_MSG_NEWSETELEM, "add", set_name, key))
        steps.append((NFT_MSG_DELSETELEM, "delete", set_name, key))
    parts = [_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 1, 0, b"", res_id=NFNL_SUBSYS_NFTABLES)]
    ops: List[_Op] = []
    for number, (msg, verb, set_name, key) in enumerate(steps):
        set_attr = _name_attr(NFTA_SET_ELEM_LIST_SET, set_name, "set")
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if msg == NFT_MSG_NEWSETELEM else 0)
        payload = table_attr + set_attr + _element_list(key)
        parts.append(_message((NFNL_SUBSYS_NFTABLES << 8) | msg, flags, number + 2, family, payload))
        ops.append(_Op(verb, set_name, key, len(table_attr), len(set_attr)))
    parts.append(_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, len(steps) + 2, 0, b"", res_id=NFNL_SUBSYS_NFTABLES))
    return b"".join(parts), ops


# -- socket and replies ---------------------------------------------------------------------


def _open(timeout: float, send_size: int, replies: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        # error replies without the echoed request, and with the kernel's pointer to the bad
        # attribute; both optional (Linux 4.3 and 4.12): the replies are parsed either way
        for option in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
            try:
                sock.setsockopt(SOL_NETLINK, option, 1)
            except OSError:
                pass
        if send_size > _DEFAULT_BUFFER:  # netlink refuses a datagram larger than the send buffer
            _grow(sock, socket.SO_SNDBUF, SO_SNDBUFFORCE, send_size + 4096)
        if replies * _ACK_TRUESIZE > _DEFAULT_BUFFER:  # a full receive queue drops ACKs (ENOBUFS)
            _grow(sock, socket.SO_RCVBUF, SO_RCVBUFFORCE, replies * _ACK_TRUESIZE + 65536)
        sock.bind((0, 0))
        sock.settimeout(timeout)
    except OSError:
        sock.close()
        raise
    return sock


def _grow(sock: socket.socket, option: int, force_option: int, size: int) -> None:
    """Raise a socket buffer past net.core.[rw]mem_max if we may (CAP_NET_ADMIN), else as far as allowed."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_option, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, option, size)


def _receive(sock: socket.socket) -> bytes:
    """One datagram, whole: a truncated one is an error, never a short read taken for all."""
    data, _ancillary, flags, _address = sock.recvmsg(65536)
    if flags & socket.MSG_TRUNC:
        raise NetlinkError("a netlink reply did not fit in 64 KiB and was truncated")
    return data


def _messages(data: bytes) -> List[Tuple[int, int, int, bytes]]:
    """(type, flags, seq, payload) of every netlink message in one datagram."""
    out = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, msg_type, flags, seq, _portid = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > len(data):
            raise NetlinkError(f"malformed netlink reply (message length {length} at offset {offset})")
        out.append((msg_type, flags, seq, data[offset + _HEADER.size : offset + length]))
        offset += (length + 3) & ~3
    return out


def _attrs(data: bytes) -> List[Tuple[int, bytes]]:
    out = []
    offset = 0
    while offset + _ATTR.size <= len(data):
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size or offset + length > len(data):
            break
        out.append((kind & NLA_TYPE_MASK, data[offset + _ATTR.size : offset + length]))
        offset += (length + 3) & ~3
    return out


def _error_reply(flags: int, payload: bytes) -> Tuple[int, str, Optional[int]]:
    """(errno, the kernel's own message or "", offset of the bad attribute or None) of an
    NLMSG_ERROR; errno 0 is an ACK."""
    if len(payload) < 4:
        raise NetlinkError("malformed netlink error reply")
    (code,) = struct.unpack_from("=i", payload)
    text, offset = "", None
    if code and flags & NLM_F_ACK_TLVS and len(payload) >= 4 + _HEADER.size:
        start = 4 + _HEADER.size
        if not flags & NLM_F_CAPPED:
            (echoed,) = struct.unpack_from("=I", payload, 4)
            start = 4 + ((echoed + 3) & ~3)
        for kind, value in _attrs(payload[start:]):
            if kind == NLMSGERR_ATTR_MSG:
                text = value.rstrip(b"\0").decode("utf-8", "replace")
            elif kind == NLMSGERR_ATTR_OFFS and len(value) >= 4:
                (offset,) = struct.unpack_from("=I", value)
    return -code, text, offset


def _errno_text(code: int) -> str:
    name = errno.errorcode.get(code)
    return f"{os.strerror(code)} ({name})" if name else os.strerror(code)


# -- requests -------------------------------------------------------------------------------


def apply_elements(
    add: Sequence[Change] = (),
    delete: Sequence[Change] = (),
    table: str = "smtp_gate",
    family: int = NFPROTO_BRIDGE,
    timeout: float = 10.0,
) -> None:
    """Add ADD's elements and remove DELETE's (present or not) in one atomic batch.

    Each change is (set name, key bytes: ifname_key() or pair_key()).  Adding an element
    already present changes nothing (NLM_F_CREATE without NLM_F_EXCL, as `nft add element`).
    Raises NetlinkError (an NftError) with one line; when the kernel refused, nothing was
    changed; `.missing` says the table or a set does not exist.
    """
    if not add and not delete:
        return
    try:
        data, ops = _build_batch(add, delete, table, family)
    except ValueError as exc:
        raise NetlinkError(f"element changes not sent, nothing was changed: {exc}", refused=True) from None
    where = f"{FAMILY_NAMES.get(family, str(family))} {table}"
    try:
        sock = _open(timeout, len(data), len(ops))
    except OSError as exc:
        raise NetlinkError(f"cannot open a netlink socket to nftables: {exc}", exc.errno or 0) from None
    try:
        try:
            sent = sock.sendto(data, (0, 0))
        except OSError as exc:
            raise NetlinkError(
                f"cannot send the element changes to nftables, nothing was changed: {exc}", exc.errno or 0
            ) from None
        if sent != len(data):
            raise NetlinkError(f"netlink took {sent} of {len(data)} bytes, nothing was changed")
        _read_acks(sock, ops, where, timeout)
    finally:
        sock.close()


def _read_acks(sock: socket.socket, ops: List[_Op], where: str, timeout: float) -> None:
    """Read one ACK per change.  The kernel reports a commit failure (on BATCH_BEGIN) before
    the per-change ACKs, and any error aborts the whole batch: the first error is the answer."""
    pending = set(range(2, len(ops) + 2))
    while pending:
        try:
            data = _receive(sock)
        except socket.timeout:
            raise NetlinkError(
                f"nftables did not answer within {timeout:g}s; the batch was applied entirely or not at all"
            ) from None
        except OSError as exc:  # ENOBUFS: replies were dropped
            raise NetlinkError(
                f"lost nftables' answers to the element changes ({exc}); "
                "the batch was applied entirely or not at all",
                exc.errno or 0,
            ) from None
        for msg_type, flags, seq, payload in _messages(data):
            if msg_type != NLMSG_ERROR:
                continue
            code, text, offset = _error_reply(flags, payload)
            if code == 0:
                pending.discard(seq)
                continue
            detail = f" ({text})" if text else ""
            if 2 <= seq < len(ops) + 2:
                op = ops[seq - 2]
                subject = f"{op.verb} element {where} {op.set_name} {{ {describe_key(op.key)} }}"
                if offset is not None and offset < op.set_end:
                    detail += f", in the {'table name' if offset < op.table_end else 'set name'}"
                raise NetlinkError(
                    f"nftables refused the element changes, nothing was changed: {subject}: "
                    f"{_errno_text(code)}{detail}",
                    code,
                    refused=True,
                )
            raise NetlinkError(
                f"nftables refused the batch of element changes for {where}, nothing was changed: "
                f"{_errno_text(code)}{detail}",
                code,
                refused=True,
            )


def list_elements(
    set_name: str, table: str = "smtp_gate", family: int = NFPROTO_BRIDGE, timeout: float = 10.0
) -> List[bytes]:
    """The keys of every element of a set, as the kernel holds them (a GETSETELEM dump;
    restarted if a change interrupted it)."""
    keys: List[bytes] = []
    for elem in list_raw_elements(set_name, table, family, timeout):
        for attr_kind, attr in _attrs(elem):
            if attr_kind == NFTA_SET_ELEM_KEY:
                keys += [data for data_kind, data in _attrs(attr) if data_kind == NFTA_DATA_VALUE]
    return keys


def list_raw_elements(
    set_name: str, table: str = "smtp_gate", family: int = NFPROTO_BRIDGE, timeout: float = 10.0
) -> List[bytes]:
    """Every element of a set as the kernel sends it: all its attributes (key, interval end,
    flags...), unparsed.  For comparing a set with itself at another time, e.g. an interval
    set, whose layout in the kernel is nft's business."""
    payload = _name_attr(NFTA_SET_ELEM_LIST_TABLE, table, "table") + _name_attr(NFTA_SET_ELEM_LIST_SET, set_name, "set")
    where = f"set {FAMILY_NAMES.get(family, str(family))} {table} {set_name}"
    return [
        elem
        for message in dump(NFT_MSG_GETSETELEM, payload, where, family, timeout)
        for kind, value in _attrs(message)
        if kind == NFTA_SET_ELEM_LIST_ELEMENTS
        for _elem_kind, elem in _attrs(value)
    ]


def interval_sentinel(element: bytes) -> bool:
    """Whether ELEMENT (as list_raw_elements() gives it) is the end-of-interval mark at key 0
    that nft puts into an interval set it fills while the set already exists, and not when
    the same batch creates it (nft 1.0.6, measured): no value lies below 0, so it holds
    nothing, and the same set reads back with or without it depending on its history."""
    attrs = dict(_attrs(element))
    if set(attrs) != {NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_FLAGS} or len(attrs[NFTA_SET_ELEM_FLAGS]) != 4:
        return False
    key = [data for kind, data in _attrs(attrs[NFTA_SET_ELEM_KEY]) if kind == NFTA_DATA_VALUE]
    flags = struct.unpack("!I", attrs[NFTA_SET_ELEM_FLAGS])[0]
    return len(key) == 1 and not any(key[0]) and flags == NFT_SET_ELEM_INTERVAL_END


NFT_MSG_GETRULE = 7
NFT_MSG_GETOBJ = 19


def dump(
    get_type: int, payload: bytes, what: str, family: int = NFPROTO_BRIDGE, timeout: float = 10.0
) -> List[bytes]:
    """The attributes (after the nfgenmsg header) of each object a GET dump of GET_TYPE
    (NFT_MSG_GETRULE, NFT_MSG_GETOBJ...) returns, filtered by PAYLOAD's attributes (the
    table, the chain, the object type); restarted if a change interrupted it.  For reading
    rules and named counters without `nft`, whose listing (nft 1.0.6) loads every element of
    every set first: seconds for a full attempts set.  WHAT names the listing in errors."""
    reply_type = get_type - 1  # nf_tables numbers each NEW* message just before its GET*
    for _attempt in range(_DUMP_RETRIES):
        try:
            sock = _open(timeout, 0, 0)
        except OSError as exc:
            raise NetlinkError(f"cannot open a netlink socket to nftables: {exc}", exc.errno or 0) from None
        try:
            sock.sendto(_message((NFNL_SUBSYS_NFTABLES << 8) | get_type, NLM_F_REQUEST | NLM_F_DUMP, 1, family, payload),
                        (0, 0))
            objects = _read_objects(sock, what, reply_type)
        except socket.timeout:
            raise NetlinkError(f"nftables did not answer a listing of {what} within {timeout:g}s") from None
        except OSError as exc:
            raise NetlinkError(f"cannot list {what}: {exc}", exc.errno or 0) from None
        finally:
            sock.close()
        if objects is not None:
            return objects
    raise NetlinkError(f"the listing of {what} was interrupted by changes {_DUMP_RETRIES} times")


def _read_objects(sock: socket.socket, where: str, reply_type: int) -> Optional[List[bytes]]:
    """Each REPLY_TYPE message's attributes from a multi-part dump, or None when the kernel
    flagged it inconsistent."""
    objects: List[bytes] = []
    interrupted = False
    while True:
        for msg_type, flags, _seq, payload in _messages(_receive(sock)):
            interrupted = interrupted or bool(flags & NLM_F_DUMP_INTR)
            if msg_type == NLMSG_ERROR or msg_type == NLMSG_DONE:
                code = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
                if code:
                    raise NetlinkError(f"cannot list {where}: {_errno_text(code)}", code, refused=True)
                if msg_type == NLMSG_DONE:
                    return None if interrupted else objects
                continue
            if msg_type & 0xFF == reply_type:
                objects.append(payload[4:])


# -- lookups of exactly what a hook needs (no dump) -------------------------------------------


def _ask_each(requests: Sequence[Tuple[int, bytes]], family: int, timeout: float, what: str) -> List[int]:
    """Send one non-dump GET request per (message type, payload), all in one datagram, each
    asking for an ACK; return each one's errno (0: found).  The kernel answers every request
    of the datagram within our sendto(), so this waits only if answers were lost."""
    data = b"".join(
        _message((NFNL_SUBSYS_NFTABLES << 8) | msg, NLM_F_REQUEST | NLM_F_ACK, seq, family, payload)
        for seq, (msg, payload) in enumerate(requests, start=1)
    )
    try:
        sock = _open(timeout, len(data), 2 * len(requests))  # a reply and an ACK each
    except OSError as exc:
        raise NetlinkError(f"cannot open a netlink socket to nftables: {exc}", exc.errno or 0) from None
    codes: List[Optional[int]] = [None] * len(requests)
    try:
        try:
            sent = sock.sendto(data, (0, 0))
            if sent != len(data):
                raise NetlinkError(f"netlink took {sent} of {len(data)} bytes of {what}")
            while None in codes:
                for msg_type, flags, seq, payload in _messages(_receive(sock)):
                    if msg_type == NLMSG_ERROR and 1 <= seq <= len(requests):
                        codes[seq - 1] = _error_reply(flags, payload)[0]
                        if codes[seq - 1] == errno.EPERM:
                            # a sender without CAP_NET_ADMIN gets ONE refusal for the whole
                            # datagram (nfnetlink_rcv acks its first message only): final
                            raise NetlinkError(f"cannot ask nftables for {what}: {_errno_text(errno.EPERM)}",
                                               errno.EPERM, refused=True)
        except socket.timeout:
            raise NetlinkError(f"nftables did not answer {what} within {timeout:g}s") from None
        except OSError as exc:
            raise NetlinkError(f"cannot ask nftables for {what}: {exc}", exc.errno or 0) from None
    finally:
        sock.close()
    return [code or 0 for code in codes]


def chains_exist(
    chains: Sequence[str], table: str = "smtp_gate", family: int = NFPROTO_BRIDGE, timeout: float = 10.0
) -> bool:
    """Whether TABLE exists with every chain of CHAINS: one GETCHAIN per chain, no process and
    no listing (a missing table or chain is ENOENT).  Raises NetlinkError for any other answer."""
    table_attr = _name_attr(NFTA_CHAIN_TABLE, table, "table")
    requests = [(NFT_MSG_GETCHAIN, table_attr + _name_attr(NFTA_CHAIN_NAME, chain, "chain")) for chain in chains]
    where = f"{FAMILY_NAMES.get(family, str(family))} {table}"
    codes = _ask_each(requests, family, timeout, f"the chains of {where}")
    for chain, code in zip(chains, codes):
        if code not in (0, errno.ENOENT):
            raise NetlinkError(f"cannot look up chain {where} {chain}: {_errno_text(code)}", code, refused=True)
    return all(code == 0 for code in codes)


def missing_elements(
    elements: Sequence[Change], table: str = "smtp_gate", family: int = NFPROTO_BRIDGE, timeout: float = 10.0
) -> List[Change]:
    """The (set name, key) of ELEMENTS the kernel does not hold: one non-dump GETSETELEM per
    element, so the cost follows the guest's few elements, not the set's size.  A missing
    table or set means every element of it is missing.  Raises NetlinkError for any other
    answer (EOPNOTSUPP from a kernel before 4.20, which cannot look one element up)."""
    if not elements:
        return []
    table_attr = _name_attr(NFTA_SET_ELEM_LIST_TABLE, table, "table")
    try:
        requests = [
            (NFT_MSG_GETSETELEM, table_attr + _name_attr(NFTA_SET_ELEM_LIST_SET, set_name, "set") + _element_list(key))
            for set_name, key in elements
        ]
    except ValueError as exc:
        raise NetlinkError(f"element lookup not sent: {exc}", refused=True) from None
    where = f"{FAMILY_NAMES.get(family, str(family))} {table}"
    codes = _ask_each(requests, family, timeout, f"{len(requests)} elements of {where}")
    for (set_name, key), code in zip(elements, codes):
        if code not in (0, errno.ENOENT):
            raise NetlinkError(
                f"cannot look up element {where} {set_name} {{ {describe_key(key)} }}: {_errno_text(code)}",
                code,
                refused=True,
            )
    return [element for element, code in zip(elements, codes) if code == errno.ENOENT]


# -- events ---------------------------------------------------------------------------------
#
# nf_tables announces every committed change to the multicast group NFNLGRP_NFTABLES: one
# message per object added or deleted (NEWTABLE, DELRULE, NEWSETELEM...), then NEWGEN for the
# transaction as a whole.  Each object's first attribute (NFTA_TABLE_NAME, NFTA_CHAIN_TABLE,
# NFTA_RULE_TABLE, NFTA_SET_TABLE, NFTA_SET_ELEM_LIST_TABLE, NFTA_OBJ_TABLE,
# NFTA_FLOWTABLE_TABLE) is the table's name, so one decoder serves them all.  A listener
# that falls behind loses messages and is told so once, by ENOBUFS on its next read.

NFNLGRP_NFTABLES = 7
NETLINK_ADD_MEMBERSHIP = 1
NFT_MSG_NEWTABLE = 0
NFT_MSG_DELTABLE = 2
NFT_MSG_NEWCHAIN = 3
NFT_MSG_DELCHAIN = 5
NFT_MSG_NEWRULE = 6
NFT_MSG_DELRULE = 8
NFT_MSG_NEWSET = 9
NFT_MSG_DELSET = 11
NFT_MSG_NEWGEN = 15
NFTA_TABLE_NAME = 1  # = NFTA_{CHAIN,RULE,SET,SET_ELEM_LIST,OBJ,FLOWTABLE}_TABLE
NFTA_GEN_ID = 1
_SETELEM_MESSAGES = (NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM, 30)  # 30: NFT_MSG_DESTROYSETELEM (6.3)
_EVENT_BUFFER = 8 * 1024 * 1024  # a burst of guest starts is thousands of element events


class Event(NamedTuple):
    """One nftables change as announced: what kind (NFT_MSG_*), in which family and table,
    which set for an element change, who sent the request (its netlink port id), and the
    generation for a NEWGEN."""

    msg: int
    family: int
    table: Optional[str] = None
    set_name: Optional[str] = None
    portid: int = 0
    generation: Optional[int] = None


def _text(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode("utf-8", "replace")


def parse_events(data: bytes) -> List[Event]:
    """The nftables events in one datagram from the multicast group; anything else is skipped."""
    events = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, msg_type, _flags, _seq, portid = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > len(data):
            break
        payload = data[offset + _HEADER.size : offset + length]
        offset += (length + 3) & ~3
        if msg_type >> 8 != NFNL_SUBSYS_NFTABLES or len(payload) < 4:
            continue
        msg, family = msg_type & 0xFF, payload[0]
        table = set_name = generation = None
        for kind, value in _attrs(payload[4:]):
            if msg == NFT_MSG_NEWGEN:
                if kind == NFTA_GEN_ID and len(value) >= 4:
                    (generation,) = struct.unpack_from("!I", value)
            elif kind == NFTA_TABLE_NAME:
                table = _text(value)
            elif kind == NFTA_SET_ELEM_LIST_SET and msg in _SETELEM_MESSAGES:
                set_name = _text(value)
        events.append(Event(msg, family, table, set_name, portid, generation))
    return events


def open_events(buffer: int = _EVENT_BUFFER) -> socket.socket:
    """A socket subscribed to every nftables change in this network namespace (blocking;
    read it with read_events())."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        _grow(sock, socket.SO_RCVBUF, SO_RCVBUFFORCE, buffer)
        sock.bind((0, 0))
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
    except OSError:
        sock.close()
        raise
    return sock


def read_events(sock: socket.socket) -> List[Event]:
    """The events of one datagram.  Raises OSError with errno ENOBUFS when the kernel dropped
    events because the socket's buffer was full: the caller must assume anything changed."""
    data = sock.recv(1 << 20)
    return parse_events(data)
