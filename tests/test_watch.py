"""Recovery from outside interference: `smtp-gate watch` keeps our table as it should be,
following nftables' netlink events, and leaves our own writers' changes alone."""

import errno
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

from smtp_gate import nfnetlink, ruleset, watch
from smtp_gate.errors import EnforcementDisabled
from smtp_gate.netlab import Guest
from smtp_gate.offswitch import Disabled
from tests.netlab import REPO, BridgeLab

SAMPLE = Path(__file__).parent / "data" / "libvirt-samples" / "2nic-virsh-destroy" / "02-lab2-start-begin.xml"
WHITELIST = "# vmname,mac,added_at,added_by,reason\n"


# -- events, decoded --------------------------------------------------------------------------


def event_message(msg: int, family: int, table: Optional[str], set_name: Optional[str] = None, portid: int = 0) -> bytes:
    payload = b""
    if table is not None:
        payload += nfnetlink._name_attr(1, table, "table")
    if set_name is not None:
        payload += nfnetlink._name_attr(nfnetlink.NFTA_SET_ELEM_LIST_SET, set_name, "set")
    data = bytearray(nfnetlink._message((nfnetlink.NFNL_SUBSYS_NFTABLES << 8) | msg, 0, 0, family, payload))
    struct.pack_into("=I", data, 12, portid)
    return bytes(data)


def test_events_are_decoded_with_family_table_set_and_sender() -> None:
    gen = nfnetlink._message((nfnetlink.NFNL_SUBSYS_NFTABLES << 8) | nfnetlink.NFT_MSG_NEWGEN, 0, 0, 0,
                             nfnetlink._attr(nfnetlink.NFTA_GEN_ID, struct.pack("!I", 42)))
    data = (event_message(nfnetlink.NFT_MSG_DELTABLE, 7, "smtp_gate", portid=99)
            + event_message(nfnetlink.NFT_MSG_NEWSETELEM, 7, "smtp_gate", "allowed")
            + event_message(nfnetlink.NFT_MSG_NEWRULE, 1, "filter") + gen)
    events = nfnetlink.parse_events(data)
    assert events == [
        nfnetlink.Event(nfnetlink.NFT_MSG_DELTABLE, 7, "smtp_gate", None, 99),
        nfnetlink.Event(nfnetlink.NFT_MSG_NEWSETELEM, 7, "smtp_gate", "allowed"),
        nfnetlink.Event(nfnetlink.NFT_MSG_NEWRULE, 1, "filter"),
        nfnetlink.Event(nfnetlink.NFT_MSG_NEWGEN, 0, None, None, 0, 42),
    ]
    assert [watch.relevant(e) for e in events] == [True, True, False, False]


@pytest.mark.parametrize(
    "event, ours",
    [
        (nfnetlink.Event(nfnetlink.NFT_MSG_DELRULE, 7, "smtp_gate"), True),
        (nfnetlink.Event(nfnetlink.NFT_MSG_DELSETELEM, 7, "smtp_gate", "blocked_ports"), True),
        (nfnetlink.Event(nfnetlink.NFT_MSG_NEWSETELEM, 7, "smtp_gate", "attempts"), False),  # statistics
        (nfnetlink.Event(nfnetlink.NFT_MSG_DELTABLE, 1, "smtp_gate"), False),  # inet, not bridge
        (nfnetlink.Event(nfnetlink.NFT_MSG_DELTABLE, 7, "smtp_gate_other"), False),
    ],
)
def test_what_counts_as_a_change_of_our_table(event, ours) -> None:
    assert watch.relevant(event) is ours


# -- the decision, without a kernel ---------------------------------------------------------


def test_differences_name_foreign_and_missing_elements_and_unknown_fixed_parts() -> None:
    desired = ruleset.Desired(guest_ifaces=(5,), allowed=((5, "52:54:00:00:00:01"),))
    keys = watch.expected_keys(desired)
    assert watch.differences(watch.Kernel("F", keys), desired, "F") == []
    assert watch.differences(None, desired, "F") == ["our table is missing"]
    assert watch.differences(watch.Kernel("G", keys), desired, "F") == [
        "its chains, rules, set definitions or fixed sets changed"]
    assert "not yet checked" in watch.differences(watch.Kernel("F", keys), desired, None)[0]
    tampered = dict(keys, allowed=keys["allowed"] | {nfnetlink.pair_key(4242, "02:00:00:00:00:01")},
                    guest_ifaces=set())
    assert watch.differences(watch.Kernel("F", tampered), desired, "F") == [
        "set guest_ifaces has 0 element(s) no record accounts for and lacks 1",
        "set allowed has 1 element(s) no record accounts for and lacks 0",
    ]


