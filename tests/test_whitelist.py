"""smtp_gate.whitelist: the model, the matcher, the hook's fast path and atomic writes.

Real files and real processes throughout: the concurrency, SIGKILL and filesystem tests
run helper scripts from tests/whitelist_helpers/ in subprocesses.
"""

import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import List, Tuple

import pytest

from smtp_gate import files, whitelist as wl
from smtp_gate.errors import SmtpGateError, ValidationError, WhitelistError

REPO = Path(__file__).resolve().parent.parent
HELPERS = Path(__file__).resolve().parent / "whitelist_helpers"
NOW = datetime(2026, 11, 25, 14, 3, 7, tzinfo=timezone.utc)
ENV = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))

# One of everything an operator may leave in the file, good and bad, with the line
# numbers the problems must carry.
SAMPLE = (
    "# vmname,mac,added_at,added_by,reason\n"  # 1
    "web1,,2026-11-25T14:03:07+00:00,alice,\"ID verified, ticket \"\"4711\"\"\"\n"  # 2
    "\n"  # 3
    "   # an indented comment, with \"an odd quote\n"  # 4
    "lbl-a,52-54-00-AB-CD-EF,2026-11-25T14:03:07+00:00,bob,dash upper\n"  # 5
    ",5254.00ab.cd01,2026-11-25T14:03:07+00:00,bob,\"two\n"  # 6
    "lines\"\n"  # 7
    "  spaced  , 52:54:00:0A:0B:0C ,t,u,padded fields and upper case\n"  # 8
    "zero,52:54:0:a:b:c,t,u,zero-stripped groups\n"  # 9: not a documented spelling
    "bare,525400aabbcc,t,u,bare digits\n"  # 10: nor this
    "6F1A2B3C-0000-4000-8000-123456789ABC,,t,u,a guest by UUID\n"  # 11
    "bad-mac,zz:zz:zz,t,u,r\n"  # 12
    "multicast,01:00:5e:00:00:01,t,u,r\n"  # 13
    "broadcast,ff:ff:ff:ff:ff:ff,t,u,r\n"  # 14
    "zeros,00:00:00:00:00:00,t,u,r\n"  # 15
    ",,t,u,neither\n"  # 16
    "few,52:54:00:11:22:33,t\n"  # 17
    "many,52:54:00:11:22:34,t,u,reason,with,commas\n"  # 18
    "y,\"ab\"c,t,u,r\n"  # 19
    "vmname,mac,added_at,added_by,reason\n"  # 20: the header without its '#'
    "# the end\n"  # 21
)
SAMPLE_PROBLEMS = {
    9: ["'52:54:0:a:b:c'", "expected six hex bytes of two digits each"],
    10: ["'525400aabbcc'", "expected six hex bytes of two digits each"],
    12: ["'zz:zz:zz'", "expected six hex bytes"],
    13: ["'01:00:5e:00:00:01'", "multicast"],
    14: ["'ff:ff:ff:ff:ff:ff'", "broadcast"],
    15: ["'00:00:00:00:00:00'", "all-zero"],
    16: ["',,t,u,neither'", "neither a guest name nor a MAC", "expected"],
    17: ["'few,52:54:00:11:22:33,t'", "expected 5 fields", "found 3"],
    18: ["many,52:54:00:11:22:34", "expected 5 fields", "found 7", "double quotes"],
    19: ["'y,\"ab\"c,t,u,r'", "expected CSV"],
}


def physical_lines(text: str) -> List[str]:
    return text.splitlines(keepends=True)


# --------------------------------------------------------------------------- parsing


def test_sample_round_trips_byte_for_byte(tmp_path: Path) -> None:
    model = wl.parse(SAMPLE)
    assert model.text() == SAMPLE
    path = tmp_path / "whitelist.csv"
    wl.write(path, model)
    assert path.read_bytes() == SAMPLE.encode()
    assert wl.load(path) == model


def test_sample_entries_are_normalised() -> None:
    entries = wl.parse(SAMPLE).entries()
    assert [(e.vmname, e.mac) for e in entries] == [
        ("web1", ""),
        ("lbl-a", "52:54:00:ab:cd:ef"),
        ("", "52:54:00:ab:cd:01"),
        ("spaced", "52:54:00:0a:0b:0c"),
        ("6F1A2B3C-0000-4000-8000-123456789ABC", ""),
    ]
    assert entries[0].reason == 'ID verified, ticket "4711"'
    assert entries[2].reason == "two\nlines"
    assert entries[3].reason == "padded fields and upper case"


