"""The configuration file: `KEY="value"` lines, compatible with the original tool's.

parse() is pure (text in, Config out) so every bad line can be unit-tested; load()
adds the one side effect, reading the file.  Every error names the file, the line,
the key and what was expected.
"""

import os
import re
from typing import Callable, Dict, NamedTuple, Optional, Pattern, Tuple

from smtp_gate import validate
from smtp_gate.errors import ConfigError, ValidationError

ENV_CONFIG = "SMTP_GATE_CONFIG"
# The application directory is a git checkout (install.sh); its config/ holds the live files.
# Paths are plain strings, not pathlib: the libvirt hook loads this module on every guest
# start, and pathlib (with urllib.parse and ipaddress) would cost it about 4 ms.
APP_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
DEFAULT_CONFIG_PATH = os.path.join(APP_DIR, "config", "smtp-gate.conf")

MODES = ("enforce", "audit")
NON_IP_POLICIES = ("drop", "accept")
STORE_FILE, STORE_METADATA = "file", "metadata"
ALLOW_STORES = (STORE_FILE, STORE_METADATA)  # where add-vm, del-vm and the picker write an allowance
DRIVERS = {"qemu": "qemu:///system", "lxc": "lxc:///system", "libxl": "xen:///system"}
DRIVER_ALIASES = {"kvm": "qemu", "qemu": "qemu", "lxc": "lxc", "xen": "libxl", "libxl": "libxl"}
_RATE = re.compile(r"([1-9]\d{0,8})/(second|minute|hour|day)")


class Config(NamedTuple):
    """The effective configuration.  A NamedTuple, not a dataclass: the libvirt hook loads
    it on every guest start, and importing dataclasses alone costs it about 10 ms."""

    path: str
    bridges: Tuple[str, ...] = ("br0",)
    blocked_ports: Tuple[validate.PortRange, ...] = ((25, 25), (465, 465))
    log_drops: bool = True
    log_rate: str = "5/second"
    log_burst: int = 50
    uplink_regex: Optional[Pattern] = None
    uplinks: Tuple[str, ...] = ()
    hypervisor: Tuple[str, ...] = ()  # libvirt drivers; empty: every driver whose daemon answers
    libvirt_uris: Tuple[str, ...] = ()  # explicit URIs; override HYPERVISOR
    whitelist: str = "whitelist.csv"
    mode: str = "enforce"
    guest_patterns: Tuple[str, ...] = ("vnet*", "tap*", "veth*", "vif*")
    non_ip: str = "drop"
    run_dir: str = "/run/smtp-gate"
    allowed_destinations: Tuple[validate.Relay, ...] = ()  # relays every guest may reach on blocked ports
    libvirt_timeout: float = 20.0  # seconds one libvirt URI may take to answer (open, list, every XMLDesc)
    allow_store: str = STORE_FILE  # ALLOW_STORE: the whitelist file, or the guest's libvirt metadata
    # -- the abuse desk (issue 12): attributed events, `report`, ON_BLOCKED ------------------
    log_group: Optional[int] = 2525  # NFLOG group of blocked attempts; None: off
    log_group_rate: str = "50/second"  # events per guest port (the kernel's meter, by iif)
    log_group_burst: int = 100
    event_interval: float = 10.0  # s: under a flood, one journal entry per guest per interval
    state_dir: str = "/var/lib/smtp-gate"  # the report's store (blocked/YYYY-MM-DD.jsonl)
    report_days: int = 7  # days of the store kept
    report_max_mb: int = 64  # MiB the store may hold in all
    on_blocked: Tuple[str, ...] = ()  # argv (shlex), JSON on stdin; empty: off
    on_blocked_threshold: int = 100  # attempts (logged events) ...
    on_blocked_window: float = 600.0  # ... within this many seconds
    on_blocked_timeout: float = 30.0  # s before a hung ON_BLOCKED command is killed
    # node_exporter's textfile directory for smtp_gate.prom (metrics.py); "" turns metrics off
    metrics_dir: str = "/var/lib/prometheus/node-exporter"
    metrics_max_guests: int = 200  # guests with series of their own; the rest are summed (metrics.py)
    # where each value came from, for `smtp-gate debug`: "default" or "FILE:LINE"
    sources: Dict[str, str] = {}  # never mutated: parse() passes a fresh dict

    @property
    def lock_path(self) -> str:
        return os.path.join(self.run_dir, "lock")

    @property
    def disabled_path(self) -> str:
        """The operator's off-switch (offswitch.py): beside the config, so it survives reboots."""
        return os.path.join(os.path.dirname(self.path), "disabled")

    @property
    def audit(self) -> bool:
        return self.mode == "audit"

    def uris(self) -> Tuple[str, ...]:
        """The libvirt URIs to read guests from, in a stable order."""
        if self.libvirt_uris:
            return self.libvirt_uris
        drivers = self.hypervisor or tuple(DRIVERS)
        return tuple(DRIVERS[d] for d in drivers)

    def hook_uri(self, driver: str) -> Optional[str]:
        """The URI a hook of DRIVER (qemu, lxc, libxl) files its guests' records under, so a
        rebuild knows which listing vouches for them: the first configured URI of that
        driver, else the driver's system URI.  None when HYPERVISOR leaves the driver out:
        rebuilds never ask it, so an allowance its hook granted would be dropped at the next
        rebuild and granted again at the next start (a flap); such guests stay blocked.
        LIBVIRT_URI naming none of the driver's URIs may still reach its guests another way
        (a proxy, a test URI): the hook grants, and a rebuild keeps it only while listed."""
        for uri in self.uris():
            if uri_driver(uri) == driver:
                return uri
        return DRIVERS.get(driver) if self.libvirt_uris else None


