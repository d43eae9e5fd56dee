"""The libvirt hooks, run as libvirt runs them: the executable, argv, the recorded domain XML
on stdin, a clean environment; the kernel state and real frames checked after each call."""

import fcntl
import json
import os
import re
import shutil
import socket
import stat
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

from smtp_gate.hook import DEADLINE
from tests.netlab import REPO, BridgeLab, immutable

pytestmark = pytest.mark.kernel

SAMPLES = Path(__file__).parent / "data" / "libvirt-samples"
TWO_NICS = SAMPLES / "2nic-virsh-destroy"
UUID2 = "56ba75c7-fc96-46bd-a78e-ccf8d5907094"
MAC_AUTO, MAC_FIXED = "52:54:00:fa:2f:a5", "52:54:00:aa:00:02"
HEADER = "# vmname,mac,added_at,added_by,reason\n"


def hook(
    lab: BridgeLab, driver: str, name: str, op: str, sub: str, xml: bytes, path: Optional[str] = None,
    extra_env: Optional[Dict[str, str]] = None, prefix: Sequence[str] = (), timeout: float = 30,
) -> subprocess.CompletedProcess:
    """Run hooks/<driver> in the hypervisor namespace with libvirt's environment (LC_ALL, PATH,
    HOME) plus SMTP_GATE_CONFIG, which the hook honours; PREFIX runs before the interpreter
    (strace); TIMEOUT is a give-up bound, not a speed claim."""
    env = {"LC_ALL": "C", "PATH": path or "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
           "SMTP_GATE_CONFIG": str(lab.config_path)}
    env.update(extra_env or {})
    return subprocess.run(
        ["ip", "netns", "exec", lab.hv.name, *prefix, "/usr/bin/python3", str(REPO / "hooks" / driver),
         name, op, sub, "-"],
        input=xml, capture_output=True, env=env, timeout=timeout,
    )


def sample(name: str) -> bytes:
    return (TWO_NICS / f"{name}.xml").read_bytes()


def allowed(lab: BridgeLab) -> str:
    return lab.nft("list", "set", "bridge", "smtp_gate", "allowed").stdout


@pytest.fixture
def lab2(bare_lab: BridgeLab) -> BridgeLab:
    """The recorded guest 'lab2': vnet1 (auto-named tap) and lab2n1 (fixed target), with
    their MACs, plus the internet listening."""
    bare_lab.add_guest("lab2a", "vnet1", 10, mac=MAC_AUTO)
    bare_lab.add_guest("lab2b", "lab2n1", 11, mac=MAC_FIXED)
    return bare_lab


def test_the_lifecycle_of_an_allowed_nic(lab2: BridgeLab) -> None:
    lab = lab2
    (lab.tmp / "whitelist.csv").write_text(HEADER + f"lab2-second-nic,{MAC_FIXED.upper()},2026-01-01T00:00:00+00:00,root,ok\n")
    auto, fixed = lab.guests["lab2a"], lab.guests["lab2b"]

    r = hook(lab, "qemu", "lab2", "prepare", "begin", sample("01-lab2-prepare-begin"))
    assert (r.returncode, r.stdout) == (0, b"")
    assert "smtp_gate" in lab.nft("list", "tables").stdout, "prepare installs the base table"
    assert not lab.tcp_connects(fixed, lab.INET4, 25, timeout=0.5)

    r = hook(lab, "qemu", "lab2", "start", "begin", sample("02-lab2-start-begin"))
    assert (r.returncode, r.stdout) == (0, b"")
    assert lab.tcp_connects(fixed, lab.INET4, 25) and lab.tcp_connects(fixed, lab.INET6, 465)
    assert not lab.tcp_connects(auto, lab.INET4, 25, timeout=0.5), "only the NIC with the whitelisted MAC"
    guest_ports = lab.nft("list", "set", "bridge", "smtp_gate", "guest_ifaces").stdout
    assert '"vnet1"' in guest_ports and '"lab2n1"' in guest_ports

    for name, op, sub in (("03-lab2-started-begin", "started", "begin"),):
        assert hook(lab, "qemu", "lab2", op, sub, sample(name)).returncode == 0
    assert lab.tcp_connects(fixed, lab.INET4, 25)

    # stopped end: the XML no longer names vnet1; the record from start says what to remove
    r = hook(lab, "qemu", "lab2", "stopped", "end", sample("04-lab2-stopped-end"))
    assert (r.returncode, r.stdout) == (0, b"")
    assert MAC_FIXED not in allowed(lab)
    assert '"vnet1"' not in lab.nft("list", "set", "bridge", "smtp_gate", "guest_ifaces").stdout
    assert not lab.tcp_connects(fixed, lab.INET4, 25, timeout=0.5)
    assert not (lab.tmp / "run" / "records" / f"{UUID2}.json").exists()
    r = hook(lab, "qemu", "lab2", "release", "end", sample("05-lab2-release-end"))
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")