def test_every_bad_row_is_reported_with_its_line_and_what_was_expected() -> None:
    problems = wl.parse(SAMPLE).problems()
    assert {p.line for p in problems} == set(SAMPLE_PROBLEMS)
    for problem in problems:
        assert problem.last_line == problem.line
        for part in SAMPLE_PROBLEMS[problem.line]:
            assert part in problem.message, (problem, part)
        assert str(problem).startswith(f"line {problem.line}: ")


def test_bad_rows_comments_and_spellings_survive_a_change(tmp_path: Path) -> None:
    path = tmp_path / "whitelist.csv"
    path.write_text(SAMPLE, encoding="utf-8")
    model = wl.load(path)
    model.add_mac("52:54:00:12:34:56", added_at=NOW, added_by="carol", reason="new")
    assert [e.action for e in model.remove_mac("52:54:00:aa:bb:cc")] == [wl.ABSENT]  # line 10 is a bad row
    assert [e.action for e in model.remove_mac("52:54:00:0a:0b:0c")] == [wl.REMOVED]  # line 8
    wl.write(path, model)
    after = physical_lines(path.read_text(encoding="utf-8"))
    before = physical_lines(SAMPLE)
    assert after[:7] == before[:7] and after[7:20] == before[8:21]  # every untouched line, as it was
    assert after[20] == ",52:54:00:12:34:56,2026-11-25T14:03:07+00:00,carol,new\n"
    assert len(after) == 21
    reloaded = wl.load(path)
    assert [str(p) for p in reloaded.problems()] == [
        str(p._replace(line=p.line - 1, last_line=p.last_line - 1)) for p in wl.parse(SAMPLE).problems()
    ]


@pytest.mark.parametrize(
    "reason",
    ['ID verified, ticket "4711"', 'a "quoted", reason, ', "", "#not a comment", "ünïcödé İ \u200b"],
)
def test_awkward_fields_round_trip(tmp_path: Path, reason: str) -> None:
    path = tmp_path / "whitelist.csv"
    model = wl.Whitelist()
    model.add_mac("52:54:00:ab:cd:ef", added_at=NOW, added_by='op, "root"', reason=reason, label="#1, \"x\"")
    model.add_guest("#hash", added_at=NOW, added_by="op", reason=reason)
    model.add_guest("a,b", added_at=NOW, added_by="op", reason=reason)
    wl.write(path, model)
    reloaded = wl.load(path)
    assert reloaded.problems() == []
    assert reloaded.entries() == model.entries()
    assert reloaded.entries()[0] == wl.Entry("#1, \"x\"", "52:54:00:ab:cd:ef", NOW.isoformat(), 'op, "root"', reason)
    assert [e.vmname for e in reloaded.entries()] == ['#1, "x"', "#hash", "a,b"]


@pytest.mark.parametrize("bad", ["two\nlines", "cr\rlf", "tab\there", "esc\x1b[31m", "nel\x85", "ls\u2028", "ps\u2029",
                                 "nul\x00", "del\x7f", "vt\x0b", "ff\x0c"])
def test_control_characters_are_refused_in_every_text_field(bad: str) -> None:
    model = wl.parse(SAMPLE)
    calls = [
        lambda: model.add_mac("52:54:00:12:34:56", added_at=NOW, added_by="u", reason=bad),
        lambda: model.add_mac("52:54:00:12:34:56", added_at=NOW, added_by="u", reason="r", label=bad),
        lambda: model.add_mac("52:54:00:12:34:56", added_at=NOW, added_by=bad, reason="r"),
        lambda: model.add_guest("web7", added_at=NOW, added_by="u", reason=bad),
        lambda: model.add_guest("web7", added_at=NOW, added_by=bad, reason="r"),
        lambda: model.add_guest(bad, added_at=NOW, added_by="u", reason="r"),
    ]
    for call in calls:
        with pytest.raises(ValidationError) as info:
            call()
        assert repr(bad) in str(info.value) and "expected one line of text without control characters" in str(info.value)
        assert "\n" not in str(info.value)
    assert model.text() == SAMPLE


def test_extra_columns_are_kept_verbatim_and_reported() -> None:
    text = "# h\nweb1,,t,u,r,expires=2027-01-01\nweb2,,t,u,r\n"
    model = wl.parse(text)
    assert [str(p) for p in model.problems()] == [
        "line 2: row 'web1,,t,u,r,expires=2027-01-01': expected 5 fields (vmname,mac,added_at,added_by,reason), "
        "found 6; put a reason that contains commas in double quotes"
    ]
    model.add_guest("web3", added_at=NOW, added_by="u", reason="r")
    assert model.text().startswith(text)
    assert [e.vmname for e in model.entries()] == ["web2", "web3"]  # the unknown shape allows nothing


