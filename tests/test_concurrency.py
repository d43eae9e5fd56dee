"""Many guests start and stop at once (hook processes fed real XML) while rebuilds loop:
no deadlock, no hook that fails, and afterwards the kernel holds exactly the truth.  (That a
hook gives up on a lock it cannot get, rather than hang libvirt, is tests/test_hooks.py's
test_a_hook_that_cannot_get_the_lock_gives_up_and_the_guest_stays_blocked; how long hooks
take is bench/bench_hook.py's.)

libvirt's view is a test-driver node file that the test updates the way libvirt's own
state changes around the hooks: a guest is listed as running (its taps exist) before its
start hook runs, and is gone (taps deleted) before its stopped hook runs.
"""

import json
import os
import random
import subprocess
import sys
import threading
from typing import Dict, List, Set, Tuple

import pytest

from tests import testdriver
from tests.netlab import REPO, BridgeLab

pytestmark = pytest.mark.kernel

GUESTS = 24
NICS = 2
CYCLES = 3
WORKERS = 8
# Running guests with no device here: they make every rebuild's libvirt listing take a
# while, so hooks run between libvirt's snapshot and the rebuild's lock, as on a big host.
BYSTANDERS = 800


class Fleet:
    """The truth: which guests run, in a node file libvirt's test driver reads."""

    def __init__(self, lab: BridgeLab) -> None:
        self.lab = lab
        self.node = lab.tmp / "node.xml"
        self.running: Set[int] = set()
        self.mutex = threading.Lock()
        self.write_node()

    def write_node(self) -> None:
        guests = sorted(self.running) + list(range(1000, 1000 + BYSTANDERS))
        text = "<node>\n" + "".join(testdriver.domain_xml(i, NICS) for i in guests) + "</node>\n"
        tmp = self.node.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.node)

    def start(self, i: int) -> None:
        with self.mutex:
            for k in range(NICS):
                port = testdriver.target(i, k)
                self.lab.hv.ip("tuntap", "add", "name", port, "mode", "tap")
                self.lab.hv.ip("link", "set", port, "address", testdriver.mac(i, k))
                self.lab.hv.ip("link", "set", port, "master", "br0")
            self.running.add(i)
            self.write_node()

    def stop(self, i: int) -> None:
        with self.mutex:
            self.running.discard(i)
            self.write_node()
            for k in range(NICS):
                self.lab.hv.ip("link", "del", testdriver.target(i, k))


def live_xml(i: int) -> bytes:
    """What libvirt hands the start hook: the guest's live XML with its targets."""
    return testdriver.domain_xml(i, NICS).replace("type='test'", "type='qemu'").encode()


def stop_xml(i: int) -> bytes:
    """What libvirt hands the stopped hook: no <target> (auto-named taps are absent)."""
    xml = live_xml(i).decode()
    for k in range(NICS):
        xml = xml.replace(f"<target dev='{testdriver.target(i, k)}'/>", "")
    return xml.encode()


def allowed_by_whitelist(i: int) -> Set[int]:
    """Which NICs of guest I the whitelist below allows."""
    if i % 3 == 0:
        return set(range(NICS))  # by name
    if i % 3 == 1:
        return {1}  # by the second NIC's MAC
    return set()


def whitelist_text() -> str:
    rows = ["# vmname,mac,added_at,added_by,reason\n"]
    for i in range(GUESTS):
        if i % 3 == 0:
            rows.append(f"{testdriver.name(i)},,2026-11-25T00:00:00+00:00,test,\n")
        elif i % 3 == 1:
            rows.append(f",{testdriver.mac(i, 1)},2026-11-25T00:00:00+00:00,test,\n")
    return "".join(rows)


