"""The whitelist commands in-process (main([...]): messages and exit codes) and as many
concurrent processes (nothing lost).  No table is installed here: these prove what the
commands do to the whitelist and the config file; tests/test_manage.py proves enforcement
in the kernel.  They only read this machine's links and ruleset, never change them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smtp_gate.cli import main
from tests import testdriver
from tests.netlab import REPO

HEADER = "# vmname,mac,added_at,added_by,reason\n"


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    """A config whose libvirt (the test driver) runs two guests on br0; no table installed."""
    uri = testdriver.write_node(tmp_path, running=2, nics=1, shutoff=1)
    path = tmp_path / "smtp-gate.conf"
    path.write_text(f'LIBVIRT_URI="{uri}"\nRUN_DIR="{tmp_path / "run"}"\n# keep this comment\nBLOCKED_PORTS="25,465"\n')
    (tmp_path / "whitelist.csv").write_text(HEADER)
    return path


def run(conf: Path, capsys: pytest.CaptureFixture, *args: str):  # type: ignore[no-untyped-def]
    code = main(["--config", str(conf), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_add_and_del_in_process(conf: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUDO_USER", "carol")
    code, out, err = run(conf, capsys, "add-vm", testdriver.name(0), "verified")
    assert code == 0, err
    assert out == f"ok: added guest '{testdriver.name(0)}' (UUID {testdriver.uuid(0)}, every NIC) at line 2\n"
    code, out, _ = run(conf, capsys, "add-vm", testdriver.name(0))
    assert code == 0 and "already there (line 2)" in out
    code, out, _ = run(conf, capsys, "add-vm", testdriver.name(2))
    assert code == 0 and "is not running: its NICs are allowed when it starts" in out
    code, out, err = run(conf, capsys, "add-mac", "5254.00AB.CDEF", "spare")
    assert code == 0 and "ok: added MAC 52:54:00:ab:cd:ef" in out
    assert "no running guest has a NIC with MAC 52:54:00:ab:cd:ef" in out
    code, out, _ = run(conf, capsys, "list", "--json")
    rows = json.loads(out)["rows"]
    assert [(r["vmname"], r["guest"], r["bound"], r["mac"], r["added_by"]) for r in rows] == [
        (testdriver.uuid(0), testdriver.name(0), "uuid", "", "carol"),
        (testdriver.uuid(2), testdriver.name(2), "uuid", "", "carol"),
        ("spare", None, "mac", "52:54:00:ab:cd:ef", "carol")]
    code, out, _ = run(conf, capsys, "del-mac", "52-54-00-AB-CD-EF")
    assert code == 0 and "ok: removed" in out
    code, out, _ = run(conf, capsys, "del-vm", testdriver.uuid(2))
    assert code == 0 and f"ok: removed guest '{testdriver.name(2)}'" in out
    code, out, err = run(conf, capsys, "del-mac", "52:54:00:ab:cd:ef")
    assert (code, out, err) == (0, "ok: nothing to remove: MAC 52:54:00:ab:cd:ef is not in the whitelist\n", "")
    code, out, err = run(conf, capsys, "del-vm", testdriver.name(1))
    assert (code, out, err) == (0, f"ok: nothing to remove: guest '{testdriver.name(1)}' is not in the whitelist\n"
                                f"ok: nothing to remove: the libvirt metadata of guest '{testdriver.name(1)}' carries no "
                                "allowance\n", "")
    code, out, err = run(conf, capsys, "del-vm", testdriver.name(1), "--source", "file")
    assert (code, out, err) == (0, f"ok: nothing to remove: guest '{testdriver.name(1)}' is not in the whitelist\n", "")


def test_add_mac_of_a_nic_another_row_allows_says_so_and_exits_0(conf: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(conf, capsys, "add-vm", testdriver.name(0))
    assert code == 0, err
    mac = testdriver.mac(0, 0)
    code, out, err = run(conf, capsys, "add-mac", mac, "eth0")
    assert code == 0, err
    assert out.startswith(f"ok: added MAC {mac} (eth0) at line 3\n"), out
    assert err == (
        f"smtp-gate: note: NIC {mac} of guest '{testdriver.name(0)}' ({testdriver.uuid(0)}) is already allowed by "
        f"line 2 (guest '{testdriver.name(0)}' (UUID {testdriver.uuid(0)}, every NIC)) "
        "(the new row changes nothing while that row stays)\n"
    )
    # removing the MAC row again: the UUID row still allows the NIC, and del-mac says so
    code, out, err = run(conf, capsys, "del-mac", mac)
    assert code == 3 and out == f"ok: removed MAC {mac} (eth0) from line 3\n", (out, err)
    assert err == (
        f"smtp-gate: note: NIC {mac} of guest '{testdriver.name(0)}' ({testdriver.uuid(0)}) is still allowed by "
        f"line 2 (guest '{testdriver.name(0)}' (UUID {testdriver.uuid(0)}, every NIC))\n"
    )


def test_the_picker_without_a_terminal_is_an_error_like_every_error(conf: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "smtp_gate", "--config", str(conf), "whitelist"], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == ("smtp-gate: error: the picker needs a terminal; in scripts use `smtp-gate add-vm NAME` and "
                        "`smtp-gate del-vm NAME`\n")


@pytest.mark.parametrize(
    "args, message",
    [
        (["add-vm", "ghost"], "guest 'ghost' not found in libvirt"),
        (["add-mac", "ff:ff:ff:ff:ff:ff"], "bad MAC address 'ff:ff:ff:ff:ff:ff': that is the broadcast address"),
        (["del-mac", "nonsense"], "bad MAC address 'nonsense'"),
        (["ports-set", "25,0"], "bad port 0 in '25,0': expected 1-65535"),
        (["ports-set", "465,25,465"], "duplicate port 465"),
    ],
)
def test_errors_are_one_line_naming_the_value_and_change_nothing(
    conf: Path, capsys: pytest.CaptureFixture, args, message: str
) -> None:
    before = (conf.read_bytes(), (conf.parent / "whitelist.csv").read_bytes())
    code, out, err = run(conf, capsys, *args)
    assert (code, out) == (1, "")
    assert err.startswith("smtp-gate: error: ") and message in err and err.count("\n") == 1
    assert (conf.read_bytes(), (conf.parent / "whitelist.csv").read_bytes()) == before


def test_a_mac_with_a_dropped_digit_is_refused_not_taken_for_another_nic(
    conf: Path, capsys: pytest.CaptureFixture
) -> None:
    before = (conf.parent / "whitelist.csv").read_bytes()
    for command in ("add-mac", "del-mac"):
        code, out, err = run(conf, capsys, command, "52:54:00:ab:cd:e")
        assert (code, out) == (1, "")
        assert err == (
            "smtp-gate: error: bad MAC address '52:54:00:ab:cd:e': expected six hex bytes of two digits each, "
            "as 52:54:00:ab:cd:ef, 52-54-00-ab-cd-ef or 5254.00ab.cdef\n"
        )
    assert (conf.parent / "whitelist.csv").read_bytes() == before


def test_a_row_with_a_bad_mac_is_reported_with_its_line_and_kept(conf: Path, capsys: pytest.CaptureFixture) -> None:
    path = conf.parent / "whitelist.csv"
    typo = "typo,52:54:00:ab:cd:e,2026-11-25T14:03:07+00:00,bob,relay\n"
    path.write_text(HEADER + typo)
    code, out, err = run(conf, capsys, "list")
    assert code == 3 and "0 row(s)" in out
    assert "line 2: bad MAC address '52:54:00:ab:cd:e'" in err and "(row kept, allows nothing)" in err
    code, out, err = run(conf, capsys, "add-mac", "52:54:00:ab:cd:0e", "real")
    assert code == 0 and out.startswith("ok: added MAC 52:54:00:ab:cd:0e (real) at line 3\n"), out
    assert "line 2: bad MAC address '52:54:00:ab:cd:e'" in err
    assert path.read_text().startswith(HEADER + typo) and path.read_text().count("\n") == 3


@pytest.mark.parametrize("bad", ["two\nlines", "cr\rhere", "tab\there", "esc\x1b[2J", "nel\x85", "ls\u2028", "ps\u2029"])
def test_control_characters_in_labels_and_reasons_are_refused_and_nothing_is_written(
    conf: Path, capsys: pytest.CaptureFixture, bad: str
) -> None:
    before = (conf.parent / "whitelist.csv").read_bytes()
    for args, what in (
        (["add-vm", testdriver.name(0), bad], "reason"),
        (["add-mac", "52:54:00:ab:cd:ef", "--reason", bad], "reason"),
        (["add-mac", "52:54:00:ab:cd:ef", bad], "label"),
    ):
        code, out, err = run(conf, capsys, *args)
        assert (code, out) == (1, ""), (args, out, err)
        assert err == (f"smtp-gate: error: bad {what} {bad!r}: expected one line of text without control "
                       f"characters (found {bad[bad.index(next(c for c in bad if not c.isprintable()))]!r} "
                       f"at position {next(i for i, c in enumerate(bad) if not c.isprintable()) + 1})\n"), err
    assert (conf.parent / "whitelist.csv").read_bytes() == before


def test_list_shows_a_hand_written_line_break_escaped_on_one_line(conf: Path, capsys: pytest.CaptureFixture) -> None:
    (conf.parent / "whitelist.csv").write_text(HEADER + 'web1,,t,u,"two\nlines, \x1b[2J"\n')
    code, out, err = run(conf, capsys, "list")
    assert (code, err) == (0, "")
    assert out.splitlines()[1:] == [
        "   2  web1 (name-bound)        (all NICs)         t  u  two\\nlines, \\x1b[2J",
        "# (name-bound): allows whichever guest has that name, also a later one that reuses it; "
        "`smtp-gate add-vm NAME --store file` adds a row bound to the guest's UUID, then delete the name-bound line",
    ]


def test_list_says_when_libvirt_was_not_reached_and_exits_3(conf: Path, capsys: pytest.CaptureFixture) -> None:
    """`"metadata": []` alone would claim no guest is allowed by its metadata."""
    node = (conf.parent / "node.xml").as_uri().replace("file://", "test://")
    missing = f"test://{conf.parent / 'missing.xml'}"
    text = conf.read_text()
    for uris in (missing, f"{node} {missing}"):
        conf.write_text(text.replace(f'LIBVIRT_URI="{node}"', f'LIBVIRT_URI="{uris}"'))
        code, out, err = run(conf, capsys, "list", "--json")
        data = json.loads(out)
        assert code == 3, err
        assert list(data["libvirt"]["unreachable"]) == [missing] and data["metadata"] == []
        assert err.startswith("smtp-gate: warning: allowances in libvirt metadata ") and "not shown" in err, err
        code, out, err = run(conf, capsys, "list")
        assert code == 3 and missing in err and "not shown" in err
    conf.write_text(text)
    code, out, err = run(conf, capsys, "list", "--json")
    assert (code, json.loads(out)["libvirt"]) == (0, {"unreachable": {}})


def test_del_vm_with_libvirt_silent_removes_the_rows_and_says_the_metadata_was_not_checked(
    conf: Path, capsys: pytest.CaptureFixture
) -> None:
    node = (conf.parent / "node.xml").as_uri().replace("file://", "test://")
    missing = f"test://{conf.parent / 'missing.xml'}"
    conf.write_text(conf.read_text().replace(f'LIBVIRT_URI="{node}"', f'LIBVIRT_URI="{missing}"'))
    uuid = testdriver.uuid(0)
    (conf.parent / "whitelist.csv").write_text(HEADER + f"{uuid},,t,u,r\n")
    code, out, err = run(conf, capsys, "del-vm", uuid)
    assert code == 3, err
    assert out == f"ok: removed guest '{uuid}' (every NIC) from line 2\n"
    assert err.endswith(f"smtp-gate: note: the libvirt metadata of guest '{uuid}' could not be checked, and may still allow "
                        f"it: `smtp-gate del-vm {uuid} --source metadata` removes it once libvirt answers\n"), err
    assert (conf.parent / "whitelist.csv").read_text() == HEADER


def test_add_vm_binds_the_uuid_and_a_guest_reusing_the_name_inherits_nothing(
    conf: Path, capsys: pytest.CaptureFixture
) -> None:
    """add-vm web1 writes web1's UUID; once web1 is gone and a new guest is given its name,
    the row allows the new one nothing (the rebuild's index, the hook's fast path and the
    model all agree), and `list` says the UUID's guest is no longer in libvirt."""
    from smtp_gate import whitelist as wl

    path = conf.parent / "whitelist.csv"
    code, out, err = run(conf, capsys, "add-vm", testdriver.name(1), "ticket 4711")
    assert code == 0, err
    text = path.read_text()
    assert text.startswith(HEADER + f"{testdriver.uuid(1)},,") and text.endswith(",ticket 4711\n")
    assert testdriver.name(1) not in text
    code, out, err = run(conf, capsys, "list")
    assert code == 0 and f"   2  {testdriver.name(1)} ({testdriver.uuid(1)}) (all NICs)" in out, out
    assert "name-bound" not in out

    mac = testdriver.mac(1, 0)
    old = wl.Guest(testdriver.name(1), testdriver.uuid(1), (mac,))
    reuse = wl.Guest(testdriver.name(1), "0badc0de-1111-4111-8111-111111111111", (mac,))
    model = wl.parse(text)
    for guest, allowed in ((old, (mac,)), (reuse, ())):
        assert model.allowed_macs(guest) == allowed
        assert model.index().allowed_macs(guest) == allowed
        assert wl.fast_allowed_macs(text, guest) == allowed  # the hook's path
    # a guest named like the UUID gets nothing either: a UUID row matches UUIDs only
    assert model.allowed_macs(wl.Guest(testdriver.uuid(1), "0badc0de-1111-4111-8111-111111111111", (mac,))) == ()

    # the guest is undefined: list shows its UUID, marked
    node = conf.parent / "node.xml"
    node.write_text(node.read_text().replace(testdriver.uuid(1), "0badc0de-1111-4111-8111-111111111111"))
    code, out, err = run(conf, capsys, "list")
    assert code == 0 and f"   2  {testdriver.uuid(1)} (not in libvirt) (all NICs)" in out, out