def test_unterminated_quote_is_reported_over_its_lines_and_never_swallows_a_new_row() -> None:
    text = "# h\nweb1,,t,u,\"never closed\nweb2,,t,u,r\n"
    model = wl.parse(text)
    assert [(p.line, p.last_line) for p in model.problems()] == [(2, 3)]
    assert "unterminated quoted field" in model.problems()[0].message
    assert model.entries() == []  # web2 is inside the open quote: csv reads it so, and so do we
    effect = model.add_guest("web3", added_at=NOW, added_by="u", reason="r")
    assert effect.line == 2
    reloaded = wl.parse(model.text())
    assert [e.vmname for e in reloaded.entries()] == ["web3"]
    assert reloaded.lines[-1].raw == "web1,,t,u,\"never closed\nweb2,,t,u,r\n"


def test_crlf_file_gets_crlf_rows_and_missing_final_newline_is_added() -> None:
    text = "# vmname,mac,added_at,added_by,reason\r\nweb1,,t,u,r"
    model = wl.parse(text)
    model.add_guest("web2", added_at=NOW, added_by="u", reason="r")
    assert model.text() == text + "\r\nweb2,,2026-11-25T14:03:07+00:00,u,r\r\n"
    assert [e.vmname for e in wl.parse(model.text()).entries()] == ["web1", "web2"]


def test_byte_order_mark_is_kept_and_ignored() -> None:
    text = "\ufeff# vmname,mac,added_at,added_by,reason\nweb1,,t,u,r\n"
    model = wl.parse(text)
    assert model.text() == text and model.problems() == [] and len(model.entries()) == 1
    assert wl.parse("\ufeffweb1,,t,u,r\n").entries()[0].vmname == "web1"


def test_line_splitting_is_on_newline_only() -> None:
    text = "web1,,t,u,form\x0cfeed\u2028and line separator\n"
    model = wl.parse(text)
    assert model.text() == text and model.entries()[0].reason == "form\x0cfeed\u2028and line separator"


def test_an_empty_file_gets_a_header_with_its_first_row() -> None:
    model = wl.parse("")
    assert model.lines == []
    model.add_guest("web1", added_at=NOW, added_by="alice", reason="r")
    assert model.text() == wl.HEADER + "web1,,2026-11-25T14:03:07+00:00,alice,r\n"


def test_missing_file_is_an_empty_model_written_with_a_header(tmp_path: Path) -> None:
    path = tmp_path / "whitelist.csv"
    model = wl.load(path)
    assert model.entries() == [] and model.problems() == [] and model.text() == wl.HEADER
    assert wl.read_text(path) == ""
    model.add_guest("web1", added_at=NOW, added_by="alice", reason="r")
    wl.write(path, model)
    assert path.read_text() == wl.HEADER + "web1,,2026-11-25T14:03:07+00:00,alice,r\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


# --------------------------------------------------------------------------- operations


def test_operations_say_what_they_did() -> None:
    model = wl.parse(SAMPLE)
    effect = model.add_guest("web1", added_at=NOW, added_by="u", reason="r")
    assert (effect.action, effect.line, effect.changed) == (wl.ALREADY, 2, False)
    assert str(effect) == "guest 'web1' already there (line 2)"
    effect = model.add_guest("other", added_at=NOW, added_by="u", reason="r", uuid="6f1a2b3c000040008000123456789abc")
    assert (effect.action, effect.line) == (wl.ALREADY, 11)  # its UUID row allows it already
    effect = model.add_mac("5254.00AB.CDEF", added_at=NOW, added_by="u", reason="r", label="other label")
    assert (effect.action, effect.line) == (wl.ALREADY, 5)
    assert str(effect) == "MAC 52:54:00:ab:cd:ef already there (line 5)"
    assert model.text() == SAMPLE

    effect = model.add_mac("52-54-00-12-34-56", added_at=NOW, added_by="u", reason="r", label="web9")
    assert (effect.action, effect.line, effect.changed) == (wl.ADDED, 22, True)
    assert str(effect) == "added MAC 52:54:00:12:34:56 (web9) at line 22"
    effect = model.add_guest("web9", added_at=NOW, added_by="u", reason="r")
    assert str(effect) == "added guest 'web9' (every NIC) at line 23"

    removed = model.remove_mac("52:54:00:0a:0b:0c")  # line 9 spells it badly: that row stays
    assert [(e.action, e.line) for e in removed] == [(wl.REMOVED, 8)]
    assert str(removed[0]) == "removed MAC 52:54:00:0a:0b:0c (spaced) from line 8"
    removed = model.remove_guest("web9")  # the guest row and the MAC row labelled with it
    assert [str(e) for e in removed] == [
        "removed MAC 52:54:00:12:34:56 (web9) from line 21",
        "removed guest 'web9' (every NIC) from line 22",
    ]
    removed = model.remove_guest("nobody", uuid="6f1a2b3c-0000-4000-8000-123456789abc")
    assert [(e.action, e.line) for e in removed] == [(wl.REMOVED, 10)]
    assert [str(e) for e in model.remove_mac("52:54:00:99:99:99")] == ["MAC 52:54:00:99:99:99 not in the whitelist"]
    assert [e.changed for e in model.remove_guest("nobody")] == [False]
    # line 8 is gone above every problem, line 11 above those from line 12 on
    assert {p.line for p in model.problems()} == {n - 1 if n < 11 else n - 2 for n in SAMPLE_PROBLEMS}