def test_stop_without_a_record_revokes_from_what_the_kernel_holds(lab2: BridgeLab) -> None:
    """The guest started before smtp-gate ran, or /run was wiped: no record to go by."""
    lab = lab2
    (lab.tmp / "whitelist.csv").write_text(HEADER + "lab2,,2026-01-01T00:00:00+00:00,root,\n")
    assert hook(lab, "qemu", "lab2", "start", "begin", sample("02-lab2-start-begin")).returncode == 0
    assert MAC_AUTO in allowed(lab) and MAC_FIXED in allowed(lab)
    (lab.tmp / "run" / "records" / f"{UUID2}.json").unlink()
    (lab.tmp / "run" / "journal").unlink()
    lab.hv.ip("link", "del", "vnet1")  # the auto-named tap is gone, as after a real stop
    r = hook(lab, "qemu", "lab2", "stopped", "end", sample("04-lab2-stopped-end"))
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"smtp-gate hook: guest 'lab2' stopped: allowance removed\n")
    assert MAC_AUTO not in allowed(lab), "the pair of a device that is gone is removed by its number"
    assert MAC_FIXED not in allowed(lab), "the pair of a target named in the stop XML is removed"


def test_a_name_row_allows_every_nic_of_the_guest(lab2: BridgeLab) -> None:
    lab = lab2
    (lab.tmp / "whitelist.csv").write_text(HEADER + "lab2,,2026-01-01T00:00:00+00:00,root,\"ID verified, ticket \"\"4711\"\"\"\n")
    assert hook(lab, "qemu", "lab2", "start", "begin", sample("02-lab2-start-begin")).returncode == 0
    assert lab.tcp_connects(lab.guests["lab2a"], lab.INET4, 25)
    assert lab.tcp_connects(lab.guests["lab2b"], lab.INET6, 25)


@pytest.mark.parametrize("vmname, allows", [(UUID2, True), ("0badc0de-1111-4111-8111-111111111111", False)])
def test_a_uuid_row_as_add_vm_writes_it_allows_the_guest_with_that_uuid_only(
    lab2: BridgeLab, vmname: str, allows: bool
) -> None:
    """The hook's fast path matches the row add-vm writes (the guest's UUID); a row with
    another guest's UUID allows this guest nothing, whatever its name."""
    lab = lab2
    (lab.tmp / "whitelist.csv").write_text(HEADER + f"{vmname},,2026-01-01T00:00:00+00:00,root,ticket 4711\n")
    assert hook(lab, "qemu", "lab2", "start", "begin", sample("02-lab2-start-begin")).returncode == 0
    assert lab.tcp_connects(lab.guests["lab2a"], lab.INET4, 25, timeout=0.5) is allows
    assert lab.tcp_connects(lab.guests["lab2b"], lab.INET6, 25, timeout=0.5) is allows


def test_reconnect_does_nothing_when_nothing_changed_and_repairs_when_it_did(lab2: BridgeLab, tmp_path: Path) -> None:
    lab = lab2
    (lab.tmp / "whitelist.csv").write_text(HEADER + "lab2,,2026-01-01T00:00:00+00:00,root,\n")
    assert hook(lab, "qemu", "lab2", "start", "begin", sample("02-lab2-start-begin")).returncode == 0
    # a spy nft that records calls and fails: reconnect with nothing changed must not need it
    spy = tmp_path / "spy"
    spy.mkdir()
    (spy / "nft").write_text(f"#!/bin/sh\necho \"$@\" >> {spy}/calls\nexit 1\n")
    (spy / "nft").chmod(0o755)
    reconnect_xml = (SAMPLES / "1nic-daemon-restart-reconnect" / "04-lab1-reconnect-begin.xml").read_bytes()
    started = sample("03-lab2-started-begin").replace(b"<domain type='qemu' id='2'>", b"<domain type='qemu' id='7'>")
    journal = lab.tmp / "run" / "journal"
    record = lab.tmp / "run" / "records" / f"{UUID2}.json"
    before = (journal.read_bytes(), record.stat().st_mtime_ns)
    r = hook(lab, "qemu", "lab2", "reconnect", "begin", started, path=f"{spy}:/usr/sbin:/usr/bin:/sbin:/bin")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    assert not (spy / "calls").exists(), "reconnect called nft although nothing changed"
    assert (journal.read_bytes(), record.stat().st_mtime_ns) == before, "reconnect changed state it did not need to"
    assert lab.tcp_connects(lab.guests["lab2a"], lab.INET4, 25)
    # the record no longer matches (the whitelist row is gone): reconnect repairs it
    (lab.tmp / "whitelist.csv").write_text(HEADER)
    r = hook(lab, "qemu", "lab2", "reconnect", "begin", started)
    assert r.returncode == 0
    assert not lab.tcp_connects(lab.guests["lab2a"], lab.INET4, 25, timeout=0.5)
    # the recorded reconnect XML of another guest is handled without a word (a hook that
    # failed would still exit 0, but would say why on stderr)
    r = hook(lab, "qemu", "lab1", "reconnect", "begin", reconnect_xml)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    assert (lab.tmp / "run" / "records" / "2cf10258-8b90-47b5-9d64-77eed98e63fb.json").exists(), (
        "reconnect of a guest without a record records it"
    )


