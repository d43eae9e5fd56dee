"""Metrics for Prometheus (smtp_gate/metrics.py): the builders, the bound on series, the
counters in RUN_DIR, and the file as the real tools read it: `promtool check metrics`
(Debian package `prometheus`) and a real `prometheus-node-exporter` (Debian package of that
name), run as a plain process inside the test's own network namespace, whose textfile
collector scrapes the directory.  The example alert rules pass `promtool check rules`, and
`promtool test rules` fires them on synthetic series.
"""

import os
import re
import shutil
import struct
import subprocess
import sys
import time
import uuid as uuid_mod
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

from smtp_gate import config as config_mod
from smtp_gate import files, metrics
from smtp_gate.errors import ConfigError
from smtp_gate.metrics import Attempt, RebuildFacts, Snapshot
from tests.netlab import REPO, BridgeLab, immutable

NASTY = 'we"b\\1\nü-🙂'  # a double quote, a backslash, a line feed, UTF-8 (a libvirt name may hold them)

Labels = Tuple[Tuple[str, str], ...]
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)",?')


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), text)


def parse(text: str) -> Dict[Tuple[str, Labels], float]:
    """The samples of a text exposition: (name, sorted label pairs) -> value.  Strict: every
    line is a comment or a sample, and label values are unescaped as the format says."""
    out: Dict[Tuple[str, Labels], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        inner = m.group(2) or ""
        pairs = _LABEL.findall(inner)
        assert "".join(f'{k}="{v}",' for k, v in pairs).rstrip(",") == inner.rstrip(","), line
        key = (m.group(1), tuple(sorted((k, _unescape(v)) for k, v in pairs)))
        assert key not in out, f"duplicate series {key}"
        out[key] = float(m.group(3))
    return out


def ours(samples: Dict[Tuple[str, Labels], float]) -> Dict[Tuple[str, Labels], float]:
    return {k: v for k, v in samples.items() if k[0].startswith("smtp_gate_")}


def snap(**fields: object) -> Snapshot:
    base: Dict[str, object] = dict(at=1_800_000_000.5, active=True, disabled=False, mode="enforce",
                                   blocked={"ipv4": 7, "ipv6": 2})
    base.update(fields)
    return Snapshot(**base)  # type: ignore[arg-type]


def tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.skip(f"{name} is not installed (Debian: apt-get install "
                    f"{'prometheus' if name == 'promtool' else name}; ./test.sh does)")
    return path


# ------------------------------------------------------------------------ the builders
def test_label_values_are_escaped_as_the_format_requires() -> None:
    assert metrics.label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    assert metrics.label_value("ü🙂") == "ü🙂"  # UTF-8 is kept as it is
    assert metrics.label_value("bad\ud800x") == "bad\ufffdx"  # what UTF-8 cannot hold: U+FFFD
    text = metrics.render(snap(attempts=(Attempt("vnet0", "52:54:00:00:00:01", 3),),
                               owners={"vnet0": (NASTY, "u-1")}), 200)
    line = next(l for l in text.splitlines() if l.startswith("smtp_gate_guest_blocked_packets_total{"))
    assert line == ('smtp_gate_guest_blocked_packets_total{guest="we\\"b\\\\1\\nü-🙂",uuid="u-1",iface="",'
                    'mac="52:54:00:00:00:01"} 3')
    assert parse(text)[("smtp_gate_guest_blocked_packets_total",
                        (("guest", NASTY), ("iface", ""), ("mac", "52:54:00:00:00:01"), ("uuid", "u-1")))] == 3


def test_every_family_has_help_and_type_and_counters_end_in_total() -> None:
    attempts = (Attempt("vnet0", "m", 1), *(Attempt("vnet1", f"m{i}", 1) for i in range(10)))
    text = metrics.render(snap(attempts=attempts, disabled_since=1.0, abuse=dict(ABUSE), abuse_wanted=True,
                               rebuild=RebuildFacts(2.0, 0.5, (("g", "u"),), 2.0, True, 2.0)), 1)
    names = {k[0] for k in parse(text)}
    for name in names:
        kind = re.search(rf"^# TYPE {name} (\w+)$", text, re.M)
        assert kind and re.search(rf"^# HELP {name} \S", text, re.M), name
        assert (kind.group(1) == "counter") == name.endswith("_total"), name
    assert {"smtp_gate_enforcement_active", "smtp_gate_disabled", "smtp_gate_mode", "smtp_gate_blocked_packets_total",
            "smtp_gate_guest_blocked_packets_total", "smtp_gate_allowed_guests", "smtp_gate_allowed_nics",
            "smtp_gate_unprotected_nics", "smtp_gate_last_rebuild_timestamp_seconds",
            "smtp_gate_last_rebuild_duration_seconds", "smtp_gate_hook_failures_total",
            "smtp_gate_table_restores_total", "smtp_gate_metrics_written_timestamp_seconds",
            "smtp_gate_disabled_since_timestamp_seconds", "smtp_gate_guest_blocked_packets_summed",
            "smtp_gate_libvirt_up", "smtp_gate_abuse_desk_up", "smtp_gate_abuse_events_total",
            "smtp_gate_on_blocked_failures_total", "smtp_gate_abuse_store_full"} <= names


def test_an_inactive_table_shows_no_kernel_counters_and_no_mode() -> None:
    samples = parse(metrics.render(snap(active=False, disabled=True, mode="", blocked={}), 200))
    assert samples[("smtp_gate_enforcement_active", ())] == 0
    assert samples[("smtp_gate_disabled", ())] == 1
    assert samples[("smtp_gate_mode", (("mode", "enforce"),))] == 0
    assert samples[("smtp_gate_mode", (("mode", "audit"),))] == 0
    assert not any(k[0] == "smtp_gate_blocked_packets_total" for k in samples)


def test_the_busiest_guests_keep_their_counters_and_the_rest_is_a_gauge() -> None:
    owners = {f"vnet{i}": (f"g{i}", f"u{i}") for i in range(5)}
    attempts = [Attempt(f"vnet{i}", "52:54:00:00:00:01", 10 * (i + 1)) for i in range(5)]
    attempts += [Attempt("tap9", "02:00:00:00:00:09", 45), Attempt("tap8", "02:00:00:00:00:08", 1)]  # no record
    counters, sums = metrics.guest_attempts(attempts, owners, max_guests=3)
    # a port of no known guest is a guest of its own, "_unknown" with its iface
    assert counters == [
        ("g4", "u4", "", "52:54:00:00:00:01", 50),
        ("_unknown", "", "tap9", "02:00:00:00:00:09", 45),
        ("g3", "u3", "", "52:54:00:00:00:01", 40),
    ]
    assert sums == [("_other", "", "", "_other", 10 + 20 + 30 + 1)]
    assert sum(r[4] for r in counters + sums) == sum(a.packets for a in attempts)
    text = metrics.render(snap(attempts=tuple(attempts), owners=owners), 3)
    assert "# TYPE smtp_gate_guest_blocked_packets_summed gauge" in text  # never a counter: it can fall
    assert not any(dict(k[1]).get("guest") == "_other" for k in parse(text) if k[0].endswith("_total"))


def test_other_falling_is_no_counter_reset() -> None:
    """The reviewer's case: a guest past the top stops and its entries expire, so the sum of
    the others falls; it is a gauge, and every counter row only grows while its entries live."""
    owners = {f"vnet{i}": (f"g{i}", f"u{i}") for i in range(4)}
    before = [Attempt(f"vnet{i}", "52:54:00:00:00:01", 100 * (i + 1)) for i in range(4)]
    remembered = metrics.remember_owners(before, owners, {})
    c1, s1 = metrics.guest_attempts(before, owners, 2, remembered)
    after = [a._replace(packets=a.packets + 1) for a in before if a.port != "vnet1"]  # g1's entry expired
    c2, s2 = metrics.guest_attempts(after, owners, 2, metrics.remember_owners(after, owners, remembered))
    assert s1 == [("_other", "", "", "_other", 100 + 200)] and s2 == [("_other", "", "", "_other", 101)]
    grown = {r[:4]: r[4] for r in c1}
    assert all(grown.get(r[:4], 0) <= r[4] for r in c2)


def test_a_guest_spoofing_macs_keeps_its_busiest_macs_and_sums_the_rest() -> None:
    attempts = [Attempt("vnet0", f"02:00:00:00:00:{i:02x}", 100 - i) for i in range(20)]
    counters, sums = metrics.guest_attempts(attempts, {"vnet0": ("spammer", "u")}, max_guests=200)
    assert len(counters) == metrics.MACS_PER_GUEST
    assert counters[:2] == [("spammer", "u", "", "02:00:00:00:00:00", 100), ("spammer", "u", "", "02:00:00:00:00:01", 99)]
    assert sums == [("spammer", "u", "", "_other", sum(100 - i for i in range(metrics.MACS_PER_GUEST, 20)))]


def test_ties_keep_the_macs_first_seen_between_writes() -> None:
    """Spoofed MACs with one packet each: the MACs that have counters stay the same write
    after write (the first seen), whatever order the kernel lists its set in."""
    import random

    owners = {"vnet0": ("spammer", "u")}
    first = [Attempt("vnet0", f"02:00:00:00:01:{i:02x}", 1) for i in range(10)]
    remembered = metrics.remember_owners(first, owners, {})
    chosen, _sums = metrics.guest_attempts(first, owners, 200, remembered)
    # later: 30 more MACs, with names that sort first, and the set listed in another order
    later = first + [Attempt("vnet0", f"02:00:00:00:00:{i:02x}", 1) for i in range(30)]
    for seed in range(5):
        random.Random(seed).shuffle(later)
        remembered = metrics.remember_owners(later, owners, remembered)
        again, sums = metrics.guest_attempts(later, owners, 200, remembered)
        assert [r[3] for r in again] == [r[3] for r in chosen][: metrics.MACS_PER_GUEST]
        assert sums == [("spammer", "u", "", "_other", 40 - metrics.MACS_PER_GUEST)]
    # a MAC that attempts more earns a counter of its own (by packets first)
    busier = [a._replace(packets=5) if a.mac == "02:00:00:00:00:1d" else a for a in later]
    top, _sums = metrics.guest_attempts(busier, owners, 200, metrics.remember_owners(busier, owners, remembered))
    assert top[0][3] == "02:00:00:00:00:1d"


def test_a_stopped_guest_keeps_its_name_on_its_entries() -> None:
    attempts = [Attempt("vnet3", "52:54:00:00:00:03", 500)]
    remembered = metrics.remember_owners(attempts, {"vnet3": ("spammer", "u3")}, {})
    # spammer suspended or stopped: no record names vnet3 any more, or another guest has it
    for now in ({}, {"vnet3": ("innocent", "u9")}):
        counters, _sums = metrics.guest_attempts(attempts, now, 200, metrics.remember_owners(attempts, now, remembered))
        assert counters == [("spammer", "u3", "", "52:54:00:00:00:03", 500)]
    # an entry seen while no record named its port is attributed once one does
    unknown = metrics.remember_owners(attempts, {}, {})
    assert metrics.remember_owners(attempts, {"vnet3": ("late", "u4")}, unknown)["vnet3 52:54:00:00:00:03"][:2] == \
        ("late", "u4")
    # entries that left the set are forgotten: the map is bounded by the set's size
    assert metrics.remember_owners([], {}, remembered) == {}


def test_owners_are_kept_in_run_dir(tmp_path: Path) -> None:
    run = str(tmp_path)
    assert metrics.read_owners(run) == {}
    owned = {"vnet0 52:54:00:00:00:01": metrics.Owner(NASTY, "u", 3)}
    metrics.write_owners(run, owned)
    assert metrics.read_owners(run) == owned
    (tmp_path / metrics.ATTEMPT_OWNERS).write_text("[1, 2]")
    assert metrics.read_owners(run) == {}


def test_series_are_bounded_whatever_fills_the_kernels_set() -> None:
    owners = {f"vnet{i}": (f"g{i}", f"u{i}") for i in range(300)}
    attempts = [Attempt(f"vnet{i}", f"02:00:00:00:{j:02x}:{i % 256:02x}", i + j) for i in range(300) for j in range(20)]
    attempts += [Attempt(f"tap{i}", "02:00:00:00:00:01", 1) for i in range(500)]
    samples = parse(metrics.render(snap(attempts=tuple(attempts), owners=owners), 200))
    series = [k for k in samples if k[0].startswith("smtp_gate_guest_blocked_packets_")]
    assert len(series) <= (200 + 1) * (metrics.MACS_PER_GUEST + 1)
    counters = [k for k in series if k[0] == "smtp_gate_guest_blocked_packets_total"]
    assert len({(dict(k[1])["guest"], dict(k[1])["iface"]) for k in counters}) == 200
    assert sum(samples[k] for k in series) == sum(a.packets for a in attempts)
    tapped = [Attempt(f"tap{i}", "02:00:00:00:00:01", 1) for i in range(500)]
    counters2, sums2 = metrics.guest_attempts(tapped, {}, 200)
    assert len(counters2) == 200 and sums2 == [("_other", "", "", "_other", 300)]  # unknown ports: bounded too


def test_unprotected_nics_per_guest_are_bounded_too() -> None:
    nics = tuple((f"g{i}", f"u{i}") for i in range(5)) + (("g0", "u0"),)
    samples = parse(metrics.render(snap(rebuild=RebuildFacts(1.0, 0.1, nics, 1.0)), 2))
    assert samples[("smtp_gate_unprotected_nics", ())] == 6
    per_guest = {dict(k[1])["guest"]: v for k, v in samples.items() if k[0] == "smtp_gate_guest_unprotected_nics"}
    assert per_guest == {"g0": 2, "g1": 1, "_other": 3}


ABUSE = {"bound": 1, "events": 1234, "overruns": 2, "kernel_drops": 3, "journal_entries": 40, "journal_lost": 5,
         "on_blocked_runs": 6, "on_blocked_failures": 1, "store_full": 0, "updated": 1_800_000_000}


def test_the_abuse_desk_is_read_from_its_file(tmp_path: Path) -> None:
    """RUN_DIR/abuse.json as the desk writes it (Desk.stats() and "updated"), written by hand:
    every key a series; missing, broken, stale or unbound: the desk is down."""
    import json

    run = str(tmp_path)
    assert metrics.read_abuse(run) is None
    (tmp_path / metrics.ABUSE).write_text(json.dumps(ABUSE))
    facts = metrics.read_abuse(run)
    assert facts == ABUSE
    samples = parse(metrics.render(snap(abuse=facts, abuse_wanted=True, at=ABUSE["updated"] + 30.0), 200))
    expected = {"smtp_gate_abuse_desk_enabled": 1, "smtp_gate_abuse_desk_up": 1, "smtp_gate_abuse_events_total": 1234,
                "smtp_gate_abuse_overruns_total": 2, "smtp_gate_abuse_kernel_drops_total": 3,
                "smtp_gate_abuse_journal_entries_total": 40, "smtp_gate_abuse_journal_lost_total": 5,
                "smtp_gate_on_blocked_runs_total": 6, "smtp_gate_on_blocked_failures_total": 1,
                "smtp_gate_abuse_store_full": 0, "smtp_gate_abuse_desk_updated_timestamp_seconds": ABUSE["updated"]}
    assert {k[0]: v for k, v in samples.items() if k[0] in expected} == expected
    # stale (the watcher stopped writing it), or not bound: down, the last figures kept
    stale = parse(metrics.render(snap(abuse=facts, abuse_wanted=True, at=ABUSE["updated"] + 61.0), 200))
    assert stale[("smtp_gate_abuse_desk_up", ())] == 0 and stale[("smtp_gate_abuse_events_total", ())] == 1234
    unbound = dict(facts, bound=0)
    assert parse(metrics.render(snap(abuse=unbound, at=ABUSE["updated"]), 200))[("smtp_gate_abuse_desk_up", ())] == 0
    # no file: down, and no counters (absent, not zero)
    none = parse(metrics.render(snap(abuse_wanted=True), 200))
    assert none[("smtp_gate_abuse_desk_up", ())] == 0 and none[("smtp_gate_abuse_desk_enabled", ())] == 1
    assert not any(k[0].startswith(("smtp_gate_abuse_events", "smtp_gate_on_blocked")) for k in none)
    (tmp_path / metrics.ABUSE).write_text(json.dumps(dict(ABUSE, bound=True, store_full=False)))
    assert metrics.read_abuse(run) == ABUSE  # 0/1 written as false/true
    for broken in ("{", "[]", json.dumps(dict(ABUSE, events="many")), json.dumps({k: v for k, v in ABUSE.items() if k != "bound"})):
        (tmp_path / metrics.ABUSE).write_text(broken)
        assert metrics.read_abuse(run) is None, broken
    assert metrics.abuse_stale_after(config_mod.parse('EVENT_INTERVAL="10"\n', str(tmp_path / "c"))) == 60.0


def test_libvirt_up_is_the_answer_of_the_last_rebuild_that_asked(tmp_path: Path) -> None:
    run = str(tmp_path)
    metrics.note_rebuild(run, 100.0, 0.5, [("web1", "u1")], libvirt=True)
    metrics.note_rebuild(run, 200.0, 0.5, None, libvirt=False)  # asked, nobody answered
    metrics.note_rebuild(run, 300.0, 0.5, None)  # --no-libvirt: not asked, the last answer stays
    facts = metrics.read_rebuild(run)
    assert facts == RebuildFacts(300.0, 0.5, (("web1", "u1"),), 100.0, False, 200.0)
    samples = parse(metrics.render(snap(rebuild=facts), 200))
    assert samples[("smtp_gate_libvirt_up", ())] == 0
    assert samples[("smtp_gate_libvirt_checked_timestamp_seconds", ())] == 200.0
    # never asked this boot: no series (the alert needs a 0, not a guess)
    assert not any(k[0] == "smtp_gate_libvirt_up" for k in parse(metrics.render(snap(rebuild=RebuildFacts(1.0, 0.1)), 200)))


def nlattr(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def counter_expr(packets: int) -> bytes:
    return nlattr(1, b"counter\0") + nlattr(2, nlattr(1, struct.pack(">Q", 999)) + nlattr(2, struct.pack(">Q", packets)))


def test_an_attempts_element_is_parsed_as_the_kernel_sends_it() -> None:
    # iface_index 7 . 52:54:00:aa:bb:cc (key: the index in host order, the MAC padded to 8),
    # its counter and its expiration, as the kernel sends an element of the attempts set
    key = struct.pack("=I", 7) + bytes.fromhex("525400aabbcc0000")
    captured = (nlattr(1, nlattr(1, key))
                + nlattr(7, bytes.fromhex("0c000100636f756e746572001c0002000c0001000000000000000000"
                                          "0c0002000000000000000000"))
                + nlattr(5, bytes.fromhex("0000000005265b4c")))
    assert metrics.parse_attempt(captured) == Attempt("7", "52:54:00:aa:bb:cc", 0)
    assert metrics.parse_attempt(nlattr(1, nlattr(1, key)) + nlattr(7, counter_expr(42))) == \
        Attempt("7", "52:54:00:aa:bb:cc", 42)
    # a set with several expressions sends them as a list
    listed = nlattr(1, nlattr(1, key)) + nlattr(11, nlattr(1, nlattr(1, b"limit\0")) + nlattr(1, counter_expr(7)))
    assert metrics.parse_attempt(listed) == Attempt("7", "52:54:00:aa:bb:cc", 7)
    assert metrics.parse_attempt(nlattr(5, bytes(8))) is None  # no key: skipped
    # the fast path (the usual layout, with or without NLA_F_NESTED) agrees with the general parse
    flagged = nlattr(0x8001, nlattr(1, key)) + nlattr(0x8007, counter_expr(5)) + nlattr(5, bytes(8))
    assert metrics._fast_attempt(flagged) == Attempt("7", "52:54:00:aa:bb:cc", 5)
    assert metrics._fast_attempt(captured) == metrics.parse_attempt(captured)
    assert metrics._fast_attempt(listed) is None


def test_attempts_are_owned_by_index_so_a_reused_port_name_is_not_blamed() -> None:
    """Attacker review of issue 12: a new guest given a stopped guest's vnet0 was blamed for
    its attempts.  The set is keyed by index, and owners are found by index."""
    from smtp_gate.runstate import Record

    new_guest = Record(uuid="u-new", name="victim", guest_ports=(("vnet0", 12),), foreign_ports=(), allowed=(), uri="")
    old_attempt = Attempt("9", "52:54:00:77:00:02", 40)  # the stopped guest's vnet0 had index 9
    counters, _sums = metrics.guest_attempts([old_attempt], metrics.owners([new_guest]), 10, None, {"12": "vnet0"})
    assert counters == [("_unknown", "", "#9", "52:54:00:77:00:02", 40)]


# ------------------------------------------------------------------ counters and files
def test_a_counter_is_one_byte_per_event_and_never_raises(tmp_path: Path) -> None:
    metrics.count(str(tmp_path), metrics.HOOK_FAILURES)
    metrics.count(str(tmp_path), metrics.HOOK_FAILURES)
    assert metrics.counted(str(tmp_path), metrics.HOOK_FAILURES) == 2
    assert metrics.counted(str(tmp_path), metrics.TABLE_RESTORES) == 0
    metrics.count(str(tmp_path / "missing"), metrics.HOOK_FAILURES)  # lost, silently
    (tmp_path / "file").write_text("")
    metrics.count(str(tmp_path / "file"), metrics.HOOK_FAILURES)  # RUN_DIR is not a directory
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    metrics.count(str(tmp_path), "link")  # never through a symlink
    assert not (tmp_path / "elsewhere").exists()
    os.truncate(tmp_path / metrics.HOOK_FAILURES, metrics.COUNTER_CAP)  # sparse: at the cap, it stops growing
    metrics.count(str(tmp_path), metrics.HOOK_FAILURES)
    assert metrics.counted(str(tmp_path), metrics.HOOK_FAILURES) == metrics.COUNTER_CAP


def test_a_rebuild_without_libvirt_keeps_the_last_known_unprotected_nics(tmp_path: Path) -> None:
    run = str(tmp_path)
    assert metrics.read_rebuild(run) is None
    metrics.note_rebuild(run, 100.0, 0.5, [("web1", "u1")])
    metrics.note_rebuild(run, 200.0, 0.25, None)
    assert metrics.read_rebuild(run) == RebuildFacts(200.0, 0.25, (("web1", "u1"),), 100.0)
    metrics.note_rebuild(run, 300.0, 0.125, [])
    assert metrics.read_rebuild(run) == RebuildFacts(300.0, 0.125, (), 300.0)
    (tmp_path / metrics.LAST_REBUILD).write_text("{not json")
    assert metrics.read_rebuild(run) is None


def test_the_file_is_replaced_atomically_and_readable_by_node_exporter(tmp_path: Path) -> None:
    path = metrics.write(str(tmp_path), "a 1\n")
    assert path == str(tmp_path / "smtp_gate.prom")
    assert os.stat(path).st_mode & 0o777 == 0o644  # node_exporter runs as user prometheus
    os.chmod(path, 0o640)
    metrics.write(str(tmp_path), "a 2\n")
    assert (tmp_path / "smtp_gate.prom").read_text() == "a 2\n"
    assert os.stat(path).st_mode & 0o777 == 0o640  # the operator's mode is kept
    assert sorted(os.listdir(tmp_path)) == ["smtp_gate.prom"]
    # the temporary name never ends in .prom: node_exporter reads only *.prom
    assert not files.temp_name_pattern("smtp_gate.prom").pattern.endswith("prom")
    with pytest.raises(metrics.MetricsDirMissing) as err:
        metrics.write(str(tmp_path / "nope"), "a 1\n")
    assert str(err.value) == (f"METRICS_DIR '{tmp_path / 'nope'}' does not exist: metrics not written "
                              '(install prometheus-node-exporter, or set METRICS_DIR="" to turn them off)')


def test_metrics_config_keys(tmp_path: Path) -> None:
    conf = str(tmp_path / "smtp-gate.conf")
    default = config_mod.parse("", conf)
    assert (default.metrics_dir, default.metrics_max_guests) == ("/var/lib/prometheus/node-exporter", 200)
    assert config_mod.parse('METRICS_DIR=""\n', conf).metrics_dir == ""
    assert metrics.refresh(config_mod.parse(f'METRICS_DIR=""\nRUN_DIR="{tmp_path}/run"\n', conf)) is None
    assert config_mod.parse('METRICS_MAX_GUESTS="5"\n', conf).metrics_max_guests == 5
    for line, message in (
        ('METRICS_DIR="textfiles"', "METRICS_DIR: bad directory 'textfiles': expected an absolute path "
                                    "(node_exporter's --collector.textfile.directory), or \"\" for no metrics"),
        ('METRICS_MAX_GUESTS="0"', "METRICS_MAX_GUESTS: bad number '0': expected a whole number of guests "
                                   "from 1 to 99999, e.g. 200"),
        ('METRICS_MAX_GUESTS="many"', "METRICS_MAX_GUESTS: bad number 'many': expected a whole number of guests "
                                      "from 1 to 99999, e.g. 200"),
    ):
        with pytest.raises(ConfigError) as err:
            config_mod.parse(line + "\n", conf)
        assert str(err.value) == f"{conf}:1: {message}"


# ------------------------------------------------------------------------- promtool
def promtool_check(text: str) -> None:
    result = subprocess.run([tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), text


def test_promtool_accepts_a_file_with_nasty_names_and_every_family() -> None:
    promtool_check(metrics.render(snap(
        attempts=(Attempt("vnet0", "52:54:00:00:00:01", 3), Attempt("tap1", "02:00:00:00:00:01", 1),
                  *(Attempt("vnet0", f"02:00:00:00:00:{i:02x}", 1) for i in range(12))),
        owners={"vnet0": (NASTY, "u-1")}, disabled_since=1.0, abuse=dict(ABUSE), abuse_wanted=True,
        rebuild=RebuildFacts(2.0, 0.5, ((NASTY, "u-1"),), 2.0, True, 2.0)), 1))


def test_promtool_accepts_the_example_alert_rules() -> None:
    result = subprocess.run([tool("promtool"), "check", "rules", "--lint=all", str(REPO / "config" / "smtp-gate.rules.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "SUCCESS: 14 rules found" in result.stdout, result.stdout + result.stderr


def test_the_rules_and_readme_name_the_hooks_real_syslog_identifier() -> None:
    """The hook alert sends the desk to `journalctl -t smtp-gate-hook`: the identifier the
    hooks really send (test_hooks.py reads it from the datagram a hook sent to /dev/log)."""
    import inspect

    from smtp_gate import hook

    named = set(re.findall(r"journalctl -t ([\w-]+)", (REPO / "config" / "smtp-gate.rules.yml").read_text()))
    named |= set(re.findall(r"journalctl -t ([\w-]+)", (REPO / "README.md").read_text()))
    assert named == {"smtp-gate-hook"}
    assert ">smtp-gate-hook[{os.getpid()}]: " in inspect.getsource(hook._syslog)


def test_the_example_alerts_fire_on_synthetic_series(tmp_path: Path) -> None:
    """`promtool test rules`: each alert fires on the series that should fire it, and not before."""
    rules = shutil.copy(REPO / "config" / "smtp-gate.rules.yml", tmp_path / "smtp-gate.rules.yml")
    tests = (REPO / "tests" / "data" / "metrics" / "rules_test.yml").read_text()
    (tmp_path / "rules_test.yml").write_text(tests)
    result = subprocess.run([tool("promtool"), "test", "rules", "rules_test.yml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
    assert Path(rules).exists()


# ------------------------------------------------------ a real lab, node_exporter scrapes
def kernel_attempts(lab: BridgeLab) -> List[Tuple[str, str, int]]:
    import json

    from smtp_gate import nft

    listing = json.loads(lab.nft("-j", "list", "set", "bridge", "smtp_gate", "attempts").stdout)
    entry = next(item["set"] for item in listing["nftables"] if "set" in item)
    return [(p, m, n) for p, m, n, _b in nft.attempt_counters(entry)]


def domain_xml(name: str, port: str, mac: str, guest_uuid: str) -> bytes:
    from xml.sax.saxutils import escape

    return (f"<domain type='kvm'><name>{escape(name)}</name><uuid>{guest_uuid}</uuid><devices>"
            f"<interface type='bridge'><mac address='{mac}'/><source bridge='br0'/><target dev='{port}'/>"
            f"</interface></devices></domain>").encode("utf-8")


@pytest.fixture
def metrics_lab(lab: BridgeLab) -> Iterator[Tuple[BridgeLab, Path]]:
    textfiles = lab.tmp / "textfile"
    textfiles.mkdir()
    lab.write_config(f'UPLINKS="uplink0"\nMETRICS_DIR="{textfiles}"\n')
    yield lab, textfiles


class NodeExporter:
    """prometheus-node-exporter as a plain process in NETNS (never a service): the textfile
    collector only, on 127.0.0.1 of that namespace."""

    def __init__(self, lab: BridgeLab, directory: Path, port: int = 9100) -> None:
        self.lab, self.port = lab, port
        self.log = lab.tmp / "node-exporter.log"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", lab.hv.name, tool("prometheus-node-exporter"), "--collector.disable-defaults",
                 "--collector.textfile", f"--collector.textfile.directory={directory}",
                 f"--web.listen-address=127.0.0.1:{port}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
            )

    def scrape(self, timeout: float = 20.0) -> str:
        code = ("import sys, urllib.request\n"
                f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{self.port}/metrics', timeout=5).read().decode())")
        give_up = time.monotonic() + timeout
        while True:
            result = self.lab.hv.exec([sys.executable, "-c", code], check=False)
            if result.returncode == 0:
                return result.stdout
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < give_up, f"node_exporter did not answer: {result.stderr}\n{self.log.read_text()}"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
        self.proc.wait(timeout=10)


def test_node_exporter_and_promtool_read_the_file_from_a_real_lab(metrics_lab: Tuple[BridgeLab, Path]) -> None:
    """A guest with a nasty name blocked, a whitelisted guest allowed, a port no hypervisor
    reported (guest "_unknown"), a hook that failed: the file as the kernel's state says,
    accepted by promtool, and served unchanged by a real node_exporter."""
    lab, textfiles = metrics_lab
    (lab.tmp / "whitelist.csv").write_text("# vmname,mac,added_at,added_by,reason\ng2,,2026-01-01T00:00:00+00:00,root,\n")
    assert lab.smtp_gate("apply").returncode == 0
    g1, g2 = lab.guests["g1"], lab.guests["g2"]
    stranger = lab.add_guest("g3", "vnet2", 4)  # its port is no libvirt guest's
    nasty_uuid = str(uuid_mod.uuid4())
    started = lab.run_hook("start", "begin", domain_xml(NASTY, g1.port, g1.mac, nasty_uuid), name="nasty")
    assert started.returncode == 0 and b"failed" not in started.stderr, started.stderr
    lab.start_guest(g2)
    broken = lab.run_hook("start", "begin", b"<domain", name="broken")  # a hook that fails: counted
    assert broken.returncode == 0 and b"failed" in broken.stderr
    assert not lab.tcp_connects(g1, lab.INET4, 25, timeout=0.5)
    assert not lab.tcp_connects(g1, lab.INET6, 465, timeout=0.5)
    assert not lab.tcp_connects(stranger, lab.INET4, 25, timeout=0.5)
    assert lab.tcp_connects(g2, lab.INET4, 25)  # allowed: no attempt counted
    rebuilt = lab.smtp_gate("rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    text = (textfiles / "smtp_gate.prom").read_text(encoding="utf-8")
    promtool_check(text)
    samples = ours(parse(text))

    expected: Dict[Tuple[str, str, str, str], float] = {}
    names = {g1.port: (NASTY, nasty_uuid, ""), stranger.port: ("_unknown", "", stranger.port)}
    for port, mac, packets in kernel_attempts(lab):
        guest, guest_uuid, iface = names[port]
        expected[(guest, guest_uuid, iface, mac)] = expected.get((guest, guest_uuid, iface, mac), 0) + packets
    got = {(dict(k[1])["guest"], dict(k[1])["uuid"], dict(k[1])["iface"], dict(k[1])["mac"]): v
           for k, v in samples.items() if k[0] == "smtp_gate_guest_blocked_packets_total"}
    assert got == expected and set(got) == {(NASTY, nasty_uuid, "", g1.mac), ("_unknown", "", stranger.port, stranger.mac)}
    assert got[(NASTY, nasty_uuid, "", g1.mac)] >= 2
    blocked = {dict(k[1])["family"]: v for k, v in samples.items() if k[0] == "smtp_gate_blocked_packets_total"}
    assert blocked["ipv4"] + blocked["ipv6"] == sum(expected.values()) and blocked["ipv6"] >= 1
    for name, value in (("smtp_gate_enforcement_active", 1), ("smtp_gate_disabled", 0), ("smtp_gate_guests", 2),
                        ("smtp_gate_allowed_guests", 1), ("smtp_gate_allowed_nics", 1),
                        ("smtp_gate_attempt_sources", len(expected)),
                        ("smtp_gate_hook_failures_total", 1), ("smtp_gate_table_restores_total", 0)):
        assert samples[(name, ())] == value, name
    assert samples[("smtp_gate_mode", (("mode", "enforce"),))] == 1
    assert samples[("smtp_gate_mode", (("mode", "audit"),))] == 0
    assert abs(samples[("smtp_gate_last_rebuild_timestamp_seconds", ())] - time.time()) < 60
    assert 0 < samples[("smtp_gate_last_rebuild_duration_seconds", ())] < 60

    exporter = NodeExporter(lab, textfiles)
    try:
        scraped = parse(exporter.scrape())
    finally:
        exporter.stop()
    assert scraped[("node_textfile_scrape_error", ())] == 0
    assert ours(scraped) == samples  # every series, every label (re-escaped by node_exporter), every value

    lab.write_config(f'UPLINKS="uplink0"\nMETRICS_DIR="{textfiles}"\nMODE="audit"\n')
    assert lab.smtp_gate("apply").returncode == 0
    samples = parse((textfiles / "smtp_gate.prom").read_text(encoding="utf-8"))
    assert samples[("smtp_gate_mode", (("mode", "audit"),))] == 1
    assert samples[("smtp_gate_mode", (("mode", "enforce"),))] == 0


def test_disabled_missing_and_unwritable_metrics_dir(metrics_lab: Tuple[BridgeLab, Path]) -> None:
    lab, textfiles = metrics_lab
    assert lab.smtp_gate("disable", "--reason", "maintenance").returncode == 0
    result = lab.smtp_gate("rebuild", "--if-enabled", check=False)
    assert result.returncode == 5, result.stderr
    samples = parse((textfiles / "smtp_gate.prom").read_text())
    assert samples[("smtp_gate_disabled", ())] == 1 and samples[("smtp_gate_enforcement_active", ())] == 0
    assert abs(samples[("smtp_gate_disabled_since_timestamp_seconds", ())] - time.time()) < 60
    assert lab.smtp_gate("enable").returncode == 0

    lab.write_config(f'UPLINKS="uplink0"\nMETRICS_DIR="{lab.tmp / "none"}"\n')
    result = lab.smtp_gate("apply", check=False)
    assert result.returncode == 0, result.stderr  # no node_exporter here: a note, not a warning
    assert (f"smtp-gate: note: METRICS_DIR '{lab.tmp / 'none'}' does not exist: metrics not written "
            '(install prometheus-node-exporter, or set METRICS_DIR="" to turn them off)\n') in result.stderr

    lab.write_config(f'UPLINKS="uplink0"\nMETRICS_DIR="{textfiles}"\n')
    with immutable(textfiles):
        result = lab.smtp_gate("apply", check=False)
    assert result.returncode == 3, result.stderr  # installed, but the operator must read this
    warning = next(l for l in result.stderr.splitlines() if "metrics not written" in l)
    assert warning.startswith(f"smtp-gate: warning: metrics not written: cannot write the metrics file "
                              f"'{textfiles / 'smtp_gate.prom'}': ")
    assert lab.nft("list", "table", "bridge", "smtp_gate").returncode == 0


def test_the_watcher_counts_a_restore_and_rewrites_the_file_at_once(metrics_lab: Tuple[BridgeLab, Path]) -> None:
    from tests.test_watch import Watcher, wait_for

    lab, textfiles = metrics_lab
    lab.smtp_gate("apply")
    prom = textfiles / "smtp_gate.prom"
    watcher = Watcher(lab)
    try:
        watcher.ready()
        lab.nft("delete", "table", "bridge", "smtp_gate")

        def restored_and_written() -> bool:
            samples = parse(prom.read_text())
            return samples[("smtp_gate_table_restores_total", ())] == 1 and samples[("smtp_gate_enforcement_active", ())] == 1

        # at once, not after the 30 s period: the restore pokes the writer
        wait_for(restored_and_written, timeout=10)
    finally:
        watcher.stop()
    assert metrics.counted(str(lab.tmp / "run"), metrics.TABLE_RESTORES) == 1
    assert "metrics:" not in watcher.text()


def test_disable_and_enable_rewrite_the_file_at_once_and_count_no_restore(metrics_lab: Tuple[BridgeLab, Path]) -> None:
    """The off-switch shows at once (not after the watcher's next 30 s), and the operator's
    own commands are never table restores (smtp_gate_table_restores_total: the watcher's)."""
    lab, textfiles = metrics_lab
    prom = textfiles / "smtp_gate.prom"
    assert lab.smtp_gate("apply").returncode == 0
    samples = parse(prom.read_text())
    assert (samples[("smtp_gate_enforcement_active", ())], samples[("smtp_gate_disabled", ())]) == (1, 0)
    result = lab.smtp_gate("disable", "--reason", "maintenance")
    assert result.returncode == 0, result.stderr
    samples = parse(prom.read_text())
    assert (samples[("smtp_gate_enforcement_active", ())], samples[("smtp_gate_disabled", ())]) == (0, 1)
    assert abs(samples[("smtp_gate_disabled_since_timestamp_seconds", ())] - time.time()) < 60
    assert lab.smtp_gate("enable").returncode == 0
    samples = parse(prom.read_text())
    assert (samples[("smtp_gate_enforcement_active", ())], samples[("smtp_gate_disabled", ())]) == (1, 0)
    assert lab.smtp_gate("disable", "--reason", "again").returncode == 0
    assert lab.smtp_gate("apply").returncode == 0
    assert lab.smtp_gate("rebuild").returncode == 0
    assert parse(prom.read_text())[("smtp_gate_table_restores_total", ())] == 0
    assert metrics.counted(str(lab.tmp / "run"), metrics.TABLE_RESTORES) == 0
    # a disable that cannot write the file says so, and exits 3: the table is removed all the same
    with immutable(textfiles):
        result = lab.smtp_gate("disable", "--reason", "x", check=False)
    assert result.returncode == 3 and "smtp-gate: warning: metrics not written: " in result.stderr, result.stderr
    assert lab.nft("list", "table", "bridge", "smtp_gate", check=False).returncode != 0


def test_a_stopped_guest_keeps_its_name_on_its_blocked_attempts(metrics_lab: Tuple[BridgeLab, Path]) -> None:
    """Suspending a spammer must not erase its name: after its `stopped` hook (its record
    gone, its port free for another guest) its counters still carry its name and UUID."""
    lab, textfiles = metrics_lab
    assert lab.smtp_gate("apply").returncode == 0
    g1 = lab.guests["g1"]
    spammer_uuid = str(uuid_mod.uuid4())
    xml = domain_xml("spammer", g1.port, g1.mac, spammer_uuid)
    assert lab.run_hook("start", "begin", xml, name="spammer").returncode == 0
    assert not lab.tcp_connects(g1, lab.INET4, 25, timeout=0.5)
    assert lab.smtp_gate("rebuild", "--no-libvirt").returncode == 0

    def named() -> Dict[Tuple[str, str, str], float]:
        samples = parse((textfiles / "smtp_gate.prom").read_text())
        return {(dict(k[1])["guest"], dict(k[1])["uuid"], dict(k[1])["mac"]): v
                for k, v in samples.items() if k[0] == "smtp_gate_guest_blocked_packets_total"}

    before = named()
    assert set(before) == {("spammer", spammer_uuid, g1.mac)} and before[("spammer", spammer_uuid, g1.mac)] >= 1
    stopped = lab.run_hook("stopped", "end", xml, name="spammer")
    assert stopped.returncode == 0 and b"failed" not in stopped.stderr, stopped.stderr
    assert lab.smtp_gate("rebuild", "--no-libvirt").returncode == 0
    assert [p for p, _m, _n in kernel_attempts(lab)] == [g1.port]  # the kernel's entry lives on
    assert named() == before  # not guest="_unknown"


def scrape_phases(exporter: "NodeExporter", textfiles: Path, lab: BridgeLab) -> Dict[str, Dict[Tuple[str, Labels], float]]:
    """What a real node_exporter serves with our file good, unparseable, and removed."""
    prom = textfiles / "smtp_gate.prom"
    good = prom.read_text()
    phases = {"good": parse(exporter.scrape())}
    prom.write_text(good.replace("smtp_gate_guests ", "smtp_gate_guests{", 1))  # one broken line
    phases["unparseable"] = parse(exporter.scrape())
    prom.unlink()
    phases["removed"] = parse(exporter.scrape())
    return phases


def test_node_exporter_serves_what_the_absence_alerts_expect(metrics_lab: Tuple[BridgeLab, Path], tmp_path: Path) -> None:
    """A real node_exporter: with the file good, our series (the abuse desk's from a
    hand-written abuse.json, libvirt down: nothing answers the lab's URI); unparseable, only
    node_textfile_scrape_error 1 and none of ours; removed, none of ours.  Those scrapes, fed
    to `promtool test rules` as the series Prometheus would store, fire the alerts."""
    import json

    lab, textfiles = metrics_lab
    (lab.tmp / "run").mkdir(exist_ok=True)
    (lab.tmp / "run" / metrics.ABUSE).write_text(json.dumps(dict(ABUSE, updated=int(time.time()))))
    result = lab.smtp_gate("apply")
    assert "no hypervisor answered" in result.stderr, result.stderr
    exporter = NodeExporter(lab, textfiles)
    try:
        phases = scrape_phases(exporter, textfiles, lab)
    finally:
        exporter.stop()
    good, broken, removed = phases["good"], phases["unparseable"], phases["removed"]
    assert good[("node_textfile_scrape_error", ())] == 0
    assert good[("smtp_gate_libvirt_up", ())] == 0 and good[("smtp_gate_abuse_desk_up", ())] == 1
    assert good[("smtp_gate_abuse_events_total", ())] == 1234 and good[("smtp_gate_on_blocked_failures_total", ())] == 1
    assert broken[("node_textfile_scrape_error", ())] == 1 and not ours(broken)
    assert removed[("node_textfile_scrape_error", ())] == 0 and not ours(removed)

    # the scrapes as Prometheus stores them: up 1 all along, 5 minutes of the good file, then
    # 30 of the unparseable (host a) or of none (host b); a series a scrape lacks goes stale
    def series(instance: str, later: Dict[Tuple[str, Labels], float]) -> List[Dict[str, str]]:
        out = [{"series": f'up{{job="node",instance="{instance}"}}', "values": "1x35"}]
        for (name, labels), value in good.items():
            if not name.startswith(("smtp_gate_", "node_textfile_scrape_error")) or "\n" in "".join(v for _k, v in labels):
                continue
            pairs = ",".join(f'{k}="{v}"' for k, v in (("job", "node"), ("instance", instance), *labels))
            after = later.get((name, labels))
            tail = f"{after:g}x30" if after is not None else "stale"
            out.append({"series": f"{name}{{{pairs}}}", "values": f"{value:g}x4 {tail}"})
        return out

    absent = [{"exp_labels": {"severity": "warning", "job": "node", "instance": i}, "exp_annotations": {
        "summary": f"node_exporter on {i} serves no smtp-gate metrics",
        "description": "METRICS_DIR/smtp_gate.prom is missing or unreadable: check that it exists (`smtp-gate apply` "
                       "writes it), and node_textfile_scrape_error."}} for i in ("a", "b")]
    unreadable = [{"exp_labels": {"severity": "warning", "job": "node", "instance": "a"}, "exp_annotations": {
        "summary": "node_exporter on a cannot read a file of its textfile directory",
        "description": "Its log (`journalctl -u prometheus-node-exporter`) names the file; `promtool check metrics < "
                       "/var/lib/prometheus/node-exporter/smtp_gate.prom` checks ours."}}]
    tests = {"rule_files": ["smtp-gate.rules.yml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": series("a", broken) + series("b", removed),
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": "SmtpGateMetricsAbsent", "exp_alerts": []},
            {"eval_time": "16m", "alertname": "SmtpGateMetricsAbsent", "exp_alerts": absent},
            {"eval_time": "16m", "alertname": "SmtpGateTextfileError", "exp_alerts": unreadable},
        ],
    }]}
    shutil.copy(REPO / "config" / "smtp-gate.rules.yml", tmp_path / "smtp-gate.rules.yml")
    # promtool takes YAML, and JSON is YAML
    (tmp_path / "scraped_test.yml").write_text(json.dumps(tests))
    result = subprocess.run([tool("promtool"), "test", "rules", "scraped_test.yml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
