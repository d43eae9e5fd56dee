"""Event-to-kernel latency of `smtp-gate watch` following libvirt (issue 11: under 1 s), beside
the time a full `smtp-gate rebuild` takes in the same lab.

A real libvirtd with real QEMU guests (tests/libvirt_lab.py: its own network and mount
namespaces; the repository's qemu hook installed), `smtp-gate watch` running there as on a
host.  A client in the lab's namespace (_events_timer.py) changes the guests' allowance with
virDomainSetMetadata (`virsh metadata ... --live` makes the same call) and polls the kernel
over netlink (a GET of each guest's `allowed` element every 1 ms):
- single: one change at a time (set or remove, round robin over the guests, a quiet gap
  after each): from the call's return to the kernel holding (or no longer holding) the
  element; p50, p99, max;
- storm: STORM_SIZE changes sent back to back on one connection (each guest's allowance
  toggled in turn), from the LAST call's return to the kernel holding every guest's final
  state (checked again after a settle time); with the send time and the number of kernel
  transactions (NEWGEN events in the namespace) the watcher made for the whole storm;
- rebuild: `smtp-gate rebuild` (the CLI, interpreter start included) in the same lab.

    sudo .venv/bin/python bench/bench_events.py [--guests 3] [--single 60] [--storms 3]
"""

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import REPO, BenchError, median, ms, percentile  # noqa: E402

from tests import libvirt_lab  # noqa: E402

HOOK = REPO / "hooks" / "qemu"


def setup(lab: libvirt_lab.LibvirtLab, root: Path, guests: int) -> List[str]:
    (root / "whitelist.csv").write_text(common.WHITELIST_HEADER)
    (root / "config" / "smtp-gate.conf").write_text(
        'BRIDGE="br0"\nUPLINKS="uplink"\n'
        f'RUN_DIR="{root / "run"}"\nWHITELIST="{root / "whitelist.csv"}"\nLIBVIRT_URI="{lab.uri}"\n'
    )
    cli(lab, root, "apply")
    names = [f"ev{i}" for i in range(guests)]
    for name in names:
        lab.start_guest(name, hold=3600, ports=(80,), connect_timeout=1)
    for name in names:  # booted and idle: TCG boots would eat the CPUs the figures need
        lab.wait_round(name, 1, timeout=180)
    return names


def cli(lab: libvirt_lab.LibvirtLab, root: Path, *args: str) -> float:
    cmd = ["env", f"PYTHONPATH={REPO}", sys.executable, "-m", "smtp_gate", "--config", str(root / "config" / "smtp-gate.conf"), *args]
    began = time.monotonic()
    proc = lab.run_in_netns(cmd, private_mounts=True, check=False, timeout=300)
    took = time.monotonic() - began
    if proc.returncode != 0:
        raise BenchError(f"smtp-gate {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()[:500]}")
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--guests", type=int, default=3, help="running QEMU guests (192 MiB each)")
    parser.add_argument("--single", type=int, default=60, help="single changes")
    parser.add_argument("--storms", type=int, default=3)
    parser.add_argument("--storm-size", type=int, default=1000)
    parser.add_argument("--rebuilds", type=int, default=5)
    args = parser.parse_args()
    common.require_root_and_kernel()
    reason = libvirt_lab.missing_requirements()
    if reason:
        print(f"SKIPPED: {reason}")
        return common.EXIT_SKIPPED
    common.install_signal_cleanup()
    common.compile_bytecode()
    root = Path(tempfile.mkdtemp(prefix="bench-events-"))
    (root / "config").mkdir()
    (root / "run").mkdir()
    watch_log = root / "watch.log"
    try:
        with libvirt_lab.LibvirtLab(root, hooks={"qemu": HOOK}, binds={str(REPO / "config"): root / "config"}) as lab:
            names = setup(lab, root, args.guests)
            with open(watch_log, "wb") as err:
                watcher = lab.popen_in_netns(
                    ["env", f"PYTHONPATH={REPO}", sys.executable, "-m", "smtp_gate", "--config",
                     str(root / "config" / "smtp-gate.conf"), "watch"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                    env=common.prod_env(),
                )
            try:
                end = time.monotonic() + 30
                while "following libvirt events" not in watch_log.read_text() and time.monotonic() < end:
                    time.sleep(0.1)
                time.sleep(1.0)
                timer = lab.run_in_netns(
                    ["env", f"PYTHONPATH={REPO}", sys.executable, str(REPO / "bench" / "_events_timer.py"),
                     "--uri", lab.uri, "--guests", ",".join(names), "--single", str(args.single),
                     "--storms", str(args.storms), "--storm-size", str(args.storm_size)],
                    check=False, timeout=1800,
                )
                if timer.returncode != 0:
                    raise BenchError(f"_events_timer.py failed: {timer.stderr.strip()[-800:]}")
                figures = json.loads(timer.stdout)
                rebuilds = [cli(lab, root, "rebuild") for _ in range(args.rebuilds)]
            finally:
                if watcher.poll() is None:
                    watcher.send_signal(signal.SIGTERM)
                    watcher.wait(timeout=15)
            said = watch_log.read_text(errors="replace")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    single = figures["single"]
    storms = figures["storms"]
    after = [s["after_last"] for s in storms]
    rows = [
        [f"single change -> kernel ({len(single)} changes, {args.guests} guests)", ms(percentile(single, 50)),
         ms(percentile(single, 99)), ms(max(single)), f"{figures['transactions_single']} for {len(single)} changes"],
        [f"storm of {args.storm_size}: last call -> final state ({len(storms)} storms)", ms(median(after)), "-",
         ms(max(after)), ", ".join(str(s["transactions"]) for s in storms) + " per storm"],
        [f"storm of {args.storm_size}: sending it (client, one connection)", ms(median([s["send"] for s in storms])), "-",
         ms(max(s["send"] for s in storms)), "-"],
        [f"smtp-gate rebuild ({args.guests} guests, CLI wall time, {len(rebuilds)} runs)", ms(median(rebuilds)), "-",
         ms(max(rebuilds)), "-"],
    ]
    common.emit(common.machine_line() + "\n")
    common.emit(common.table(
        "bench_events: libvirt metadata change -> kernel, by `smtp-gate watch` (ms)",
        ["what", "p50", "p99", "max", "kernel transactions"],
        rows,
        notes=[
            "from virDomainSetMetadata's return (as `virsh metadata --live`) to the kernel's `allowed` set agreeing, "
            "polled over netlink every 1 ms in the lab's namespace",
            "kernel transactions: NEWGEN events in the namespace (only the watcher writes there meanwhile)",
            f"watcher: {said.count('(metadata)')} guest log lines for metadata changes in total; "
            f"restores of its own table: {said.count('restored in')}",
            "target (issue 11): under 1 s, single changes and storms",
        ],
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