def test_elements_a_record_holds_for_a_gone_device_are_no_difference() -> None:
    """Issue 11 review: QEMU's tap goes before libvirt runs the stop hook; the record still
    accounts for its elements (present or not), and nothing else is excused by it."""
    from smtp_gate.discovery import Link
    from smtp_gate.runstate import Record

    links = {"vnet0": Link(name="vnet0", ifindex=5, kind="tun", master="br0", lowers=())}
    records = [Record("u1", "up", guest_ports=(("vnet0", 5),), allowed=((5, "52:54:00:00:00:01"),)),
               Record("u2", "stopping", guest_ports=(("vnet1", 9),), allowed=((9, "52:54:00:00:00:02"),))]
    gone = watch.gone_keys(records, links)
    assert gone == {"guest_ifaces": {nfnetlink.index_key(9)}, "foreign_ifaces": set(),
                    "allowed": {nfnetlink.pair_key(9, "52:54:00:00:00:02")}}
    desired = ruleset.Desired(guest_ifaces=(5,), allowed=((5, "52:54:00:00:00:01"),))
    keys = watch.expected_keys(desired)
    held = {name: keys[name] | gone[name] for name in keys}
    assert watch.differences(watch.Kernel("F", held), desired, "F", gone) == []
    assert watch.differences(watch.Kernel("F", keys), desired, "F", gone) == []  # the hook removed them
    foreign = dict(held, allowed=held["allowed"] | {nfnetlink.pair_key(9, "02:00:00:00:00:01")})
    assert watch.differences(watch.Kernel("F", foreign), desired, "F", gone) == [
        "set allowed has 1 element(s) no record accounts for and lacks 0"]
    assert watch.differences(watch.Kernel("F", held), desired, "F") == [
        "set guest_ifaces has 1 element(s) no record accounts for and lacks 0",
        "set allowed has 1 element(s) no record accounts for and lacks 0",
    ], "without the records' gone keys it was a difference (the false alarm of every guest stop)"


@pytest.mark.parametrize("raw, sentinel", [
    ("0c00010006000100000000000800030000000001", True),  # key 0, flags INTERVAL_END: nft's mark
    ("0c00010006000100001a00000800030000000001", False),  # the end of [25, 26)
    ("0c0001000600010000190000", False),  # the start of [25, 26)
    ("0c00010006000100000000000800030000000000", False),  # an interval that starts at 0
    ("0c000100060001000000000008000300000000010800020000000000", False),  # anything more
])
def test_the_interval_end_mark_at_zero_is_told_apart(raw: str, sentinel: bool) -> None:
    assert nfnetlink.interval_sentinel(bytes.fromhex(raw)) is sentinel


def test_the_fixed_text_leaves_out_exactly_the_dynamic_elements() -> None:
    base = ruleset.Desired(uplinks=("eth0",))
    assert watch.fixed_text(base._replace(guest_ifaces=(3,), allowed=((3, "52:54:00:00:00:01"),))) == watch.fixed_text(base)
    assert watch.fixed_text(base._replace(blocked_ports=((25, 25),))) != watch.fixed_text(base)
    assert watch.fixed_text(base._replace(uplinks=("eth1",))) != watch.fixed_text(base)


