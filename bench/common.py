"""Shared setup for the benchmarks: namespaces, cheap stand-in ports, allowances in the
kernel, whitelists, libvirt test-driver guests, timing and table printing.

Every benchmark works only inside network namespaces it creates (tests/netlab.py's
BridgeLab) and always removes them; a private libvirtd, when one is used, runs as the
unprivileged user `nobody` in a namespace of its own with its sockets in a temporary
directory.  Nothing here touches the host's ruleset, links or libvirt.

Timings of the CLI and of the hooks are taken WITHOUT PYTHONDONTWRITEBYTECODE (this
development environment sets it; libvirt's hooks and an operator's shell do not) and
after `python -m compileall smtp_gate`, so that they measure what production runs.
"""

import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests import netlab, testdriver  # noqa: E402  (needs the repo root on sys.path)
from tests.netlab import BridgeLab, Guest, Netns  # noqa: E402,F401
from smtp_gate.errors import SmtpGateError  # noqa: E402

SAMPLE_XML = REPO / "tests" / "data" / "libvirt-samples" / "2nic-virsh-destroy" / "02-lab2-start-begin.xml"
HOOK = REPO / "hooks" / "qemu"
SYSTEM_PYTHON = "/usr/bin/python3"  # the interpreter named in the hooks' shebang
LIBVIRT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
WHITELIST_HEADER = "# vmname,mac,added_at,added_by,reason\n"
EXIT_SKIPPED = 77  # a benchmark that cannot run here (run_all.py reports it as skipped)


class BenchError(Exception):
    """A setup step or a measured command failed: the benchmark stops, cleanup still runs."""


# what a failed step may raise: ours, or the labs' (AssertionError; smtp_gate.netlab.LabError)
FAILURES = (BenchError, AssertionError, SmtpGateError)


# -- processes --------------------------------------------------------------------------------


def run(args: Sequence[str], check: bool = True, input: Optional[str] = None,
        env: Optional[Dict[str, str]] = None, timeout: float = 600.0) -> subprocess.CompletedProcess:
    """Run ARGS (never through a shell), text in and out; raise BenchError on a non-zero exit."""
    result = subprocess.run(list(args), input=input, capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise BenchError(f"{' '.join(args)[:200]} failed ({result.returncode}): {result.stderr.strip()[:800]}")
    return result


def ns_run(ns: "Netns", args: Sequence[str], check: bool = True, input: Optional[str] = None,
           env: Optional[Dict[str, str]] = None, timeout: float = 600.0) -> subprocess.CompletedProcess:
    """ARGS inside namespace NS (`ip netns exec`, which also mounts the namespace's own /sys)."""
    return run(["ip", "netns", "exec", ns.name, *args], check=check, input=input, env=env, timeout=timeout)


def nft(lab: "BridgeLab", *args: str, check: bool = True, input: Optional[str] = None) -> subprocess.CompletedProcess:
    """nft in the lab's hypervisor namespace."""
    return ns_run(lab.hv, ["nft", *args], check=check, input=input)


def prod_env(**extra: str) -> Dict[str, str]:
    """This environment without PYTHONDONTWRITEBYTECODE, plus EXTRA."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(extra)
    return env


def cli(lab: BridgeLab, *args: str, ok: Sequence[int] = (0, 3)) -> subprocess.CompletedProcess:
    """`python -m smtp_gate --config LAB.config ARGS` in the hypervisor namespace, as an operator
    runs it (no PYTHONDONTWRITEBYTECODE); exit codes outside OK raise BenchError."""
    result = ns_run(
        lab.hv, [sys.executable, "-m", "smtp_gate", "--config", str(lab.config_path), *args],
        check=False, env=prod_env(PYTHONPATH=str(REPO)),
    )
    if result.returncode not in ok:
        raise BenchError(f"smtp-gate {' '.join(args)} exited {result.returncode}: {result.stderr.strip()[:800]}")
    return result


def hook_env(config: Path) -> Dict[str, str]:
    """What libvirt gives a hook (LC_ALL, PATH, HOME) plus SMTP_GATE_CONFIG."""
    return {"LC_ALL": "C", "PATH": LIBVIRT_PATH, "HOME": "/root", "SMTP_GATE_CONFIG": str(config)}


def compile_bytecode() -> None:
    """Compile smtp_gate once for the hook's interpreter and the venv's (both CPython 3.11
    here: one .pyc serves both), as an installed copy would have after its first run."""
    for python in dict.fromkeys((SYSTEM_PYTHON, sys.executable)):
        run([python, "-m", "compileall", "-q", str(REPO / "smtp_gate")], env=prod_env())


def require_root_and_kernel() -> None:
    reason = netlab.missing_kernel_features()
    if reason:
        print(f"SKIPPED: {reason}")
        sys.exit(EXIT_SKIPPED)


def install_signal_cleanup() -> None:
    """SIGTERM/SIGHUP raise SystemExit, so every `finally` (namespace removal) still runs."""

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


# -- statistics and tables ----------------------------------------------------------------


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Terminate PROC if it still runs, kill it if it ignores that, and reap it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    data = sorted(values)
    k = (len(data) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def ms(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "-"
    return f"{seconds * 1000:.1f}"


def table(title: str, headers: Sequence[str], rows: Iterable[Sequence[object]], notes: Sequence[str] = ()) -> str:
    """An aligned text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    rule = "-" * len(line(cells[0]))
    out = [f"== {title}", line(cells[0]), rule] + [line(r) for r in cells[1:]] + [rule]
    out += [f"  {note}" for note in notes]
    return "\n".join(out) + "\n"


def machine_line() -> str:
    nft = run(["nft", "--version"], check=False).stdout.strip()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"# {platform.node()}: {os.cpu_count()} CPUs, kernel {platform.release()}, {nft}, "
        f"python {platform.python_version()} (hooks: {SYSTEM_PYTHON}), load average {load}"
    )


