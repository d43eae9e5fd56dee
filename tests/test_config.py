"""Config parsing: every key, every bad value named with file, line and key."""

import os
from pathlib import Path

import pytest

from smtp_gate import config, validate
from smtp_gate.cli import main
from smtp_gate.errors import ConfigError

PATH = Path("/etc/smtp-gate/smtp-gate.conf")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(text: str) -> config.Config:
    return config.parse(text, PATH)


def test_empty_file_gives_the_documented_defaults() -> None:
    c = parse("")
    assert c.bridges == ("br0",)
    assert c.blocked_ports == ((25, 25), (465, 465))
    assert c.log_drops and c.log_rate == "5/second" and c.log_burst == 50
    assert c.uplink_regex is None and c.uplinks == ()
    assert c.mode == "enforce" and c.non_ip == "drop"
    assert c.guest_patterns == ("vnet*", "tap*", "veth*", "vif*")
    assert c.whitelist == str(PATH.parent / "whitelist.csv")
    assert c.uris() == ("qemu:///system", "lxc:///system", "xen:///system")
    assert all(source.startswith("default") for source in c.sources.values())


def test_the_original_tools_file_is_read_unchanged() -> None:
    original = """# smtp-gate configuration
BRIDGE="br0"
BLOCKED_PORTS="25,465"
LOG_DROPS="1"
LOG_RATE="5/second"
LOG_BURST="50"
UPLINK_REGEX="^(ens|eno|enp|eth|bond)"
HYPERVISOR=""
"""
    c = parse(original)
    assert c.uplink_regex is not None and c.uplink_regex.search("enp3s0")
    assert c.hypervisor == ()
    assert c.sources["bridges"] == f"{PATH}:2"


def test_every_key_and_its_forms() -> None:
    c = parse(
        "BRIDGE='br0, br1 vmbr0'\n"
        "BLOCKED_PORTS=25,465,2525-2530\n"
        'LOG_DROPS="no"\n'
        'LOG_RATE="10/minute"  # a trailing comment\n'
        "LOG_BURST=5\n"
        'UPLINKS="eno1 bond0.100"\n'
        'HYPERVISOR="kvm,lxc"\n'
        'LIBVIRT_URI="test:///tmp/node.xml"\n'
        'WHITELIST="/var/lib/smtp-gate/allow.csv"\n'
        'MODE="Audit"\n'
        'GUEST_PATTERNS="vnet* ct*"\n'
        'NON_IP="accept"\n'
        'export RUN_DIR="/tmp/run-sg"\n'
    )
    assert c.bridges == ("br0", "br1", "vmbr0")
    assert c.blocked_ports == ((25, 25), (465, 465), (2525, 2530))
    assert not c.log_drops and c.log_rate == "10/minute" and c.log_burst == 5
    assert c.uplinks == ("eno1", "bond0.100")
    assert c.hypervisor == ("qemu", "lxc")
    assert c.uris() == ("test:///tmp/node.xml",)
    assert c.whitelist == "/var/lib/smtp-gate/allow.csv"
    assert c.audit and c.non_ip == "accept" and c.guest_patterns == ("vnet*", "ct*")
    assert c.run_dir == "/tmp/run-sg" and c.lock_path == "/tmp/run-sg/lock"
    assert parse('HYPERVISOR="xen"\n').uris() == ("xen:///system",)


