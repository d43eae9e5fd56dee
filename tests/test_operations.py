"""What the operator meets when something around a command is absent or broken: a dry run
writes nothing, every apply reads the whitelist for its problems, an operating-system error
names the config key and what was expected, the off-switch works without a usable RUN_DIR,
and `list`, `debug`, `--help` and `guest-bridges` say what is so, each in one line."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from smtp_gate.cli import build_parser, main
from tests import testdriver
from tests.netlab import REPO, BridgeLab

HEADER = "# vmname,mac,added_at,added_by,reason\n"
BAD_MAC_ROW = "web1,52:54:0:ab:cd:ef,2026-11-25T14:03:07+00:00,alice,typo\n"
EXPECTED_RUN_DIR = "expected a directory smtp-gate can write (default /run/smtp-gate)"


def tree(root: Path) -> Dict[str, Tuple[int, bytes, int]]:
    """Every file and directory under ROOT: (mode, content, mtime in ns)."""
    out = {}
    for path in sorted([root, *root.rglob("*")]):
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_mode, b"" if path.is_dir() else path.read_bytes(), st.st_mtime_ns)
    return out


def table_installed(lab: BridgeLab) -> bool:
    return "table bridge smtp_gate" in lab.nft("list", "tables").stdout


def answering(lab: BridgeLab, running: int = 1) -> str:
    """A libvirt (the test driver) that answers, with RUNNING guests whose ports are on br0."""
    uri = testdriver.write_node(lab.tmp, running=running, nics=1)
    for i in range(running):
        lab.add_guest(f"vm{i}", testdriver.target(i, 0), 20 + i, mac=testdriver.mac(i, 0))
    return uri


# ------------------------------------------------------------------------------ dry run
@pytest.mark.kernel
@pytest.mark.parametrize("libvirt", ["answering", "not answering", "--no-libvirt"])
def test_a_dry_run_creates_no_run_directory(bare_lab: BridgeLab, libvirt: str) -> None:
    lab = bare_lab
    if libvirt == "answering":
        lab.write_config(f'UPLINKS="uplink0"\nLIBVIRT_URI="{answering(lab)}"\n')
    before = tree(lab.tmp)
    r = lab.smtp_gate("apply", "--dry-run", *(["--no-libvirt"] if libvirt == "--no-libvirt" else []), check=False)
    assert r.returncode == 0, r.stderr
    assert "table bridge smtp_gate" in r.stdout and "nothing was changed" in r.stderr
    assert not (lab.tmp / "run").exists(), "a dry run created RUN_DIR"
    assert tree(lab.tmp) == before
    assert not table_installed(lab)


@pytest.mark.kernel
def test_a_dry_run_leaves_an_existing_run_directory_as_it_was(bare_lab: BridgeLab) -> None:
    """A run directory as the hooks leave it before the first rebuild (lock, records, a
    journal, no rebuild.lock), with libvirt answering: nothing in it is created or changed."""
    lab = bare_lab
    lab.write_config(f'UPLINKS="uplink0"\nLIBVIRT_URI="{answering(lab, running=2)}"\n')
    lab.smtp_gate("apply", "--no-libvirt")
    shutil.rmtree(lab.tmp / "run")
    lab.start_guest(lab.guests["vm0"])  # the hook writes the lock, a record and the journal
    run = lab.tmp / "run"
    assert (run / "journal").stat().st_size > 0 and list((run / "records").iterdir())
    assert not (run / "rebuild.lock").exists()
    before = tree(run)
    r = lab.smtp_gate("apply", "--dry-run", check=False)
    assert r.returncode == 0, r.stderr
    assert tree(run) == before
    r = lab.smtp_gate("apply", check=False)  # the real apply writes them, as the dry run would have
    assert r.returncode == 0 and (run / "rebuild.lock").exists() and (run / "journal").stat().st_size == 0


# ----------------------------------------------------------------- RUN_DIR and disable
def bad_run_dir(lab: BridgeLab, kind: str) -> str:
    if kind == "/proc/nope":
        return kind
    blocker = lab.tmp / "a-file"
    blocker.write_text("")
    return str(blocker)


def write_config_with_run_dir(lab: BridgeLab, run_dir: str) -> None:
    lab.config_path.write_text(
        f'UPLINKS="uplink0"\nLIBVIRT_URI="qemu:///system?socket={lab.tmp}/none"\nRUN_DIR="{run_dir}"\n'
        'METRICS_DIR=""\n'  # never the host's node_exporter directory
    )


@pytest.mark.kernel
@pytest.mark.parametrize("kind", ["/proc/nope", "a regular file"])
def test_a_run_dir_that_cannot_be_used_is_one_line_naming_the_key(bare_lab: BridgeLab, kind: str) -> None:
    lab = bare_lab
    run_dir = bad_run_dir(lab, kind)
    write_config_with_run_dir(lab, run_dir)
    problem = "cannot be created: No such file or directory" if kind == "/proc/nope" else "is not a directory"
    for args in (["apply"], ["rebuild", "--if-enabled"], ["add-mac", "52:54:00:ab:cd:ef"]):
        r = lab.smtp_gate(*args, check=False)
        assert (r.returncode, r.stdout) == (1, ""), (args, r)
        assert r.stderr == (
            f"smtp-gate: error: RUN_DIR '{run_dir}' (from {lab.config_path}:3) {problem}; {EXPECTED_RUN_DIR}\n"
        ), args
    assert not table_installed(lab)


@pytest.mark.kernel
@pytest.mark.parametrize("kind", ["/proc/nope", "a regular file"])
def test_disable_works_when_run_dir_cannot_be_used(lab: BridgeLab, kind: str) -> None:
    lab.smtp_gate("apply")
    assert table_installed(lab)
    run_dir = bad_run_dir(lab, kind)
    write_config_with_run_dir(lab, run_dir)
    r = lab.smtp_gate("disable", "--reason", "incident 7", check=False, env={"SUDO_USER": "alice"})
    assert r.returncode == 0, r.stderr
    assert not table_installed(lab) and (lab.tmp / "disabled").exists()
    assert json.loads((lab.tmp / "disabled").read_text())["reason"] == "incident 7"
    assert "ok: removed table bridge smtp_gate" in r.stdout
    (warning,) = r.stderr.splitlines()
    assert warning.startswith(f"smtp-gate: warning: RUN_DIR '{run_dir}' (from {lab.config_path}:3) ")
    assert "switching off without the lock" in warning
    assert lab.tcp_connects(lab.guests["g1"], lab.INET4, 25), "disabled means nothing is blocked"


# ------------------------------------------------------------------ the whitelist on apply
def break_whitelist(lab: BridgeLab, how: str) -> Path:
    path = lab.tmp / "whitelist.csv"
    if how == "directory":
        path.mkdir()
    else:
        path.write_text(HEADER + BAD_MAC_ROW)
    return path


@pytest.mark.kernel
@pytest.mark.parametrize("how", ["directory", "bad MAC"])
@pytest.mark.parametrize("args", [["apply", "--no-libvirt"], ["apply", "--no-libvirt", "--if-enabled"], ["rebuild"]])
def test_without_libvirt_a_broken_whitelist_is_a_warning_and_enforcement_is_installed(
    lab: BridgeLab, how: str, args: List[str]
) -> None:
    """The boot service's apply asks no libvirt, and the lab's rebuild finds none answering:
    the whitelist is read anyway, its problem is a warning (exit 3), and the table is installed."""
    path = break_whitelist(lab, how)
    r = lab.smtp_gate(*args, check=False)
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert r.stdout.startswith("ok: enforcing on br0")
    warnings = [line for line in r.stderr.splitlines()
                if line.startswith("smtp-gate: warning: ") and "no hypervisor answered" not in line]
    if how == "directory":
        assert warnings == [
            f"smtp-gate: warning: the whitelist cannot be read (WHITELIST '{path}' is a directory: expected a file): "
            "enforcement is installed and the kernel's allowances for existing ports are kept"
        ], r.stderr
    else:
        assert len(warnings) == 1 and warnings[0].startswith(f"smtp-gate: warning: {path}: line 2: "), r.stderr
        assert "52:54:0:ab:cd:ef" in warnings[0]
    assert table_installed(lab)
    assert not lab.tcp_connects(lab.guests["g1"], lab.INET4, 25, timeout=0.5)


@pytest.mark.kernel
def test_a_dry_run_without_libvirt_says_the_whitelist_would_be_unreadable(bare_lab: BridgeLab) -> None:
    lab = bare_lab
    break_whitelist(lab, "directory")
    r = lab.smtp_gate("apply", "--dry-run", "--no-libvirt", check=False)
    assert r.returncode == 3
    assert "dry run, nothing installed: the whitelist cannot be read" in r.stderr
    assert "enforcement would be installed" in r.stderr and "is installed" not in r.stderr
    assert not table_installed(lab)


@pytest.mark.kernel
@pytest.mark.parametrize("how", ["directory", "bad MAC"])
def test_with_libvirt_answering_a_broken_whitelist_is_as_the_readme_says(bare_lab: BridgeLab, how: str) -> None:
    """An unreadable whitelist is an error when it is needed to decide the allowances
    (exit 1, nothing changed); a row that cannot be used is a warning (exit 3)."""
    lab = bare_lab
    lab.write_config(f'UPLINKS="uplink0"\nLIBVIRT_URI="{answering(lab)}"\n')
    path = break_whitelist(lab, how)
    r = lab.smtp_gate("apply", check=False)
    if how == "directory":
        assert (r.returncode, r.stdout) == (1, ""), r
        assert r.stderr == f"smtp-gate: error: WHITELIST '{path}' is a directory: expected a file\n"
        assert not table_installed(lab)
    else:
        assert r.returncode == 3, r
        assert f"smtp-gate: warning: {path}: line 2: " in r.stderr and table_installed(lab)


# ------------------------------------------------------------- list, debug, help, libvirt
def test_list_says_when_the_whitelist_file_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    conf = tmp_path / "smtp-gate.conf"
    missing = tmp_path / "nowhere.csv"
    uri = testdriver.write_node(tmp_path, running=0)  # a libvirt with no guest: no metadata allowance either
    conf.write_text(f'WHITELIST="{missing}"\nRUN_DIR="{tmp_path / "run"}"\nLIBVIRT_URI="{uri}"\nMETRICS_DIR=""\n')
    assert main(["--config", str(conf), "list"]) == 0
    out, err = capsys.readouterr()
    assert out == f"# {missing}: the whitelist file does not exist (it allows no guest)\n" and err == ""
    assert main(["--config", str(conf), "list", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["exists"], report["rows"], report["problems"]) == (False, [], [])
    missing.write_text(HEADER)
    assert main(["--config", str(conf), "list"]) == 0
    assert capsys.readouterr().out == f"# {missing}: 0 row(s)\n"
    assert json.loads((main(["--config", str(conf), "list", "--json"]), capsys.readouterr().out)[1])["exists"] is True
    assert not (tmp_path / "run").exists()


@pytest.mark.kernel
def test_debug_says_when_its_config_file_does_not_exist(bare_lab: BridgeLab) -> None:
    """Without --config, the installed default is read, and its absence means defaults: a copy
    of the application in a temporary directory has no config/smtp-gate.conf."""
    lab = bare_lab
    app = lab.tmp / "app"
    shutil.copytree(REPO / "smtp_gate", app / "smtp_gate", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "SMTP_GATE_CONFIG"}
    # from APP: `python -m` puts the working directory first on the path
    run = f"cd {shlex.quote(str(app))} && exec {shlex.quote(sys.executable)} -m smtp_gate debug"
    r = lab.hv.exec(["sh", "-c", run], check=False, env=dict(env, PYTHONPATH=str(app)))
    assert r.returncode == 0, r.stderr
    default = app / "config" / "smtp-gate.conf"
    assert f"config file: {default} (does not exist: every value above is the default)\n" in r.stdout
    r = lab.smtp_gate("debug")
    assert f"config file: {lab.config_path}\n" in r.stdout


def test_the_top_level_help_lists_every_exit_code() -> None:
    epilog = build_parser().epilog or ""
    for code in ("0 ok", "1 error", "2 usage", "3 done", "4 (status)", "5 disabled", "6 a file", "141 the reader"):
        assert code in epilog, code


def test_guest_bridges_with_a_test_uri_that_does_not_exist_is_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "smtp-gate.conf"
    conf.write_text(f'RUN_DIR="{tmp_path / "run"}"\nMETRICS_DIR=""\n')
    missing = tmp_path / "missing.xml"
    r = subprocess.run(
        [sys.executable, "-m", "smtp_gate", "--config", str(conf), "guest-bridges", "--libvirt-uri", f"test://{missing}"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60,
    )
    assert (r.returncode, r.stdout) == (1, ""), r
    (line,) = r.stderr.splitlines()  # libxml2's "I/O warning" line would come before it
    assert line.startswith(f"smtp-gate: error: no libvirt URI answered, so the guests' bridges are unknown: test://{missing}: ")