def test_when_the_kernel_refuses_the_guest_still_starts_and_stays_blocked(lab2: BridgeLab) -> None:
    """The start hook talks to nftables over netlink, not through nft: without CAP_NET_ADMIN
    the kernel refuses its batch (EPERM)."""
    lab = lab2
    (lab.tmp / "whitelist.csv").write_text(HEADER + "lab2,,2026-01-01T00:00:00+00:00,root,\n")
    lab.smtp_gate("apply")
    env = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "SMTP_GATE_CONFIG": str(lab.config_path)}
    r = subprocess.run(
        ["ip", "netns", "exec", lab.hv.name, "setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin",
         "/usr/bin/python3", str(REPO / "hooks" / "qemu"), "lab2", "start", "begin", "-"],
        input=sample("02-lab2-start-begin"), capture_output=True, env=env, timeout=30,
    )
    assert (r.returncode, r.stdout) == (0, b""), "a failing hook would stop the guest from starting"
    assert b"failed" in r.stderr and b"stays blocked" in r.stderr
    assert not lab.tcp_connects(lab.guests["lab2a"], lab.INET4, 25, timeout=0.5)


def test_a_hook_that_cannot_get_the_lock_gives_up_and_the_guest_stays_blocked(lab2: BridgeLab) -> None:
    """libvirt holds the guest's lock while a hook runs: a hook must never wait for ours forever.
    While another process holds it, `start begin` returns (exit 0, nothing on stdout, a line on
    stderr) without allowing anything; once it is free the same call allows."""
    lab = lab2
    (lab.tmp / "whitelist.csv").write_text(HEADER + "lab2,,2026-01-01T00:00:00+00:00,root,\n")
    assert hook(lab, "qemu", "lab2", "prepare", "begin", sample("01-lab2-prepare-begin")).returncode == 0
    fixed = lab.guests["lab2b"]
    lock_path = lab.tmp / "run" / "lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(lock_path), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a rebuild or another hook would hold it
        r = hook(lab, "qemu", "lab2", "start", "begin", sample("02-lab2-start-begin"))  # timeout=30: give up
        assert (r.returncode, r.stdout) == (0, b"")
        assert b"still held" in r.stderr, r.stderr
        assert MAC_FIXED not in allowed(lab) and MAC_AUTO not in allowed(lab)
        assert not lab.tcp_connects(fixed, lab.INET4, 25, timeout=0.5), "no lock, no allowance"
    finally:
        os.close(fd)
    r = hook(lab, "qemu", "lab2", "start", "begin", sample("02-lab2-start-begin"))
    assert (r.returncode, r.stdout) == (0, b"")
    assert MAC_FIXED in allowed(lab) and lab.tcp_connects(fixed, lab.INET4, 25)


def test_broken_input_never_fails_the_hook(lab2: BridgeLab) -> None:
    lab = lab2
    for xml in (b"", b"<domain><name>x</name>", b"<network/>"):
        r = hook(lab, "qemu", "x", "start", "begin", xml)
        assert (r.returncode, r.stdout) == (0, b"")
        assert b"smtp-gate hook" in r.stderr
    lab.config_path.write_text('BLOCKED_PORTS="nonsense"\n')
    r = hook(lab, "qemu", "lab2", "start", "begin", sample("02-lab2-start-begin"))
    assert (r.returncode, r.stdout) == (0, b"") and b"BLOCKED_PORTS" in r.stderr
    # operations the hook does not handle (migrate: stdout would replace the XML) are silent
    r = hook(lab, "qemu", "lab2", "migrate", "begin", sample("02-lab2-start-begin"))
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")


def test_libxl_allows_at_started_not_at_start(lab2: BridgeLab) -> None:
    lab = lab2
    (lab.tmp / "whitelist.csv").write_text(HEADER + "lab2,,2026-01-01T00:00:00+00:00,root,\n")
    xml = sample("02-lab2-start-begin").replace(b"type='qemu'", b"type='xen'")
    assert hook(lab, "libxl", "lab2", "start", "begin", xml).returncode == 0
    assert "smtp_gate" in lab.nft("list", "tables").stdout
    assert MAC_FIXED not in allowed(lab)
    assert hook(lab, "libxl", "lab2", "started", "begin", xml).returncode == 0
    assert MAC_FIXED in allowed(lab)


