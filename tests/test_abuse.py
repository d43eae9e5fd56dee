"""The abuse desk (issue 12): blocked attempts from the NFLOG group, attributed to guests,
as structured entries in a real journal; the report's bounded store; ON_BLOCKED."""

import errno
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, List

import pytest

from smtp_gate import abuse, cli, frames, journal, nflog, nfnetlink
from smtp_gate.nflog import Attempt, Guest
from smtp_gate.store import MAX_DESTINATIONS, Store, day_of, rank
from tests import journal_lab
from tests.netlab import REPO, BridgeLab

WHITELIST = "# vmname,mac,added_at,added_by,reason\n"


# -- pieces, without a kernel -----------------------------------------------------------------


def test_journal_native_format_is_binary_safe_for_newlines() -> None:
    data = journal.encode({"MESSAGE": "two\nlines", "SMTP_GATE_GUEST": "web1", "SMTP_GATE_COUNT": 3})
    assert data.startswith(b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\n")
    assert b"SMTP_GATE_GUEST=web1\nSMTP_GATE_COUNT=3\n" in data
    assert journal.decode(data) == {"MESSAGE": "two\nlines", "SMTP_GATE_GUEST": "web1", "SMTP_GATE_COUNT": "3"}
    with pytest.raises(ValueError):
        journal.encode({"_PRIVATE": "x"})


def test_without_a_journal_socket_an_entry_is_one_line_on_stderr(tmp_path: Path) -> None:
    import io

    err = io.StringIO()
    writer = journal.Journal(str(tmp_path / "no-socket"), fallback=err)
    assert writer.send({"MESSAGE": "blocked\nSMTP", "SMTP_GATE_GUEST": "web1"}) == "stderr"
    assert err.getvalue() == "smtp-gate watch: blocked SMTP (SMTP_GATE_GUEST=web1)\n"


def nflog_message(prefix: bytes, payload: bytes, ifindex: int = 7, mac: bytes = b"\x52\x54\x00\x00\x00\x09") -> bytes:
    attrs = (nfnetlink._attr(nflog.NFULA_PACKET_HDR, struct.pack("!HBB", 0x0800, 1, 0))
             + nfnetlink._attr(nflog.NFULA_PREFIX, prefix + b"\0")
             + nfnetlink._attr(nflog.NFULA_IFINDEX_INDEV, struct.pack("!I", ifindex))
             + nfnetlink._attr(nflog.NFULA_HWADDR, struct.pack("!HH", 6, 0) + mac + b"\0\0")
             + nfnetlink._attr(nflog.NFULA_PAYLOAD, payload))
    return nfnetlink._message((nflog.NFNL_SUBSYS_ULOG << 8) | nflog.NFULNL_MSG_PACKET, 0, 0, 7, attrs)


def test_nflog_messages_are_parsed_into_attempts() -> None:
    seg4 = frames.tcp_segment(socket.inet_aton("10.0.0.5"), socket.inet_aton("192.0.2.25"), 40001, 25)
    seg6 = frames.tcp_segment(socket.inet_pton(socket.AF_INET6, "fd00::5"), socket.inet_pton(socket.AF_INET6, "2001:db8::25"), 40002, 465)
    data = (nflog_message(b"SMTPGATE4 ", frames.ipv4_packet("10.0.0.5", "192.0.2.25", seg4))
            + nflog_message(b"SMTPGATE6 audit ", frames.ipv6_packet("fd00::5", "2001:db8::25", seg6), ifindex=9)
            + nflog_message(b"SOMEONE ELSE ", frames.ipv4_packet("10.0.0.5", "192.0.2.25", seg4)))
    attempts = nflog.parse(data, now=100.0)
    assert attempts == [
        Attempt(7, "52:54:00:00:00:09", 4, "10.0.0.5", "192.0.2.25", 40001, 25, "enforce", 100.0, syn=True, seq=1),
        Attempt(9, "52:54:00:00:00:09", 6, "fd00::5", "2001:db8::25", 40002, 465, "audit", 100.0, syn=True, seq=1),
    ]
    # a segment with ACK (SYN-ACK, data, RST-ACK) opens no connection
    for flags in (0x12, 0x10, 0x18, 0x14):
        seg = frames.tcp_segment(socket.inet_aton("10.0.0.5"), socket.inet_aton("192.0.2.25"), 40001, 25, flags=flags)
        (one,) = nflog.parse(nflog_message(b"SMTPGATE4 ", frames.ipv4_packet("10.0.0.5", "192.0.2.25", seg)), now=1.0)
        assert not one.syn, hex(flags)


def test_a_retransmitted_syn_is_a_packet_not_a_connection_attempt() -> None:
    """Finding 1 of the review: one connect() whose SYN is sent 7 times was 7 "attempts"."""
    seen = abuse.Connections()
    syn = attempt()._replace(syn=True, seq=1234)
    assert seen.new(syn, 0.0)
    assert not any(seen.new(syn, t) for t in (1.0, 3.0, 7.0, 15.0, 31.0, 63.0)), "retransmissions"
    assert seen.new(syn._replace(sport=40001), 64.0), "another connect() is another attempt"
    assert not seen.new(syn._replace(syn=False), 64.0), "no SYN: no attempt"
    assert seen.new(syn, 64.0 + abuse.Connections.RETRANSMIT), "long after, the same tuple opens anew"
    written: List[Dict[str, object]] = []
    agg = abuse.Aggregator(10.0, written.append)
    web1 = Guest("web1", "u-1", "vnet3")
    agg.add(syn, web1, now=0.0)
    for t in (1.0, 3.0):
        agg.add(syn._replace(syn=False), web1, now=t)
    agg.tick(10.0)
    assert [(e["SMTP_GATE_COUNT"], e["SMTP_GATE_CONNECTIONS"]) for e in written] == [(1, 1), (2, 0)]


def attempt(ifindex: int = 7, dst: str = "192.0.2.25", at: float = 1_800_000_000.0, mac: str = "52:54:00:00:00:09") -> Attempt:
    return Attempt(ifindex, mac, 4, "10.0.0.5", dst, 40000, 25, "enforce", at)


def test_a_flood_is_one_entry_per_port_per_interval_whatever_the_macs() -> None:
    written: List[Dict[str, object]] = []
    agg = abuse.Aggregator(10.0, written.append)
    web1 = Guest("web1", "u-1", "vnet3")
    agg.add(attempt(), web1, now=0.0)
    assert [e["SMTP_GATE_COUNT"] for e in written] == [1], "the first attempt is written at once"
    for i in range(10_000):
        agg.add(attempt(mac=f"02:00:00:00:{i >> 8 & 255:02x}:{i & 255:02x}"), web1, now=1.0 + i / 2000)
    agg.tick(9.9)
    assert len(written) == 1
    agg.tick(10.0)
    assert [e["SMTP_GATE_COUNT"] for e in written] == [1, 10_000]
    assert written[1]["SMTP_GATE_GUEST"] == "web1" and written[1]["SMTP_GATE_MAC"] == "02:00:00:00:27:0f"
    agg.tick(20.0)
    assert len(written) == 2 and not agg.open, "an interval without attempts closes"
    # at the watcher's exit, an interval still open is written (finding 3: nothing counted is left unsaid)
    agg.add(attempt(), web1, now=30.0)
    agg.add(attempt(), web1, now=31.0)
    agg.tick(32.0, final=True)
    assert [e["SMTP_GATE_COUNT"] for e in written[2:]] == [1, 1] and not agg.open


def test_on_blocked_document_lists_sources_and_macs_with_iso_times() -> None:
    recent = abuse.Recent()
    at = 1_800_000_000.0
    for i in range(30):
        recent.add(attempt(at=at + i, mac=f"02:00:00:00:00:{i:02x}")._replace(src=f"10.0.0.{i % 3}"))
    trigger = abuse.Trigger(("/bin/true",), 5, 120.0, 1.0, print)
    last = attempt(at=at + 29)._replace(family=6, src="fd00::5", dst="2001:db8::25", syn=True)
    doc = trigger.document(last, Guest("unknown port", "", "vnet3"), 5, 30, at, recent)
    assert (doc["first"], doc["last"]) == ("2027-01-15T08:00:00Z", "2027-01-15T08:00:29Z")
    assert doc["last_attempt"] == {"family": "ipv6", "src": "fd00::5", "dst": "2001:db8::25", "sport": 40000, "dport": 25}
    assert doc["port"] == "unknown port vnet3" and doc["window_seconds"] == 120 and doc["attempts"] == 5
    assert [s["source"] for s in doc["sources"]] == ["10.0.0.0", "10.0.0.1", "10.0.0.2"]
    assert len(doc["macs"]) == abuse.MAX_LISTED and doc["macs_more"] == 10 and doc["macs_uncounted_packets"] == 0


def test_the_store_keeps_its_bounds(tmp_path: Path) -> None:
    day = 86400.0
    now = 1_800_000_000.0
    store = Store(str(tmp_path), days=7, max_bytes=200_000)
    web1 = Guest("web1", "u-1", "vnet3")
    # a guest spraying 5 000 destinations in one minute: MAX_DESTINATIONS lines and "other"
    for i in range(5000):
        store.add(attempt(dst=f"198.51.{i >> 8}.{i & 255}", at=now), web1)
    assert store.flush(now) == MAX_DESTINATIONS + 1
    ranked = rank(store.rows(now - 60))
    assert ranked[0].attempts == 5000 and ranked[0].destinations[0] == ("other", 5000 - MAX_DESTINATIONS)
    # days older than DAYS are pruned
    for back in range(10, 0, -1):
        store.add(attempt(at=now - back * day), web1)
        store.flush(now - back * day)
    store.prune(now)
    days = [name for name in sorted(os.listdir(store.dir))]
    assert len(days) == 8 and days[0] > "2027-01-07", days  # 7 days back and today
    # ports that write line after line: past their day's budget, one summary a minute; the
    # older days stay (tests/test_desk_hardening.py: the cap itself)
    for minute in range(3000):
        for guest in range(3):
            store.add(attempt(ifindex=guest, at=now + minute * 0.01), Guest(f"g{guest}", f"u{guest}", f"vnet{guest}"))
        store.flush(now)
    store.flush(now, final=True)
    assert store.size() <= 200_000 and store.dropped == 0
    assert len(os.listdir(store.dir)) == 8 and f"{day_of(now)}.jsonl" in os.listdir(store.dir)
    assert {r.guest: r.attempts for r in rank(store.rows(now - 60)) if r.guest != "web1"} == {
        "g0": 3000, "g1": 3000, "g2": 3000}


def test_report_ranks_guests_and_refuses_a_bad_since(tmp_path: Path, capsys) -> None:
    config = tmp_path / "smtp-gate.conf"
    config.write_text(f'STATE_DIR="{tmp_path / "state"}"\n')
    store = Store(str(tmp_path / "state"))
    now = time.time()
    for i in range(5):
        store.add(attempt(at=now - 30 + i)._replace(syn=True), Guest("web1", "u-1", "vnet3"))
    store.add(attempt(at=now - 20), Guest("web1", "u-1", "vnet3"))  # a retransmission: a packet only
    store.add(attempt(ifindex=9, dst="203.0.113.9", at=now - 10)._replace(syn=True, src="10.9.9.9"),
              Guest("unknown port", "", "vnet9"))
    store.add(attempt(at=now - 7200), Guest("old", "u-2", "vnet4"))  # outside --since 1h
    store.flush(now)
    assert cli.main(["--config", str(config), "report", "--since", "1h", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(g["guest"], g["connections"], g["attempts"]) for g in report["guests"]] == [
        ("web1", 5, 6), ("unknown port", 1, 1)]
    assert report["guests"][0]["destinations"] == [{"destination": "192.0.2.25:25", "attempts": 6}]
    assert report["guests"][0]["sources"] == [{"source": "10.0.0.5", "packets": 6}]
    assert report["guests"][0]["mode"] == "enforce" and report["no_data"] is False
    assert report["guests"][1]["ifaces"] == ["vnet9"] and report["guests"][1]["port"] == "unknown port vnet9"
    assert cli.main(["--config", str(config), "report", "--since", "3h"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("(3h): 3 guest(s), ranked by connection attempts") and "old (u-2)" in out
    assert "      5 connection attempt(s)       6 packet(s)  web1 (u-1)" in out
    assert "unknown port vnet9" in out and "sources: 10.9.9.9 (1)" in out
    for bad in ("1x", "0h", "h", "-1h"):
        assert cli.main(["--config", str(config), "report", f"--since={bad}"]) == 2
        err = capsys.readouterr().err
        assert err == (f"smtp-gate: error: bad --since {bad!r}: expected a duration like 30m, 1h, 2d or 1w "
                       "(a whole number and s, m, h, d or w)\n")
    assert cli.main(["--config", str(config), "report", "--top", "0"]) == 2
    assert capsys.readouterr().err == ("smtp-gate: error: bad --top 0: expected a whole number from 1 "
                                       "(destinations and sources shown per guest)\n")
    assert cli.main(["--config", str(config), "report", "--since", "30d"]) == 0
    assert ("smtp-gate: note: --since 30d reaches beyond REPORT_DAYS=7: the store keeps 7 day(s), older attempts "
            "are gone\n") in capsys.readouterr().err


def test_report_says_when_it_has_no_data(tmp_path: Path, capsys) -> None:
    """Finding 4: a watcher that never ran was "0 guest(s)", exit 0."""
    config = tmp_path / "smtp-gate.conf"
    config.write_text(f'STATE_DIR="{tmp_path / "state"}"\n')
    assert cli.main(["--config", str(config), "report"]) == 3
    captured = capsys.readouterr()
    assert captured.err == (f"smtp-gate: warning: no data: is smtp-gate watch running? STATE_DIR={tmp_path / 'state'} "
                            "holds no blocked attempt (the watcher writes it; LOG_GROUP must not be off)\n")
    assert cli.main(["--config", str(config), "report", "--json"]) == 3
    assert json.loads(capsys.readouterr().out)["no_data"] is True
    store = Store(str(tmp_path / "state"))
    store.add(attempt(at=time.time() - 7200), Guest("web1", "u-1", "vnet3"))
    store.flush()
    assert cli.main(["--config", str(config), "report", "--since", "1h"]) == 3
    assert "smtp-gate: warning: no data since " in capsys.readouterr().err


def test_report_lists_macs_up_to_a_bound_and_labels_audit(tmp_path: Path, capsys) -> None:
    config = tmp_path / "smtp-gate.conf"
    config.write_text(f'STATE_DIR="{tmp_path / "state"}"\n')
    store = Store(str(tmp_path / "state"))
    now = time.time()
    web1 = Guest("web1", "u-1", "vnet3")
    for i in range(13):
        store.add(attempt(at=now - 10, mac=f"02:00:00:00:00:{i:02x}")._replace(syn=True), web1)
    store.add(attempt(at=now - 5)._replace(syn=True, mode="audit"), web1)
    store.flush(now)
    assert cli.main(["--config", str(config), "report"]) == 0
    out = capsys.readouterr().out
    assert "1 of them in audit mode (delivered, not blocked)" in out.splitlines()[0]
    assert "web1 (u-1)  AUDIT (delivered)" in out
    macs = [line for line in out.splitlines() if "MACs:" in line][0]
    assert macs.count("02:00:00:00:00:") == 10 and macs.endswith(" +3 more"), macs
    assert cli.main(["--config", str(config), "report", "--json"]) == 0
    guests = json.loads(capsys.readouterr().out)["guests"]
    assert [(g["mode"], g["connections"], len(g["macs"]), g["macs_more"]) for g in guests] == [
        ("enforce", 13, 10, 3), ("audit", 1, 1, 0)]


def test_report_names_state_dir_when_it_cannot_read_it() -> None:
    """A user who is not root: one line naming STATE_DIR and who may read it."""
    if not shutil.which("setpriv"):
        pytest.skip("needs setpriv (util-linux)")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="smtp-gate-report-") as tmp:  # pytest's tmp is root's alone
        _report_as_nobody(Path(tmp))


def _report_as_nobody(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = Store(str(state))
    store.add(attempt(at=time.time()), Guest("web1", "u-1", "vnet3"))
    store.flush()
    os.chmod(state / "blocked", 0o700)
    config = tmp_path / "smtp-gate.conf"
    config.write_text(f'STATE_DIR="{state}"\n')
    for path in (tmp_path, config):
        os.chmod(path, 0o755)
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                             "smtp_gate", "--config", str(config), "report"], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), cwd="/")
    assert result.returncode == 1, result
    assert result.stderr == (f"smtp-gate: error: cannot read the report's store in STATE_DIR '{state}' "
                             f"({state / 'blocked'}): Permission denied; report needs root (or membership of the group "
                             "that owns the store)\n")


# -- the kernel, a real bridge and a real journal ---------------------------------------------


def guest_uuid(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, name))


