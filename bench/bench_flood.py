"""The abuse desk under a flood (issue 12): a guest spoofing thousands of MACs sends ~70 000
blocked SMTP frames/s through the real bridge while `smtp-gate watch` runs beside a private
systemd-journald (tests/journal_lab.py: a mount namespace of its own; the machine's journal
is never touched).  Side by side, in one run:

  LOG_GROUP off       the watcher without blocked-attempt events: the reference
  default             LOG_GROUP 2525, LOG_GROUP_RATE 50/second per guest port (burst 100)
  meter raised        LOG_GROUP_RATE 1000000/second: only the global cap (1 000 events/s,
                      burst 2 000) holds the events back -- the most the watcher is sent

Reported for each: the frames sent and the rate achieved (bench/_flood_sender.py: raw
AF_PACKET sends of prebuilt frames from the guest namespace, each from its own source port
of 16 384, so the desk's connection counting is exercised), the frames our drop rule
counted (`blocked4`), the frames that reached the internet namespace on port 25 (an
ingress counter there: must be 0, enforcement intact), the watcher's CPU share over the
flood (utime+stime from /proc/<pid>/stat, % of one CPU) and journald's, the NFLOG events
the watcher received, its overruns (reads that failed with ENOBUFS) and the kernel's drop
count for its socket (/proc/net/netlink), the journal entries written (read back with
journalctl; the flooder's packets and connection attempts in them), the entries of a second, quiet guest that sends one attempt a second during
the flood (per-port fairness: none of them may be lost), and the report store's size.

    sudo .venv/bin/python bench/bench_flood.py [--seconds 5] [--rate 70000]
"""

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _flood_sender  # noqa: E402
import common  # noqa: E402

from tests import journal_lab  # noqa: E402

HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
VARIANTS = (
    ("LOG_GROUP off", 'LOG_GROUP="off"\n'),
    ("default (50/s per port)", ""),
    ("meter raised (cap 1000/s)", 'LOG_GROUP_RATE="1000000/second"\nLOG_GROUP_BURST="1000000"\n'),
)
INTERVAL = 2  # EVENT_INTERVAL for the run (s)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def children(pid: int) -> List[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def blocked4(lab: common.BridgeLab) -> int:
    data = json.loads(common.nft(lab, "-j", "list", "counter", "bridge", "smtp_gate", "blocked4").stdout)
    return int(next(i["counter"]["packets"] for i in data["nftables"] if "counter" in i))


def arrived(lab: common.BridgeLab) -> int:
    out = common.ns_run(lab.inet, ["nft", "-j", "list", "counter", "netdev", "bench", "smtp"]).stdout
    return int(next(i["counter"]["packets"] for i in json.loads(out)["nftables"] if "counter" in i))