def follow_with(monkeypatch, feed: Callable[[socket.socket], None], outcomes: List[object]) -> List[float]:
    """Run watch.follow on a socket pair that FEED writes to; each check takes the next of
    OUTCOMES (an exception is raised); returns when the checks ran out (EnforcementDisabled)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    lost = errno.ENOBUFS.to_bytes(1, "little")

    def read_events(sock: socket.socket) -> List[nfnetlink.Event]:
        data = sock.recv(100)
        if data == lost:
            raise OSError(errno.ENOBUFS, "No buffer space available")
        return [nfnetlink.Event(nfnetlink.NFT_MSG_NEWSETELEM, 7, "smtp_gate", data.decode())]

    monkeypatch.setattr(nfnetlink, "read_events", read_events)
    calls: List[float] = []

    def check() -> bool:
        calls.append(time.monotonic())
        outcome = outcomes.pop(0) if outcomes else EnforcementDisabled(Disabled("x"))
        if isinstance(outcome, BaseException):
            raise outcome
        if len(calls) == 1:
            threading.Thread(target=feed, args=(theirs,), daemon=True).start()
        return bool(outcome)

    try:
        with pytest.raises(EnforcementDisabled):
            watch.follow(ours, check, lambda _m: None)
    finally:
        ours.close()
        theirs.close()
    return calls


def test_a_burst_of_events_is_one_check_and_statistics_are_none(monkeypatch) -> None:
    def feed(sock: socket.socket) -> None:
        for _ in range(200):
            sock.send(b"allowed")
        time.sleep(0.5)
        for _ in range(50):
            sock.send(b"attempts")  # the datapath counting attempts: no check
        time.sleep(0.5)
        sock.send(b"guest_ifaces")
        time.sleep(0.5)
        sock.send(b"allowed")  # the last check: it ends the loop

    calls = follow_with(monkeypatch, feed, [False, False, False])
    assert len(calls) == 4, "start, the burst, the single event, the end"
    assert calls[2] - calls[1] > 0.9, "the 50 statistics events caused no check"


def test_lost_events_mean_a_check_and_a_failed_check_is_retried(monkeypatch) -> None:
    from smtp_gate.errors import NftError

    def feed(sock: socket.socket) -> None:
        time.sleep(0.2)
        sock.send(errno.ENOBUFS.to_bytes(1, "little"))
        time.sleep(watch.RETRY + 0.5)
        sock.send(b"allowed")  # the last check: it ends the loop

    calls = follow_with(monkeypatch, feed, [False, NftError("refused"), False])
    assert len(calls) == 4, "start, the overrun (refused), its retry, the end"
    assert calls[2] - calls[1] >= watch.RETRY * 0.9


# -- the kernel, in namespaces ----------------------------------------------------------------


def domain_xml(guest: Guest) -> bytes:
    """What libvirt gives the hook for GUEST (as BridgeLab.start_guest builds it)."""
    return (
        f"<domain type='kvm'><name>{guest.name}</name><uuid>{uuid.uuid5(uuid.NAMESPACE_DNS, guest.name)}</uuid>"
        f"<devices><interface type='bridge'><mac address='{guest.mac}'/><source bridge='br0'/>"
        f"<target dev='{guest.port}'/></interface></devices></domain>"
    ).encode()


def wait_for(predicate, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError("not reached in time")


class Watcher:
    """`smtp-gate watch` in the lab's hypervisor namespace, its stderr in a file."""

    def __init__(self, lab: BridgeLab) -> None:
        self.lab = lab
        self.log = lab.tmp / f"watch-{time.monotonic_ns()}.log"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", lab.hv.name, sys.executable, "-m", "smtp_gate", "--config",
                 str(lab.config_path), "watch"],
                env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL, stderr=err,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )

    def text(self) -> str:
        return self.log.read_text()

    def restores(self) -> int:
        return self.text().count("restored in")

    def ready(self) -> None:
        """Following events, and its first check (which installs and remembers the table) done."""
        wait_for(lambda: "following nftables events" in self.text() and (
            self.restores() >= 1 or "checked our table against this configuration" in self.text()), timeout=10)
        time.sleep(0.3)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        self.proc.wait(timeout=10)


def netns_pids(lab: BridgeLab) -> List[str]:
    return subprocess.run(["ip", "netns", "pids", lab.hv.name], capture_output=True, text=True).stdout.split()


def snapshot(lab: BridgeLab) -> object:
    """Our table, statistics aside: rules, sets and every element of the state sets."""
    listing = json.loads(lab.nft("-j", "list", "table", "bridge", "smtp_gate", check=False).stdout or "{}")
    return json.dumps(watch._strip([item for item in listing.get("nftables", [])
                                    if "metainfo" not in item and item.get("set", {}).get("name") != "attempts"
                                    and "counter" not in item]), sort_keys=True)


@pytest.fixture
def guarded(lab: BridgeLab):
    """The lab with enforcement applied, g2 started by the real hook and whitelisted (so the
    hook allowed it), g1 an unknown port, and the watcher running."""
    (lab.tmp / "whitelist.csv").write_text(WHITELIST + "g2,,2026-01-01T00:00:00+00:00,root,\ng3,,2026-01-01T00:00:00+00:00,root,\n")
    lab.smtp_gate("apply")
    lab.start_guest(lab.guests["g2"])
    assert lab.tcp_connects(lab.guests["g2"], lab.INET4, 25)
    watcher = Watcher(lab)
    try:
        watcher.ready()
        yield lab, watcher
    finally:
        watcher.stop()