class JournaledWatcher:
    """`smtp-gate watch` in the lab's hypervisor namespace beside a private journald."""

    def __init__(self, lab: BridgeLab) -> None:
        self.lab = lab
        self.jtmp = lab.tmp / f"journal-{time.monotonic_ns()}"
        self.jtmp.mkdir()
        self.log = self.jtmp / "watch.log"
        argv = journal_lab.wrap(self.jtmp, ["ip", "netns", "exec", lab.hv.name, sys.executable, "-m", "smtp_gate",
                                            "--config", str(lab.config_path), "watch"])
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(argv, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL,
                                         stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: "following blocked attempts" in self.text() and "following nftables events" in self.text()
                 and ("checked our table" in self.text() or "restored in" in self.text()), 15)

    def text(self) -> str:
        return self.log.read_text()

    def entries(self, *matches: str) -> List[Dict[str, str]]:
        return journal_lab.entries(self.jtmp, *matches)

    def watcher_pid(self) -> int:
        """The `smtp-gate watch` process itself (beside journald, in the wrapper's session)."""
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                if os.getsid(int(entry)) == self.proc.pid and b"smtp_gate" in args and b"watch" in args:
                    return int(entry)
            except OSError:
                continue
        raise AssertionError("the watcher process is gone")

    def terminate(self) -> None:
        """SIGTERM to the watcher alone, as systemd stops it; journald stays to take its last entries."""
        os.kill(self.watcher_pid(), signal.SIGTERM)
        wait_for(lambda: "journal entries (" in self.text(), 15)
        time.sleep(0.3)  # journald writes what it was sent

    def stop(self) -> None:
        journal_lab.stop_group(self.proc)  # also the journald of a watcher terminate() stopped