def test_bad_values_are_refused_before_they_reach_the_file() -> None:
    model = wl.Whitelist()
    with pytest.raises(ValidationError, match="multicast"):
        model.add_mac("01:00:5e:00:00:01", added_at=NOW, added_by="u", reason="r")
    with pytest.raises(ValidationError, match="expected six hex bytes"):
        model.add_mac("52:54:00:ab:cd", added_at=NOW, added_by="u", reason="r")
    with pytest.raises(WhitelistError, match="without leading or trailing spaces"):
        model.add_guest(" web1", added_at=NOW, added_by="u", reason="r")
    with pytest.raises(WhitelistError, match="non-empty"):
        model.add_guest("", added_at=NOW, added_by="u", reason="r")
    with pytest.raises(WhitelistError, match="timezone-aware"):
        model.add_guest("web1", added_at=datetime(2026, 1, 1), added_by="u", reason="r")
    assert model.lines == []


def test_timestamps_keep_their_offset() -> None:
    model = wl.Whitelist()
    tz = timezone(timedelta(hours=-5, minutes=-30))
    model.add_guest("web1", added_at=datetime(2026, 11, 25, 14, 3, 7, 123456, tzinfo=tz), added_by="u", reason="r")
    assert model.entries()[0].added_at == "2026-11-25T14:03:07-05:30"


# --------------------------------------------------------------------------- matching


def guest(name: str = "", uuid: str = "", *macs: str) -> wl.Guest:
    return wl.Guest(name, uuid, tuple(macs))


def test_matching() -> None:
    model = wl.parse(SAMPLE)
    nics = ("52:54:00:ab:cd:ef", "52-54-00-99-99-99", "52:54:00:0a:0b:0c")
    everything = ("52:54:00:ab:cd:ef", "52:54:00:99:99:99", "52:54:00:0a:0b:0c")
    by_mac = ("52:54:00:ab:cd:ef", "52:54:00:0a:0b:0c")
    assert model.allowed_macs(guest("web1", "", *nics)) == everything
    assert model.allowed_macs(guest("x", "6f1a2b3c-0000-4000-8000-123456789abc", *nics)) == everything
    assert model.allowed_macs(guest("x", "6F1A2B3C000040008000123456789ABC", "52:54:00:99:99:99")) == (
        "52:54:00:99:99:99",
    )
    assert model.allowed_macs(guest("lbl-a", "", *nics)) == by_mac  # a label is no name
    assert model.allowed_macs(guest("WEB1", "", *nics)) == by_mac  # names are exact
    assert model.allowed_macs(guest("spaced", "", "52:54:00:99:99:99")) == ()
    # bad rows allow nothing: not the MAC of line 17, not the name of line 18
    assert model.allowed_macs(guest("many", "", "52:54:00:11:22:33", "52:54:00:11:22:34")) == ()
    assert model.allowed_macs(guest("web1")) == ()
    assert [n for n, _ in model.matching(guest("q", "", "52:54:00:0a:0b:0c"))] == [8]
    # a MAC in no documented spelling allows nothing (line 10): a typo is not another NIC
    assert model.allowed_macs(guest("bare", "", "52:54:00:aa:bb:cc")) == ()


# --------------------------------------------------------------------------- the fast path


def spell_mac(values: List[int], rnd: random.Random) -> str:
    """A spelling of the MAC in a random case, maybe padded: one validate.mac() accepts, or
    a near miss it refuses (bytes without their leading zero, bare digits).  The fast path
    must read both kinds as the full parse does."""
    digits = ["%02x" % v for v in values]
    style = rnd.choice(["colon", "colon", "dash", "dot", "bare", "colon-short", "dash-short"])
    if style.endswith("short"):
        digits = [d[1] if d[0] == "0" and rnd.random() < 0.7 else d for d in digits]
    sep = {"colon": ":", "dash": "-", "colon-short": ":", "dash-short": "-"}.get(style)
    text = sep.join(digits) if sep else "".join(digits)
    if style == "dot":
        text = f"{text[:4]}.{text[4:8]}.{text[8:]}"
    case = rnd.random()
    if case < 0.2:
        text = text.upper()
    elif case < 0.3:
        text = "".join(c.upper() if rnd.random() < 0.5 else c for c in text)
    return (" " if rnd.random() < 0.05 else "") + text


