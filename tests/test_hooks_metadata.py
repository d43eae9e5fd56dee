"""The fleet allowance (issue 11) in the hooks: the real hook process, the recorded domain XML of
a libvirt 9.0 guest with `<metadata><x:allow xmlns:x="urn:smtp-gate:1" .../></metadata>` on
stdin, an empty whitelist file, real frames through the lab's bridge after each call."""

from pathlib import Path

import pytest

from tests.netlab import BridgeLab

pytestmark = pytest.mark.kernel

TWO_NICS = Path(__file__).parent / "data" / "libvirt-samples" / "2nic-virsh-destroy"
UUID2 = "56ba75c7-fc96-46bd-a78e-ccf8d5907094"
MAC_AUTO, MAC_FIXED = "52:54:00:fa:2f:a5", "52:54:00:aa:00:02"  # on vnet1 and lab2n1
HEADER = "# vmname,mac,added_at,added_by,reason\n"
NS = "urn:smtp-gate:1"


def sample(name: str, allow: str = "") -> bytes:
    """The recorded XML of hook call NAME, with ALLOW in its <metadata> (as libvirt writes it:
    after <uuid>, before <memory>)."""
    xml = (TWO_NICS / f"{name}.xml").read_bytes()
    if not allow:
        return xml
    return xml.replace(b"  <memory ", f"  <metadata>\n    {allow}\n  </metadata>\n  <memory ".encode(), 1)


def allowed(lab: BridgeLab) -> str:
    return lab.nft("list", "set", "bridge", "smtp_gate", "allowed").stdout


def quiet(result) -> bool:  # type: ignore[no-untyped-def]
    """libvirt's rules for a hook: exit 0 and nothing on stdout, ever."""
    return (result.returncode, result.stdout) == (0, b"") and b"failed" not in result.stderr


@pytest.fixture
def lab2(bare_lab: BridgeLab) -> BridgeLab:
    bare_lab.add_guest("lab2a", "vnet1", 10, mac=MAC_AUTO)
    bare_lab.add_guest("lab2b", "lab2n1", 11, mac=MAC_FIXED)
    (bare_lab.tmp / "whitelist.csv").write_text(HEADER)  # the file allows nobody: only the metadata can
    return bare_lab


def test_allowed_by_metadata_alone_from_start_until_stop(lab2: BridgeLab) -> None:
    lab, auto, fixed = lab2, lab2.guests["lab2a"], lab2.guests["lab2b"]
    allow = f'<sg:allow xmlns:sg="{NS}" by="panel" at="2026-12-01T10:00:00+00:00" reason="KYC 123"/>'
    assert quiet(lab.run_hook("prepare", "begin", sample("01-lab2-prepare-begin", allow), name="lab2"))
    assert not lab.tcp_connects(auto, lab.INET4, 25, timeout=0.5), "blocked before start"
    assert quiet(lab.run_hook("start", "begin", sample("02-lab2-start-begin", allow), name="lab2"))
    # the first connection after `start begin`: before the guest's vCPUs could ever run
    assert lab.tcp_connects(auto, lab.INET4, 25) and lab.tcp_connects(fixed, lab.INET6, 465)
    assert MAC_AUTO in allowed(lab) and MAC_FIXED in allowed(lab)
    assert quiet(lab.run_hook("started", "begin", sample("03-lab2-started-begin", allow), name="lab2"))
    r = lab.run_hook("stopped", "end", sample("04-lab2-stopped-end", allow), name="lab2")
    assert quiet(r) and b"allowance removed" in r.stderr
    assert MAC_AUTO not in allowed(lab) and MAC_FIXED not in allowed(lab)
    assert not lab.tcp_connects(fixed, lab.INET4, 25, timeout=0.5)
    assert not (lab.tmp / "run" / "records" / f"{UUID2}.json").exists()
    assert quiet(lab.run_hook("release", "end", sample("05-lab2-release-end", allow), name="lab2"))


@pytest.mark.parametrize("prefix", ["sg", "smtpgate", None])
def test_nic_children_limit_it_to_one_of_two_nics(lab2: BridgeLab, prefix: "str | None") -> None:
    """<nic> children as libvirt writes them (in our namespace, any prefix) or unqualified."""
    lab = lab2
    tag = f"{prefix}:" if prefix else ""
    xmlns = f'xmlns:{prefix}="{NS}"' if prefix else f'xmlns="{NS}"'
    allow = f'<{tag}allow {xmlns} by="panel"><{tag}nic mac="{MAC_FIXED.upper()}"/></{tag}allow>'
    assert quiet(lab.run_hook("start", "begin", sample("02-lab2-start-begin", allow), name="lab2"))
    assert lab.tcp_connects(lab.guests["lab2b"], lab.INET4, 25)
    assert not lab.tcp_connects(lab.guests["lab2a"], lab.INET4, 25, timeout=0.5), "the NIC the metadata does not name"
    assert MAC_FIXED in allowed(lab) and MAC_AUTO not in allowed(lab)