def test_a_nic_on_an_unprotected_bridge_is_left_alone(lab: BridgeLab) -> None:
    lab.hv.ip("link", "add", "virbr0", "type", "bridge")
    lab.hv.ip("link", "set", "virbr0", "up")
    guest = lab.netns("nat")
    lab.connect(guest, "eth0", "vnet5", mac="52:54:00:00:05:05", bridge="virbr0")
    lab.smtp_gate("apply")
    xml = sample("02-lab2-start-begin").replace(b"<source bridge='br0'/>\n      <target dev='vnet1'/>",
                                                b"<source bridge='virbr0'/>\n      <target dev='vnet5'/>")
    assert hook(lab, "qemu", "lab2", "start", "begin", xml).returncode == 0
    assert '"vnet5"' in lab.nft("list", "set", "bridge", "smtp_gate", "foreign_ifaces").stdout
    record = json.loads((lab.tmp / "run" / "records" / f"{UUID2}.json").read_text())
    assert record["foreign_ports"] == [["vnet5", lab.hv.ifindex("vnet5")]] and record["allowed"] == []


def test_the_hook_finds_its_configuration_without_the_environment(tmp_path: Path) -> None:
    """libvirt passes only LC_ALL, PATH and HOME: the hook's default config is its app dir's."""
    app = tmp_path / "app"
    (app / "hooks").mkdir(parents=True)
    (app / "config").mkdir()
    shutil.copytree(REPO / "smtp_gate", app / "smtp_gate", ignore=shutil.ignore_patterns("__pycache__"))
    (app / "hooks" / "qemu").write_bytes((REPO / "hooks" / "qemu").read_bytes())
    (app / "hooks" / "qemu").chmod(0o755)
    (app / "config" / "smtp-gate.conf").write_text('BLOCKED_PORTS="not-a-port"\n')
    link = tmp_path / "qemu.d-smtp-gate"
    os.symlink(app / "hooks" / "qemu", link)
    r = subprocess.run([str(link), "x", "start", "begin", "-"], input=b"<domain/>", capture_output=True,
                       env={"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"})
    assert (r.returncode, r.stdout) == (0, b"")
    assert str(app / "config" / "smtp-gate.conf").encode() in r.stderr, r.stderr
    assert stat.S_IMODE((REPO / "hooks" / "qemu").stat().st_mode) & 0o111


def test_while_disabled_the_hooks_install_nothing_but_keep_their_records(lab2: BridgeLab) -> None:
    """`smtp-gate disable` is honoured by prepare and start (the base table stays away, the guest
    still starts: exit 0, nothing on stdout), and the start is recorded, so `enable` comes back
    exact without asking libvirt."""
    lab = lab2
    (lab.tmp / "whitelist.csv").write_text(HEADER + f"lab2-second-nic,{MAC_FIXED},2026-01-01T00:00:00+00:00,root,ok\n")
    lab.smtp_gate("apply")
    lab.smtp_gate("disable", "--reason", "incident 42", env={"SUDO_USER": "alice"})
    xen = sample("02-lab2-start-begin").replace(b"type='qemu'", b"type='xen'")
    calls = (("qemu", "prepare", sample("01-lab2-prepare-begin")), ("qemu", "start", sample("02-lab2-start-begin")),
             ("libxl", "start", xen))
    for driver, op, xml in calls:
        r = hook(lab, driver, "lab2", op, "begin", xml)
        assert (r.returncode, r.stdout) == (0, b""), (driver, op, r)
        assert "smtp_gate" not in lab.nft("list", "tables").stdout, f"{driver} {op} begin brought the table back"
        assert b"enforcement is disabled by alice at " in r.stderr and b"failed" not in r.stderr, r.stderr
    record = json.loads((lab.tmp / "run" / "records" / f"{UUID2}.json").read_text())
    assert [mac for _index, mac in record["allowed"]] == [MAC_FIXED], "the start is recorded while disabled"

    lab.smtp_gate("enable")  # no hypervisor answers here: enable restores from the hooks' records
    assert lab.tcp_connects(lab.guests["lab2b"], lab.INET4, 25), "the allowance recorded while disabled is back"
    assert not lab.tcp_connects(lab.guests["lab2a"], lab.INET4, 25, timeout=0.5)
    r = hook(lab, "qemu", "lab2", "stopped", "end", sample("04-lab2-stopped-end"))
    assert (r.returncode, r.stdout) == (0, b"") and MAC_FIXED not in allowed(lab)


# -- bounded hooks (issue 10): one budget, no process on the common paths, netlink fallbacks ----

STARTED = sample("03-lab2-started-begin").replace(b"<domain type='qemu' id='2'>", b"<domain type='qemu' id='7'>")
GIVE_UP = DEADLINE + 10  # seconds: only so that a hung hook fails the test instead of hanging it