def test_del_vm_removes_rows_bound_to_the_name_and_to_the_uuid(conf: Path, capsys: pytest.CaptureFixture) -> None:
    path = conf.parent / "whitelist.csv"
    name, uuid = testdriver.name(0), testdriver.uuid(0)
    path.write_text(HEADER + f"{name},,t,u,by hand\n{uuid.upper()},,t,u,by uuid\nweb9,,t,u,other\n")
    code, out, err = run(conf, capsys, "list")
    assert f"   2  {name} (name-bound)" in out and f"   3  {name} ({uuid.upper()})" in out and "web9 (name-bound)" in out
    code, out, err = run(conf, capsys, "del-vm", name)
    assert code == 0, err
    assert out.splitlines() == [f"ok: removed guest '{name}' (every NIC) from line 2",
                                f"ok: removed guest '{name}' (UUID {uuid.upper()}, every NIC) from line 3",
                                f"ok: nothing to remove: the libvirt metadata of guest '{name}' carries no allowance"]
    assert path.read_text() == HEADER + "web9,,t,u,other\n"
    # and by UUID: the name-bound row goes too
    path.write_text(HEADER + f"{name},,t,u,by hand\n")
    code, out, err = run(conf, capsys, "del-vm", uuid, "--source", "file")
    assert code == 0 and out == f"ok: removed guest '{name}' (every NIC) from line 2\n", (out, err)
    assert path.read_text() == HEADER


