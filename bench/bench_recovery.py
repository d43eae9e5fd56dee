"""Time from `nft flush ruleset` (and from `nft delete table bridge smtp_gate`, and from
`nft flush chain bridge smtp_gate forward`: the interferences of tests/test_watch.py) to
enforcement restored by `smtp-gate watch`, median over several runs, against the 60 s
rebuild timer.

Measured three ways in the hypervisor namespace, all on one monotonic clock:
- kernel events: a second `nft monitor` (on a pty, so each event arrives at once) gives
  the instant the interfering transaction and the restoring one (the first to add our
  forward chain's rules back) were committed (the arrival of each one's first event line):
  restore = restoring - interfering;
- kernel poll: `nft list chain bridge smtp_gate forward` every POLL seconds until it holds
  the jump to the outbound chain again (resolution POLL; the polling itself costs CPU);
- the guest's side: a loop of TCP connects (a SYN each, 10 ms timeout) from a guest that
  is not allowed to port 25 of the "internet" namespace: how long port 25 was open.
After each run: the not-allowed guest is blocked again and the allowed one (allowed by its
start hook, restored from the watch's records) still connects.

Scenarios: "2 guests" (the lab of tests/test_watch.py) and, with --large (default on),
1 000 more recorded running guests (2 000 ports as unattached taps, 2 000 allowances):
the restore rebuilds from the run dir's records, so its cost grows with them.

    sudo .venv/bin/python bench/bench_recovery.py [--runs 7] [--no-large]
"""

import argparse
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import BenchError, median, ms  # noqa: E402

MAC_FIXED = "52:54:00:aa:00:02"  # the recorded sample's NIC with a fixed target (lab2n1)
SAMPLE = common.SAMPLE_XML
TIMER = 60.0
ATTEMPT = 0.010  # each guest connect waits this long for the SYN-ACK


class Monitor:
    """`nft monitor` in a namespace; every line with the monotonic time it arrived."""

    def __init__(self, ns: common.Netns) -> None:
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns.name, "nft", "monitor"], stdout=slave,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
        os.close(slave)
        self.fd = master
        self.lines: List[Tuple[float, str]] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        pending = b""
        while True:
            try:
                ready, _, _ = select.select([self.fd], [], [], 0.5)
                if not ready:
                    if self.proc.poll() is not None:
                        return
                    continue
                data = os.read(self.fd, 65536)
            except OSError:
                return
            if not data:
                return
            now = time.monotonic()
            pending += data
            *complete, pending = pending.split(b"\n")
            with self.lock:
                self.lines.extend((now, line.decode(errors="replace").strip()) for line in complete)

    def generations(self, since: float) -> List[Tuple[float, List[str]]]:
        """Transactions seen after SINCE: (arrival of their first line, their lines).  The kernel
        sends a transaction's events when it commits it; nft then prints them one by one, so
        the first line is the closest to the commit (a transaction of 2 000 elements takes
        nft a while to print)."""
        with self.lock:
            lines = [(t, l) for t, l in self.lines if t >= since]
        out: List[Tuple[float, List[str]]] = []
        block: List[str] = []
        first: Optional[float] = None
        for t, line in lines:
            if line.startswith("# new generation"):
                out.append((first if first is not None else t, block))
                block, first = [], None
            elif line:
                block.append(line)
                first = t if first is None else first
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=5)
        os.close(self.fd)


class SynLoop(threading.Thread):
    """Connect attempts to INET4:25 from a guest namespace, back to back, until stopped."""

    def __init__(self, lab: common.BridgeLab, guest: common.Guest) -> None:
        super().__init__(daemon=True)
        self.lab, self.guest = lab, guest
        self.stop_event = threading.Event()
        self.attempts: List[Tuple[float, float, bool]] = []

    def run(self) -> None:
        while not self.stop_event.is_set():
            sock = self.guest.ns.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            start = time.monotonic()
            ok = False
            try:
                sock.connect_ex((self.lab.INET4, 25))
                _, writable, _ = select.select([], [sock], [], ATTEMPT)
                ok = bool(writable) and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
            finally:
                sock.close()
            self.attempts.append((start, time.monotonic(), ok))
            if ok:
                time.sleep(0.001)  # don't flood the listener's accept queue

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)


def enforcing(lab: common.BridgeLab) -> bool:
    out = common.nft(lab, "list", "chain", "bridge", "smtp_gate", "forward", check=False)
    return out.returncode == 0 and "goto egress" in out.stdout


