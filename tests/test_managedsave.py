"""A managed-saved guest resumes from the definition saved in its image, not from its saved
definition (attacker review of issue 11): with ALLOW_STORE="metadata", del-vm and add-vm
must change the image's definition too, or the revocation (the allowance) does not hold
when `virsh start` resumes it.  Real libvirtd and QEMU (tests/libvirt_lab.py), real frames
from the guest's own probe rounds."""

from pathlib import Path

import pytest

from smtp_gate import domain
from tests import libvirt_lab
from tests.test_watch_libvirt import HOOK, NS, REPO, Env

pytestmark = pytest.mark.libvirt


def image_allow(lab: libvirt_lab.LibvirtLab, name: str) -> bool:
    """Whether the definition in NAME's managed save image carries our <allow>."""
    return domain.parse(lab.virsh("managedsave-dumpxml", name).stdout).allow is not None


def test_del_vm_and_add_vm_rewrite_the_managed_save_image(tmp_path: Path) -> None:
    reason = libvirt_lab.missing_requirements()
    if reason:
        pytest.skip(reason)
    (tmp_path / "config").mkdir()
    (tmp_path / "run").mkdir()
    lab = libvirt_lab.LibvirtLab(tmp_path, hooks={"qemu": HOOK}, binds={str(REPO / "config"): tmp_path / "config"})
    with lab:
        e = Env(lab, tmp_path)
        e.write_config()
        (tmp_path / "whitelist.csv").write_text("# vmname,mac,added_at,added_by,reason\n")
        e.config.write_text(e.config.read_text() + 'ALLOW_STORE="metadata"\n')
        e.cli("apply")
        lab.start_guest("ms", guest_ip=5, hold=600, interval=1, connect_timeout=2, ports=(25,), console_append=True,
                        metadata=f'<sg:allow xmlns:sg="{NS}" by="panel" reason="KYC"/>')
        assert lab.wait_round("ms", 1, timeout=120).round(1)[("v4", 25)] == "open"

        # revoke while it sleeps in its image
        lab.virsh("managedsave", "ms")
        assert lab.domstate("ms") == "shut off" and image_allow(lab, "ms")
        d = e.cli("del-vm", "ms")
        assert (  # del-vm's default source is "all": the file's line ("nothing to remove") comes first
            "ok: removed the allowance from the libvirt metadata of guest 'ms' (saved definition and managed save "
            "image: the guest is shut off and resumes from that image)") in d.stdout.splitlines(), d.stdout
        assert not image_allow(lab, "ms"), lab.virsh("managedsave-dumpxml", "ms").stdout
        lab.virsh("start", "ms")  # resumes from the image
        assert "allow" not in lab.virsh("metadata", "ms", NS, "--live", check=False).stdout
        n = lab.probe_results("ms").rounds
        res = lab.wait_round("ms", n + 2, timeout=60)
        assert res.round(n + 2)[("v4", 25)] == "blocked", res.console[-2000:]
        assert not e.allowed()

        # and allow it while it sleeps: "allowed when it starts" must hold
        lab.virsh("managedsave", "ms")
        a = e.cli("add-vm", "ms", "KYC ok")
        assert "managed save image" in a.stdout.splitlines()[0], a.stdout
        assert "ok: guest 'ms' is not running: its NICs are allowed when it starts" in a.stdout
        assert image_allow(lab, "ms")
        lab.virsh("start", "ms")
        assert "KYC ok" in lab.virsh("metadata", "ms", NS, "--live").stdout
        n = lab.probe_results("ms").rounds
        res = lab.wait_round("ms", n + 2, timeout=60)
        assert res.round(n + 2)[("v4", 25)] == "open", res.console[-2000:]
        assert e.allowed()