def wait_for(predicate, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("not reached in time")


def send(lab: BridgeLab, guest, dport: int = 25, family: int = 4, count: int = 1, macs: int = 0,  # type: ignore[no-untyped-def]
         sport: int = 40000) -> None:
    """COUNT blocked SMTP SYN frames from GUEST, each from its own source port from SPORT on (so
    each one is a connection attempt), with MACS spoofed source MACs, if any."""
    tx = guest.ns.socket(socket.AF_PACKET, socket.SOCK_RAW)
    try:
        tx.bind(("eth0", 0))
        for i in range(count):
            mac = guest.mac if not macs else f"02:00:00:00:{(i % macs) >> 8:02x}:{(i % macs) & 255:02x}"
            port = sport + i % 20000
            if family == 4:
                seg = frames.tcp_segment(socket.inet_aton(guest.ip4), socket.inet_aton(lab.INET4), port, dport,
                                         b"SGT-abuse-desk!!")
                tx.send(frames.ethernet(lab.inet_mac, mac, frames.ETH_P_IP, frames.ipv4_packet(guest.ip4, lab.INET4, seg)))
            else:
                seg = frames.tcp_segment(socket.inet_pton(socket.AF_INET6, guest.ip6),
                                         socket.inet_pton(socket.AF_INET6, lab.INET6), port, dport, b"SGT-abuse-desk!!")
                tx.send(frames.ethernet(lab.inet_mac, mac, frames.ETH_P_IPV6, frames.ipv6_packet(guest.ip6, lab.INET6, seg)))
    finally:
        tx.close()


@pytest.fixture
def desk_lab(lab: BridgeLab):  # type: ignore[no-untyped-def]
    reason = journal_lab.missing()
    if reason:
        pytest.skip(reason)
    (lab.tmp / "whitelist.csv").write_text(WHITELIST)
    script = lab.tmp / "on-blocked.sh"
    script.write_text(f"#!/bin/sh\ncat > {lab.tmp}/on-blocked.$$.json\n")
    script.chmod(0o755)
    lab.write_config(f'UPLINKS="uplink0"\nEVENT_INTERVAL="1"\nSTATE_DIR="{lab.tmp / "state"}"\n'
                     f'ON_BLOCKED="{script}"\nON_BLOCKED_THRESHOLD="20"\nON_BLOCKED_WINDOW="600"\n')
    lab.smtp_gate("apply")
    lab.start_guest(lab.guests["g1"])  # g1: a guest with a record; g2 (vnet1): an unknown port
    watcher = JournaledWatcher(lab)
    try:
        yield lab, watcher
    finally:
        watcher.stop()


@pytest.mark.kernel
def test_blocked_attempts_are_attributed_entries_in_the_journal(desk_lab) -> None:  # type: ignore[no-untyped-def]
    lab, watcher = desk_lab
    g1, g2 = lab.guests["g1"], lab.guests["g2"]
    send(lab, g1)
    send(lab, g1, dport=465, family=6)
    send(lab, g2)
    entries = wait_for(lambda: len(watcher.entries("SMTP_GATE_EVENT=blocked")) >= 2 and watcher.entries(
        "SMTP_GATE_GUEST=g1"))
    first = entries[0]
    assert {k: first[k] for k in first if k.startswith("SMTP_GATE_") or k in ("SYSLOG_IDENTIFIER", "PRIORITY")} == {
        "SYSLOG_IDENTIFIER": "smtp-gate", "PRIORITY": "4", "SMTP_GATE_EVENT": "blocked", "SMTP_GATE_GUEST": "g1",
        "SMTP_GATE_UUID": guest_uuid("g1"), "SMTP_GATE_MAC": g1.mac, "SMTP_GATE_IFACE": "vnet0",
        "SMTP_GATE_IFINDEX": str(lab.hv.ifindex("vnet0")), "SMTP_GATE_FAMILY": "ipv4", "SMTP_GATE_SRC": g1.ip4,
        "SMTP_GATE_DST": lab.INET4, "SMTP_GATE_SPORT": "40000", "SMTP_GATE_DPORT": "25", "SMTP_GATE_MODE": "enforce",
        "SMTP_GATE_COUNT": "1", "SMTP_GATE_CONNECTIONS": "1", "SMTP_GATE_TOP_DESTINATIONS": f"{lab.INET4}:25=1",
    }
    assert first["MESSAGE"] == f"blocked SMTP from g1 (vnet0, {g1.ip4}, {g1.mac}) to {lab.INET4}:25"
    # the second attempt of g1 fell into its interval: one entry with the count at its end
    later = wait_for(lambda: [e for e in watcher.entries("SMTP_GATE_GUEST=g1") if e["SMTP_GATE_COUNT"] == "1"
                              and e["SMTP_GATE_FAMILY"] == "ipv6"])
    assert later[0]["SMTP_GATE_DST"] == lab.INET6 and later[0]["SMTP_GATE_DPORT"] == "465"
    unknown = watcher.entries("SMTP_GATE_IFACE=vnet1")
    assert unknown and unknown[0]["SMTP_GATE_GUEST"] == "unknown port" and unknown[0]["SMTP_GATE_UUID"] == ""
    assert unknown[0]["MESSAGE"] == (f"blocked SMTP from unknown port vnet1 (ifindex {lab.hv.ifindex('vnet1')}, "
                                     f"{g2.ip4}, {g2.mac}) to {lab.INET4}:25")
    # the report sees them once the watcher has written its buckets (every EVENT_INTERVAL)
    def report() -> List[Dict[str, object]]:
        out = lab.smtp_gate("report", "--since", "10m", "--json").stdout
        return json.loads(out)["guests"]
    guests = wait_for(lambda: [g for g in report() if g["guest"] == "g1"] and report())
    assert [(g["guest"], g["attempts"]) for g in guests] == [("g1", 2), ("unknown port", 1)]


@pytest.mark.kernel
def test_a_spoofed_mac_flood_keeps_enforcement_bounds_entries_and_runs_on_blocked_once(desk_lab) -> None:  # type: ignore[no-untyped-def]
    lab, watcher = desk_lab
    g1, g2 = lab.guests["g1"], lab.guests["g2"]
    counter = lambda: json.loads(lab.nft("-j", "list", "counter", "bridge", "smtp_gate", "blocked4").stdout)  # noqa: E731
    before = counter()["nftables"][1]["counter"]["packets"]
    for batch in range(3):
        send(lab, g1, count=5000, macs=4096, sport=20000 + batch * 5000)
        assert not lab.tcp_connects(g1, lab.INET4, 25, timeout=0.5), "enforcement holds during the flood"
        send(lab, g2)  # another guest's attempt is not starved by the flood (the meter is per port)
        time.sleep(0.5)
    assert counter()["nftables"][1]["counter"]["packets"] - before >= 15_000 + 3, "every frame was dropped by the rule"
    wait_for(lambda: list(lab.tmp.glob("on-blocked.*.json")), 10)
    time.sleep(2.5)  # two more intervals
    g1_entries = watcher.entries("SMTP_GATE_GUEST=g1")
    counts = [int(e["SMTP_GATE_COUNT"]) for e in g1_entries]
    # 15 000 frames, but the kernel's meter passes 100 + 50/s per port, and the watcher
    # writes at most one entry per port per second (EVENT_INTERVAL=1) after the first
    assert 2 <= len(g1_entries) <= 8, counts
    assert 100 <= sum(counts) <= 400, counts
    assert len({e["SMTP_GATE_MAC"] for e in g1_entries}) >= 2, "the MACs are the frames' (spoofed) ones"
    assert len(watcher.entries("SMTP_GATE_IFACE=vnet1")) >= 2, "g2's attempts were not starved"
    runs = list(lab.tmp.glob("on-blocked.*.json"))
    assert len(runs) == 1, "at most once per guest per window"
    document = json.loads(runs[0].read_text())
    assert document["guest"] == "g1" and document["uuid"] == guest_uuid("g1") and document["attempts"] >= 20
    assert document["destinations"][0]["destination"] == f"{lab.INET4}:25"
    assert document["sources"] == [{"source": g1.ip4, "packets": document["packets"]}]
    assert len(document["macs"]) == abuse.MAX_LISTED and document["macs_more"] >= 0
    assert document["last_attempt"]["family"] == "ipv4" and document["port"] == "g1"
    assert "ON_BLOCKED: " in watcher.text() and "exited with status" not in watcher.text()
    assert "restored in" not in watcher.text(), "the datapath's meter and counters are no change of our table"
    assert not lab.frame_arrives(g1.ns, frames.tcp4_frame(g1.mac, lab.inet_mac, g1.ip4, lab.INET4, 25, b"SGT-after-flood!"))


@pytest.mark.kernel
def test_audit_mode_logs_too_and_a_hung_on_blocked_is_killed(lab: BridgeLab) -> None:
    reason = journal_lab.missing()
    if reason:
        pytest.skip(reason)
    (lab.tmp / "whitelist.csv").write_text(WHITELIST)
    hung = lab.tmp / "hung.sh"
    hung.write_text(f"#!/bin/sh\necho started > {lab.tmp}/hung.started\nexec sleep 600\n")
    hung.chmod(0o755)
    lab.write_config(f'UPLINKS="uplink0"\nMODE="audit"\nLOG_DROPS="0"\nEVENT_INTERVAL="1"\n'
                     f'STATE_DIR="{lab.tmp / "state"}"\nON_BLOCKED="{hung}"\nON_BLOCKED_THRESHOLD="1"\n'
                     'ON_BLOCKED_TIMEOUT="1"\n')
    lab.smtp_gate("apply")
    lab.start_guest(lab.guests["g1"])
    watcher = JournaledWatcher(lab)
    try:
        g1 = lab.guests["g1"]
        send(lab, g1)
        entries = wait_for(lambda: watcher.entries("SMTP_GATE_GUEST=g1"))
        assert entries[0]["SMTP_GATE_MODE"] == "audit"
        # finding 2: the mail was delivered, and the entry says so
        assert entries[0]["MESSAGE"] == (f"SMTP that would be blocked (audit mode: delivered) from g1 "
                                         f"(vnet0, {g1.ip4}, {g1.mac}) to {lab.INET4}:25")
        wait_for(lambda: "ON_BLOCKED for g1 killed after 1 s (timeout" in watcher.text(), 10)
        stats = wait_for(lambda: json.loads((lab.tmp / "run" / "abuse.json").read_text())["on_blocked_failures"] == 1
                         and json.loads((lab.tmp / "run" / "abuse.json").read_text()), 10)
        assert stats["on_blocked_runs"] == 1 and stats["bound"] == 1
        report = wait_for(lambda: json.loads(lab.smtp_gate("report", "--json", check=False).stdout)["guests"], 10)
        assert [(g["guest"], g["mode"]) for g in report] == [("g1", "audit")]
        assert "AUDIT (delivered)" in lab.smtp_gate("report").stdout
        # enforcement work went on meanwhile: a flush is restored while the command hung
        lab.nft("flush", "ruleset")
        wait_for(lambda: "table bridge smtp_gate" in lab.nft("list", "tables").stdout)
    finally:
        watcher.stop()
    assert (lab.tmp / "hung.started").exists()
    assert "sleep 600" not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "status -9" not in watcher.text()


def test_the_abuse_desk_keys_are_checked(tmp_path: Path) -> None:
    from smtp_gate import config as config_mod
    from smtp_gate.errors import ConfigError

    path = tmp_path / "c.conf"
    good = config_mod.parse('LOG_GROUP="off"\nON_BLOCKED="/usr/local/bin/notify --queue \'smtp abuse\'"\n'
                            'EVENT_INTERVAL="2.5"\nREPORT_MAX_MB="5"\n', path)
    assert good.log_group is None and good.on_blocked == ("/usr/local/bin/notify", "--queue", "smtp abuse")
    assert (good.event_interval, good.report_max_mb) == (2.5, 5)
    assert config_mod.parse("", path).log_group == 2525
    for line, message in [
        ('LOG_GROUP="70000"', "LOG_GROUP: bad NFLOG group '70000': expected a number 0-65535, or off"),
        ('ON_BLOCKED="notify-abuse"', "ON_BLOCKED: bad command 'notify-abuse': expected an absolute path first"),
        ('ON_BLOCKED_THRESHOLD="0"', "ON_BLOCKED_THRESHOLD: bad threshold '0': expected a whole number 1-1000000000"),
        ('EVENT_INTERVAL="soon"', "EVENT_INTERVAL: bad interval 'soon': expected seconds between 0.1 and 3600"),
        ('LOG_GROUP_RATE="lots"', "LOG_GROUP_RATE: bad rate 'lots'"),
    ]:
        with pytest.raises(ConfigError) as err:
            config_mod.parse(line + "\n", path)
        assert str(err.value).startswith(f"{path}:1: ") and message in str(err.value), str(err.value)


@pytest.mark.kernel
def test_a_group_held_by_another_listener_is_said_once_and_the_watcher_goes_on(bare_lab: BridgeLab) -> None:
    """Another NFLOG listener (ulogd) on LOG_GROUP: the desk says so; the watcher restores as before."""
    with bare_lab.hv.entered():
        holder = nflog.open_group(2525)
    try:
        with bare_lab.hv.entered():
            with pytest.raises(nfnetlink.NetlinkError) as err:
                nflog.open_group(2525)
        assert err.value.errno == errno.EPERM and "another listener holds the group" in str(err.value)
        bare_lab.smtp_gate("apply")
        (bare_lab.tmp / "whitelist.csv").write_text(WHITELIST)
        log = bare_lab.tmp / "watch.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", bare_lab.hv.name, sys.executable, "-m", "smtp_gate",
                                     "--config", str(bare_lab.config_path), "watch"],
                                    env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL,
                                    stderr=out, start_new_session=True)
        try:
            wait_for(lambda: "checked our table" in log.read_text() or "restored in" in log.read_text(), 15)
            bare_lab.nft("flush", "ruleset")
            wait_for(lambda: "table bridge smtp_gate" in bare_lab.nft("list", "tables").stdout)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        assert ("blocked attempts are not followed: cannot bind NFLOG group 2525: Operation not permitted (EPERM) "
                "(another listener holds the group: pick a free LOG_GROUP)") in log.read_text()
        # finding 4: the sign outside the watcher's log
        stats = json.loads((bare_lab.tmp / "run" / "abuse.json").read_text())
        assert set(stats) == set(abuse.STATS_KEYS) | {"updated"} and stats["bound"] == 0
        debug = bare_lab.smtp_gate("debug", check=False)
        assert "the abuse desk is not following blocked attempts (NFLOG group 2525)" in debug.stderr
    finally:
        holder.close()