def wait_quiet(monitor: Monitor, seconds: float = 1.0, limit: float = 30.0) -> None:
    """Wait until no nft transaction was seen for SECONDS (the watch's follow-up rebuild is over)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with monitor.lock:
            last = monitor.lines[-1][0] if monitor.lines else 0.0
        if time.monotonic() - last >= seconds:
            return
        time.sleep(0.1)
    raise BenchError("nft transactions did not stop after the restore")


def one_run(lab: common.BridgeLab, monitor: Monitor, interference: List[str], blocked: common.Guest,
            allowed: common.Guest, poll: float) -> Dict[str, Optional[float]]:
    syn = SynLoop(lab, blocked)
    syn.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    common.nft(lab, *interference)
    polled: Optional[float] = None
    while time.monotonic() - t0 < 30:
        if enforcing(lab):
            polled = time.monotonic()
            break
        time.sleep(poll)
    if polled is None:
        syn.stop()
        raise BenchError("enforcement not restored within 30 s")
    time.sleep(0.3)
    syn.stop()
    wait_quiet(monitor)
    gens = monitor.generations(t0)
    if not gens:
        raise BenchError("the monitor saw no transaction")
    t_flush = gens[0][0]
    t_restore = next((t for t, block in gens[1:]
                      if any(l.startswith("add rule bridge smtp_gate forward") for l in block)), None)
    if t_restore is None:
        raise BenchError(f"no restoring transaction among {len(gens)} seen")
    open_attempts = [(s, e) for s, e, ok in syn.attempts if ok and s >= t0 - ATTEMPT]
    before = [ok for s, _e, ok in syn.attempts if s < t0 - ATTEMPT]
    if any(before):
        raise BenchError("port 25 was open before the interference")
    if any(ok for s, _e, ok in syn.attempts if s > polled + 0.05):
        raise BenchError("port 25 still open after enforcement was restored")
    if lab.tcp_connects(blocked, lab.INET4, 25, timeout=0.5) or not lab.tcp_connects(allowed, lab.INET4, 25):
        raise BenchError("after the restore: the blocked guest connects or the allowed one does not")
    return {
        "events": t_restore - t_flush,
        "poll": polled - t0,
        "open_window": (open_attempts[-1][1] - open_attempts[0][0]) if open_attempts else 0.0,
        "open_from_flush": (open_attempts[-1][1] - t_flush) if open_attempts else 0.0,
        "open_count": float(len(open_attempts)),
        "attempts": float(len([1 for s, _e, _ok in syn.attempts if t0 <= s <= polled])),
    }


def scenario(label: str, extra_guests: int, runs: int, poll: float) -> Dict[str, object]:
    header = common.WHITELIST_HEADER + "lab2,,2026-01-01T00:00:00+00:00,root,\n"
    with common.bridge_lab() as lab:
        lab.listen(lab.inet, [25])
        blocked = lab.add_guest("g1", "vnet0", 2)
        allowed = lab.add_guest("lab2", "lab2n1", 3, mac=MAC_FIXED)
        if extra_guests:
            from smtp_gate import domain, guests as guests_mod
            from smtp_gate.runstate import RunState
            from tests import testdriver

            taps = [testdriver.target(i, k) for i in range(extra_guests) for k in range(2)]
            common.add_taps(lab.hv, taps)
            indexes = common.link_indexes(lab.hv)
            state = RunState(lab.tmp / "run")
            state.prepare()
            for i in range(extra_guests):
                dom = domain.parse(common.sample_domain_xml(i))
                state.write_record(guests_mod.record_for(dom, ("br0",), tuple(guests_mod.nic_macs(dom)),
                                                         indexes.get, lambda _n: None))
        (lab.tmp / "whitelist.csv").write_text(header, encoding="utf-8")
        common.cli(lab, "apply", "--no-libvirt")
        hook = common.ns_run(lab.hv, [str(common.HOOK), "lab2", "start", "begin", "-"], input=SAMPLE.read_text(),
                           env=common.hook_env(lab.config_path))
        if hook.stdout:
            raise BenchError("the hook wrote on stdout")
        expected = common.allowed_count(lab)
        if not lab.tcp_connects(allowed, lab.INET4, 25) or lab.tcp_connects(blocked, lab.INET4, 25, timeout=0.5):
            raise BenchError("the lab does not enforce as expected before the runs")
        log = open(lab.tmp / "watch.log", "w")
        watcher = subprocess.Popen(
            ["ip", "netns", "exec", lab.hv.name, sys.executable, "-m", "smtp_gate", "--config", str(lab.config_path),
             "watch"],
            env=common.prod_env(PYTHONPATH=str(common.REPO)), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        monitor = Monitor(lab.hv)
        results: Dict[str, List[Dict[str, Optional[float]]]] = {}
        try:
            time.sleep(2.0)  # the watch imports, checks the table and starts its own monitor
            if watcher.poll() is not None:
                raise BenchError(f"smtp-gate watch exited ({watcher.returncode}): {(lab.tmp / 'watch.log').read_text()}")
            for name, interference in (("nft flush ruleset", ["flush", "ruleset"]),
                                       ("nft delete table bridge smtp_gate", ["delete", "table", "bridge", "smtp_gate"]),
                                       ("nft flush chain bridge smtp_gate forward",
                                        ["flush", "chain", "bridge", "smtp_gate", "forward"])):
                for _ in range(runs):
                    results.setdefault(name, []).append(one_run(lab, monitor, interference, blocked, allowed, poll))
                    if common.allowed_count(lab) != expected:
                        raise BenchError(f"{common.allowed_count(lab)} allowances after the restore, expected {expected}")
        finally:
            monitor.close()
            if watcher.poll() is None:
                os.killpg(watcher.pid, signal.SIGTERM)
                try:
                    watcher.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(watcher.pid, signal.SIGKILL)
                    watcher.wait(timeout=10)
            log.close()
        watch_log = (lab.tmp / "watch.log").read_text()
        return {"label": label, "results": results, "allowances": expected,
                "watch_says": [l for l in watch_log.splitlines() if "restored in" in l]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="interferences of each kind (median reported)")
    parser.add_argument("--poll", type=float, default=0.02, help="kernel poll interval, seconds")
    parser.add_argument("--no-large", action="store_true", help="skip the 1 000-recorded-guests scenario")
    args = parser.parse_args()
    common.require_root_and_kernel()
    common.install_signal_cleanup()
    common.compile_bytecode()
    scenarios = [scenario("2 guests", 0, args.runs, args.poll)]
    if not args.no_large:
        scenarios.append(scenario("+1 000 recorded guests", 1000, args.runs, args.poll))

    common.emit(common.machine_line() + "\n")
    rows = []
    for s in scenarios:
        for name, runs in s["results"].items():  # type: ignore[union-attr]
            def col(key: str) -> List[float]:
                return [float(r[key]) for r in runs if r[key] is not None]

            rows.append([
                f"{s['label']}: {name}", ms(median(col("events"))), ms(max(col("events"))), ms(median(col("poll"))),
                ms(median(col("open_window"))), ms(max(col("open_from_flush"))),
                f"{sum(1 for r in runs if r['open_count'])}/{len(runs)}",
            ])
    rows.append(["60 s timer alone (smtp-gate-rebuild.timer)", f"{TIMER / 2 * 1000:.0f}", f"{TIMER * 1000:.0f}", "-",
                 f"~{TIMER / 2 * 1000:.0f}", f"{TIMER * 1000:.0f}", "-"])
    common.emit(common.table(
        f"bench_recovery: interference -> enforcement restored by `smtp-gate watch` (ms; median and max of {args.runs})",
        ["scenario: interference", "restore (events) p50", "max", f"restore (poll {args.poll * 1000:.0f} ms) p50",
         "port 25 open p50", "open until (max)", "runs open"],
        rows,
        notes=[
            "restore (events) = commit of the restoring transaction - commit of the interfering one (a second `nft monitor`)",
            "restore (poll) = from launching the interfering `nft` command until `nft list chain` shows the rules again",
            f"port 25 open = last - first successful connect of the not-allowed guest (a connect every <= {ATTEMPT * 1000:.0f} ms); "
            "open until = last successful connect's end - commit of the interference; runs open = runs with any success",
            "the 60 s timer row: a flush at a random instant waits 30 s on average, 60 s at worst, plus the rebuild",
        ] + [f"{s['label']}: {s['allowances']} allowances restored each time (checked); watch says e.g. "
             f"{(s['watch_says'] or ['-'])[0].split('watch: ')[-1]}" for s in scenarios],
    ))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except common.FAILURES as exc:
        print(f"bench_recovery: error: {exc}", file=sys.stderr)
        sys.exit(1)