def run_variant(name: str, extra: str, seconds: float, rate: float) -> Dict[str, object]:
    with common.bridge_lab() as lab:
        tmp = lab.tmp
        (tmp / "whitelist.csv").write_text("# vmname,mac,added_at,added_by,reason\n")
        lab.write_config(f'UPLINKS="uplink0"\nEVENT_INTERVAL="{INTERVAL}"\nSTATE_DIR="{tmp / "state"}"\n' + extra)
        flooder = lab.add_guest("flooder", "vnet0", 2)
        quiet = lab.add_guest("quiet", "vnet1", 3)
        common.cli(lab, "apply")
        lab.start_guest(flooder, quiet)
        common.ns_run(lab.inet, ["nft", "-f", "-"], input=(
            "add table netdev bench\nadd counter netdev bench smtp\n"
            "add chain netdev bench in { type filter hook ingress device eth0 priority 0; }\n"
            "add rule netdev bench in tcp dport 25 counter name smtp\n"))
        jtmp = tmp / "journal"
        jtmp.mkdir()
        log = tmp / "watch.log"
        argv = journal_lab.wrap(jtmp, ["ip", "netns", "exec", lab.hv.name, sys.executable, "-m", "smtp_gate",
                                       "--config", str(lab.config_path), "watch"])
        with open(log, "wb") as err:
            watcher = subprocess.Popen(argv, env=dict(os.environ, PYTHONPATH=str(common.REPO)),
                                       stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        try:
            deadline = time.monotonic() + 20
            while "checked our table" not in log.read_text() and "restored in" not in log.read_text():
                if time.monotonic() > deadline or watcher.poll() is not None:
                    raise common.BenchError(f"the watcher did not start: {log.read_text()}")
                time.sleep(0.1)
            time.sleep(0.5)
            journald = children(watcher.pid)  # the private journald
            before_drop, before_cpu = blocked4(lab), cpu_seconds(watcher.pid)
            before_jd = sum(cpu_seconds(p) for p in journald)
            started = time.monotonic()
            sender = subprocess.Popen(
                ["ip", "netns", "exec", flooder.ns.name, sys.executable, str(HERE / "_flood_sender.py"),
                 "--dst-mac", lab.inet_mac, "--src", flooder.ip4, "--dst", lab.INET4, "--rate", str(rate),
                 "--seconds", str(seconds), "--macs", "4096"],
                stdout=subprocess.PIPE, text=True,
            )
            tx = quiet.ns.socket(socket.AF_PACKET, socket.SOCK_RAW)
            tx.bind(("eth0", 0))
            quiet_sent = 0
            while sender.poll() is None:
                tx.send(_flood_sender.syn_frame(quiet.mac, lab.inet_mac, quiet.ip4, lab.INET4, 30000 + quiet_sent))
                quiet_sent += 1
                time.sleep(1.0)
            tx.close()
            out, _ = sender.communicate(timeout=30)
            elapsed = time.monotonic() - started
            cpu = cpu_seconds(watcher.pid) - before_cpu
            jd_cpu = sum(cpu_seconds(p) for p in journald) - before_jd
            sent = json.loads(out)
            dropped_by_rule = blocked4(lab) - before_drop
            time.sleep(INTERVAL + 1.5)  # the last interval's entries and the store's flush
        finally:
            journal_lab.stop_group(watcher, timeout=20)
        text = log.read_text()
        stats = re.search(r"abuse desk: (\d+) blocked-attempt events received, (\d+) overrun\(s\), kernel drops (\S+), "
                          r"(\d+) journal entries", text)
        entries = journal_lab.entries(jtmp, "SMTP_GATE_EVENT=blocked")
        flood_entries = [e for e in entries if e.get("SMTP_GATE_GUEST") == "flooder"]
        quiet_entries = [e for e in entries if e.get("SMTP_GATE_GUEST") == "quiet"]
        store = tmp / "state" / "blocked"
        return {
            "variant": name, "sent": sent["sent"], "rate": sent["rate"], "dropped_by_rule": dropped_by_rule,
            "arrived": arrived(lab), "watcher_cpu": 100 * cpu / elapsed, "journald_cpu": 100 * jd_cpu / elapsed,
            "received": int(stats.group(1)) if stats else 0, "overruns": int(stats.group(2)) if stats else 0,
            "kernel_drops": stats.group(3) if stats else "-", "entries": len(entries),
            "flood_count": sum(int(e["SMTP_GATE_COUNT"]) for e in flood_entries), "flood_entries": len(flood_entries),
            "flood_connections": sum(int(e.get("SMTP_GATE_CONNECTIONS", 0)) for e in flood_entries),
            "quiet": f"{sum(int(e['SMTP_GATE_COUNT']) for e in quiet_entries)}/{quiet_sent}" if stats else f"-/{quiet_sent}",
            "store": sum(f.stat().st_size for f in store.glob("*.jsonl")) if store.exists() else 0,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="flood duration per variant (default 5)")
    parser.add_argument("--rate", type=float, default=70000, help="target frames/s (default 70000)")
    args = parser.parse_args()
    common.require_root_and_kernel()
    reason = journal_lab.missing()
    if reason:
        print(f"SKIPPED: {reason}")
        return common.EXIT_SKIPPED
    common.install_signal_cleanup()
    common.emit(common.machine_line() + "\n")
    results = [run_variant(name, extra, args.seconds, args.rate) for name, extra in VARIANTS]
    rows = [[
        r["variant"], r["sent"], f"{r['rate']:.0f}", r["dropped_by_rule"], r["arrived"], f"{r['watcher_cpu']:.1f}",
        f"{r['journald_cpu']:.1f}", r["received"], r["overruns"], r["kernel_drops"], r["entries"],
        f"{r['flood_count']} ({r['flood_connections']} conn.) in {r['flood_entries']}", r["quiet"], r["store"],
    ] for r in results]
    common.emit(common.table(
        f"blocked SMTP flood from a guest spoofing 4096 MACs, {args.seconds:g} s at {args.rate:.0f} frames/s target",
        ["variant", "sent", "frames/s", "dropped", "arrived", "watcher %CPU", "journald %CPU", "events", "overruns",
         "kernel drops", "entries", "flooder: packets (connection attempts) in entries", "quiet guest", "store bytes"],
        rows,
        notes=[
            "dropped: frames counted by our drop chain (blocked4); arrived: frames to port 25 seen by the internet side",
            "%CPU: utime+stime over the flood's wall time, % of one CPU; events: NFLOG events the watcher read",
            f"entries: journal entries (EVENT_INTERVAL={INTERVAL}s); quiet guest: attempts in its entries / frames it sent",
        ],
    ))
    failed = [r["variant"] for r in results if r["arrived"]]
    if failed:
        print(f"ENFORCEMENT BROKEN under the flood: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