def handle_of(lab: BridgeLab, chain: str, rule: str) -> str:
    for line in lab.nft("-a", "list", "chain", "bridge", "smtp_gate", chain).stdout.splitlines():
        if line.strip().startswith(rule + " # handle "):
            return line.rsplit(" ", 1)[1]
    raise AssertionError(f"no rule {rule!r} in {chain}")


def g1_index(lab: BridgeLab) -> int:
    return lab.hv.ifindex("vnet0")


TAMPERING: Dict[str, Callable[[BridgeLab], List[str]]] = {
    "flush-ruleset": lambda lab: ["flush", "ruleset"],
    "delete-table": lambda lab: ["delete", "table", "bridge", "smtp_gate"],
    "flush-chain": lambda lab: ["flush", "chain", "bridge", "smtp_gate", "forward"],
    "delete-the-drop-rule": lambda lab: ["delete", "rule", "bridge", "smtp_gate", "smtp4", "handle",
                                         handle_of(lab, "smtp4", "drop")],
    "insert-foreign-rule": lambda lab: ["insert", "rule", "bridge", "smtp_gate", "forward", "accept"],
    "delete-blocked-port": lambda lab: ["delete", "element", "bridge", "smtp_gate", "blocked_ports", "{ 25 }"],
    "add-uplink": lambda lab: ["add", "element", "bridge", "smtp_gate", "uplinks", '{ "vnet0" }'],
    "foreign-allowance-future-index": lambda lab: ["add", "element", "bridge", "smtp_gate", "allowed",
                                                   "{ 4242 . 02:00:00:00:00:01 }"],
    "foreign-allowance-for-g1": lambda lab: ["add", "element", "bridge", "smtp_gate", "allowed",
                                             f"{{ {g1_index(lab)} . {lab.guests['g1'].mac} }}"],
    "foreign-guest-port": lambda lab: ["add", "element", "bridge", "smtp_gate", "guest_ifaces",
                                       f"{{ {g1_index(lab)} }}"],
    "foreign-exempt-port": lambda lab: ["add", "element", "bridge", "smtp_gate", "foreign_ifaces",
                                        f"{{ {g1_index(lab)} }}"],
    "revoke-the-hooks-allowance": lambda lab: ["delete", "element", "bridge", "smtp_gate", "allowed",
                                               f"{{ {lab.hv.ifindex('vnet1')} . {lab.guests['g2'].mac} }}"],
}


@pytest.mark.kernel
@pytest.mark.parametrize("name", sorted(TAMPERING))
def test_any_foreign_change_of_our_table_is_undone(guarded, name: str) -> None:
    lab, watcher = guarded
    before, restores = snapshot(lab), watcher.restores()
    lab.nft(*TAMPERING[name](lab))
    wait_for(lambda: watcher.restores() > restores)
    wait_for(lambda: snapshot(lab) == before)
    assert not lab.tcp_connects(lab.guests["g1"], lab.INET4, 25, timeout=0.5), "SMTP must be blocked again"
    assert lab.tcp_connects(lab.guests["g2"], lab.INET4, 25), "the hook's allowance is back"
    time.sleep(0.5)
    assert watcher.restores() == restores + 1, "its own restore's events led to no second restore"


@pytest.mark.kernel
def test_a_legitimate_hook_start_and_stop_are_not_undone(guarded) -> None:
    lab, watcher = guarded
    g3 = lab.add_guest("g3", "vnet2", 4)
    restores = watcher.restores()
    pair = f'"vnet2" . {g3.mac}'
    allowed = lambda: lab.nft("list", "set", "bridge", "smtp_gate", "allowed").stdout  # noqa: E731
    result = lab.run_hook("start", "begin", domain_xml(g3), name="g3")
    assert result.returncode == 0, result.stderr
    assert pair in allowed()
    time.sleep(1.0)  # several debounce windows: the watcher has compared by now
    assert pair in allowed() and lab.tcp_connects(g3, lab.INET4, 25), "the hook's allowance stays"
    result = lab.run_hook("stopped", "end", domain_xml(g3), name="g3")
    assert result.returncode == 0, result.stderr
    time.sleep(1.0)
    assert pair not in allowed() and not lab.tcp_connects(g3, lab.INET4, 25, timeout=0.5), "the stop stays"
    assert watcher.restores() == restores, watcher.text()
    assert "following nftables events" in watcher.text()