def traced(lab: BridgeLab, tmp_path: Path, op: str, sub: str, xml: bytes, **kwargs: object) -> Tuple[subprocess.CompletedProcess, List[str], List[str]]:
    """Run the hook under `strace -f -e trace=execve` and PYTHONPROFILEIMPORTTIME: (result,
    every execve of the hook's process tree, every module it imported)."""
    if not shutil.which("strace"):
        pytest.skip("needs strace")
    trace = tmp_path / f"execve-{op}-{len(list(tmp_path.glob('execve-*')))}"
    r = hook(lab, "qemu", "lab2", op, sub, xml, prefix=["strace", "-f", "-qq", "-e", "trace=execve", "-o", str(trace)],
             extra_env={"PYTHONPROFILEIMPORTTIME": "1"}, **kwargs)  # type: ignore[arg-type]
    execs = [line for line in trace.read_text().splitlines() if "execve(" in line]
    modules = [line.split("|")[-1].strip() for line in r.stderr.decode().splitlines() if line.startswith("import time:")]
    return r, execs, modules


def said(r: subprocess.CompletedProcess) -> bytes:
    """What the hook itself wrote on stderr (without PYTHONPROFILEIMPORTTIME's lines)."""
    return b"\n".join(line for line in r.stderr.splitlines() if not line.startswith(b"import time:"))


@contextmanager
def holding_the_lock(lab: BridgeLab) -> Iterator[None]:
    """Hold smtp-gate's lock as a rebuild would (flock on config.lock_path)."""
    from smtp_gate import config

    path = config.load(lab.config_path).lock_path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def chains(lab: BridgeLab) -> str:
    return lab.nft("list", "chains", "bridge").stdout


def test_prepare_spawns_nothing_when_the_table_is_there_and_installs_it_when_not(lab2: BridgeLab, tmp_path: Path) -> None:
    lab = lab2
    lab.smtp_gate("apply")
    r, execs, modules = traced(lab, tmp_path, "prepare", "begin", sample("01-lab2-prepare-begin"))
    assert (r.returncode, r.stdout, said(r)) == (0, b"", b"")
    assert len(execs) == 1 and "python3" in execs[0], f"prepare spawned a process: {execs}"
    assert "smtp_gate.nfnetlink" in modules and "subprocess" not in modules

    lab.nft("delete", "table", "bridge", "smtp_gate")
    r = hook(lab, "qemu", "lab2", "prepare", "begin", sample("01-lab2-prepare-begin"))
    assert (r.returncode, r.stdout) == (0, b"") and b"installed the base enforcement" in r.stderr, r.stderr
    assert "chain forward" in chains(lab) and "chain input" in chains(lab)
    assert not lab.tcp_connects(lab.guests["lab2b"], lab.INET4, 25, timeout=0.5)

    # someone else's half-done table (no input chain) is not enforcement: prepare completes it
    lab.nft("delete", "table", "bridge", "smtp_gate")
    lab.nft("add", "table", "bridge", "smtp_gate")
    lab.nft("add", "chain", "bridge", "smtp_gate", "forward", "{ type filter hook forward priority -200; policy accept; }")
    r = hook(lab, "qemu", "lab2", "prepare", "begin", sample("01-lab2-prepare-begin"))
    assert (r.returncode, r.stdout) == (0, b"") and b"installed the base enforcement" in r.stderr, r.stderr
    assert "chain input" in chains(lab)
    assert not lab.tcp_connects(lab.guests["lab2b"], lab.INET4, 25, timeout=0.5)


def test_reconnect_restores_elements_the_kernel_lost(lab2: BridgeLab) -> None:
    """The record still matches, but an allowance and a guest port went missing from the
    kernel (someone's `nft delete element`): reconnect looks them up and puts them back."""
    lab = lab2
    (lab.tmp / "whitelist.csv").write_text(HEADER + "lab2,,2026-01-01T00:00:00+00:00,root,\n")
    assert hook(lab, "qemu", "lab2", "start", "begin", sample("02-lab2-start-begin")).returncode == 0
    auto = lab.guests["lab2a"]
    assert lab.tcp_connects(auto, lab.INET4, 25)
    vnet1, lab2n1 = lab.hv.ifindex("vnet1"), lab.hv.ifindex("lab2n1")
    lab.nft("delete", "element", "bridge", "smtp_gate", "allowed", f"{{ {vnet1} . {MAC_AUTO} }}")
    lab.nft("delete", "element", "bridge", "smtp_gate", "guest_ifaces", f"{{ {lab2n1} }}")
    assert not lab.tcp_connects(auto, lab.INET4, 25, timeout=0.5)

    r = hook(lab, "qemu", "lab2", "reconnect", "begin", STARTED)
    assert (r.returncode, r.stdout) == (0, b"")
    assert b"the kernel lacked" in r.stderr and b"failed" not in r.stderr, r.stderr
    assert f"guest_ifaces {{ {lab2n1} }}".encode() in r.stderr and f"{vnet1} . {MAC_AUTO}".encode() in r.stderr
    assert lab.tcp_connects(auto, lab.INET4, 25) and lab.tcp_connects(auto, lab.INET6, 465)
    assert '"lab2n1"' in lab.nft("list", "set", "bridge", "smtp_gate", "guest_ifaces").stdout
    assert lab.tcp_connects(lab.guests["lab2b"], lab.INET4, 25), "the element that was there is still there"