def test_del_vm_of_a_guest_libvirt_forgot_finds_its_uuid_rows_through_the_hooks_record(
    conf: Path, capsys: pytest.CaptureFixture
) -> None:
    from smtp_gate.runstate import Record, RunState

    gone = "11111111-2222-4333-8444-555555555555"
    RunState(conf.parent / "run").write_record(Record(gone, "gone1"))
    path = conf.parent / "whitelist.csv"
    path.write_text(HEADER + f"{gone},,t,u,r\n")
    code, out, err = run(conf, capsys, "del-vm", "gone1")
    assert code == 0 and out == f"ok: removed guest 'gone1' (UUID {gone}, every NIC) from line 2\n", (out, err)
    assert path.read_text() == HEADER


def test_an_os_error_is_one_line_exit_1_and_a_traceback_only_with_debug(
    conf: Path, capsys: pytest.CaptureFixture
) -> None:
    """Real failures outside our own error type: the run directory (where the lock lives)
    under a regular file, and a whitelist that is a directory."""
    blocker = conf.parent / "not-a-dir"
    blocker.write_text("")
    conf.write_text(conf.read_text().replace(f'RUN_DIR="{conf.parent / "run"}"', f'RUN_DIR="{blocker / "run"}"'))
    before = (conf.parent / "whitelist.csv").read_bytes()
    # the key, the line that set it, the OS error and what was expected
    line = (f"smtp-gate: error: RUN_DIR '{blocker / 'run'}' (from {conf}:2) cannot be created: Not a directory; "
            "expected a directory smtp-gate can write (default /run/smtp-gate)\n")
    for args in (["add-mac", "52:54:00:ab:cd:ef"], ["del-vm", testdriver.name(0)]):
        code, out, err = run(conf, capsys, *args)
        assert (code, out, err) == (1, "", line)
    assert (conf.parent / "whitelist.csv").read_bytes() == before
    code, out, err = run(conf, capsys, "--debug", "add-mac", "52:54:00:ab:cd:ef")
    assert code == 1 and "Traceback (most recent call last)" in err and "NotADirectoryError" in err
    assert err.endswith(line)

    conf.write_text(conf.read_text().replace(f'RUN_DIR="{blocker / "run"}"', f'RUN_DIR="{conf.parent / "run"}"'))
    (conf.parent / "whitelist.csv").unlink()
    (conf.parent / "whitelist.csv").mkdir()
    for args in (["list"], ["add-mac", "52:54:00:ab:cd:ef"]):
        code, out, err = run(conf, capsys, *args)
        assert (code, out) == (1, ""), err
        assert err == f"smtp-gate: error: WHITELIST '{conf.parent / 'whitelist.csv'}' is a directory: expected a file\n"


