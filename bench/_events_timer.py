"""bench_events.py's client, run INSIDE the lab's network namespace (so that it reads the same
kernel as the watcher): changes guests' metadata with virDomainSetMetadata and polls the
kernel over netlink until it holds (or no longer holds) each guest's allowance.

Prints one JSON object: {"single": [seconds...], "storms": [{...}, ...]}.

    python bench/_events_timer.py --uri URI --guests a,b,c --single 60 --storms 3 --storm-size 1000
"""

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import libvirt  # noqa: E402

from smtp_gate import domain, nfnetlink, ruleset  # noqa: E402

NS = domain.METADATA_NS
BODY = '<allow by="bench" reason="bench_events"/>'
POLL = 0.001  # s between two looks at the kernel (each one is a netlink GET per guest)


class Guest:
    def __init__(self, dom: "libvirt.virDomain") -> None:
        self.dom = dom
        parsed = domain.parse(dom.XMLDesc(0))
        nic = parsed.nics[0]
        with open(f"/sys/class/net/{nic.target}/ifindex") as handle:
            index = int(handle.read())
        self.key = ("allowed", nfnetlink.pair_key(index, nic.mac))
        self.allowed = False

    def toggle(self) -> None:
        """Set or remove the allowance (live): one virDomainSetMetadata call."""
        self.allowed = not self.allowed
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
        if self.allowed:
            self.dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, BODY, "smtpgate", NS, flags)
        else:
            self.dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, NS, flags)


def kernel_agrees(guests: List[Guest]) -> bool:
    missing = set(nfnetlink.missing_elements([g.key for g in guests], table=ruleset.TABLE,
                                             family=nfnetlink.NFPROTO_BRIDGE, timeout=5.0))
    return all((g.key not in missing) == g.allowed for g in guests)


def wait_agrees(guests: List[Guest], give_up: float = 30.0) -> float:
    """The monotonic time the kernel first agreed with every guest's wanted state."""
    end = time.monotonic() + give_up
    while time.monotonic() < end:
        if kernel_agrees(guests):
            return time.monotonic()
        time.sleep(POLL)
    raise SystemExit(f"the kernel did not agree within {give_up:g}s")


class Transactions:
    """Counts the kernel's nftables transactions (NEWGEN: one per committed batch) in this
    namespace; only the watcher writes here while the bench runs."""

    def __init__(self) -> None:
        self.sock = nfnetlink.open_events()
        self.count = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                events = nfnetlink.read_events(self.sock)
            except OSError:
                self.count += 1_000_000  # lost events: the figure would be wrong, make it obvious
                continue
            self.count += sum(1 for e in events if e.msg == nfnetlink.NFT_MSG_NEWGEN)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uri", required=True)
    parser.add_argument("--guests", required=True)
    parser.add_argument("--single", type=int, default=60)
    parser.add_argument("--gap", type=float, default=0.3, help="quiet seconds between single changes")
    parser.add_argument("--storms", type=int, default=3)
    parser.add_argument("--storm-size", type=int, default=1000)
    parser.add_argument("--settle", type=float, default=2.0)
    args = parser.parse_args()
    conn = libvirt.open(args.uri)
    guests = [Guest(conn.lookupByName(name)) for name in args.guests.split(",")]
    for g in guests:  # start from "no metadata"
        g.allowed = True
        g.toggle()
    wait_agrees(guests)
    transactions = Transactions()
    out: Dict[str, object] = {"single": [], "storms": [], "transactions_single": 0}

    before = transactions.count
    for i in range(args.single):
        guest = guests[i % len(guests)]
        guest.toggle()
        sent = time.monotonic()
        out["single"].append(wait_agrees(guests) - sent)  # type: ignore[union-attr]
        time.sleep(args.gap)
    out["transactions_single"] = transactions.count - before

    for _ in range(args.storms):
        time.sleep(args.settle)
        before = transactions.count
        began = time.monotonic()
        for i in range(args.storm_size):
            guests[i % len(guests)].toggle()
        last = time.monotonic()
        final = wait_agrees(guests)
        time.sleep(args.settle)
        if not kernel_agrees(guests):
            raise SystemExit("the kernel left the storm's final state afterwards")
        out["storms"].append({  # type: ignore[union-attr]
            "changes": args.storm_size, "send": last - began, "after_last": final - last,
            "transactions": transactions.count - before,
            "final_allowed": sum(g.allowed for g in guests), "guests": len(guests),
        })
    for g in guests:
        if g.allowed:
            g.toggle()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.exit(main())