def test_reconnect_with_everything_in_place_takes_no_lock_and_spawns_nothing(lab2: BridgeLab, tmp_path: Path) -> None:
    lab = lab2
    (lab.tmp / "whitelist.csv").write_text(HEADER + "lab2,,2026-01-01T00:00:00+00:00,root,\n")
    assert hook(lab, "qemu", "lab2", "start", "begin", sample("02-lab2-start-begin")).returncode == 0
    journal = lab.tmp / "run" / "journal"
    record = lab.tmp / "run" / "records" / f"{UUID2}.json"
    sets = ("allowed", "guest_ifaces", "foreign_ifaces")
    before = (journal.read_bytes(), record.stat().st_mtime_ns,
              [lab.nft("list", "set", "bridge", "smtp_gate", s).stdout for s in sets])
    with holding_the_lock(lab):  # a reconnect that took the lock would give up and say so
        r, execs, modules = traced(lab, tmp_path, "reconnect", "begin", STARTED, timeout=GIVE_UP)
    assert (r.returncode, r.stdout, said(r)) == (0, b"", b"")
    assert len(execs) == 1 and "python3" in execs[0], f"reconnect spawned a process: {execs}"
    assert "smtp_gate.nfnetlink" in modules and "subprocess" not in modules
    assert (journal.read_bytes(), record.stat().st_mtime_ns,
            [lab.nft("list", "set", "bridge", "smtp_gate", s).stdout for s in sets]) == before


def test_a_hook_that_cannot_get_the_lock_gives_up_within_its_budget(lab2: BridgeLab) -> None:
    lab = lab2
    (lab.tmp / "whitelist.csv").write_text(HEADER + "lab2,,2026-01-01T00:00:00+00:00,root,\n")
    lab.smtp_gate("apply")
    with holding_the_lock(lab):
        r = hook(lab, "qemu", "lab2", "start", "begin", sample("02-lab2-start-begin"), timeout=GIVE_UP)
    assert (r.returncode, r.stdout) == (0, b""), "a failing hook would stop the guest from starting"
    assert b"gave up after" in r.stderr and f"({DEADLINE:g}s allowed)".encode() in r.stderr, r.stderr
    assert b"did not add the elements of guest 'lab2': it stays blocked" in r.stderr and b"lock" in r.stderr
    assert not lab.tcp_connects(lab.guests["lab2a"], lab.INET4, 25, timeout=0.5)
    assert not (lab.tmp / "run" / "records" / f"{UUID2}.json").exists()


@pytest.mark.parametrize("mode, why", [("deny", b"cannot open a netlink socket"), ("mute", b"did not answer")])
def test_when_netlink_fails_the_hooks_fall_back_to_nft(lab2: BridgeLab, netlink_shim: str, mode: str, why: bytes) -> None:
    """No socket (an LSM's denial) or no answer: the same change goes through `nft -f`, the
    guest is allowed at start and blocked again at stop; prepare asks nft for the table."""
    lab = lab2
    (lab.tmp / "whitelist.csv").write_text(HEADER + "lab2,,2026-01-01T00:00:00+00:00,root,\n")
    shim = {"LD_PRELOAD": netlink_shim, "SG_NETLINK": mode}
    r = hook(lab, "qemu", "lab2", "prepare", "begin", sample("01-lab2-prepare-begin"), extra_env=shim, timeout=GIVE_UP)
    assert (r.returncode, r.stdout) == (0, b"") and b"failed after" not in r.stderr and b"gave up" not in r.stderr, r.stderr
    assert b"asking nft whether our table exists" in r.stderr and why in r.stderr
    assert b"installed the base enforcement" in r.stderr and "chain input" in chains(lab)

    r = hook(lab, "qemu", "lab2", "start", "begin", sample("02-lab2-start-begin"), extra_env=shim, timeout=GIVE_UP)
    assert (r.returncode, r.stdout) == (0, b"") and b"failed after" not in r.stderr and b"gave up" not in r.stderr, r.stderr
    assert b"retrying the element changes with nft -f" in r.stderr and why in r.stderr
    assert lab.tcp_connects(lab.guests["lab2a"], lab.INET4, 25) and lab.tcp_connects(lab.guests["lab2b"], lab.INET6, 25)

    r = hook(lab, "qemu", "lab2", "stopped", "end", sample("04-lab2-stopped-end"), extra_env=shim, timeout=GIVE_UP)
    assert (r.returncode, r.stdout) == (0, b"") and b"failed after" not in r.stderr and b"gave up" not in r.stderr, r.stderr
    assert b"retrying the element changes with nft -f" in r.stderr
    assert not lab.tcp_connects(lab.guests["lab2a"], lab.INET4, 25, timeout=0.5)
    assert "elements" not in allowed(lab)