@pytest.mark.kernel
def test_a_guest_whose_tap_went_with_qemu_is_not_taken_for_tampering(guarded) -> None:
    """Issue 11 review: at every stop (and migration out) QEMU exits and its tap goes first;
    libvirt runs `stopped end` seconds later.  The link change wakes the watcher meanwhile:
    the record still holds the gone tap's elements, so nothing is restored and nothing is
    called foreign; the hook then removes them.  A foreign change in that window still is."""
    lab, watcher = guarded
    g3 = lab.add_guest("g3", "vnet2", 4)
    lab.start_guest(g3)
    index = lab.hv.ifindex("vnet2")
    allowed = lambda: lab.nft("list", "set", "bridge", "smtp_gate", "allowed").stdout  # noqa: E731
    guest_ports = lambda: lab.nft("list", "set", "bridge", "smtp_gate", "guest_ifaces").stdout  # noqa: E731
    assert g3.mac in allowed()
    time.sleep(0.5)
    restores = watcher.restores()
    lab.hv.ip("link", "del", "vnet2")  # QEMU exited: its tap is gone, the stop hook has not run
    time.sleep(1.0)  # several debounce windows: the watcher has compared by now
    assert watcher.restores() == restores, watcher.text()
    assert g3.mac in allowed() and str(index) in guest_ports(), "the record's elements wait for the hook"
    # a real foreign change meanwhile is reported and undone, the record's elements are not its concern
    lab.nft("add", "element", "bridge", "smtp_gate", "allowed", "{ 4242 . 02:00:00:00:00:01 }")
    wait_for(lambda: watcher.restores() > restores)
    assert "set allowed has 1 element(s) no record accounts for and lacks 0; restored in" in watcher.text()
    assert "02:00:00:00:00:01" not in allowed()
    restores = watcher.restores()
    result = lab.run_hook("stopped", "end", domain_xml(g3), name="g3")
    assert result.returncode == 0 and b"failed" not in result.stderr, result.stderr
    assert g3.mac not in allowed() and str(index) not in guest_ports(), "the kernel ends clean"
    assert not list((lab.tmp / "run" / "records").glob(f"{uuid.uuid5(uuid.NAMESPACE_DNS, 'g3')}*"))
    time.sleep(1.0)
    assert watcher.restores() == restores, watcher.text()
    assert "no record accounts for" not in watcher.text().split("restored in")[-1], watcher.text()


@pytest.mark.kernel
def test_enable_and_a_full_apply_are_not_taken_for_a_change(guarded) -> None:
    """Issue 11 review: after `enable` (a table created anew) the watcher re-installed it and
    said its rules had changed: nft puts an interval set's end mark at 0 only into a set that
    existed before its batch.  Neither `enable` nor an `apply` over a table the watcher
    created anew is a change now; the first check after enable says what it found."""
    lab, watcher = guarded
    restores = watcher.restores()
    lab.smtp_gate("disable", "--reason", "review")
    time.sleep(1.0)
    lab.smtp_gate("enable")
    wait_for(lambda: "checked our table after enable" in watcher.text(), timeout=10)
    time.sleep(1.0)
    assert watcher.restores() == restores, watcher.text()
    assert "checked our table after enable in " in watcher.text()
    assert "it holds what the configuration and the records say, nothing to restore" in watcher.text()
    lab.nft("flush", "ruleset")
    wait_for(lambda: watcher.restores() > restores)  # created anew by the watcher itself
    restores = watcher.restores()
    time.sleep(0.5)
    lab.smtp_gate("apply")  # over the existing table: nft adds the end mark
    time.sleep(1.0)
    assert watcher.restores() == restores, watcher.text()
    assert "set definitions or fixed sets changed" not in watcher.text(), watcher.text()
    lab.nft("delete", "element", "bridge", "smtp_gate", "blocked_ports", "{ 25 }")  # still caught
    wait_for(lambda: watcher.restores() > restores)
    assert "its chains, rules, set definitions or fixed sets changed; restored in" in watcher.text()
    assert not lab.tcp_connects(lab.guests["g1"], lab.INET4, 25, timeout=0.5)