def uri_driver(uri: str) -> Optional[str]:
    """The hook driver a libvirt URI's guests belong to (qemu+unix://... -> qemu, xen -> libxl);
    None for other drivers (test, remote, ...)."""
    scheme = uri.partition(":")[0].partition("+")[0].lower()
    return DRIVER_ALIASES.get(scheme) if scheme != "kvm" else None


def _split(value: str) -> Tuple[str, ...]:
    return tuple(item for item in re.split(r"[,\s]+", value.strip()) if item)


def _names(value: str) -> Tuple[str, ...]:
    return tuple(validate.ifname(item) for item in _split(value))


def _bridges(value: str) -> Tuple[str, ...]:
    names = _names(value)
    if not names:
        raise ValidationError("expected one or more bridge names, e.g. \"br0\" or \"br0,br1\"")
    return names


def _ports(value: str) -> Tuple[validate.PortRange, ...]:
    return tuple(validate.port_list(value))


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ValidationError(f"bad value {value!r}: expected 1 or 0")


def _rate(value: str) -> str:
    if not _RATE.fullmatch(value.strip()):
        raise ValidationError(f"bad rate {value!r}: expected N/second, N/minute, N/hour or N/day")
    return value.strip()


def _burst(value: str) -> int:
    if not re.fullmatch(r"[1-9]\d{0,8}", value.strip()):
        raise ValidationError(f"bad burst {value!r}: expected a whole number of packets, 1 or more")
    return int(value)


def _regex(value: str) -> Optional[Pattern]:
    if not value.strip():
        return None
    try:
        return re.compile(value.strip())
    except re.error as exc:
        raise ValidationError(f"bad regular expression {value!r}: {exc}") from None


def _choice(choices: Tuple[str, ...]) -> Callable[[str], str]:
    def parse(value: str) -> str:
        lowered = value.strip().lower()
        if lowered not in choices:
            raise ValidationError(f"bad value {value!r}: expected one of {', '.join(choices)}")
        return lowered

    return parse


def _hypervisor(value: str) -> Tuple[str, ...]:
    drivers = []
    for item in _split(value.lower()):
        if item not in DRIVER_ALIASES:
            raise ValidationError(
                f"bad hypervisor {item!r}: expected kvm/qemu, lxc or xen/libxl (or empty to detect)"
            )
        drivers.append(DRIVER_ALIASES[item])
    return tuple(dict.fromkeys(drivers))


def _uris(value: str) -> Tuple[str, ...]:
    uris = _split(value)
    for uri in uris:
        if not re.fullmatch(r"[a-z][a-z0-9+]*://[^\s]*", uri):
            raise ValidationError(f"bad libvirt URI {uri!r}: expected e.g. qemu:///system")
    return uris


def _patterns(value: str) -> Tuple[str, ...]:
    return tuple(validate.ifname_pattern(item) for item in _split(value))


def _destinations(value: str) -> Tuple[validate.Relay, ...]:
    return validate.relay_list(value)


def _seconds(value: str) -> float:
    try:
        seconds = float(value.strip())
    except ValueError:
        seconds = 0.0
    if not 0.5 <= seconds <= 3600:
        raise ValidationError(f"bad timeout {value!r}: expected seconds between 0.5 and 3600, e.g. 20")
    return seconds


def _path(value: str) -> str:
    if not value.strip():
        raise ValidationError("expected a file path")
    return value.strip()