@pytest.mark.parametrize("mode", ["deny", "mute"])
def test_a_failed_netlink_and_a_hung_nft_cost_the_budget_and_no_more(
    lab2: BridgeLab, netlink_shim: str, tmp_path: Path, mode: str
) -> None:
    """netlink fails and the fallback nft hangs: the hook kills nft when the budget is spent,
    exits 0 with nothing on stdout and says what it did not do.  With no socket the guest
    stays blocked; when only the answers were lost ("mute") the kernel did take the batch,
    whole, and the log says that this can be so."""
    lab = lab2
    (lab.tmp / "whitelist.csv").write_text(HEADER + "lab2,,2026-01-01T00:00:00+00:00,root,\n")
    lab.smtp_gate("apply")
    hung = tmp_path / "hung"
    hung.mkdir()
    (hung / "nft").write_text(f"#!/bin/sh\necho $$ >> {hung}/pids\nexec sleep 600\n")
    (hung / "nft").chmod(0o755)
    r = hook(lab, "qemu", "lab2", "start", "begin", sample("02-lab2-start-begin"), path=f"{hung}:/usr/sbin:/usr/bin:/sbin:/bin",
             extra_env={"LD_PRELOAD": netlink_shim, "SG_NETLINK": mode}, timeout=GIVE_UP)
    assert (r.returncode, r.stdout) == (0, b""), "a failing hook would stop the guest from starting"
    assert b"retrying the element changes with nft -f" in r.stderr, r.stderr
    assert b"did not add the elements of guest 'lab2': it stays blocked" in r.stderr and b"did not finish" in r.stderr
    pids = [int(p) for p in (hung / "pids").read_text().split()]
    assert pids and not any(os.path.exists(f"/proc/{pid}") and "sleep" in open(f"/proc/{pid}/comm").read() for pid in pids), \
        "the hung nft outlived the hook"
    assert not (lab.tmp / "run" / "records" / f"{UUID2}.json").exists()
    connects = [lab.tcp_connects(lab.guests[g], lab.INET4, 25, timeout=0.5) for g in ("lab2a", "lab2b")]
    if mode == "deny":
        assert connects == [False, False]
    else:
        assert b"did not answer" in r.stderr and b"applied entirely or not at all" in r.stderr
        assert connects in ([False, False], [True, True]), "half a batch took effect"


# -- what a hook must survive: a syslog that does not read, a run directory that cannot be written --


@contextmanager
def deaf_syslog(tmp_path: Path) -> Iterator[Tuple[socket.socket, List[str]]]:
    """A datagram socket nobody reads, and a hook() prefix that runs the hook in a private
    mount namespace where /dev/log is that socket (a tmpfs over /dev there, with the few
    device nodes a process needs bound in: this machine's /dev is never touched)."""
    path = tmp_path / "log.sock"
    (tmp_path / "olddev").mkdir()
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    script = (
        'mount --bind /dev "$0/olddev" && mount -t tmpfs none /dev || exit 97; '
        'for n in null zero full random urandom; do touch /dev/$n && mount --bind "$0/olddev/$n" /dev/$n || exit 97; done; '
        'touch /dev/log && mount --bind "$0/log.sock" /dev/log || exit 97; exec "$@"'
    )
    try:
        yield receiver, ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(tmp_path)]
    finally:
        receiver.close()


def fill(path: str) -> int:
    """Queue datagrams at PATH until its queue is full; how many."""
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.setblocking(False)
    count = 0
    try:
        while True:
            sender.sendto(b"<14>filler", path)
            count += 1
    except BlockingIOError:
        return count
    finally:
        sender.close()