def random_file(rnd: random.Random, names: List[str], uuids: List[str], macs: List[List[int]]) -> str:
    def field(value: str) -> str:
        if rnd.random() < 0.15 or any(c in value for c in ',"\n\r'):
            return '"' + value.replace('"', '""') + '"'
        return value

    multiline = rnd.random() < 0.4  # quoted fields that span lines: the fast path must fall back
    hazards = rnd.random() < 0.4  # rows whose quoting makes csv read several lines as one

    def reason() -> str:
        return rnd.choice(["ok", "a, b", 'ticket "4711"', "x" * rnd.randint(0, 30), "ünïcödé, İ", ""]
                          + ["two\nlines"] * multiline)

    def row() -> str:
        kind = rnd.random()
        name = rnd.choice(names + uuids + [""])
        mac = spell_mac(rnd.choice(macs), rnd)
        if kind < 0.3:
            return ",".join([field(name or "x"), "", "t", "u", field(reason())])
        if kind < 0.6:
            return ",".join([field(rnd.choice([name, ""])), field(mac), "t", "u", field(reason())])
        spanning = [
            f"{name},b\"c,\"{mac}",  # a literal quote, then a field that opens and spans lines
            f"{name},\"{mac}",  # an open quote: swallows what follows
        ]
        return rnd.choice(spanning * hazards + [
            f"#{name},{mac},t,u,commented out",
            f"# comment with \"odd quote {name}",
            f"# a,\"b {mac}",
            "",
            "   ",
            f"{name},{mac}",  # too few
            f"{name},{mac},t,u,r,extra",  # too many
            f"{name},zz:{mac},t,u,r",  # bad MAC
            f"{name},01:00:5e:00:00:01,t,u,r",  # multicast
            f",,t,u,{name}",  # neither
            f"{name},{mac},t,u,ab\"c",  # a literal quote inside an unquoted field
            f"{name},\"{mac}\"x,t,u,r",  # bad quoting
            f"{name},{mac},t,u,cr\rinside",  # a bare carriage return
            "vmname,mac,added_at,added_by,reason",
        ])

    rows = [row() for _ in range(rnd.randint(0, 40))]
    if rnd.random() < 0.7:
        rows.insert(0, wl.HEADER.rstrip("\n"))
    newline = "\r\n" if rnd.random() < 0.1 else "\n"
    text = newline.join(rows) + (newline if rnd.random() < 0.8 else "")
    if rnd.random() < 0.05:
        text = "\ufeff" + text
    return text


def random_pools(rnd: random.Random) -> Tuple[List[str], List[str], List[List[int]]]:
    names = ["web1", "web-2", "Web1", "db,3", 'q"uote', "#hash", "ünï", "İstanbul", "x", "t", "ab"]
    uuids = []
    for _ in range(3):
        u = "%032x" % rnd.getrandbits(128)
        dashed = f"{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"
        uuids.append(rnd.choice([dashed, dashed.upper(), u, u.upper()]))
    macs = []
    for _ in range(6):
        low_bytes = rnd.random() < 0.3
        macs.append([0x52, 0x54, 0x00] + [rnd.randrange(16) if low_bytes and rnd.random() < 0.6 else rnd.randrange(256)
                                          for _ in range(3)])
    macs.append([0x02, 0x00, 0x00, 0x00, 0x00, 0x01])  # no byte >= 0x10 after the first: a full parse
    return names, uuids, macs


def test_fast_path_equals_full_parse_on_random_files() -> None:
    rnd = random.Random(20261125)
    routes = {"miss": 0, "lines": 0, "full": 0}
    lines_with_quotes = 0
    for _ in range(600):
        names, uuids, macs = random_pools(rnd)
        text = random_file(rnd, names, uuids, macs)
        model = wl.parse(text)
        assert model.text() == text
        index = model.index()
        for _ in range(6):
            g = guest(
                rnd.choice(names + [""]),
                rnd.choice(uuids + [""]).lower() if rnd.random() < 0.5 else rnd.choice(uuids + [""]),
                *[":".join("%02x" % v for v in rnd.choice(macs)) for _ in range(rnd.randint(0, 3))],
            )
            answer, route = wl._fast(text, g)
            assert answer == model.allowed_macs(g), (text, g, route)
            assert answer == wl.fast_allowed_macs(text, g)
            assert answer == index.allowed_macs(g), "the rebuild's index answers like the model"
            routes[route] += 1
            if route == "lines" and '"' in text:
                lines_with_quotes += 1
    # every way through was taken, and the line-wise one often, also with quotes in the file
    assert routes["lines"] > 800 and routes["miss"] > 300 and routes["full"] > 100, routes
    assert lines_with_quotes > 300, lines_with_quotes