def _group(value: str) -> Optional[int]:
    text = value.strip().lower()
    if text in ("", "off", "none"):
        return None
    if not re.fullmatch(r"\d{1,5}", text) or int(text) > 65535:
        raise ValidationError(f"bad NFLOG group {value!r}: expected a number 0-65535, or off")
    return int(text)


def _whole(low: int, high: int, what: str) -> Callable[[str], int]:
    def parse(value: str) -> int:
        text = value.strip()
        if not re.fullmatch(r"\d{1,9}", text) or not low <= int(text) <= high:
            raise ValidationError(f"bad {what} {value!r}: expected a whole number {low}-{high}")
        return int(text)

    return parse


def _interval(low: float, high: float, what: str) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            seconds = float(value.strip())
        except ValueError:
            seconds = -1.0
        if not low <= seconds <= high:
            raise ValidationError(f"bad {what} {value!r}: expected seconds between {low:g} and {high:g}")
        return seconds

    return parse


def _command(value: str) -> Tuple[str, ...]:
    """A command line split as a shell would split words (shlex), never run by a shell."""
    import shlex

    try:
        argv = tuple(shlex.split(value))
    except ValueError as exc:
        raise ValidationError(f"bad command {value!r}: {exc}") from None
    if argv and not os.path.isabs(argv[0]):
        raise ValidationError(f"bad command {value!r}: expected an absolute path first, e.g. /usr/local/bin/notify-abuse")
    return argv


def _metrics_dir(value: str) -> str:
    value = value.strip()
    if value and not os.path.isabs(value):
        raise ValidationError(
            f'bad directory {value!r}: expected an absolute path (node_exporter\'s --collector.textfile.directory), or "" for no metrics'
        )
    return value


def _max_guests(value: str) -> int:
    if not re.fullmatch(r"[1-9]\d{0,4}", value.strip()):
        raise ValidationError(f"bad number {value!r}: expected a whole number of guests from 1 to 99999, e.g. 200")
    return int(value)


# key -> (Config field, parser)
KEYS: Dict[str, Tuple[str, Callable[[str], object]]] = {
    "BRIDGE": ("bridges", _bridges),
    "BLOCKED_PORTS": ("blocked_ports", _ports),
    "LOG_DROPS": ("log_drops", _bool),
    "LOG_RATE": ("log_rate", _rate),
    "LOG_BURST": ("log_burst", _burst),
    "UPLINK_REGEX": ("uplink_regex", _regex),
    "UPLINKS": ("uplinks", _names),
    "HYPERVISOR": ("hypervisor", _hypervisor),
    "LIBVIRT_URI": ("libvirt_uris", _uris),
    "WHITELIST": ("whitelist", _path),
    "MODE": ("mode", _choice(MODES)),
    "GUEST_PATTERNS": ("guest_patterns", _patterns),
    "NON_IP": ("non_ip", _choice(NON_IP_POLICIES)),
    "RUN_DIR": ("run_dir", _path),
    "ALLOWED_DESTINATIONS": ("allowed_destinations", _destinations),
    "LIBVIRT_TIMEOUT": ("libvirt_timeout", _seconds),
    "ALLOW_STORE": ("allow_store", _choice(ALLOW_STORES)),
    # the abuse desk (issue 12)
    "LOG_GROUP": ("log_group", _group),
    "LOG_GROUP_RATE": ("log_group_rate", _rate),
    "LOG_GROUP_BURST": ("log_group_burst", _burst),
    "EVENT_INTERVAL": ("event_interval", _interval(0.1, 3600, "interval")),
    "STATE_DIR": ("state_dir", _path),
    "REPORT_DAYS": ("report_days", _whole(1, 366, "number of days")),
    "REPORT_MAX_MB": ("report_max_mb", _whole(1, 100000, "size in MiB")),
    "ON_BLOCKED": ("on_blocked", _command),
    "ON_BLOCKED_THRESHOLD": ("on_blocked_threshold", _whole(1, 10**9, "threshold")),
    "ON_BLOCKED_WINDOW": ("on_blocked_window", _interval(1, 86400 * 7, "window")),
    "ON_BLOCKED_TIMEOUT": ("on_blocked_timeout", _interval(0.5, 3600, "timeout")),
    "METRICS_DIR": ("metrics_dir", _metrics_dir),
    "METRICS_MAX_GUESTS": ("metrics_max_guests", _max_guests),
}