def test_concurrent_starts_stops_and_rebuilds_end_in_the_truth(bare_lab: BridgeLab) -> None:
    lab = bare_lab
    fleet = Fleet(lab)
    lab.write_config(f'UPLINKS="uplink0"\nLIBVIRT_URI="test://{fleet.node}"\n')
    (lab.tmp / "whitelist.csv").write_text(whitelist_text())
    assert lab.smtp_gate("apply").returncode == 0
    env = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "SMTP_GATE_CONFIG": str(lab.config_path)}
    problems: List[str] = []

    def hook(i: int, op: str, sub: str, xml: bytes) -> None:
        r = subprocess.run(
            ["ip", "netns", "exec", lab.hv.name, "/usr/bin/python3", str(REPO / "hooks" / "qemu"),
             testdriver.name(i), op, sub, "-"],
            input=xml, capture_output=True, env=env, timeout=60,
        )
        if r.returncode != 0 or r.stdout or b"failed" in r.stderr:
            problems.append(f"{testdriver.name(i)} {op} {sub}: rc={r.returncode} out={r.stdout!r} err={r.stderr!r}")

    stop_rebuilds = threading.Event()

    def worker(mine: List[int], seed: int) -> None:
        try:
            cycles(mine, seed)
        finally:
            # the last rebuild must race with hooks still running: a final rebuild after all
            # hooks would derive the truth from scratch and hide a lost update
            stop_rebuilds.set()

    def cycles(mine: List[int], seed: int) -> None:
        rng = random.Random(seed)
        for cycle in range(CYCLES):
            for i in rng.sample(mine, len(mine)):
                fleet.start(i)
                hook(i, "prepare", "begin", live_xml(i))
                hook(i, "start", "begin", live_xml(i))
                hook(i, "started", "begin", live_xml(i))
                if cycle == CYCLES - 1 and i % 2 == 0:
                    continue  # the even guests stay running at the end
                fleet.stop(i)
                hook(i, "stopped", "end", stop_xml(i))
                hook(i, "release", "end", stop_xml(i))

    rebuilds: List[int] = []

    def rebuild_loop() -> None:
        while not stop_rebuilds.is_set():
            r = lab.hv.exec([sys.executable, "-m", "smtp_gate", "--config", str(lab.config_path), "rebuild"],
                            check=False, env=dict(os.environ, PYTHONPATH=str(REPO)))
            rebuilds.append(r.returncode)
            if r.returncode != 0:
                problems.append(f"rebuild: rc={r.returncode} {r.stderr}")

    looper = threading.Thread(target=rebuild_loop)
    looper.start()
    threads = [threading.Thread(target=worker, args=(list(range(w, GUESTS, WORKERS)), w)) for w in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    stop_rebuilds.set()
    looper.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not looper.is_alive(), "deadlock"
    assert problems == []
    assert len(rebuilds) >= 3, "rebuilds must really have raced with the hooks"

    # the truth: running guests, their allowed NICs, on the devices that exist now
    expected_allowed: Set[Tuple[str, str]] = set()
    expected_ports: Set[str] = set()
    for i in fleet.running:
        for k in range(NICS):
            expected_ports.add(testdriver.target(i, k))
            if k in allowed_by_whitelist(i):
                expected_allowed.add((testdriver.target(i, k), testdriver.mac(i, k)))
    assert fleet.running == {i for i in range(GUESTS) if i % 2 == 0}

    def kernel() -> Tuple[Set[Tuple[str, str]], Set[str]]:
        listing = json.loads(lab.nft("-j", "list", "table", "bridge", "smtp_gate").stdout)
        sets: Dict[str, list] = {item["set"]["name"]: item["set"].get("elem", []) for item in listing["nftables"] if "set" in item}
        allowed = {(str(e["concat"][0]), str(e["concat"][1])) for e in sets["allowed"]}
        return allowed, {str(e) for e in sets["guest_ifaces"]}

    assert kernel() == (expected_allowed, expected_ports), "hooks racing rebuilds lost or resurrected state"
    records = {p.stem for p in (lab.tmp / "run" / "records").glob("*.json")}
    bystanders = {testdriver.uuid(i) for i in range(1000, 1000 + BYSTANDERS)}
    assert records - bystanders == {testdriver.uuid(i) for i in fleet.running}
    # and one more rebuild from libvirt changes nothing
    assert lab.smtp_gate("rebuild").returncode == 0
    assert kernel() == (expected_allowed, expected_ports)