@pytest.mark.parametrize(
    "text, route, allowed",
    [
        # the needle on a continuation line of a quoted field: the name is data, not a row
        ('a,,t,u,"reason\nweb1,,t,u,r"\n', "full", ()),
        # a literal quote in an unquoted field, then a field that opens: csv swallows the next line
        ('a,b"c,"d\nweb1,,t,u,r\n', "full", ()),
        # a comment may hold any quote; the line-wise check reads it as a comment
        ('# "odd\nweb1,,t,u,r\n', "lines", ("52:54:00:ab:cd:ef",)),
        ('x,,t,u,"a, b"\nweb1,,t,u,r\n', "lines", ("52:54:00:ab:cd:ef",)),
        ('# web1 is commented out\n#web1,,t,u,r\n', "lines", ()),
        ("web1 ,,t,u,r\n", "lines", ("52:54:00:ab:cd:ef",)),
        ("other,52:54:00:AB:cd:EF,t,u,r\n", "lines", ("52:54:00:ab:cd:ef",)),
        ("other,52:54:0:AB:cd:EF,t,u,r\n", "lines", ()),  # a dropped digit: a bad row, found and refused
        ("other,5254.00AB.CDEF,t,u,r\n", "lines", ("52:54:00:ab:cd:ef",)),
        ("other,52:54:00:ab:cd:ef,t,u\n", "lines", ()),
        ("\ufeffweb1,,t,u,r\n", "lines", ("52:54:00:ab:cd:ef",)),
        ("İ,,t,u,r\nweb1,,t,u,İ\n", "lines", ("52:54:00:ab:cd:ef",)),
        ("nothing here\n", "miss", ()),
    ],
)
def test_fast_path_cases(text: str, route: str, allowed: Tuple[str, ...]) -> None:
    g = guest("web1", "", "52:54:00:ab:cd:ef")
    assert wl.parse(text).allowed_macs(g) == allowed
    assert wl._fast(text, g) == (allowed, route)


def test_fast_path_falls_back_for_a_name_with_a_quote() -> None:
    text = 'other,,t,u,r\n"we""b",,t,u,r\n'
    g = guest('we"b', "", "52:54:00:ab:cd:ef")
    assert wl._fast(text, g) == (("52:54:00:ab:cd:ef",), "full")


def big_file(rows: int, quoted: float, seed: int = 1) -> Tuple[str, List[str]]:
    """A realistic large whitelist: a third whole-guest rows, the rest MAC rows, some quoted reasons."""
    rnd = random.Random(seed)
    out = [wl.HEADER]
    macs = []
    for i in range(rows):
        mac = "52:54:00:%02x:%02x:%02x" % (rnd.randrange(256), rnd.randrange(256), rnd.randrange(256))
        macs.append(mac)
        reason = rnd.choice(["ok", "relay", "mail server"])
        if rnd.random() < quoted:
            reason = f'"ID verified, ticket ""{i}"""'
        out.append(f"vm-{i:05d},{'' if i % 3 == 0 else mac},2026-11-25T14:03:07+00:00,alice,{reason}\n")
    return "".join(out), macs


def best_ms(fn, repeat: int = 7, number: int = 20) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best * 1000


def test_fast_path_is_much_faster_than_a_full_parse() -> None:
    text, macs = big_file(10000, quoted=0.1)
    uuid = "6f1a2b3c-0000-4000-8000-123456789abc"
    cases = {
        "miss": guest("vm-nope", uuid, "52:54:00:fe:ed:01"),
        "hit, last row by name": guest("vm-09999", uuid, "52:54:00:fe:ed:01"),
        "hit, a middle row by MAC": guest("x", uuid, macs[5000]),
    }
    full = best_ms(lambda: wl.parse(text), repeat=3, number=1)
    report = [f"full parse {full:.1f} ms"]
    for label, g in cases.items():
        assert wl._fast(text, g)[0] == wl.parse(text).allowed_macs(g)
        assert wl._fast(text, g)[1] != "full"
        fast = best_ms(lambda: wl.fast_allowed_macs(text, g))
        report.append(f"{label} {fast:.2f} ms")
        assert fast < full / 5, report
    print("10 000 rows, 10% quoted: " + ", ".join(report))