_LINE = re.compile(
    r"""(?:export\s+)?(?P<key>[A-Za-z_][A-Za-z0-9_]*)=
        (?:"(?P<dq>[^"\\$`]*)"|'(?P<sq>[^']*)'|(?P<bare>[^\s"'\\$`#;]*))
        \s*(?:\#.*)?""",
    re.VERBOSE,
)


def _refuse_guest_uplinks(values: Dict[str, object], seen: Dict[str, int], path: str) -> None:
    """An uplink whose name says "guest port" is a contradiction that would exempt a guest's
    traffic as inbound if a guest's port ever carried the name: refused, not guessed."""
    uplinks = values.get("uplinks", ())
    patterns = values.get("guest_patterns", Config._field_defaults["guest_patterns"])
    for name in uplinks:  # type: ignore[attr-defined]
        for pattern in patterns:  # type: ignore[attr-defined]
            if validate.pattern_matches(pattern, name):
                where = f"{path}:{seen['UPLINKS']}"
                raise ConfigError(
                    f"{where}: UPLINKS: {name!r} matches the guest port pattern {pattern!r} (GUEST_PATTERNS): "
                    "an uplink must not be named like a guest's port; rename the device, or remove the "
                    "pattern from GUEST_PATTERNS if no guest port is ever named like that"
                )


def parse(text: str, path: "os.PathLike[str] | str") -> Config:
    """Parse the text of a config file.  PATH is used for messages and relative paths."""
    path = os.fspath(path)
    values: Dict[str, object] = {}
    sources: Dict[str, str] = {}
    seen: Dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        m = _LINE.fullmatch(line)
        if not m:
            raise ConfigError(f"{where}: cannot read {raw.strip()!r}: expected KEY=\"value\"")
        key = m.group("key")
        value = next(v for v in (m.group("dq"), m.group("sq"), m.group("bare")) if v is not None)
        if key not in KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}: expected one of {', '.join(KEYS)}")
        if key in seen:
            raise ConfigError(f"{where}: {key} is set again (first on line {seen[key]}): set it once")
        seen[key] = number
        attr, parser = KEYS[key]
        try:
            values[attr] = parser(value)
        except ValidationError as exc:
            raise ConfigError(f"{where}: {key}: {exc}") from None
        sources[attr] = where
    _refuse_guest_uplinks(values, seen, path)
    whitelist = str(values.get("whitelist", "whitelist.csv"))
    values["whitelist"] = whitelist if os.path.isabs(whitelist) else os.path.join(os.path.dirname(path), whitelist)
    for attr, _parser in KEYS.values():
        sources.setdefault(attr, "default")
    sources["whitelist"] = sources["whitelist"] if "WHITELIST" in seen else "default (beside the config file)"
    return Config(path=path, sources=sources, **values)  # type: ignore[arg-type]


def resolve_path(cli_path: Optional[str], environ: Optional[Dict[str, str]] = None) -> Tuple[str, str]:
    """Where the config comes from: --config, else $SMTP_GATE_CONFIG, else the installed default."""
    env = os.environ if environ is None else environ
    if cli_path:
        return cli_path, "--config"
    if env.get(ENV_CONFIG):
        return env[ENV_CONFIG], ENV_CONFIG
    return DEFAULT_CONFIG_PATH, "default"


def load(cli_path: Optional[str] = None, environ: Optional[Dict[str, str]] = None) -> Config:
    """Read the configuration.  An installed default that does not exist yet means all defaults;
    a path the operator named must exist."""
    path, origin = resolve_path(cli_path, environ)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        if origin != "default":
            raise ConfigError(f"config file {str(path)!r} (from {origin}) does not exist") from None
        text = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from None
    return parse(text, path)


def with_value(text: str, path: str, key: str, value: str) -> Tuple[str, int]:
    """TEXT with KEY set to VALUE, every other line and comment kept; and the line it is on.

    The key's line is replaced in place (appended when absent), and the result must
    parse as a whole: a config is never written that smtp-gate itself would refuse.
    """
    if key not in KEYS:
        raise ConfigError(f"unknown key {key!r}: expected one of {', '.join(KEYS)}")
    if '"' in value or "\n" in value or "\\" in value or "$" in value or "`" in value:
        raise ConfigError(f"bad value {value!r} for {key}: it cannot be written between double quotes")
    lines = text.splitlines(keepends=True)
    new_line = f'{key}="{value}"\n'
    number = 0
    for i, raw in enumerate(lines):
        m = _LINE.fullmatch(raw.strip())
        if m and m.group("key") == key:
            lines[i] = new_line
            number = i + 1
            break
    else:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.append(new_line)
        number = len(lines)
    result = "".join(lines)
    parse(result, path)
    return result, number