@pytest.mark.parametrize(
    "children, allows_fixed",
    [
        ('<sg:nic mac="not-a-mac"/>', False),  # the only <nic> is bad: nothing, never "every NIC"
        ('<sg:nic mac="ff:ff:ff:ff:ff:ff"/>', False),
        ("<sg:nic/>", False),
        (f'<sg:nic mac="52:54:00:aa:00:0"/><sg:nic mac="{MAC_FIXED}"/>', True),  # a bad one beside a good one
    ],
)
def test_a_bad_nic_mac_never_widens_the_allowance(lab2: BridgeLab, children: str, allows_fixed: bool) -> None:
    lab = lab2
    allow = f'<sg:allow xmlns:sg="{NS}" by="panel">{children}</sg:allow>'
    assert quiet(lab.run_hook("start", "begin", sample("02-lab2-start-begin", allow), name="lab2"))
    assert not lab.tcp_connects(lab.guests["lab2a"], lab.INET4, 25, timeout=0.5)
    assert lab.tcp_connects(lab.guests["lab2b"], lab.INET4, 25, timeout=0.5 if not allows_fixed else 1.0) is allows_fixed
    assert MAC_AUTO not in allowed(lab)


def test_another_namespace_allows_nothing(lab2: BridgeLab) -> None:
    lab = lab2
    allow = '<sg:allow xmlns:sg="urn:smtp-gate:2" by="panel"/>'
    assert quiet(lab.run_hook("start", "begin", sample("02-lab2-start-begin", allow), name="lab2"))
    assert not lab.tcp_connects(lab.guests["lab2b"], lab.INET4, 25, timeout=0.5)


def test_a_guest_migrated_in_is_allowed_from_its_first_frame(lab2: BridgeLab) -> None:
    """The hook calls a migration destination sees (qemu, libvirt 9.0): `migrate begin` (stdout
    would replace the incoming XML: nothing, and no state touched), `prepare begin`, `start
    begin` (the taps exist, the guest is paused), `started begin` (still paused)."""
    lab, auto, fixed = lab2, lab2.guests["lab2a"], lab2.guests["lab2b"]
    allow = f'<sg:allow xmlns:sg="{NS}" by="panel" reason="KYC 123"><sg:nic mac="{MAC_AUTO}"/></sg:allow>'
    incoming = sample("02-lab2-start-begin", allow).replace(b"<domain type='qemu' id='2'>", b"<domain type='qemu'>")
    r = lab.run_hook("migrate", "begin", incoming, name="lab2")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    assert "smtp_gate" not in lab.nft("list", "tables").stdout, "migrate begin changes nothing"
    assert not (lab.tmp / "run" / "records").exists() or not list((lab.tmp / "run" / "records").iterdir())
    assert quiet(lab.run_hook("prepare", "begin", sample("01-lab2-prepare-begin", allow), name="lab2"))
    assert not lab.tcp_connects(auto, lab.INET4, 25, timeout=0.5), "blocked until start begin"
    assert quiet(lab.run_hook("start", "begin", sample("02-lab2-start-begin", allow), name="lab2"))
    assert lab.tcp_connects(auto, lab.INET4, 25), "allowed from its first frame on the destination"
    assert not lab.tcp_connects(fixed, lab.INET4, 25, timeout=0.5)
    assert quiet(lab.run_hook("started", "begin", sample("03-lab2-started-begin", allow), name="lab2"))
    assert lab.tcp_connects(auto, lab.INET6, 25)
    # a guest migrated in without an allowance stays blocked
    r = lab.run_hook("stopped", "end", sample("04-lab2-stopped-end", allow), name="lab2")
    assert quiet(r) and MAC_AUTO not in allowed(lab)
    assert quiet(lab.run_hook("migrate", "begin", sample("02-lab2-start-begin"), name="lab2"))
    assert quiet(lab.run_hook("start", "begin", sample("02-lab2-start-begin"), name="lab2"))
    assert not lab.tcp_connects(auto, lab.INET4, 25, timeout=0.5)


def test_libxl_allows_by_metadata_at_started(lab2: BridgeLab) -> None:
    lab = lab2
    allow = f'<sg:allow xmlns:sg="{NS}" by="panel"/>'
    xen = sample("02-lab2-start-begin", allow).replace(b"type='qemu'", b"type='xen'")
    assert quiet(lab.run_hook("start", "begin", xen, driver="libxl", name="lab2"))
    assert MAC_FIXED not in allowed(lab) and not lab.tcp_connects(lab.guests["lab2b"], lab.INET4, 25, timeout=0.5)
    assert quiet(lab.run_hook("started", "begin", xen, driver="libxl", name="lab2"))
    assert lab.tcp_connects(lab.guests["lab2b"], lab.INET4, 25) and lab.tcp_connects(lab.guests["lab2a"], lab.INET4, 25)
    assert quiet(lab.run_hook("stopped", "end", xen, driver="libxl", name="lab2"))
    assert MAC_FIXED not in allowed(lab)