def test_hook_import_stays_light() -> None:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import smtp_gate.whitelist"],
        env=ENV, capture_output=True, text=True, check=True,
    ).stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.splitlines() if "|" in line}
    assert "smtp_gate.whitelist" in imported
    for heavy in ("filelock", "lxml", "libvirt", "dataclasses", "datetime", "tempfile", "inspect", "shutil"):
        assert heavy not in imported, f"{heavy} is imported with smtp_gate.whitelist"


# --------------------------------------------------------------------------- files


def test_write_keeps_mode_and_owner(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    path = tmp_path / "whitelist.csv"
    path.write_text(SAMPLE)
    os.chown(path, 1234, 5678)
    os.chmod(path, 0o604)
    model = wl.load(path)
    model.add_guest("web2", added_at=NOW, added_by="u", reason="r")
    wl.write(path, model)
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o604)
    assert wl.load(path) == model


def test_write_follows_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real" / "whitelist.csv"
    real.parent.mkdir()
    real.write_text(SAMPLE)
    link = tmp_path / "whitelist.csv"
    link.symlink_to(real)
    model = wl.load(link)
    model.add_guest("web2", added_at=NOW, added_by="u", reason="r")
    wl.write(link, model)
    assert link.is_symlink() and real.read_text() == model.text()


def test_not_utf8_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "whitelist.csv"
    data = b"# header\nweb1,,t,u,caf\xe9\n"
    path.write_bytes(data)
    with pytest.raises(WhitelistError) as info:
        wl.load(path)
    message = str(info.value)
    assert str(path) in message and "not valid UTF-8" in message and "line 2" in message
    assert "\n" not in message
    with pytest.raises(WhitelistError):
        wl.read_text(path)
    assert path.read_bytes() == data


def test_unreadable_and_unwritable_targets(tmp_path: Path) -> None:
    with pytest.raises(WhitelistError, match=re.escape(f"WHITELIST '{tmp_path}' is a directory: expected a file")):
        wl.load(tmp_path)
    with pytest.raises(WhitelistError, match="not a regular file"):
        wl.write(tmp_path, wl.Whitelist())
    missing = tmp_path / "no" / "whitelist.csv"
    with pytest.raises(WhitelistError, match=re.escape(str(missing)) + ".*No such file or directory"):
        wl.write(missing, wl.parse(SAMPLE))
    assert issubclass(WhitelistError, SmtpGateError)


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_leftover_temp_files_are_recognisable_ignored_and_cleaned(tmp_path: Path) -> None:
    path = tmp_path / "whitelist.csv"
    path.write_text(SAMPLE)
    stale = tmp_path / ".whitelist.csv.tmp0badf00d"
    stale.write_text("web9,,t,u,half a")
    age(stale, files.LEFTOVER_AGE + 1)
    fresh = tmp_path / ".whitelist.csv.tmp12345678"  # maybe a live writer's: left alone
    fresh.write_text("web9,,t,u,half a")
    other = tmp_path / ".whitelist.csv.tmp-not-ours"
    other.write_text("x")
    age(other, files.LEFTOVER_AGE + 1)
    assert files.temp_name_pattern("whitelist.csv").fullmatch(stale.name)
    assert wl.load(path).text() == SAMPLE
    wl.write(path, wl.load(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh.name, other.name, "whitelist.csv"])


def run_helper(name: str, *args: str, timeout: float = 120) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(
        [sys.executable, str(HELPERS / name), *args], env=ENV, capture_output=True, text=True, timeout=timeout
    )