def desk_config(lab: BridgeLab, extra: str = "") -> None:
    (lab.tmp / "whitelist.csv").write_text(WHITELIST)
    lab.write_config(f'UPLINKS="uplink0"\nEVENT_INTERVAL="1"\nSTATE_DIR="{lab.tmp / "state"}"\n' + extra)


def stats(lab: BridgeLab) -> Dict[str, int]:
    return json.loads((lab.tmp / "run" / "abuse.json").read_text())


@pytest.mark.kernel
def test_one_connect_is_one_connection_attempt_however_often_its_syn_is_sent(lab: BridgeLab) -> None:
    """Finding 1: a connect() with a 3.5 s timeout sends its SYN at least 3 times (0, 1, 3 s;
    every second on Linux 6.5+): as many packets, and 1 connection attempt; ON_BLOCKED's
    threshold counts attempts."""
    reason = journal_lab.missing()
    if reason:
        pytest.skip(reason)
    script = lab.tmp / "on-blocked.sh"
    script.write_text(f"#!/bin/sh\ncat > {lab.tmp}/on-blocked.$$.json\n")
    script.chmod(0o755)
    desk_config(lab, f'ON_BLOCKED="{script}"\nON_BLOCKED_THRESHOLD="2"\nON_BLOCKED_WINDOW="120"\n')
    lab.smtp_gate("apply")
    g1 = lab.guests["g1"]
    lab.start_guest(g1)
    watcher = JournaledWatcher(lab)
    try:
        assert not lab.tcp_connects(g1, lab.INET4, 25, timeout=3.5)

        def totals() -> List[int]:
            entries = watcher.entries("SMTP_GATE_GUEST=g1")
            return [sum(int(e["SMTP_GATE_COUNT"]) for e in entries), sum(int(e["SMTP_GATE_CONNECTIONS"]) for e in entries)]
        wait_for(lambda: totals()[0] >= 3, 10)
        time.sleep(1.5)  # the interval's entry
        packets, connections = totals()
        assert packets >= 3 and connections == 1, "the SYNs of one connect(): packets, 1 connection attempt"
        assert not list(lab.tmp.glob("on-blocked.*.json")), "one connection attempt is below a threshold of 2"
        assert not lab.tcp_connects(g1, lab.INET4, 25, timeout=0.5)  # a second connect(): another attempt
        run = wait_for(lambda: list(lab.tmp.glob("on-blocked.*.json")), 10)
        document = json.loads(wait_for(lambda: run[0].read_text(), 5))
        assert document["attempts"] == 2 and document["packets"] > packets and document["threshold"] == 2
        guests = lambda: json.loads(lab.smtp_gate("report", "--json", check=False).stdout)["guests"]  # noqa: E731
        report = wait_for(lambda: [g for g in guests() if g["connections"] == 2], 10)
        assert [g["guest"] for g in guests()] == ["g1"] and report[0]["attempts"] > packets
    finally:
        watcher.stop()