@pytest.mark.kernel
def test_a_legitimate_rebuild_and_ports_set_are_not_undone(guarded) -> None:
    lab, watcher = guarded
    restores = watcher.restores()
    lab.smtp_gate("rebuild")
    time.sleep(1.0)
    assert watcher.restores() == restores, watcher.text()
    assert lab.tcp_connects(lab.guests["g2"], lab.INET4, 25), "the hook's allowance stays"
    lab.smtp_gate("ports-set", "25,465,587")
    time.sleep(1.0)
    ports = lab.nft("list", "set", "bridge", "smtp_gate", "blocked_ports").stdout
    assert "587" in ports, "the watcher re-read the configuration and kept the new port"
    assert not lab.tcp_connects(lab.guests["g1"], lab.INET4, 587, timeout=0.5)


@pytest.mark.kernel
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_the_watcher_leaves_no_process_behind(guarded, sig: int) -> None:
    lab, watcher = guarded
    lab.nft("flush", "ruleset")
    wait_for(lambda: "goto egress" in lab.nft("list", "chain", "bridge", "smtp_gate", "forward", check=False).stdout)
    time.sleep(0.5)
    assert netns_pids(lab) == [str(watcher.proc.pid)], "no `nft monitor` or any other child while it watches"
    watcher.stop(sig)
    wait_for(lambda: netns_pids(lab) == [], timeout=3)