def emit(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# -- namespaces -----------------------------------------------------------------------------


@contextlib.contextmanager
def bridge_lab(config_extra: str = "") -> Iterator[BridgeLab]:
    """tests/netlab.BridgeLab (hv: br0 + uplink0, inet) in a temporary directory; always removed.

    The config points LIBVIRT_URI at a socket nothing answers unless CONFIG_EXTRA names one."""
    tmp = Path(tempfile.mkdtemp(prefix="smtp-gate-bench-"))
    lab: Optional[BridgeLab] = None
    try:
        lab = BridgeLab(tmp)
        lab.write_config('UPLINKS="uplink0"\n' + config_extra)
        yield lab
    finally:
        if lab is not None:
            lab.close()
        shutil.rmtree(tmp, ignore_errors=True)


def ip_batch(ns: Netns, commands: Sequence[str]) -> None:
    """Many `ip` commands in one process (`ip -batch`)."""
    if commands:
        run(["ip", "-n", ns.name, "-batch", "-"], input="".join(f"{c}\n" for c in commands))


def add_taps(ns: Netns, names: Sequence[str], master: str = "") -> None:
    """Unattached taps (no process holds them): cheap stand-ins for guest ports.  An
    unattached tap has no carrier, so it carries no traffic; it has a name and an index,
    which is all an allowance needs."""
    ip_batch(ns, [f"tuntap add dev {n} mode tap" for n in names])
    if master:
        ip_batch(ns, [f"link set {n} master {master}" for n in names])


def link_indexes(ns: Netns) -> Dict[str, int]:
    data = json.loads(run(["ip", "-n", ns.name, "-j", "link", "show"]).stdout)
    return {entry["ifname"]: int(entry["ifindex"]) for entry in data}


def filler_mac(n: int) -> str:
    """A unique, locally administered unicast MAC for filler allowance N."""
    return f"02:5b:{(n >> 24) & 0xFF:02x}:{(n >> 16) & 0xFF:02x}:{(n >> 8) & 0xFF:02x}:{n & 0xFF:02x}"


def nft_add_elements(lab: BridgeLab, set_name: str, elements: Sequence[str], chunk: int = 5000) -> None:
    """Add ELEMENTS (already rendered) to one of our sets, in one nft transaction."""
    if not elements:
        return
    lines = [
        f"add element bridge smtp_gate {set_name} {{ {', '.join(elements[i:i + chunk])} }}\n"
        for i in range(0, len(elements), chunk)
    ]
    nft(lab, "-f", "-", input="".join(lines))


def add_guest_ifaces(lab: BridgeLab, indexes: Iterable[int]) -> None:
    """Make the ports of INDEXES known guest ports, as a hook does at a guest's start (an
    element of `guest_ifaces`, keyed by interface index)."""
    nft_add_elements(lab, "guest_ifaces", [str(index) for index in sorted(set(indexes))])


def filler_pairs(ports: Dict[str, int], total: int) -> List[Tuple[int, str]]:
    """TOTAL (ifindex, MAC) allowances spread evenly over the existing PORTS."""
    indexes = sorted(ports.values())
    if total and not indexes:
        raise BenchError("filler allowances need ports")
    return [(indexes[n % len(indexes)], filler_mac(n)) for n in range(total)]


def render_pairs(pairs: Iterable[Tuple[int, str]]) -> List[str]:
    return [f"{index} . {mac}" for index, mac in pairs]


def set_count(lab: BridgeLab, set_name: str) -> int:
    """How many elements one of our sets holds in the kernel."""
    data = json.loads(nft(lab, "-j", "list", "set", "bridge", "smtp_gate", set_name).stdout)
    for item in data["nftables"]:
        if "set" in item:
            return len(item["set"].get("elem", []))
    return 0


def allowed_count(lab: BridgeLab) -> int:
    return set_count(lab, "allowed")


# -- guests and whitelists ------------------------------------------------------------------


def sample_domain_xml(i: int, driver_type: str = "qemu", running_id: Optional[int] = 2) -> str:
    """The recorded libvirt 9.0 / QEMU 7.2 start XML (2 bridge NICs, ~2.5 KB), made guest I
    of tests/testdriver's naming: testdriver.name(i), uuid(i), mac(i, k), target(i, k).

    DRIVER_TYPE 'test' makes it a domain libvirt's test driver accepts (no id then: the
    driver assigns one)."""
    text = SAMPLE_XML.read_text(encoding="utf-8")
    if driver_type == "test":
        head = f"<domain type='test' xmlns:test='{testdriver.TEST_NS}'>"
    else:
        head = f"<domain type='{driver_type}'" + (f" id='{running_id}'>" if running_id is not None else ">")
    swaps = [
        ("<domain type='qemu' id='2'>", head),
        ("<name>lab2</name>", f"<name>{testdriver.name(i)}</name>"),
        ("56ba75c7-fc96-46bd-a78e-ccf8d5907094", testdriver.uuid(i)),
        ("52:54:00:fa:2f:a5", testdriver.mac(i, 0)),
        ("52:54:00:aa:00:02", testdriver.mac(i, 1)),
        ("dev='vnet1'", f"dev='{testdriver.target(i, 0)}'"),
        ("dev='lab2n1'", f"dev='{testdriver.target(i, 1)}'"),
    ]
    for old, new in swaps:
        if old not in text:
            raise BenchError(f"sample XML changed: {old!r} not found in {SAMPLE_XML}")
        text = text.replace(old, new)
    return text


def write_sample_node(directory: Path, running: int) -> str:
    """A test-driver node file (tests/testdriver.py's format) whose guests have the
    recorded sample's shape; returns its test:/// URI."""
    parts = ["<node>\n"] + [sample_domain_xml(i, "test") + "\n" for i in range(running)] + ["</node>\n"]
    path = Path(directory).resolve() / "node.xml"
    path.write_text("".join(parts), encoding="utf-8")
    return f"test://{path}"


def whitelist_text(rows: int, guests: int, nics: int = 2) -> Tuple[str, int]:
    """A whitelist of ROWS rows in the original's format, and how many of the GUESTS'
    NICs it allows: every 4th guest by name (all its NICs), every 4th+1 by its first
    NIC's MAC; the remaining rows name guests and MACs that do not exist."""
    lines = [WHITELIST_HEADER]
    allowed_nics = 0
    for i in range(guests):
        if len(lines) - 1 >= rows:
            break
        if i % 4 == 0:
            lines.append(f"{testdriver.name(i)},,2026-01-01T00:00:00+00:00,root,bench\n")
            allowed_nics += nics
        elif i % 4 == 1:
            lines.append(f"{testdriver.name(i)}-eth0,{testdriver.mac(i, 0)},2026-01-01T00:00:00+00:00,root,bench\n")
            allowed_nics += 1
    n = 0
    while len(lines) - 1 < rows:
        if n % 2:
            lines.append(f"gone{n:06d},,2026-01-01T00:00:00+00:00,root,\"ticket {n}, verified\"\n")
        else:
            lines.append(f"gone{n:06d}-nic,{filler_mac(1 << 23 | n)},2026-01-01T00:00:00+00:00,ops,bench\n")
        n += 1
    return "".join(lines), allowed_nics


# -- a private libvirtd for the test driver -------------------------------------------------


@contextlib.contextmanager
def private_libvirtd() -> Iterator[str]:
    """A session libvirtd run as the unprivileged user `nobody`, in a network namespace of
    its own, with every directory under a temporary one; yields a `test+unix:///default`
    URI reaching its test driver.  Clients then pay what they pay against a real
    qemu:///system (an RPC per call over a UNIX socket), not the node-file parse that
    every `test:///PATH` open costs.  Killed by PID and removed on exit."""
    libvirtd = shutil.which("libvirtd", path=LIBVIRT_PATH)
    if not libvirtd:
        raise BenchError("libvirtd not found (apt-get install libvirt-daemon)")
    tmp = Path(tempfile.mkdtemp(prefix="sgb-lvd-"))  # short: a socket path has ~107 bytes
    ns = Netns(f"sgb-lvd-{os.getpid()}")
    proc: Optional[subprocess.Popen] = None
    try:
        for sub in ("run", "config", "cache", "home"):
            (tmp / sub).mkdir()
        run(["chown", "-R", "nobody:", str(tmp)])
        env = {
            "HOME": str(tmp / "home"), "XDG_RUNTIME_DIR": str(tmp / "run"), "XDG_CONFIG_HOME": str(tmp / "config"),
            "XDG_CACHE_HOME": str(tmp / "cache"), "PATH": LIBVIRT_PATH, "LC_ALL": "C",
        }
        log = open(tmp / "libvirtd.log", "wb")
        try:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns.name, "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                 libvirtd],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        sock = tmp / "run" / "libvirt" / "libvirt-sock"
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"private libvirtd did not start: {(tmp / 'libvirtd.log').read_text()[-800:]}")
            time.sleep(0.05)
        yield f"test+unix:///default?socket={sock}"
    finally:
        if proc is not None:
            stop_process(proc, timeout=10)
        ns.close()
        shutil.rmtree(tmp, ignore_errors=True)


def create_guests(uri: str, running: int, xml=sample_domain_xml):  # type: ignore[no-untyped-def]
    """Start guests 0 .. RUNNING-1 (transient) through URI; returns the open connection,
    which must stay open: libvirt frees test:///default when its last connection closes."""
    import libvirt

    conn = libvirt.open(uri)
    for i in range(running):
        conn.createXML(xml(i, "test"), 0)
    return conn
