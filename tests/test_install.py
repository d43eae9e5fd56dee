"""install.sh and uninstall.sh, into --root prefixes under tmp dirs, never on the live system.

Every test installs from a snapshot of this working tree committed to a throwaway git
repository (install.sh clones commits, so uncommitted files must be committed somewhere to be
installed), with --no-venv: no network, about half a second per install.  The trees are
compared with exact listings (every path, its type, mode, symlink target and, for files,
a hash).  Nothing here needs root: install.sh probes the kernel only in a throwaway network
namespace and reports a failure to create one as a warning.

systemd-analyze (Debian/Ubuntu package `systemd`, RHEL `systemd`) verifies the units; without
it those tests skip.  shellcheck (package `shellcheck`) lints the scripts when present.
"""

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pytest

from smtp_gate import __version__, config, whitelist

REPO = Path(__file__).resolve().parent.parent
APP = "usr/local/smtp-gate"
DRIVERS = ("qemu", "lxc", "libxl")
UNITS = ("smtp-gate.service", "smtp-gate-rebuild.service", "smtp-gate-rebuild.timer", "smtp-gate-watch.service")
MARKER = "smtp-gate-install"
FOREIGN_HOOK = "#!/bin/sh\n# someone else's monolithic qemu hook\nexit 0\n"
HOST_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))

Entry = Tuple[str, ...]