class SilentLibvirtd:
    """A unix socket that accepts libvirt clients and never answers: a hung libvirtd."""

    def __init__(self, path: Path) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(16)
        self.clients: List[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            self.clients.append(client)

    def close(self) -> None:
        self.server.close()
        for client in self.clients:
            client.close()


def held(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@pytest.mark.kernel
def test_the_restore_does_not_wait_for_a_rebuild_stuck_in_libvirt(lab) -> None:
    """Issue 10, 5a: a rebuild hangs inside a libvirtd that never answers, holding rebuild.lock;
    the table still comes back after a flush (the restore takes only the main lock)."""
    sock = lab.tmp / "libvirt-sock"
    fake = SilentLibvirtd(sock)
    lab.write_config(f'UPLINKS="uplink0"\nLIBVIRT_URI="qemu:///system?socket={sock}"\n')
    (lab.tmp / "whitelist.csv").write_text(WHITELIST + "g2,,2026-01-01T00:00:00+00:00,root,\n")
    lab.smtp_gate("apply", "--no-libvirt")
    lab.start_guest(lab.guests["g2"])
    watcher = Watcher(lab)
    rebuild = subprocess.Popen(
        ["ip", "netns", "exec", lab.hv.name, sys.executable, "-m", "smtp_gate", "--config", str(lab.config_path),
         "rebuild"], env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        watcher.ready()
        wait_for(lambda: fake.clients and held(lab.tmp / "run" / "rebuild.lock"), timeout=10)
        lab.nft("flush", "ruleset")
        wait_for(lambda: "goto egress" in lab.nft("list", "chain", "bridge", "smtp_gate", "forward", check=False).stdout)
        assert rebuild.poll() is None and held(lab.tmp / "run" / "rebuild.lock"), "the rebuild was still stuck"
        assert not lab.tcp_connects(lab.guests["g1"], lab.INET4, 25, timeout=0.5)
        assert lab.tcp_connects(lab.guests["g2"], lab.INET4, 25), "restored with the recorded allowance"
    finally:
        os.killpg(rebuild.pid, signal.SIGKILL)
        rebuild.wait()
        watcher.stop()
        fake.close()


@pytest.mark.kernel
def test_enforcement_comes_back_by_itself_with_the_allowances(bare_lab: BridgeLab) -> None:
    lab = bare_lab
    blocked = lab.add_guest("g1", "vnet0", 2)
    allowed = lab.add_guest("lab2", "lab2n1", 3, mac="52:54:00:aa:00:02")
    (lab.tmp / "whitelist.csv").write_text(WHITELIST + "lab2,,2026-01-01T00:00:00+00:00,root,\n")
    lab.smtp_gate("apply")
    hook = lab.run_hook("start", "begin", SAMPLE.read_bytes(), name="lab2")
    assert hook.returncode == 0
    assert lab.tcp_connects(allowed, lab.INET4, 25)
    watcher = Watcher(lab)
    try:
        watcher.ready()
        lab.nft("flush", "ruleset")
        wait_for(lambda: "goto egress" in lab.nft("list", "chain", "bridge", "smtp_gate", "forward", check=False).stdout)
        assert not lab.tcp_connects(blocked, lab.INET4, 25, timeout=0.5), "SMTP must be blocked again"
        assert lab.tcp_connects(allowed, lab.INET4, 25), "the restore kept the recorded allowance"
    finally:
        watcher.stop()
    assert "our table is missing; restored in" in watcher.text()


@pytest.mark.kernel
def test_the_watcher_leaves_a_disabled_table_away_until_enable(lab) -> None:
    """`smtp-gate disable` with the watcher running (the installed default): the table stays away;
    after `enable` the watcher follows events again and restores after a flush."""
    lab.smtp_gate("apply")
    watcher = Watcher(lab)
    has_table = lambda: "table bridge smtp_gate" in lab.nft("list", "tables").stdout  # noqa: E731
    try:
        watcher.ready()
        lab.smtp_gate("disable", "--reason", "incident 42", env={"SUDO_USER": "alice"})
        time.sleep(2.0)
        assert not has_table(), "the watcher brought a disabled table back"
        assert lab.tcp_connects(lab.guests["g1"], lab.INET4, 25)
        lab.smtp_gate("enable")
        assert has_table()
        time.sleep(1.5)  # it looks for the off-switch once a second
        lab.nft("flush", "ruleset")
        wait_for(has_table)
        assert not lab.tcp_connects(lab.guests["g1"], lab.INET4, 25, timeout=0.5)
    finally:
        watcher.stop()
    err = watcher.text()
    assert "enforcement is disabled by alice at " in err and "(incident 42): not installing" in err, err
    assert "re-enabled" in err and "our table is missing; restored in" in err, err


@pytest.mark.kernel
def test_the_event_socket_sees_changes_of_our_table_in_its_namespace(bare_lab: BridgeLab) -> None:
    with bare_lab.hv.entered():
        sock = nfnetlink.open_events()
    try:
        sock.settimeout(5)
        bare_lab.nft("add", "table", "inet", "unrelated")
        bare_lab.nft("add", "table", "bridge", "smtp_gate")
        seen: List[nfnetlink.Event] = []
        while not any(watch.relevant(e) for e in seen):
            seen += nfnetlink.read_events(sock)
        assert nfnetlink.Event(nfnetlink.NFT_MSG_NEWTABLE, 1, "unrelated", portid=seen[0].portid) in seen
        assert not watch.relevant(seen[0])
        assert any(e.msg == nfnetlink.NFT_MSG_NEWTABLE and e.family == 7 and e.table == "smtp_gate" for e in seen)
    finally:
        sock.close()


def test_a_port_moved_onto_a_protected_bridge_loses_its_exemption_at_once(lab: BridgeLab) -> None:
    """No nftables event tells of `ip link set PORT master br0`: the watcher follows link
    changes too, and its check finds the port no longer foreign (input chain: the host)."""
    lab.hv.ip("link", "add", "br1", "type", "bridge")
    lab.hv.ip("link", "set", "br1", "up")
    lab.hv.ip("addr", "add", "10.77.0.254/24", "dev", "br0")
    lab.listen(lab.hv, [25])
    mover_ns = lab.netns("mover")
    lab.connect(mover_ns, "eth0", "vnet5", ip4="10.77.0.60/24", mac="52:54:00:00:05:05", bridge="br1")
    lab.smtp_gate("apply")
    assert "vnet5" in lab.nft("list", "set", "bridge", "smtp_gate", "foreign_ifaces").stdout
    watcher = Watcher(lab)
    try:
        watcher.ready()
        assert "and link changes" in watcher.text()
        lab.hv.ip("link", "set", "vnet5", "nomaster")
        lab.hv.ip("link", "set", "vnet5", "master", "br0")
        wait_for(lambda: "vnet5" not in lab.nft("list", "set", "bridge", "smtp_gate", "foreign_ifaces").stdout)
        assert not netlab_tcp(mover_ns, "10.77.0.254", 25), "the moved port reached the host's port 25"
    finally:
        watcher.stop()


def netlab_tcp(ns, addr: str, port: int) -> bool:  # type: ignore[no-untyped-def]
    from smtp_gate import netlab

    return netlab.tcp_connects(ns, addr, port, 0.5)