@pytest.mark.kernel
def test_a_stopped_watcher_writes_what_it_counted(lab: BridgeLab) -> None:
    """Finding 3: SIGTERM lost up to EVENT_INTERVAL of attempts while saying "0 lost"."""
    reason = journal_lab.missing()
    if reason:
        pytest.skip(reason)
    desk_config(lab)
    lab.write_config(f'UPLINKS="uplink0"\nEVENT_INTERVAL="600"\nSTATE_DIR="{lab.tmp / "state"}"\n')
    lab.smtp_gate("apply")
    g1 = lab.guests["g1"]
    lab.start_guest(g1)
    watcher = JournaledWatcher(lab)
    try:
        send(lab, g1, count=5)
        wait_for(lambda: watcher.entries("SMTP_GATE_GUEST=g1"))
        time.sleep(0.5)
        watcher.terminate()
        entries = watcher.entries("SMTP_GATE_GUEST=g1")
        assert [(e["SMTP_GATE_COUNT"], e["SMTP_GATE_CONNECTIONS"]) for e in entries] == [("1", "1"), ("4", "4")]
        assert "5 blocked-attempt events received" in watcher.text() and "0 lost" in watcher.text()
        assert [(g["guest"], g["attempts"]) for g in json.loads(lab.smtp_gate("report", "--json").stdout)["guests"]] \
            == [("g1", 5)], "the store's buckets were written too"
        assert {k: v for k, v in stats(lab).items() if k != "updated"} == {
            "bound": 0, "events": 5, "overruns": 0, "kernel_drops": 0, "journal_entries": 2, "journal_lost": 0,
            "on_blocked_runs": 0, "on_blocked_failures": 0, "store_full": 0}
    finally:
        watcher.stop()