def test_usage_errors_exit_2(conf: Path, capsys: pytest.CaptureFixture) -> None:
    assert run(conf, capsys, "add-mac")[0] == 2
    assert run(conf, capsys, "ports-set", "25", "extra")[0] == 2


def test_ports_set_keeps_the_files_other_lines(conf: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(conf, capsys, "ports-set", "587,25,465")
    assert code == 0 and "ok: blocked ports set to 25,465,587" in out and "(line 4)" in out
    assert conf.read_text().splitlines()[2:] == ["# keep this comment", 'BLOCKED_PORTS="25,465,587"']


def test_many_concurrent_commands_lose_nothing(conf: Path) -> None:
    """16 processes add and remove MACs at once: every add that was not undone is there once."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    workers = []
    for w in range(16):
        script = "; ".join(
            ["from smtp_gate.cli import main"]
            + [f"assert main(['--config', {str(conf)!r}, 'add-mac', '52:54:00:10:{w:02x}:{i:02x}', 'w{w}']) == 0"
               for i in range(6)]
            + [f"assert main(['--config', {str(conf)!r}, 'del-mac', '52:54:00:10:{w:02x}:{i:02x}']) == 0"
               for i in (1, 3)]
        )
        workers.append(subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True))
    for proc in workers:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    code_out = subprocess.run([sys.executable, "-m", "smtp_gate", "--config", str(conf), "list", "--json"],
                              env=env, capture_output=True, text=True, check=True)
    macs = [row["mac"] for row in json.loads(code_out.stdout)["rows"]]
    expected = sorted(f"52:54:00:10:{w:02x}:{i:02x}" for w in range(16) for i in (0, 2, 4, 5))
    assert sorted(macs) == expected, "a concurrent write lost or duplicated a row"
    assert (conf.parent / "whitelist.csv").read_text().startswith(HEADER)


def test_config_and_debug_work_after_the_subcommand_too(conf: Path, capsys: pytest.CaptureFixture) -> None:
    (conf.parent / "whitelist.csv").write_text("# vmname,mac,added_at,added_by,reason\n,52:54:00:00:00:01,,,\n")
    assert main(["list", "--config", str(conf)]) == 0
    assert "52:54:00:00:00:01" in capsys.readouterr().out
    assert main(["--config", str(conf), "list", "--config", str(conf.parent / "missing.conf")]) == 1
    assert "missing.conf" in capsys.readouterr().err, "the later --config wins, as written"
    assert main(["list", "--config", str(conf.parent / "missing.conf"), "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_a_reader_that_goes_away_is_not_an_error(conf: Path) -> None:
    """`smtp-gate list | head -1`: no traceback, no error line, exit 141 (SIGPIPE's)."""
    rows = "".join(f",52:54:00:00:{i >> 8:02x}:{i & 0xFF:02x},,,reason {i}\n" for i in range(1, 3000))
    (conf.parent / "whitelist.csv").write_text("# vmname,mac,added_at,added_by,reason\n" + rows)
    proc = subprocess.Popen([sys.executable, "-m", "smtp_gate", "--config", str(conf), "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout is not None and proc.stdout.read(10)
    proc.stdout.close()
    _out, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (141, b"")