# ------------------------------------------------------------------------------------ helpers
def run(cmd: Sequence[object], expect: Optional[int] = 0, env: Optional[Dict[str, str]] = None,
        cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    """Run CMD (no shell) and check its exit status (unless EXPECT is None), showing its output
    when it differs."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert expect is None or proc.returncode == expect, (
        f"{cmd} exited {proc.returncode}, expected {expect}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )
    return proc


def git(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    return run(["git", "-c", "user.name=smtp-gate tests", "-c", "user.email=tests@localhost",
                "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false", *args], cwd=cwd)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def tree(root: Path) -> Dict[str, Entry]:
    """Every path under ROOT: ('dir',), ('link', target) or ('file', mode, hash).
    A .git directory is listed, its contents are not (git's own business).  __pycache__
    is not listed at all: Python's bytecode cache, written when the installed hook first
    runs (it runs with -I, which ignores PYTHONDONTWRITEBYTECODE), is not installed content."""
    listing: Dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if "__pycache__" in dirnames:
            dirnames.remove("__pycache__")
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            path = base / name
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                listing[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                listing[rel] = ("dir",)
            else:
                listing[rel] = ("file", oct(stat.S_IMODE(st.st_mode)), sha(path))
        if ".git" in dirnames:
            dirnames.remove(".git")
    return listing


def show_diff(actual: Dict[str, Entry], expected: Dict[str, Entry]) -> str:
    lines = []
    for key in sorted(set(actual) | set(expected)):
        if actual.get(key) != expected.get(key):
            lines.append(f"{key}: actual {actual.get(key)} expected {expected.get(key)}")
    return "\n".join(lines)


def assert_tree(root: Path, expected: Dict[str, Entry]) -> None:
    actual = tree(root)
    assert actual == expected, "file tree differs:\n" + show_diff(actual, expected)


def with_parents(paths: Dict[str, Entry]) -> Dict[str, Entry]:
    """Add ('dir',) for every parent directory of the given paths."""
    out = dict(paths)
    for rel in paths:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            out.setdefault("/".join(parts[:i]), ("dir",))
    return out


def install(root: Path, src: Path, *extra: object, expect: int = 0) -> subprocess.CompletedProcess:
    return run([src / "install.sh", "--root", root, "--no-venv", *extra], expect=expect)


def uninstall(root: Path, src: Path, *extra: object, expect: int = 0) -> subprocess.CompletedProcess:
    return run([src / "uninstall.sh", "--root", root, *extra], expect=expect)


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This working tree (tracked and untracked-but-not-ignored files, as git would add them)
    committed to a fresh repository, with git's file modes (0644, or 0755 if executable)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed (Debian/Ubuntu: apt-get install git)")
    src = tmp_path_factory.mktemp("snapshot") / "smtp-gate"
    src.mkdir()
    listed = run(["git", "-C", REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard"]).stdout
    for rel in sorted(set(filter(None, listed.split("\0")))):
        origin = REPO / rel
        if not origin.is_file() or origin.is_symlink():
            continue  # deleted in the working tree, or not a regular file
        target = src / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(origin, target)
        target.chmod(0o755 if os.access(origin, os.X_OK) else 0o644)
    git("init", "-q", cwd=src)
    git("add", "-A", cwd=src)
    git("commit", "-q", "-m", "snapshot of the working tree for tests/test_install.py", cwd=src)
    return src


@pytest.fixture(scope="session")
def app_files(snapshot: Path) -> Dict[str, Entry]:
    """What a clone of the snapshot holds (without .git's contents), as tree() lists it."""
    return tree(snapshot)


def expected_installed(app_files: Dict[str, Entry], app_root: Path, app: str = APP,
                       config_text: Optional[Tuple[bytes, bytes]] = None) -> Dict[str, Entry]:
    """The tree after `install.sh --root R --no-venv` with libvirt >= 6.5 and /usr/bin/python3 >= 3.9.
    Generated files are listed with their mode; their contents are checked by the tests."""
    conf = app_root / "config"
    conf_entry = ("file", "0o644", sha(conf / "smtp-gate.conf"))
    wl_entry = ("file", "0o640", sha(conf / "whitelist.csv"))
    listing: Dict[str, Entry] = {f"{app}/{rel}": entry for rel, entry in app_files.items()}
    listing[app] = ("dir",)
    listing[f"{app}/config/smtp-gate.conf"] = conf_entry
    listing[f"{app}/config/whitelist.csv"] = wl_entry
    depth = "../../../.."
    for d in DRIVERS:
        listing[f"etc/libvirt/hooks/{d}.d/smtp-gate"] = ("link", f"{depth}/{app}/hooks/{d}")
    return with_parents(listing)


def generated(root: Path) -> Dict[str, Entry]:
    """The generated files (wrapper, units), whose hashes depend on install.sh's templates."""
    out = {"usr/bin/smtp-gate": ("file", "0o755", sha(root / "usr/bin/smtp-gate"))}
    for u in UNITS:
        out[f"etc/systemd/system/{u}"] = ("file", "0o644", sha(root / "etc/systemd/system" / u))
    return out


def check_generated(root: Path, src: Path, app: str = "/usr/local/smtp-gate",
                    python: str = "/usr/bin/python3") -> None:
    """The wrapper runs smtp_gate.cli:main from the app dir; the units are the repo's plus a header."""
    wrapper = (root / "usr/bin/smtp-gate").read_text()
    assert wrapper.startswith(f"#!{python} -I\n") and MARKER in wrapper
    assert "from smtp_gate.cli import main" in wrapper
    for u in UNITS:
        text = (root / "etc/systemd/system" / u).read_text()
        first, second, rest = text.split("\n", 2)
        assert MARKER in first and "systemctl edit" in second
        assert rest == (src / "systemd" / u).read_text().replace("/usr/local/smtp-gate", app)


def check_hooks(root: Path, src: Path, app: str = APP) -> None:
    """The installed hooks are executable symlinks to the app dir's hooks, identical to the repo's."""
    for d in DRIVERS:
        link = root / f"etc/libvirt/hooks/{d}.d/smtp-gate"
        assert link.is_symlink()
        assert os.readlink(link) == f"../../../../{app}/hooks/{d}"
        assert link.resolve() == (root / app / "hooks" / d).resolve()
        assert os.access(link, os.X_OK) and link.resolve().is_file()
        assert link.read_bytes() == (src / "hooks" / d).read_bytes()


def run_hook(path: Path) -> None:
    """Call an installed hook with an operation it ignores: it must import smtp_gate (through the
    link or wrapper), exit 0 and print nothing; it touches no nft, lock or file for this one."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = run([path, "smtp-gate-test-vm", "migrate", "begin", "-"], env=env)
    assert proc.stdout == "" and proc.stderr == "", proc


# --------------------------------------------------------------------------------------- tests
def test_install_twice_then_uninstall_gives_exact_trees(snapshot: Path, app_files: Dict[str, Entry],
                                                       tmp_path: Path) -> None:
    root = tmp_path / "root"
    foreign = root / "etc/libvirt/hooks/qemu"
    foreign.parent.mkdir(parents=True)
    foreign.write_text(FOREIGN_HOOK)
    foreign.chmod(0o755)
    foreign_entry = ("file", "0o755", sha(foreign))

    # first install: clones the snapshot, creates the live config from the examples
    out = install(root, snapshot).stdout
    assert "cloned" in out and "install.sh: done" in out
    assert "kept       /etc/libvirt/hooks/qemu (someone else's hook" in out
    app_root = root / APP
    for name in ("smtp-gate.conf", "whitelist.csv"):
        assert (app_root / "config" / name).read_bytes() == (snapshot / "config" / f"{name}.example").read_bytes()
    first_generated = generated(root)
    expected = expected_installed(app_files, app_root)
    expected.update(with_parents(first_generated))
    expected["etc/libvirt/hooks/qemu"] = foreign_entry
    assert_tree(root, expected)
    check_generated(root, snapshot)
    check_hooks(root, snapshot)
    run_hook(root / "etc/libvirt/hooks/qemu.d/smtp-gate")
    version = run([sys.executable, "-B", root / "usr/bin/smtp-gate", "--version"]).stdout
    assert version.strip() == f"smtp-gate {__version__}"
    status = run(["git", "-C", app_root, "status", "--porcelain"]).stdout
    assert status == "", "the live config must be untracked and ignored by git"

    # the operator edits the config and the whitelist; a second run changes nothing at all
    for name in ("smtp-gate.conf", "whitelist.csv"):
        with open(app_root / "config" / name, "a") as handle:
            handle.write(f"# operator's marker in {name}\n")
    stamps = {rel: (root / rel).lstat().st_mtime_ns for rel in expected if not rel.startswith(APP + "/")}
    out = install(root, snapshot).stdout
    assert "install.sh: nothing changed" in out
    assert "kept       /usr/local/smtp-gate/config/smtp-gate.conf (exists" in out
    expected = expected_installed(app_files, app_root)
    expected.update(with_parents(first_generated))
    expected["etc/libvirt/hooks/qemu"] = foreign_entry
    assert_tree(root, expected)
    assert {rel: (root / rel).lstat().st_mtime_ns for rel in stamps} == stamps, "a second run rewrote files"
    for name in ("smtp-gate.conf", "whitelist.csv"):
        assert (app_root / "config" / name).read_text().endswith(f"# operator's marker in {name}\n")

    # uninstall: everything of ours goes but the app dir (with the config); the foreign hook stays
    out = uninstall(root, snapshot).stdout
    assert ("kept       /usr/local/smtp-gate (the application, with config/smtp-gate.conf and "
            "config/whitelist.csv)") in out
    assert f"rm -rf {app_root}" in out
    after = {rel: e for rel, e in expected.items() if rel.startswith(APP + "/") or rel == APP}
    after["etc/libvirt/hooks/qemu"] = foreign_entry
    after.update({d: ("dir",) for d in ("etc/systemd/system", "usr/bin")})  # standard dirs stay
    assert_tree(root, with_parents(after))
    out = uninstall(root, snapshot).stdout
    assert "uninstall.sh: nothing to remove" in out
    assert_tree(root, with_parents(after))

    # installing again keeps the edited config
    install(root, snapshot)
    for name in ("smtp-gate.conf", "whitelist.csv"):
        assert (app_root / "config" / name).read_text().endswith(f"# operator's marker in {name}\n")
    assert_tree(root, expected)


def test_run_from_inside_the_app_dir_uses_that_checkout(snapshot: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    app_root = root / APP
    app_root.parent.mkdir(parents=True)
    git("clone", "-q", snapshot, app_root, cwd=tmp_path)
    before = tree(app_root)
    out = install(root, app_root).stdout
    assert "in place" in out and "cloned" not in out
    expected = expected_installed(tree(snapshot), app_root)
    expected.update(with_parents(generated(root)))
    assert_tree(root, expected)
    created = set(tree(app_root)) - set(before)
    assert created == {"config/smtp-gate.conf", "config/whitelist.csv"}
    check_hooks(root, snapshot)
    assert "nothing changed" in install(root, app_root).stdout
    uninstall(root, app_root)
    assert tree(app_root) == {**before, **{rel: tree(app_root)[rel] for rel in created}}


def test_an_existing_app_dir_is_left_as_it_is(snapshot: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    app_root = root / APP
    app_root.parent.mkdir(parents=True)
    git("clone", "-q", snapshot, app_root, cwd=tmp_path)
    (app_root / "LOCAL-CHANGE").write_text("an operator's file\n")
    out = install(root, snapshot).stdout
    assert "left as it is; update it with: git -C /usr/local/smtp-gate pull" in out
    assert (app_root / "LOCAL-CHANGE").exists()
    # a directory that is not smtp-gate is refused before anything is written
    other = tmp_path / "other"
    (other / "opt/thing").mkdir(parents=True)
    err = install(other, snapshot, "--app-dir", "/opt/thing", expect=1).stderr
    assert "is not an smtp-gate application directory" in err
    assert tree(other) == {"opt": ("dir",), "opt/thing": ("dir",)}


def test_app_dir_option_is_used_everywhere(snapshot: Path, app_files: Dict[str, Entry], tmp_path: Path) -> None:
    root = tmp_path / "root"
    install(root, snapshot, "--app-dir", "/opt/sg")
    app_root = root / "opt/sg"
    expected = expected_installed(app_files, app_root, app="opt/sg")
    expected.update(with_parents(generated(root)))
    assert_tree(root, expected)
    check_generated(root, snapshot, app="/opt/sg")
    check_hooks(root, snapshot, app="opt/sg")
    unit = (root / "etc/systemd/system/smtp-gate.service").read_text()
    assert "ReadWritePaths=-/opt/sg/config" in unit and "/usr/local/smtp-gate" not in unit
    assert '"../../opt/sg"' in (root / "usr/bin/smtp-gate").read_text()
    version = run([sys.executable, "-B", root / "usr/bin/smtp-gate", "--version"]).stdout
    assert version.strip() == f"smtp-gate {__version__}"
    # uninstall with the default app dir does not recognise these as ours...
    out = uninstall(root, snapshot).stdout
    assert "kept       /usr/bin/smtp-gate" not in out  # the wrapper carries the marker: removed
    assert all((root / f"etc/libvirt/hooks/{d}.d/smtp-gate").is_symlink() for d in DRIVERS)
    # ...with the right one it does
    uninstall(root, snapshot, "--app-dir", "/opt/sg")
    assert not any((root / f"etc/libvirt/hooks/{d}.d").exists() for d in DRIVERS)


def test_libvirt_older_than_6_5_gets_monolithic_hooks_where_free(snapshot: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    hooks = root / "etc/libvirt/hooks"
    hooks.mkdir(parents=True)
    (hooks / "qemu").write_text(FOREIGN_HOOK)
    (hooks / "qemu").chmod(0o755)
    proc = install(root, snapshot, "--libvirt-version", "6.0.0")
    assert "older than 6.5" in proc.stdout
    assert "/etc/libvirt/hooks/qemu is someone else's hook: left untouched" in proc.stderr
    assert '| /usr/local/smtp-gate/hooks/qemu "$@" >/dev/null' in proc.stderr
    assert (hooks / "qemu").read_text() == FOREIGN_HOOK
    for d in ("lxc", "libxl"):
        assert os.readlink(hooks / d) == f"../../../{APP}/hooks/{d}"
        assert os.access(hooks / d, os.X_OK)
    assert not any((hooks / f"{d}.d").exists() for d in DRIVERS)
    assert "nothing changed" in install(root, snapshot, "--libvirt-version", "6.0.0").stdout
    # libvirt upgraded: the drop-ins replace our monolithic hooks, the foreign one stays
    out = install(root, snapshot, "--libvirt-version", "9.0.0").stdout
    assert "removed    /etc/libvirt/hooks/lxc (our hook for libvirt < 6.5" in out
    check_hooks(root, snapshot)
    assert (hooks / "qemu").read_text() == FOREIGN_HOOK
    assert not (hooks / "lxc").exists() and not (hooks / "libxl").exists()
    # and uninstall after an old-libvirt install removes the monolithic links too
    install(root, snapshot, "--libvirt-version", "6.0")
    out = uninstall(root, snapshot).stdout
    assert "reload libvirtd (systemctl reload libvirtd): libvirt < 6.5 would fail guest starts" in out
    assert sorted(p.name for p in hooks.iterdir()) == ["qemu"]
    assert (hooks / "qemu").read_text() == FOREIGN_HOOK


def test_old_system_python_gets_hook_wrappers(snapshot: Path, tmp_path: Path) -> None:
    """When /usr/bin/python3 is older than 3.9 the hooks run another interpreter through a
    wrapper (--hook-python stands in for the detection here)."""
    root = tmp_path / "root"
    python = sys.executable
    install(root, snapshot, "--hook-python", python)
    for d in DRIVERS:
        hook = root / f"etc/libvirt/hooks/{d}.d/smtp-gate"
        assert hook.is_file() and not hook.is_symlink()
        assert stat.S_IMODE(hook.stat().st_mode) == 0o755
        text = hook.read_text()
        assert MARKER in text and f"exec {python} " in text
        run_hook(hook)
    assert "nothing changed" in install(root, snapshot, "--hook-python", python).stdout
    # back to /usr/bin/python3: the wrappers become links again
    install(root, snapshot)
    check_hooks(root, snapshot)
    install(root, snapshot, "--hook-python", python)
    uninstall(root, snapshot)
    assert not (root / "etc/libvirt/hooks/qemu.d").exists()


@pytest.mark.parametrize("path", ["usr/bin/smtp-gate", "etc/libvirt/hooks/qemu.d/smtp-gate",
                                  "etc/systemd/system/smtp-gate.service"])
def test_files_not_written_by_install_sh_are_never_replaced(snapshot: Path, tmp_path: Path, path: str) -> None:
    root = tmp_path / "root"
    target = root / path
    target.parent.mkdir(parents=True)
    target.write_text("#!/bin/sh\n# not ours\n")
    before = tree(root)
    err = install(root, snapshot, expect=1).stderr
    assert f"refusing to replace /{path}" in err and "nothing was changed" in err
    assert tree(root) == before
    # uninstall keeps it too
    uninstall(root, snapshot)
    assert target.read_text() == "#!/bin/sh\n# not ours\n"


def test_help_and_usage_errors(snapshot: Path, tmp_path: Path) -> None:
    for script in ("install.sh", "uninstall.sh"):
        assert "--root DIR" in run([snapshot / script, "--help"]).stdout
        assert "unknown argument" in run([snapshot / script, "--bogus"], expect=2).stderr
        assert "--app-dir must be" in run([snapshot / script, "--root", tmp_path, "--app-dir", "rel/path", "--no-venv"]
                                          if script == "install.sh" else
                                          [snapshot / script, "--root", tmp_path, "--app-dir", "rel/path"],
                                          expect=2).stderr
    assert tree(tmp_path) == {}
    assert "--libvirt-version expects" in run([snapshot / "install.sh", "--root", tmp_path,
                                               "--libvirt-version", "new"], expect=2).stderr


def test_scripts_pass_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian/Ubuntu: apt-get install shellcheck)")
    run(["shellcheck", "-x", REPO / "install.sh", REPO / "uninstall.sh", REPO / "install-common.sh",
         REPO / "test.sh", REPO / ".ci/run", CONTAINER], cwd=REPO)


# ------------------------------------------------------------------------------ config examples
def test_config_example_documents_every_key_with_its_default() -> None:
    text = (REPO / "config/smtp-gate.conf.example").read_text()
    path = Path("/usr/local/smtp-gate/config/smtp-gate.conf")
    as_shipped = config.parse(text, path)
    defaults = config.parse("", path)
    commented = re.findall(r"^#([A-Z_]+=\".*\")$", text, flags=re.M)
    assert sorted(line.split("=")[0] for line in commented) == sorted(config.KEYS), "every key, once"
    uncommented = config.parse("\n".join(commented) + "\n", path)
    for attr, _parser in config.KEYS.values():
        want = getattr(defaults, attr)
        for candidate in (getattr(as_shipped, attr), getattr(uncommented, attr)):
            if attr == "uplink_regex":
                assert candidate is None and want is None
            else:
                assert candidate == want, attr


def test_whitelist_example_parses_and_its_examples_are_valid() -> None:
    text = (REPO / "config/whitelist.csv.example").read_text()
    assert text.startswith("# vmname,mac,added_at,added_by,reason\n")
    shipped = whitelist.parse(text)
    assert shipped.entries() == [] and shipped.problems() == []
    examples = [line[2:] for line in text.splitlines() if re.match(r"# [^ ]*,", line) and "vmname" not in line]
    assert len(examples) == 2
    used = whitelist.parse(text + "".join(line + "\n" for line in examples))
    assert len(used.entries()) == 2 and used.problems() == []


# ------------------------------------------------------------------------- systemd-analyze verify
def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian/Ubuntu: apt-get install systemd)")
    if not any(d.is_dir() for d in HOST_UNIT_DIRS):
        pytest.skip("no systemd unit directory on this machine to verify against")
    return tool


def verify_root(tmp_path: Path, installed_root: Path) -> Path:
    """A tree for `systemd-analyze verify --root`: this machine's units (sysinit.target and the
    rest, which our units' default dependencies require), the installed unit files and the
    installed /usr/bin/smtp-gate, byte for byte.  (Without --root, verify checks ExecStart= on
    the live /usr/bin, where smtp-gate may or may not be installed.)  A unit of ours that this
    machine has in its unit directory (a packaged install) is left out: only the tree under test
    may define them."""
    v = tmp_path / "verify"
    lib = v / "usr/lib/systemd/system"
    host = next(d for d in HOST_UNIT_DIRS if d.is_dir())
    shutil.copytree(host, lib, symlinks=True, ignore=shutil.ignore_patterns("smtp-gate*"))
    (v / "etc/systemd/system").mkdir(parents=True)
    for u in UNITS:
        shutil.copy2(installed_root / "etc/systemd/system" / u, v / "etc/systemd/system" / u)
    (v / "usr/bin").mkdir(parents=True)
    shutil.copy2(installed_root / "usr/bin/smtp-gate", v / "usr/bin/smtp-gate")
    return v


def verify(tool: str, root: Path, *units: str) -> List[str]:
    proc = subprocess.run([tool, "verify", "--man=no", f"--root={root}", *units],
                          capture_output=True, text=True, timeout=120)
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if l.strip()]
    assert proc.returncode == 0, "\n".join(lines)
    return lines


def test_units_pass_systemd_analyze_verify(snapshot: Path, tmp_path: Path) -> None:
    tool = systemd_analyze()
    root = tmp_path / "root"
    install(root, snapshot)
    v = verify_root(tmp_path, root)
    lines = verify(tool, v, *UNITS)
    assert lines == [], "systemd-analyze verify complained:\n" + "\n".join(lines)
    # the check is not vacuous: a unit error is reported
    (v / "etc/systemd/system/smtp-gate.service").write_text(
        (v / "etc/systemd/system/smtp-gate.service").read_text().replace("Type=oneshot", "Type=bogus"))
    assert any("smtp-gate.service" in l for l in verify(tool, v, "smtp-gate.service"))


# A firewall unit as Debian ships it (early boot, before sysinit.target) and as Fedora/RHEL/AlmaLinux
# ship it (default dependencies: after basic.target, hence after sockets.target).
NFTABLES_DEBIAN = """[Unit]
Description=nftables
Wants=network-pre.target
Before=network-pre.target shutdown.target
Conflicts=shutdown.target
DefaultDependencies=no
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/bin/smtp-gate --version
ExecReload=/usr/bin/smtp-gate --version
ExecStop=/usr/bin/smtp-gate --version
[Install]
WantedBy=sysinit.target
"""
NFTABLES_RHEL = """[Unit]
Description=Netfilter Tables
Wants=network-pre.target
Before=network-pre.target
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/bin/smtp-gate --version
ExecReload=/usr/bin/smtp-gate --version
ExecStop=/usr/bin/smtp-gate --version
[Install]
WantedBy=multi-user.target
"""
LIBVIRT_SOCKET = """[Unit]
Description=stand-in for {name}.socket
[Socket]
ListenStream=/run/libvirt/{name}-sock
[Install]
WantedBy=sockets.target
"""
LIBVIRT_SERVICE = """[Unit]
Description=stand-in for {name}.service
Requires={name}.socket
After=network.target
[Service]
ExecStart=/usr/bin/smtp-gate --version
[Install]
WantedBy=multi-user.target
"""
# The earlier design: ordered before the libvirt sockets, which needs DefaultDependencies=no.
ORDERED_BEFORE_SOCKETS = """[Unit]
Description=before the libvirt sockets
DefaultDependencies=no
After=sysinit.target nftables.service
Before=virtqemud.service virtqemud.socket libvirtd.service libvirtd.socket
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/bin/smtp-gate --version
[Install]
WantedBy=multi-user.target
"""


def enable(v: Path, unit: str, target: str) -> None:
    wants = v / "etc/systemd/system" / f"{target}.wants"
    wants.mkdir(exist_ok=True)
    (wants / unit).symlink_to(f"/etc/systemd/system/{unit}")


def boot_layout(tmp_path: Path, root: Path, nftables: str, ours: Optional[str] = None) -> Path:
    v = verify_root(tmp_path, root)
    etc = v / "etc/systemd/system"
    (etc / "nftables.service").write_text(nftables)
    enable(v, "nftables.service", "sysinit.target" if "DefaultDependencies=no" in nftables else "multi-user.target")
    for name in ("libvirtd", "virtqemud"):
        (etc / f"{name}.socket").write_text(LIBVIRT_SOCKET.format(name=name))
        (etc / f"{name}.service").write_text(LIBVIRT_SERVICE.format(name=name))
        enable(v, f"{name}.socket", "sockets.target")
        enable(v, f"{name}.service", "multi-user.target")
    if ours is not None:
        (etc / "smtp-gate.service").write_text(ours)
    for unit, target in (("smtp-gate.service", "multi-user.target"), ("smtp-gate.service", "nftables.service"),
                         ("smtp-gate-watch.service", "multi-user.target"),
                         ("smtp-gate-rebuild.timer", "timers.target")):
        enable(v, unit, target)
    return v


@pytest.mark.parametrize("nftables", [NFTABLES_DEBIAN, NFTABLES_RHEL], ids=["debian-nftables", "rhel-nftables"])
def test_boot_transaction_has_no_ordering_cycle(snapshot: Path, tmp_path: Path, nftables: str) -> None:
    """Everything enabled, as at boot: nftables, libvirt's sockets and daemons (monolithic and
    modular stand-ins) and our units.  systemd would break an ordering cycle by deleting a start
    job - ours, nftables' or a libvirt socket's."""
    tool = systemd_analyze()
    root = tmp_path / "root"
    install(root, snapshot)
    lines = verify(tool, boot_layout(tmp_path, root, nftables), "multi-user.target")
    assert not [l for l in lines if "cycle" in l or "deleted" in l], "\n".join(lines)


def test_ordering_before_the_libvirt_sockets_would_cycle_with_rhel_nftables(snapshot: Path, tmp_path: Path) -> None:
    """Why smtp-gate.service is ordered before the libvirt daemons but not their sockets (and why the
    test above is not vacuous): the alternative cycles as soon as nftables.service runs after
    basic.target, as on Fedora/RHEL/AlmaLinux."""
    tool = systemd_analyze()
    root = tmp_path / "root"
    install(root, snapshot)
    lines = verify(tool, boot_layout(tmp_path, root, NFTABLES_RHEL, ours=ORDERED_BEFORE_SOCKETS), "multi-user.target")
    assert any("ordering cycle" in l for l in lines), "\n".join(lines)


def unit_settings(text: str) -> Dict[str, List[str]]:
    """KEY -> every value it is given (sections ignored: our keys are unambiguous)."""
    settings: Dict[str, List[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_contract() -> None:
    """The properties DESIGN.md section 2 and issue 5 ask of the units, read from the repo's files."""
    units = {u: unit_settings((REPO / "systemd" / u).read_text()) for u in UNITS}
    boot = units["smtp-gate.service"]
    assert boot["Type"] == ["oneshot"] and boot["RemainAfterExit"] == ["yes"]
    # --if-enabled: the boot service and the timer are not the operator; they honour `smtp-gate disable`
    assert boot["ExecStart"] == ["/usr/bin/smtp-gate apply --no-libvirt --if-enabled"]
    assert boot["ExecReload"] == ["/usr/bin/smtp-gate apply --no-libvirt --if-enabled"]
    assert "ExecStop" not in boot and "ExecStopPost" not in boot, "stopping must never remove enforcement"
    assert boot["ReloadPropagatedFrom"] == ["nftables.service"] and boot["PartOf"] == ["nftables.service"]
    assert "nftables.service" in " ".join(boot["After"])
    before = " ".join(boot["Before"]).split()
    assert {"libvirtd.service", "virtqemud.service", "virtlxcd.service", "virtxend.service"} <= set(before)
    for forbidden in ("network.target", "network-online.target"):
        assert forbidden not in " ".join(boot.get("After", []) + boot.get("Wants", []) + boot.get("Requires", []))
    assert boot["WantedBy"] == ["multi-user.target nftables.service"]  # back after nftables stop + start
    rebuild = units["smtp-gate-rebuild.service"]
    assert rebuild["Type"] == ["oneshot"] and "RemainAfterExit" not in rebuild
    assert rebuild["ExecStart"] == ["/usr/bin/smtp-gate rebuild --if-enabled"]
    assert {"libvirtd.service", "virtqemud.service"} <= set(" ".join(rebuild["After"]).split())
    timer = units["smtp-gate-rebuild.timer"]
    assert timer["OnUnitActiveSec"] == ["60s"] and timer["AccuracySec"] == ["1s"] and timer["OnBootSec"]
    watch = units["smtp-gate-watch.service"]
    assert watch["Type"] == ["simple"] and watch["ExecStart"] == ["/usr/bin/smtp-gate watch"]
    assert watch["Restart"] == ["always"] and watch["RestartSec"] == ["1"] and watch["StartLimitIntervalSec"] == ["0"]
    assert "smtp-gate.service" in " ".join(watch["After"])
    for name, settings in units.items():
        if not name.endswith(".service"):
            continue
        # 3: installed with a warning; 5: installed nothing, as the operator's `disable` asked
        assert settings["SuccessExitStatus"] == (["3"] if name == "smtp-gate-watch.service" else ["3 5"]), name
        for key in ("PrivateNetwork", "NetworkNamespacePath", "JoinsNamespaceOf", "PrivateUsers", "IPAddressDeny"):
            assert key not in settings, f"{name}: {key} would hide the host's network from nft"
        assert "AF_NETLINK" in settings["RestrictAddressFamilies"][0].split(), name
        assert "CAP_NET_ADMIN" in settings["CapabilityBoundingSet"][0].split(), name
        assert settings["ProtectSystem"] == ["strict"], name
        assert settings["ReadWritePaths"] == ["-/usr/local/smtp-gate/config", "-/var/lib/prometheus/node-exporter"], name
        assert settings["RuntimeDirectory"] == ["smtp-gate"] and settings["RuntimeDirectoryPreserve"] == ["yes"], name


# ------------------------------------------------------- live install under a real systemd (root)
CONTAINER = REPO / "tests/install_helpers/systemd_container.sh"
TEST_NFTABLES_CONF = "flush ruleset\ntable inet smtp_gate_test_firewall {\n}\n"
TEST_NFTABLES_UNIT = """[Unit]
Description=nftables (as Debian ships it, on a test ruleset)
Wants=network-pre.target
Before=network-pre.target shutdown.target
Conflicts=shutdown.target
DefaultDependencies=no
[Service]
Type=oneshot
RemainAfterExit=yes
StandardInput=null
ExecStart={nft} -f /etc/smtp-gate-test-nftables.conf
ExecReload={nft} -f /etc/smtp-gate-test-nftables.conf
ExecStop={nft} flush ruleset
[Install]
WantedBy=sysinit.target
"""
STANDIN_LIBVIRTD = """[Unit]
Description=stand-in for libvirtd: records whether our table exists when it starts
Requires=libvirtd.socket
After=network.target libvirtd.socket
[Service]
ExecStart=/bin/sh -c '{nft} list table bridge smtp_gate >/dev/null 2>&1 && s=present || s=absent; \
    echo $$s >/run/standin-libvirtd; exec sleep infinity'
[Install]
WantedBy=multi-user.target
"""
STANDIN_SOCKET = """[Unit]
Description=stand-in for libvirtd.socket
[Socket]
ListenStream=/run/libvirt/libvirt-sock
[Install]
WantedBy=sockets.target
"""


def container_skip_reason() -> Optional[str]:
    if os.geteuid() != 0:
        return "needs root (a throwaway systemd in its own namespaces)"
    for tool in ("unshare", "nsenter", "setsid", "pgrep", "nft", "git"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/lib/systemd/systemd").exists():
        return "no /lib/systemd/systemd to boot"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "no overlayfs"
    if not any(Path(p, "cgroup.procs").exists() for p in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")):
        return "no writable cgroup2 hierarchy"
    return None


class Container:
    """This machine's systemd booted in a throwaway container (see systemd_container.sh), with the
    host's own smtp-gate installation hidden.  host_layer: a tree laid over the host's / below the
    container's own layer (a decoy host installation); hide_host_install=False leaves such paths
    visible, only to show that the hiding is what keeps them out."""

    # what the commands run inside get: never the test process's environment (an operator's
    # $SMTP_GATE_CONFIG, a venv's PATH), as `sudo ./install.sh` would not either
    ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}

    def __init__(self, path: Path, host_layer: Optional[Path] = None, hide_host_install: bool = True) -> None:
        self.path = path
        self.pid = ""
        self.options: List[object] = []
        if host_layer is not None:
            self.options += ["--host-layer", host_layer]
        if not hide_host_install:
            self.options.append("--keep-host-install")

    def start(self) -> None:
        self.pid = run([CONTAINER, "start", self.path, *self.options]).stdout.strip()

    def reboot(self) -> None:
        run([CONTAINER, "stop", self.path, "--keep-layer"])
        self.start()

    def stop(self) -> None:
        subprocess.run([str(CONTAINER), "stop", str(self.path)], capture_output=True, timeout=60)

    def __call__(self, *cmd: object, expect: Optional[int] = 0) -> subprocess.CompletedProcess:
        return run(["nsenter", "-t", self.pid, "-m", "-u", "-i", "-n", "-p", "-C", "-r", "-w", *cmd], expect=expect,
                   env=self.ENV)

    def write(self, path: str, text: str) -> None:
        self("mkdir", "-p", str(Path(path).parent))
        proc = subprocess.run(["nsenter", "-t", self.pid, "-m", "-r", "-w", "tee", path], input=text,
                              capture_output=True, text=True, timeout=60, env=self.ENV)
        assert proc.returncode == 0, proc.stderr

    def show(self, unit: str, prop: str) -> str:
        return self("systemctl", "show", unit, "-p", prop, "--value").stdout.strip()

    def has_table(self) -> bool:
        return self("nft", "list", "tables").stdout.find("table bridge smtp_gate") >= 0

    def wait_table(self, seconds: float = 5.0) -> bool:
        """Wait until our table is back and smtp-gate.service has no job left (a propagated reload or
        restart finishes a moment after the nftables job that systemctl waited for)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.has_table() and self.show("smtp-gate.service", "Job") == "":
                return True
            time.sleep(0.05)
        return False


# Where a host's own installation lives (install.sh's live paths, a packaged unit, the runtime
# dir): a test must never see any of them.
HOST_INSTALL_PATHS = ("/usr/local/smtp-gate", "/usr/bin/smtp-gate", "/etc/libvirt/hooks",
                      "/etc/systemd/system/smtp-gate.service", "/etc/systemd/system/smtp-gate.service.d",
                      "/etc/systemd/system/smtp-gate-watch.service", "/etc/systemd/system/smtp-gate-rebuild.timer",
                      "/etc/systemd/system/smtp-gate-rebuild.service",
                      "/etc/systemd/system/multi-user.target.wants/smtp-gate.service",
                      "/etc/systemd/system/nftables.service.wants/smtp-gate.service",
                      "/usr/lib/systemd/system/smtp-gate-watch.service", "/run/smtp-gate")
POISON_CONF = 'BRIDGE="host-br9"\nHOST_ONLY_KEY="the host\'s config, which no test may read"\n'


@pytest.fixture
def host_install(snapshot: Path, tmp_path: Path) -> Path:
    """A decoy installation of smtp-gate, as a host that runs it has one, laid over the container's
    view of this machine: install.sh's own layout, enabled, with a config that smtp-gate refuses
    (an unknown key: apply exits 1), a drop-in that would run the services with another config,
    and a packaged unit in /usr/lib.  Built with install.sh --root; never on the live system."""
    layer = tmp_path / "host-layer"
    install(layer, snapshot)
    (layer / APP / "config/smtp-gate.conf").write_text(POISON_CONF)
    etc = layer / "etc/systemd/system"
    for target, unit in (("multi-user.target", "smtp-gate.service"), ("nftables.service", "smtp-gate.service"),
                         ("multi-user.target", "smtp-gate-watch.service"), ("timers.target", "smtp-gate-rebuild.timer")):
        (etc / f"{target}.wants").mkdir(exist_ok=True)
        (etc / f"{target}.wants" / unit).symlink_to(f"/etc/systemd/system/{unit}")
    (etc / "smtp-gate.service.d").mkdir()
    (etc / "smtp-gate.service.d/host.conf").write_text(
        "[Service]\nEnvironment=SMTP_GATE_CONFIG=/usr/local/smtp-gate/config/smtp-gate.conf\n")
    packaged = layer / "usr/lib/systemd/system"
    packaged.mkdir(parents=True)
    (packaged / "smtp-gate-watch.service").write_text("[Service]\nExecStart=/bin/false\n")
    return layer


@pytest.mark.kernel
def test_the_container_hides_the_hosts_installation(host_install: Path, tmp_path: Path) -> None:
    """The live test below must behave as on a fresh host whatever this machine has installed.
    A decoy installation laid over this machine's / stands in for the host's: without the hiding
    the container sees it (so the check is not vacuous), with it none of its paths exist."""
    reason = container_skip_reason()
    if reason:
        pytest.skip(reason)
    seen = Container(tmp_path / "sees", host_layer=host_install, hide_host_install=False)
    try:
        seen.start()
        assert seen("cat", "/usr/local/smtp-gate/config/smtp-gate.conf").stdout == POISON_CONF
        assert MARKER in seen("cat", "/usr/bin/smtp-gate").stdout
        assert "smtp-gate.service" in seen("systemctl", "list-unit-files", "smtp-gate*", "--no-legend").stdout
    finally:
        seen.stop()
    ct = Container(tmp_path / "hides", host_layer=host_install)
    try:
        ct.start()
        present = [p for p in HOST_INSTALL_PATHS if ct("test", "-e", p, expect=None).returncode == 0]
        assert present == [], f"the host's installation shows through: {present}"
        assert ct("systemctl", "list-unit-files", "smtp-gate*", "--no-legend", expect=1).stdout.strip() == ""
        assert ct("sh", "-c", "ls /etc/systemd/system/*.wants/ | grep smtp-gate", expect=1).stdout == ""
        # and across a reboot, where the container keeps its own layer
        ct.reboot()
        assert [p for p in HOST_INSTALL_PATHS if ct("test", "-e", p, expect=None).returncode == 0] == []
    finally:
        ct.stop()
    assert (host_install / APP / "config/smtp-gate.conf").read_text() == POISON_CONF


@pytest.mark.kernel
def test_live_install_under_a_real_systemd(snapshot: Path, tmp_path: Path, host_install: Path) -> None:
    """The live path of install.sh and uninstall.sh, in a container running this machine's
    systemd with its own network namespace, on a "host" that has its own installation of
    smtp-gate (host_install, hidden as this machine's would be): units enabled and started, the boot order (after
    nftables, before libvirtd) across a reboot, nftables reload/restart/stop+start bringing the
    table back, stopping our unit removing nothing, and uninstall removing everything but the app
    dir.  The host's ruleset and units are never touched."""
    reason = container_skip_reason()
    if reason:
        pytest.skip(reason)
    nft = shutil.which("nft")
    host_tables = run(["nft", "list", "tables"]).stdout
    ct = Container(tmp_path / "container", host_layer=host_install)
    try:
        ct.start()
        # This environment's Python with lxml/libvirt/filelock may live under /root or /home, which
        # ProtectHome= hides from the services, and the test venv under /tmp (a clone in /tmp),
        # which PrivateTmp= replaces: a drop-in lifts those two settings for the test.
        for unit in ("smtp-gate.service", "smtp-gate-rebuild.service", "smtp-gate-watch.service"):
            ct.write(f"/etc/systemd/system/{unit}.d/test-python.conf", "[Service]\nProtectHome=no\nPrivateTmp=no\n")
        ct.write("/etc/smtp-gate-test-nftables.conf", TEST_NFTABLES_CONF)
        ct.write("/etc/systemd/system/nftables.service", TEST_NFTABLES_UNIT.format(nft=nft))
        ct.write("/etc/systemd/system/libvirtd.service", STANDIN_LIBVIRTD.format(nft=nft))
        ct.write("/etc/systemd/system/libvirtd.socket", STANDIN_SOCKET)
        ct("systemctl", "daemon-reload")
        ct("systemctl", "enable", "--quiet", "nftables.service", "libvirtd.socket", "libvirtd.service")
        ct("systemctl", "start", "nftables.service")

        out = ct(snapshot / "install.sh", "--python", sys.executable, "--no-venv").stdout
        for unit in ("smtp-gate.service", "smtp-gate-watch.service", "smtp-gate-rebuild.timer"):
            assert f"enabled    {unit}" in out and f"started    {unit}" in out
        assert "Meanwhile guests stay blocked by smtp-gate's table (bridge smtp_gate), and the 60 s rebuild" in out
        assert ct.show("smtp-gate.service", "ActiveState") == "active"
        assert ct.show("smtp-gate.service", "Result") == "success"  # exit 3 (no br0 here) is success
        assert ct.show("smtp-gate.service", "ExecMainStatus") in ("0", "3")
        assert ct.has_table()
        assert ct("readlink", "/etc/systemd/system/nftables.service.wants/smtp-gate.service").stdout.strip()

        # the watcher (sandboxed as installed) puts the table back after a flush by hand
        assert ct.show("smtp-gate-watch.service", "ActiveState") == "active"
        time.sleep(1)  # let it subscribe to nftables events
        started = time.monotonic()
        ct("nft", "flush", "ruleset")
        assert ct.wait_table(), "smtp-gate-watch.service did not restore the table after nft flush ruleset"
        print(f"watcher: table back {time.monotonic() - started:.2f}s after `nft flush ruleset`")
        ct("systemctl", "start", "nftables.service")  # the flush emptied its ruleset; start = no-op, so:
        ct("systemctl", "reload", "nftables.service")
        assert ct.wait_table()

        # systemd alone, without the watcher: nftables.service reload, restart, stop + start each
        # flush the ruleset, and each brings our table back
        ct("systemctl", "stop", "smtp-gate-watch.service")
        for action in (["reload"], ["restart"]):
            ct("systemctl", *action, "nftables.service")
            assert ct.wait_table(), f"table not back after systemctl {action[0]} nftables"
        ct("systemctl", "stop", "nftables.service")
        assert not ct.has_table() and ct.show("smtp-gate.service", "ActiveState") == "inactive"
        ct("systemctl", "start", "nftables.service")
        assert ct.wait_table(), "table not back after systemctl stop + start nftables"
        # stopping our unit removes nothing
        ct("systemctl", "stop", "smtp-gate.service")
        assert ct.has_table()
        ct("systemctl", "start", "smtp-gate.service", "smtp-gate-watch.service")

        # reboot: nftables, then us, then the (stand-in) libvirt daemon, which finds our table
        ct.reboot()
        assert ct.show("smtp-gate.service", "ActiveState") == "active" and ct.has_table()
        nft_up = int(ct.show("nftables.service", "ActiveEnterTimestampMonotonic"))
        ours_start = int(ct.show("smtp-gate.service", "InactiveExitTimestampMonotonic"))
        ours_up = int(ct.show("smtp-gate.service", "ActiveEnterTimestampMonotonic"))
        libvirtd_start = int(ct.show("libvirtd.service", "InactiveExitTimestampMonotonic"))
        assert 0 < nft_up <= ours_start <= ours_up <= libvirtd_start
        assert ct("cat", "/run/standin-libvirtd").stdout.strip() == "present"

        # second run: nothing changes (but for starting the watcher again, should it be between
        # two restarts because it exited)
        out = ct(snapshot / "install.sh", "--python", sys.executable, "--no-venv").stdout
        assert "install.sh: nothing changed" in out or (
            "install.sh: done (1 change(s))" in out and "  started    smtp-gate-watch.service" in out), out

        out = ct(snapshot / "uninstall.sh").stdout
        assert "removed    table bridge smtp_gate" in out
        assert not ct.has_table()
        assert ct("systemctl", "list-unit-files", "smtp-gate*", "--no-legend", expect=1).stdout.strip() == ""
        for gone in ("/usr/bin/smtp-gate", "/etc/systemd/system/nftables.service.wants/smtp-gate.service",
                     "/run/smtp-gate", *(f"/etc/libvirt/hooks/{d}.d" for d in DRIVERS)):
            ct("test", "!", "-e", gone)
        assert ct("cat", "/usr/local/smtp-gate/config/smtp-gate.conf").stdout == (
            snapshot / "config/smtp-gate.conf.example").read_text()
        assert "nothing to remove" in ct(snapshot / "uninstall.sh").stdout
    finally:
        ct.stop()
    assert run(["nft", "list", "tables"]).stdout == host_tables, "the host's ruleset changed"


def test_paths_the_units_cannot_reach_are_warned_about(snapshot: Path, tmp_path: Path) -> None:
    """ProtectHome=yes hides /home, /root and /run/user from the services."""
    err = install(tmp_path / "root", snapshot, "--app-dir", "/home/operator/smtp-gate").stderr
    assert "/home/operator/smtp-gate/ is under /home, /root or /run/user" in err and "ProtectHome=no" in err


@pytest.mark.parametrize("extra", [(), ("--no-start",)])
def test_nothing_started_means_no_claim_that_guests_stay_blocked(
    snapshot: Path, tmp_path: Path, extra: Tuple[str, ...]
) -> None:
    """With --root (and --no-start) nothing runs: install.sh must not say that guests stay
    blocked by a table, nor that one is or is not installed on this machine."""
    out = install(tmp_path / "root", snapshot, *extra)
    text = out.stdout + out.stderr
    assert "stay blocked" not in text and "boot table" not in text
    assert "Enforcement is NOT active" not in text
    assert "--root: nothing enabled.  On the installed system run:" in out.stdout


def test_a_link_into_the_app_dir_counts_as_ours(snapshot: Path, tmp_path: Path) -> None:
    """An older layout's /usr/bin/smtp-gate pointing into the same app dir is replaced, not refused."""
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/smtp-gate").symlink_to("/usr/local/smtp-gate/smtp-gate.sh")
    out = install(root, snapshot).stdout
    assert "updated    /usr/bin/smtp-gate" in out
    assert MARKER in (root / "usr/bin/smtp-gate").read_text()


# ------------------------------------------------------------- BRIDGE from the guests' bridges
def guests_node(tmp_path: Path, bridges: Sequence[str], direct: bool = False) -> str:
    """A libvirt test-driver node: one running guest per bridge in BRIDGES (type='bridge': the
    XML names the bridge, so no link of this machine is read), and with DIRECT a macvtap one."""
    from tests import testdriver

    parts = ["<node>\n"]
    parts += [testdriver.domain_xml(i, 1, bridge) for i, bridge in enumerate(bridges)]
    if direct:
        nic = (f"<interface type='direct'><mac address='{testdriver.mac(9, 0)}'/>"
               "<source dev='eth0' mode='bridge'/><target dev='mvt9'/></interface>")
        parts.append(testdriver._domain("mvtap", testdriver.uuid(9), nic, True))
    parts.append("</node>\n")
    node = tmp_path / "node.xml"
    node.write_text("".join(parts))
    return f"test://{node}"


def libvirt_python_or_skip() -> str:
    """An interpreter that imports libvirt and lxml (this test run's): install.sh runs the
    installed command with it to ask the test driver."""
    probe = subprocess.run([sys.executable, "-c", "import libvirt, lxml, filelock"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("libvirt-python, lxml or filelock not importable by this Python")
    return sys.executable


def test_a_first_install_writes_the_bridges_the_guests_use_and_an_update_only_proposes(
    snapshot: Path, tmp_path: Path
) -> None:
    py = libvirt_python_or_skip()
    root = tmp_path / "root"
    conf = root / APP / "config/smtp-gate.conf"
    example = (snapshot / "config/smtp-gate.conf.example").read_text()
    uri = guests_node(tmp_path, ["br0", "virbr0", "virbr0"], direct=True)
    out = install(root, snapshot, "--python", py, "--libvirt-uri", uri)
    assert 'configured BRIDGE="br0 virbr0" in /usr/local/smtp-gate/config/smtp-gate.conf' in out.stdout, out.stdout
    assert "1 running guest NIC(s) are of a kind no bridge rule sees" in out.stdout
    assert conf.read_text() == example.replace('#BRIDGE="br0"\n', 'BRIDGE="br0 virbr0"\n')
    assert config.parse(conf.read_text(), str(conf)).bridges == ("br0", "virbr0")
    # nothing runs under --root: no claim that anything is enforced
    assert "stay blocked" not in out.stdout + out.stderr and "is enforced" not in out.stdout + out.stderr
    # a second run finds BRIDGE complete and changes nothing
    again = install(root, snapshot, "--python", py, "--libvirt-uri", uri)
    assert "install.sh: nothing changed" in again.stdout, again.stdout + again.stderr
    assert "BRIDGE names every bridge the running guests use (br0 virbr0)" in again.stdout

    # an existing config is never changed: the line to set is printed
    conf.write_text(example)
    before = conf.read_bytes()
    uri = guests_node(tmp_path, ["br0", "virbr0", "br5"])
    out = install(root, snapshot, "--python", py, "--libvirt-uri", uri)
    assert conf.read_bytes() == before
    assert "running guests use bridge(s) that BRIDGE does not name: br5 virbr0" in out.stderr, out.stderr
    assert '    BRIDGE="br0 br5 virbr0"\n' in out.stderr and "smtp-gate apply" in out.stderr
    assert "install.sh: nothing changed" in out.stdout


def test_a_libvirt_that_does_not_answer_leaves_the_example_config_and_says_so(snapshot: Path, tmp_path: Path) -> None:
    py = libvirt_python_or_skip()
    root = tmp_path / "root"
    out = install(root, snapshot, "--python", py, "--libvirt-uri", f"qemu:///system?socket={tmp_path}/nobody")
    assert "could not ask libvirt which bridges the guests use: no libvirt URI answered" in out.stderr, out.stderr
    conf = root / APP / "config/smtp-gate.conf"
    assert conf.read_bytes() == (snapshot / "config/smtp-gate.conf.example").read_bytes()
    # with --root and no --libvirt-uri, libvirt is not asked at all
    other = install(tmp_path / "other", snapshot, "--python", py)
    assert "--root: libvirt not asked which bridges the guests use" in other.stdout