@pytest.mark.kernel
def test_on_blocked_failures_are_counted_and_its_memory_survives_a_restart(lab: BridgeLab) -> None:
    reason = journal_lab.missing()
    if reason:
        pytest.skip(reason)
    script = lab.tmp / "fails.sh"
    script.write_text(f"#!/bin/sh\ncat > {lab.tmp}/fails.$$.json\nexit 3\n")
    script.chmod(0o755)
    desk_config(lab, f'ON_BLOCKED="{script}"\nON_BLOCKED_THRESHOLD="5"\nON_BLOCKED_WINDOW="600"\n')
    lab.smtp_gate("apply")
    g1 = lab.guests["g1"]
    lab.start_guest(g1)
    watcher = JournaledWatcher(lab)
    try:
        send(lab, g1, count=10)
        wait_for(lambda: "ON_BLOCKED for g1 failed: " in watcher.text(), 10)
        assert f"ON_BLOCKED for g1 failed: {script} exited with status 3" in watcher.text()
        assert wait_for(lambda: stats(lab)["on_blocked_failures"] == 1 and stats(lab), 5)["on_blocked_runs"] == 1
    finally:
        watcher.stop()
    assert (lab.tmp / "state" / "on_blocked.json").exists()
    watcher = JournaledWatcher(lab)  # a restart within the window does not run it again for g1
    try:
        send(lab, g1, count=10, sport=50000)
        wait_for(lambda: len(watcher.entries("SMTP_GATE_GUEST=g1")) >= 2, 10)
        time.sleep(1.0)
        assert len(list(lab.tmp.glob("fails.*.json"))) == 1 and "ON_BLOCKED: " not in watcher.text()
    finally:
        watcher.stop()