@pytest.mark.parametrize(
    "line, expected",
    [
        ('BRIDGE=""', "expected one or more bridge names"),
        ('BRIDGE="br0 br;0"', "bad interface name 'br;0'"),
        ('BRIDGE="averyveryverylongname"', "1-15 characters"),
        ('BRIDGE="12"', "all-digit name"),
        ('BLOCKED_PORTS="25,abc"', "bad port 'abc'"),
        ('BLOCKED_PORTS="0"', "expected 1-65535"),
        ('BLOCKED_PORTS="70000"', "expected 1-65535"),
        ('BLOCKED_PORTS="25,25"', "duplicate port 25"),
        ('BLOCKED_PORTS="20-30,25"', "duplicate port 25"),
        ('BLOCKED_PORTS="30-20"', "first port exceeds the last"),
        ('BLOCKED_PORTS=""', "expected ports 1-65535"),
        ('LOG_DROPS="maybe"', "expected 1 or 0"),
        ('LOG_RATE="5/fortnight"', "expected N/second"),
        ('LOG_RATE="-1/second"', "expected N/second"),
        ('LOG_BURST="0"', "whole number of packets"),
        ('LOG_BURST="ten"', "whole number of packets"),
        ('UPLINK_REGEX="^(eth"', "bad regular expression"),
        ('UPLINKS="eth0 eth\\"1"', "cannot read"),
        ('HYPERVISOR="vmware"', "expected kvm/qemu, lxc or xen/libxl"),
        ('LIBVIRT_URI="not a uri"', "bad libvirt URI"),
        ('MODE="permissive"', "expected one of enforce, audit"),
        ('GUEST_PATTERNS="vn*et"', "bad interface name 'vn*et'"),
        ('GUEST_PATTERNS="*"', "bad interface pattern '*'"),
        ('NON_IP="maybe"', "expected one of drop, accept"),
        ('WHITELIST=""', "expected a file path"),
        ('BRIDGE="br0" extra', "cannot read"),
        ('BRIDGE=$(reboot)', "cannot read"),
        ("just some words", "cannot read"),
        ('BRIGDE="br0"', "unknown key 'BRIGDE'"),
    ],
)
def test_every_bad_value_names_file_line_key_and_what_is_expected(line: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(f"# header\n\n{line}\n")
    message = str(info.value)
    assert message.startswith(f"{PATH}:3: ")
    assert expected in message
    key = line.split("=")[0]
    if "=" in line and key.isupper() and "unknown" not in expected and "cannot read" not in expected:
        assert f": {key}: " in message


def test_a_key_set_twice_is_an_error_naming_both_lines() -> None:
    with pytest.raises(ConfigError, match=r":3: BRIDGE is set again \(first on line 1\)"):
        parse('BRIDGE="br0"\n\nBRIDGE="br1"\n')


def test_config_path_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.resolve_path("/a.conf", {config.ENV_CONFIG: "/b.conf"}) == ("/a.conf", "--config")
    assert config.resolve_path(None, {config.ENV_CONFIG: "/b.conf"}) == ("/b.conf", config.ENV_CONFIG)
    assert config.resolve_path(None, {}) == (config.DEFAULT_CONFIG_PATH, "default")
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(str(tmp_path / "missing.conf"), {})
    assert config.DEFAULT_CONFIG_PATH == os.path.join(REPO, "config", "smtp-gate.conf")
    # The default file itself is not read here: in a checkout that is also the installed app
    # dir (/usr/local/smtp-gate) it is the host's live config.  A stand-in at another path:
    default = tmp_path / "app" / "config" / "smtp-gate.conf"
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", str(default))
    assert config.load(None, {}) == config.parse("", str(default)), "an absent default means all defaults"
    default.parent.mkdir(parents=True)
    default.write_text('BLOCKED_PORTS="2525"\n')
    assert config.load(None, {}).blocked_ports == ((2525, 2525),)


def test_cli_reports_a_bad_config_in_one_line_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "smtp-gate.conf"
    path.write_text('BLOCKED_PORTS="25,x"\n')
    assert main(["--config", str(path), "status"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"smtp-gate: error: {path}:1: BLOCKED_PORTS: bad port 'x' in '25,x': expected a number 1-65535 or a range like 2525-2530"
    assert main(["--config", str(path), "--debug", "status"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_cli_usage_errors_exit_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["no-such-command"]) == 2
    assert main([]) == 2
    assert main(["--help"]) == 0
    assert "exit codes" in capsys.readouterr().out


def test_every_command_has_help_with_an_example(capsys: pytest.CaptureFixture) -> None:
    from smtp_gate.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:  # type: ignore[union-attr]
        assert main([name, "--help"]) == 0
        assert "example:" in capsys.readouterr().out, name


def test_port_lists_round_trip() -> None:
    ranges = validate.port_list(" 465, 25 2525-2530 ")
    assert validate.format_ports(ranges) == "25,465,2525-2530"


def test_allowed_destinations_are_parsed_into_normal_form_and_bad_ones_named() -> None:
    c = config.parse('ALLOWED_DESTINATIONS="192.0.2.25:25, [2001:db8::/64]:587 198.51.100.0/28"\n', Path("/c.conf"))
    assert c.allowed_destinations == (
        (4, "192.0.2.25", (25, 25)), (6, "2001:db8::/64", (587, 587)), (4, "198.51.100.0/28", (1, 65535)),
    )
    for bad in ("192.0.2.7/24", "mail.example.com", "192.0.2.1:0", "[2001:db8::1", "0.0.0.0/0", "::/0",
                "10.0.0.0/8:25", "2001:db8::/48", "192.0.2.0/24 192.0.2.25:25", "192.0.2.25:25 192.0.2.25",
                "[2001:db8::/64]:25 2001:db8::25", "192.0.2.25:25 192.0.2.25:25"):
        with pytest.raises(ConfigError) as info:
            config.parse(f'ALLOWED_DESTINATIONS="{bad}"\n', Path("/c.conf"))
        assert "/c.conf:1: ALLOWED_DESTINATIONS:" in str(info.value) and repr(bad.split()[-1]) in str(info.value)
    ok = config.parse('ALLOWED_DESTINATIONS="192.0.2.25:25 192.0.2.25:465 192.0.2.26"\n', Path("/c.conf"))
    assert len(ok.allowed_destinations) == 3, "the same address on other ports does not overlap"


def test_an_uplink_named_like_a_guest_port_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        config.parse('BRIDGE="br0"\nUPLINKS="eno1 vethup0"\n', Path("/c.conf"))
    assert "/c.conf:2: UPLINKS: 'vethup0' matches the guest port pattern 'veth*'" in str(info.value)
    assert config.parse('UPLINKS="vethup0"\nGUEST_PATTERNS="vnet* tap*"\n', Path("/c.conf")).uplinks == ("vethup0",)