def test_a_syslog_that_does_not_read_never_holds_up_a_hook(lab2: BridgeLab, tmp_path: Path) -> None:
    """/dev/log's queue is full (a journald that does not read): glibc's syslog() would block
    forever, and libvirt waits for its hook, so the guest's start would hang.  The hooks
    drop the syslog line, keep the stderr one, and finish; prepare logs while it installs
    the table, start while it allows.  Once the queue has room, the line arrives."""
    lab = lab2
    (lab.tmp / "whitelist.csv").write_text(HEADER + "lab2,,2026-01-01T00:00:00+00:00,root,\n")
    with deaf_syslog(tmp_path) as (receiver, prefix):
        assert fill(receiver.getsockname()) > 0
        for op, xml, line in (("prepare", "01-lab2-prepare-begin", b"installed the base enforcement"),
                              ("start", "02-lab2-start-begin", b"guest 'lab2' allowed on")):
            r = hook(lab, "qemu", "lab2", op, "begin", sample(xml), prefix=prefix, timeout=GIVE_UP)  # a give-up bound
            assert (r.returncode, r.stdout) == (0, b""), r.stderr
            assert line in r.stderr and b"failed" not in r.stderr, r.stderr
        assert lab.tcp_connects(lab.guests["lab2b"], lab.INET4, 25)

        receiver.setblocking(False)
        try:
            while receiver.recv(4096):
                pass
        except BlockingIOError:
            pass
        r = hook(lab, "qemu", "lab2", "stopped", "end", sample("04-lab2-stopped-end"), prefix=prefix, timeout=GIVE_UP)
        assert (r.returncode, r.stdout) == (0, b""), r.stderr
        sent = receiver.recv(4096)
    assert re.fullmatch(rb"<30>smtp-gate-hook\[\d+\]: guest 'lab2' stopped: allowance removed", sent), sent
    assert not lab.tcp_connects(lab.guests["lab2b"], lab.INET4, 25, timeout=0.5)


def test_a_start_whose_record_cannot_be_written_undoes_its_elements(lab2: BridgeLab) -> None:
    """The kernel took the start's elements, then its record could not be written (an immutable
    records directory stands in for a full /run): an allowance no record names is one the
    stop hook cannot find, so the hook removes its elements again and says so.  The guest
    starts (exit 0) and stays blocked."""
    lab = lab2
    (lab.tmp / "whitelist.csv").write_text(HEADER + "lab2,,2026-01-01T00:00:00+00:00,root,\n")
    lab.smtp_gate("apply")
    records = lab.tmp / "run" / "records"
    with immutable(records):
        r = hook(lab, "qemu", "lab2", "start", "begin", sample("02-lab2-start-begin"), timeout=GIVE_UP)
    assert (r.returncode, r.stdout) == (0, b""), r.stderr
    vnet1, lab2n1 = lab.hv.ifindex("vnet1"), lab.hv.ifindex("lab2n1")
    assert b"did not record guest 'lab2' in the run directory; removed again what it had added (" in r.stderr, r.stderr
    assert f"allowed {{ {vnet1} . {MAC_AUTO} }}".encode() in r.stderr and f"guest_ifaces {{ {lab2n1} }}".encode() in r.stderr
    assert b"the guest stays blocked until the next rebuild" in r.stderr and b"Operation not permitted" in r.stderr
    assert "elements" not in allowed(lab)
    assert '"vnet1"' not in lab.nft("list", "set", "bridge", "smtp_gate", "guest_ifaces").stdout
    assert not lab.tcp_connects(lab.guests["lab2a"], lab.INET4, 25, timeout=0.5)
    assert not lab.tcp_connects(lab.guests["lab2b"], lab.INET6, 25, timeout=0.5)
    assert list(records.iterdir()) == [], "nothing left behind in the run directory"


def test_when_the_undo_fails_too_the_hook_says_what_the_kernel_holds(
    lab2: BridgeLab, netlink_shim: str, tmp_path: Path
) -> None:
    """The record cannot be written, and the undo cannot get through either (its netlink socket
    is denied, the nft it falls back to fails): the log must not claim the guest is blocked,
    since it is not; it names what the kernel holds without a record."""
    lab = lab2
    (lab.tmp / "whitelist.csv").write_text(HEADER + "lab2,,2026-01-01T00:00:00+00:00,root,\n")
    lab.smtp_gate("apply")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "nft").write_text("#!/bin/sh\necho 'nft: broken for this test' >&2\nexit 1\n")
    (broken / "nft").chmod(0o755)
    with immutable(lab.tmp / "run" / "records"):
        r = hook(lab, "qemu", "lab2", "start", "begin", sample("02-lab2-start-begin"), path=f"{broken}:/usr/sbin:/usr/bin:/sbin:/bin",
                 extra_env={"LD_PRELOAD": netlink_shim, "SG_NETLINK": "deny-after-1"}, timeout=GIVE_UP)
    assert (r.returncode, r.stdout) == (0, b""), r.stderr
    vnet1 = lab.hv.ifindex("vnet1")
    assert b"did not record guest 'lab2' in the run directory, and undoing its element changes failed too" in r.stderr, r.stderr
    assert b"the kernel holds guest_ifaces { " in r.stderr, r.stderr
    assert f"guest_ifaces {{ {vnet1} }}".encode() in r.stderr and f"allowed {{ {vnet1} . {MAC_AUTO} }}".encode() in r.stderr
    assert b"stays blocked" not in r.stderr and b"the next rebuild that reaches libvirt records or removes them" in r.stderr
    assert lab.tcp_connects(lab.guests["lab2a"], lab.INET4, 25), "what the log says the kernel holds, it holds"
