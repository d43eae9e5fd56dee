"""The one module that talks to nftables: the `nft` command, and netlink for element changes.

A batch is sent whole through `nft -f -`, which the kernel commits as one
transaction: it applies completely or not at all, and a failure is reported whole.
Reading goes through `nft -j` and comes back as plain data.  Element changes (a hook at
every guest start and stop, a whitelist command) go over netlink instead, as one batch
just as atomic (nfnetlink.py): no process to spawn, and no dump of every network link,
which nft does to resolve an interface index.  `subprocess` is imported only by the
functions that run nft, so the hook's common path never imports it; the hook's other
questions (is our table there? does the kernel hold these elements?) go over netlink too.
Every function that waits takes a timeout, so a hook can give it what is left of its budget.
"""

import json
import os
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from smtp_gate import nfnetlink
from smtp_gate.errors import NftError
from smtp_gate.ruleset import FAMILY, TABLE, Batch, Element, ElementChanges

if TYPE_CHECKING:
    import subprocess

FAMILY_NUMBER = nfnetlink.NFPROTO_BRIDGE  # FAMILY, "bridge", as netlink numbers it
# our base chains: a table without both (someone else's half-done work) is not enforcement
BASE_CHAINS = ("forward", "input")

# libvirt runs hooks with PATH=/usr/sbin:/usr/bin:/sbin:/bin; an operator's sudo may not have sbin.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])


def nft_binary() -> str:
    # not shutil.which: importing shutil costs every hook call a few milliseconds
    for directory in _SEARCH_PATH.split(os.pathsep):
        candidate = os.path.join(directory or ".", "nft")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise NftError("the nft command was not found: install the nftables package (apt-get install nftables)")