@pytest.mark.kernel
def test_an_abuse_desk_that_cannot_work_is_said_everywhere(bare_lab: BridgeLab) -> None:
    """Findings 4 and 5: ON_BLOCKED with LOG_GROUP off, or a command that cannot run, is a
    warning of apply, status and debug (exit 3) and of the watcher's start."""
    (bare_lab.tmp / "whitelist.csv").write_text(WHITELIST)
    missing = bare_lab.tmp / "no such notifier"
    bare_lab.write_config(f'UPLINKS="uplink0"\nON_BLOCKED="\'{missing}\' --queue \'smtp abuse\'"\n'
                          f'ON_BLOCKED_WINDOW="120"\nSTATE_DIR="{bare_lab.tmp / "state"}"\n')
    problem = (f"smtp-gate: warning: ON_BLOCKED command '{missing}' cannot be used: No such file or directory; "
               "expected an executable file\n")
    apply = bare_lab.smtp_gate("apply", "--no-libvirt", check=False)
    assert apply.returncode == 3 and problem in apply.stderr, apply
    status = bare_lab.smtp_gate("status", check=False)
    assert status.returncode == 3 and problem.replace("smtp-gate: ", "") in status.stdout, status
    debug = bare_lab.smtp_gate("debug", check=False)
    assert debug.returncode == 3 and problem in debug.stderr
    assert f"""ON_BLOCKED="'{missing}' --queue 'smtp abuse'"  <- """ in debug.stdout, debug.stdout
    assert 'ON_BLOCKED_WINDOW="120"  <- ' in debug.stdout
    for bad, why in (("dir", "is not a regular file"), ("plain", "is not executable")):
        path = bare_lab.tmp / bad
        path.mkdir() if bad == "dir" else path.write_text("#!/bin/sh\n")
        bare_lab.write_config(f'UPLINKS="uplink0"\nON_BLOCKED="{path}"\n')
        debug = bare_lab.smtp_gate("debug", check=False)
        assert debug.returncode == 3 and f"ON_BLOCKED command '{path}' {why}" in debug.stderr
    ok = bare_lab.tmp / "ok.sh"
    ok.write_text("#!/bin/sh\n")
    ok.chmod(0o755)
    bare_lab.write_config(f'UPLINKS="uplink0"\nON_BLOCKED="{ok}"\nLOG_GROUP="off"\n')
    off = ('smtp-gate: warning: ON_BLOCKED is set but LOG_GROUP is "off": blocked attempts are not followed, '
           "so the command never runs (set LOG_GROUP, e.g. 2525)\n")
    apply = bare_lab.smtp_gate("apply", "--no-libvirt", check=False)
    assert apply.returncode == 3 and off in apply.stderr
    assert bare_lab.smtp_gate("debug", check=False).returncode == 3
    # the watcher says so at its start, and writes "bound": 0
    log = bare_lab.tmp / "watch.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", bare_lab.hv.name, sys.executable, "-m", "smtp_gate",
                                 "--config", str(bare_lab.config_path), "watch"],
                                env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL, stderr=out,
                                start_new_session=True)
    try:
        wait_for(lambda: "following nftables events" in log.read_text(), 15)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    assert 'blocked attempts are not followed: LOG_GROUP is "off"' in log.read_text()
    assert off.replace("smtp-gate: ", "smtp-gate watch: ") in log.read_text()
    assert stats(bare_lab)["bound"] == 0


@pytest.mark.kernel
def test_disable_prints_the_full_path_of_its_record(bare_lab: BridgeLab) -> None:
    """Finding 7: a relative --config printed "recorded in disabled"."""
    bare_lab.write_config('UPLINKS="uplink0"\n')
    (bare_lab.tmp / "whitelist.csv").write_text(WHITELIST)
    result = subprocess.run(["ip", "netns", "exec", bare_lab.hv.name, sys.executable, "-m", "smtp_gate", "--config",
                             "smtp-gate.conf", "disable", "--reason", "test"], cwd=str(bare_lab.tmp),
                            env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result
    assert f"; recorded in {bare_lab.tmp / 'disabled'} (kept across reboots)\n" in result.stdout