def test_concurrent_read_modify_writes_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    """16 processes, half through filelock and half through fcntl.flock: the same lock."""
    path = tmp_path / "whitelist.csv"
    start = SAMPLE + "keep,52:54:00:ee:ee:ee,t,u,kept\n"
    path.write_text(start)
    lock = tmp_path / "run" / "lock"
    workers, iterations = 16, 24
    procs = [
        subprocess.Popen(
            [sys.executable, str(HELPERS / "rmw_worker.py"), str(path), str(lock),
             "filelock" if w % 2 else "flock", str(w), str(iterations)],
            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for w in range(workers)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err

    model = wl.load(path)
    added = [e.mac for e in model.entries() if e.added_by.startswith("worker")]
    assert len(added) == len(set(added)), "a row was duplicated"
    expected = {f"52:54:00:ff:ff:{k:02x}" for k in range(4)}  # added by every worker, present once
    removed = {i - 2 for i in range(iterations) if i % 3 == 2}
    for w in range(workers):
        expected |= {f"52:54:00:{w:02x}:{i:02x}:01" for i in range(iterations) if i not in removed}
    assert set(added) == expected, f"lost {sorted(expected - set(added))}, revived {sorted(set(added) - expected)}"
    assert model.text().startswith(start), "an untouched line changed"
    assert [p.line for p in model.problems()] == sorted(SAMPLE_PROBLEMS)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_sigkill_during_writes_leaves_old_or_new_never_a_mix(tmp_path: Path) -> None:
    a_text, _ = big_file(8000, quoted=0.1, seed=1)
    b_text, _ = big_file(8000, quoted=0.1, seed=2)
    a_file, b_file = tmp_path / "a.csv", tmp_path / "b.csv"
    a_file.write_text(a_text)
    b_file.write_text(b_text)
    a, b = a_text.encode(), b_text.encode()
    work = tmp_path / "work"
    work.mkdir()
    path = work / "whitelist.csv"
    path.write_bytes(a)
    pattern = files.temp_name_pattern("whitelist.csv")
    start = time.perf_counter()
    wl.write(path, wl.parse(a_text))
    window = 3 * (time.perf_counter() - start) + 0.02  # a few writes' worth: kills land in all phases
    rnd = random.Random(4711)
    kills, caught_mid_write, seen, left = 30, 0, set(), set()  # type: ignore[var-annotated]
    for _ in range(kills):
        proc = subprocess.Popen(
            [sys.executable, str(HELPERS / "writer_loop.py"), str(path), str(a_file), str(b_file)],
            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n", proc.stderr.read()  # type: ignore
        time.sleep(rnd.uniform(0, window))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()  # type: ignore[union-attr]
        data = path.read_bytes()
        assert data in (a, b), f"after a kill the file is neither old nor new ({len(data)} bytes)"
        seen.add(data == a)
        others = {p.name for p in work.iterdir() if p.name != "whitelist.csv"}
        assert all(pattern.fullmatch(name) for name in others), others
        caught_mid_write += bool(others - left)
        left = others
        assert wl.load(path).text().encode() == data
    assert seen == {True, False}, "the writer never got to switch contents"
    assert caught_mid_write > 0, "no kill landed inside a write"
    for leftover in work.iterdir():
        if leftover.name != "whitelist.csv":
            age(leftover, files.LEFTOVER_AGE + 1)
    wl.write(path, wl.load(path))  # a later write removes what killed writers left
    assert [p.name for p in work.iterdir()] == ["whitelist.csv"]
    print(f"{kills} kills, {caught_mid_write} of them inside a write (a temporary file was left)")


def test_full_read_only_and_forbidden_filesystems(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare(1) is missing: no private mount namespace to mount a tmpfs in")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(
        [unshare, "--mount", "--propagation", "private", sys.executable, str(HELPERS / "fs_errors.py"), str(mnt)],
        env=ENV, capture_output=True, text=True, timeout=120,
    )
    if proc.returncode != 0 and "Operation not permitted" in proc.stderr:
        pytest.skip(f"no mount namespace here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    results = {r["check"]: r for r in map(json.loads, proc.stdout.splitlines())}
    for check, os_error in (("full", "No space left on device"), ("read-only", "Read-only file system"),
                            ("permission", "Permission denied")):
        r = results[check]
        assert r["error_class"] == "WhitelistError", r
        assert repr(r["path"]) in r["error"] and os_error in r["error"] and "\n" not in r["error"], r
        assert r["unchanged"], r
        assert not [f for f in r["files"] if f.startswith(".")], r  # the temporary file is gone
    assert results["full"]["path"] == str(mnt / "whitelist.csv")
    assert list(mnt.iterdir()) == []  # the tmpfs never existed outside the namespace
    assert not Path("/tmp/smtp-gate").exists()


def test_lines_read_without_csv_are_read_exactly_as_csv_reads_them() -> None:
    """whitelist._plain_fields() stands in for csv on most lines: on 20 000 random lines of
    commas, spaces, quotes, CR, LF, NUL and text, wherever it answers, csv (strict, the
    parser's own settings) reads the same fields; and it declines every line with a quote."""
    import csv

    rng = random.Random(4711)
    alphabet = [",", ",", " ", '"', "\r", "\n", "\0", "a", "b", "é", "#", "\t", "5", ":"]
    answered = 0
    for _ in range(20000):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        line += rng.choice(["", "\n", "\r\n", "\r"])
        if not line.strip() or line.strip()[0] == "#":
            continue  # blank and comment lines never reach csv (whitelist._records)
        fields = wl._plain_fields(line)
        if fields is None:
            continue
        answered += 1
        assert '"' not in line
        assert list(csv.reader([line], strict=True)) == [fields], repr(line)
    assert answered > 2000  # the comparison really ran on many lines