def _run(args: List[str], stdin: Optional[str] = None, timeout: float = 60.0) -> "subprocess.CompletedProcess[str]":
    import subprocess  # here, not at the top: importing it costs a hook a few milliseconds

    try:
        return subprocess.run(
            [nft_binary(), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise NftError(f"nft {' '.join(args)} did not finish within {timeout:g}s") from None
    except OSError as exc:
        raise NftError(f"cannot run nft: {exc}") from None


def run_batch(batch: Batch, check_only: bool = False, timeout: float = 60.0) -> None:
    """Commit BATCH atomically (or only validate it with the kernel when CHECK_ONLY)."""
    args = ["-c", "-f", "-"] if check_only else ["-f", "-"]
    result = _run(args, stdin=batch.text(), timeout=timeout)
    if result.returncode != 0:
        raise NftError(
            "nft refused the batch, nothing was changed: " + " | ".join(result.stderr.strip().splitlines()[:6])
        )


def run_elements(changes: ElementChanges, timeout: float = 10.0) -> None:
    """Commit element CHANGES atomically over netlink.  Raises NftError (nfnetlink.NetlinkError,
    whose `.missing` says our table or one of its sets does not exist); nothing is changed then."""
    add, delete = changes.keys()
    nfnetlink.apply_elements(add, delete, table=TABLE, family=FAMILY_NUMBER, timeout=timeout)


def missing_table_or_set(exc: Exception) -> bool:
    """Whether EXC is run_elements() finding no table or set to change (ENOENT)."""
    return isinstance(exc, nfnetlink.NetlinkError) and exc.missing


def netlink_failed(exc: Exception) -> bool:
    """Whether EXC is netlink failing us rather than the kernel refusing the request: no
    socket (an LSM or seccomp policy, no descriptors, no memory), a send error, no answer in
    time, answers lost or unreadable.  Then `nft` may still get through: the same change is
    worth retrying with it (element changes are idempotent: adds do not need the element
    absent, removals are an add and a delete).  A refusal by the kernel (EPERM without
    CAP_NET_ADMIN, ENOENT, EINVAL...) is not: nft would be refused the same."""
    return isinstance(exc, nfnetlink.NetlinkError) and not exc.refused


def base_exists(timeout: float = 10.0) -> bool:
    """table_exists() over netlink: one GETCHAIN per base chain, no process, no listing.
    Raises NftError (nfnetlink.NetlinkError; see netlink_failed())."""
    return nfnetlink.chains_exist(BASE_CHAINS, table=TABLE, family=FAMILY_NUMBER, timeout=timeout)


def missing_elements(elements: Sequence[Tuple[str, Element]], timeout: float = 10.0) -> List[Tuple[str, Element]]:
    """The (set, element) of ELEMENTS the kernel does not hold, each looked up by itself (not
    a dump of the sets).  ELEMENTS must be checked (ruleset.element_changes)."""
    keys, _none = ElementChanges(add=tuple(elements)).keys()
    missing = set(nfnetlink.missing_elements(keys, table=TABLE, family=FAMILY_NUMBER, timeout=timeout))
    return [element for element, key in zip(elements, keys) if key in missing]


def table_exists(timeout: float = 60.0) -> bool:
    """Whether our table exists, cheaply.  `nft list tables` fetches every set element
    (186 ms with 10 000 allowances, measured); `list chains` fetches none (5 ms)."""
    result = _run(["list", "chains", FAMILY], timeout=timeout)
    if result.returncode != 0:
        raise NftError(f"nft list chains failed: {result.stderr.strip()}")
    head = f"table {FAMILY} {TABLE} {{"
    start = result.stdout.find(head)
    if start < 0:
        return False
    end = result.stdout.find("\ntable ", start + len(head))
    block = result.stdout[start : end if end >= 0 else None]
    # an empty table left by someone else's half-done work is not enforcement
    return all(f"chain {chain} {{" in block for chain in BASE_CHAINS)


class KernelTable:
    """Our table as the kernel holds it.  From a terse listing (read_table(elements=False))
    ELEMENTS is empty, whatever the sets hold."""

    def __init__(self) -> None:
        self.chains: Dict[str, List[list]] = {}  # chain name -> each rule's JSON expressions
        self.sets: Dict[str, dict] = {}  # set name -> nft JSON set object
        self.counters: Dict[str, Tuple[int, int]] = {}  # name -> (packets, bytes)
        self.elements: Dict[str, List[object]] = {}  # set name -> elements as JSON values


def _element_value(elem: object) -> object:
    """Unwrap nft JSON: {"elem": {"val": X, "counter": ...}} -> X; {"concat": [...]} -> tuple."""
    if isinstance(elem, dict) and "elem" in elem:
        elem = elem["elem"]["val"]
    if isinstance(elem, dict) and "concat" in elem:
        return tuple(elem["concat"])
    if isinstance(elem, dict) and "range" in elem:
        return tuple(elem["range"])
    if isinstance(elem, dict) and "prefix" in elem:
        # an ifname wildcard ("vnet*") is listed as a prefix
        return elem["prefix"]
    return elem


def parse_listing(data: dict) -> KernelTable:
    table = KernelTable()
    for item in data.get("nftables", []):
        if "chain" in item:
            table.chains.setdefault(item["chain"]["name"], [])
        elif "rule" in item:
            table.chains.setdefault(item["rule"]["chain"], []).append(item["rule"].get("expr", []))
        elif "set" in item:
            entry = item["set"]
            table.sets[entry["name"]] = entry
            table.elements[entry["name"]] = [_element_value(e) for e in entry.get("elem", [])]
        elif "counter" in item:
            entry = item["counter"]
            table.counters[entry["name"]] = (int(entry.get("packets", 0)), int(entry.get("bytes", 0)))
    return table


def port_counters(set_json: dict) -> Dict[str, int]:
    """port -> packets of the per-port attempts set (nft shows an index as its device's
    name, or as a number when that device is gone: then "#N")."""
    out: Dict[str, int] = {}
    for elem in set_json.get("elem", []):
        if isinstance(elem, dict) and "elem" in elem:
            value, counter = elem["elem"]["val"], elem["elem"].get("counter", {})
            port = f"#{value}" if isinstance(value, int) else str(value)
            out[port] = out.get(port, 0) + int(counter.get("packets", 0))
    return out


def attempt_counters(set_json: dict) -> List[Tuple[str, str, int, int]]:
    """(port, MAC, packets, bytes) of the blocked-attempts set (port: its device's name, or
    "#N" for an index whose device is gone)."""
    out = []
    for elem in set_json.get("elem", []):
        if isinstance(elem, dict) and "elem" in elem:
            value = elem["elem"]["val"]
            counter = elem["elem"].get("counter", {})
        else:
            value, counter = elem, {}
        if isinstance(value, dict) and "concat" in value:
            name, mac = value["concat"]
            name = f"#{name}" if isinstance(name, int) else name
            out.append((str(name), str(mac), int(counter.get("packets", 0)), int(counter.get("bytes", 0))))
    return out


def read_table(elements: bool = True, timeout: float = 60.0) -> Optional[KernelTable]:
    """Our table, or None when it does not exist.  Without ELEMENTS, only its chains, rules,
    sets and counters (`nft -t`): a rebuild that asked libvirt needs no element of the
    kernel's, and listing 2 000 guest ports and 10 000 allowances costs it tens of ms."""
    args = ["-j", "list", "table", FAMILY, TABLE]
    result = _run(args if elements else ["-t", *args], timeout=timeout)
    if result.returncode != 0:
        if "No such file or directory" in result.stderr:
            return None
        raise NftError(f"nft list table {FAMILY} {TABLE} failed: {result.stderr.strip()}")
    return parse_listing(json.loads(result.stdout))


def list_text() -> Optional[str]:
    """Our table as nft prints it, for `smtp-gate debug`."""
    result = _run(["list", "table", FAMILY, TABLE])
    if result.returncode != 0:
        return None
    return result.stdout
