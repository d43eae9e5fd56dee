"""A real libvirtd + QEMU (TCG) lab for end-to-end tests, isolated from this machine.

Why: smtp-gate's hooks only prove themselves when a real libvirtd calls them while a real
guest's tap sits on a real bridge.  This module gives a test exactly that, without touching
the host's libvirt, nftables ruleset, links, users or cgroups.  No product code lives here.

Isolation
    * Two network namespaces per lab: ``sglab<pid>n<k>`` ("lab": ``br0`` with the ``uplink`` veth
      and the guests' taps; libvirtd, virtlogd, QEMU and the hooks run here) and
      ``sginet<pid>n<k>`` ("internet": ``inet0`` = uplink's peer, 10.99.0.1/24 + fd99::1/64
      and 10.98.0.1/24 + fd98::1/64 ... for guests' further NICs,
      dual-stack TCP listeners on 80, 25, 465 and 587 that answer ``OK <port>``; inet0 has
      the same MAC in every lab, so a guest migrated between two labs reaches it at once).
    * A private mount namespace, owned by a small "holder" process started with
      ``ip netns exec LAB unshare --mount --propagation private``: a fresh tmpfs on /run (which
      also hides D-Bus and systemd: no machined registration), and bind mounts of lab
      directories on /etc/libvirt, /run/libvirt (= /var/run/libvirt), /var/lib/libvirt,
      /var/cache/libvirt and /var/log/libvirt.  A mount point missing on the host is created
      inside an overlayfs on its parent whose upper layer is in the lab root, so nothing appears
      on the host.  When the host has no ``libvirt-qemu`` user/group (libvirt-daemon-system is
      not installed, and the QEMU driver refuses to start without them even with user=root),
      copies of /etc/passwd and /etc/group with them added are bind-mounted too.
      ``ip netns exec``'s fresh /sys has no cgroup mounts, so libvirt creates no cgroups.
    * virtlogd and libvirtd run in the foreground, started with ``nsenter`` into the holder's
      mount + network namespaces with libvirt's usual clean environment; nsenter execs, so the
      PIDs we hold (and kill) are the daemons'.  Clients (virsh, libvirt-python) connect with
      ``lab.uri`` = ``qemu:///system?socket=<lab>/run/libvirt/libvirt-sock`` (the run dir moves to
      a short /tmp/sglab-run-* directory when that path would not fit in a socket address).
    * ``close()`` (always called by the context manager, also when the test fails) destroys and
      undefines every domain, stops libvirtd, virtlogd, the listener and the holder by PID,
      SIGKILLs whatever still lives in the two namespaces (leftover QEMU) and deletes them.
      Daemons get PR_SET_PDEATHSIG, and every new lab first removes namespaces with our prefixes
      whose owner PID is gone, so a crashed run never blocks the next one.

Guest
    Debian's kernel from the ``linux-image-amd64`` .deb (``apt-get download``; only vmlinuz and
    the 8 virtio modules virtio_net needs are kept, and vmlinuz is unpacked to an ELF vmlinux
    that QEMU boots through its PVH entry: that saves the ~5 s TCG spends decompressing) plus a
    busybox-static initramfs, cached in ``/var/cache/smtp-gate-tests`` (env
    ``SMTP_GATE_TEST_CACHE``).  The initramfs name carries a hash of ``INIT_SCRIPT``, the modules
    and busybox, so changing any of them rebuilds it.  libvirtd's QEMU capability cache (~8 s to
    build) is kept there too.  Domains are ``type='qemu'`` (TCG): this machine's /dev/kvm
    (kvm_pvm) cannot boot a 64-bit guest.  Diskless, 192 MiB, 1 vCPU, serial console to a file.

    The init (kernel-cmdline parameters lab.ip, lab.ip6, lab.target, lab.target6, lab.ports,
    lab.hold, lab.interval, lab.nic, lab.nics, lab.tmo; lab.nic and the addresses are comma
    lists, one entry per probing NIC) prints the NIC MACs, then probes every port on each
    probing NIC's lab.target (v4) and lab.target6 (v6) in parallel as soon as its NICs are up
    (about 3 s of guest uptime), and prints one line per attempt::

        LAB: nic eth0 mac 52:54:00:12:34:56
        LAB: RESULT v4 port=25 status=blocked round=1 nic=eth0 t=3.34 end=5.40 rc=1 detail=nc:_timed_out
        LAB: round 1 done uptime=5.41

    status: ``open`` (the listener answered), ``blocked`` (connect timed out after lab.tmo s: SYNs
    dropped), ``refused`` (RST) or ``error``; ``t``/``end`` are guest uptimes at the start/end of
    that attempt, so "blocked from the very first attempt" is ``round == 1`` and ``blocked``.
    With lab.hold > 0 the guest then stays up that many seconds, re-probing every lab.interval
    seconds when that is > 0 (rounds 2, 3, ...), and finally powers off (the domain is destroyed
    on poweroff/reboot/crash).

API (failures raise ``LabError``)
    missing_requirements(fetch_kernel=True) -> Optional[str]   skip reason, or None; fetches
                                      the guest kernel into the cache when it is missing
    cleanup_stale_labs() -> List[str]                          namespaces removed

    with LibvirtLab(tmp_path, hooks={"qemu": "/path/hook"}, record_hooks=False, binds=None,
                    host_uuid=None) as lab:
        lab.ns, lab.inet_ns           network namespace names (``ip netns exec <ns> ...``)
        lab.uri                       libvirt URI for ``virsh -c`` / ``libvirt.open()``
        lab.peer_uri                  ``qemu+unix://`` URI another lab's libvirtd reaches this one by
        lab.host_uuid                 libvirtd.conf's host_uuid (None: libvirt's choice)
        lab.root                      lab directory: etc/ lib/ cache/ log/ run/ state/ overlay/
        lab.etc_dir, lab.hooks_dir    the daemons' /etc/libvirt and /etc/libvirt/hooks
        lab.state_dir                 consoles (<name>.console.log), domain XML, daemon logs
        lab.libvirtd_log, lab.virtlogd_log, lab.listener_log_path, lab.qemu_log(name)
        lab.run_in_netns(cmd, private_mounts=False, check=True, input=None, timeout=60)
                                      run cmd in the lab netns (nft, ip, bridge, a product CLI);
                                      private_mounts=True runs it in the daemons' mount namespace
                                      too, i.e. with the hooks' view of /etc/libvirt and /run
        lab.bind_mount(src, target), lab.unmount(target)
                                      add/remove a bind mount in the daemons' private mount
                                      namespace while the lab runs (e.g. a failing nft)
        lab.run_in_inet(cmd, ...)     run cmd in the "internet" namespace
        lab.virsh(*args, check=True, timeout=120) -> CompletedProcess (text)
        lab.migrate(name, dest_lab, *flags, timeout=180) -> s
                                      ``virsh migrate --live --p2p --tunnelled FLAGS name
                                      dest_lab.peer_uri`` (both labs with distinct host_uuid)
        lab.install_hook(driver, path, name=None, restart=False) -> Path
                                      symlink into hooks/<driver>.d/.  libvirtd decides at start,
                                      per driver, whether hooks exist at all: a file added to a
                                      driver that had none then is ignored until a restart
                                      (restart=True); one added next to an existing hook (e.g.
                                      with record_hooks=True) is run from the next call on
        lab.restart_libvirtd() -> s   SIGTERM by PID, start again; running guests survive and get
                                      a 'reconnect begin' hook call each
        lab.stop_libvirtd(), lab.start_libvirtd() -> s, lab.libvirtd_pid()
        lab.domain_xml(name, nics=1, hold=0, macs=None, targets=None, interfaces=None,
                       guest_ip=None, interval=0, probe_nic=0 (or [0, 1, ...]), ports=PORTS,
                       connect_timeout=2, console_append=False, metadata="") -> str
        lab.start_guest(name, **same) -> name   define (replacing) + ``virsh start``, returns then
        lab.boot_guest(name, timeout=180, keep=False, **same) -> GuestResult
                                      start, wait until shut off, parse the console, undefine
        lab.wait_shutoff(name, timeout=180) -> bool
        lab.wait_console(name, regex, timeout=60) -> matched text
        lab.wait_round(name, n=1, timeout=60) -> GuestResult   after probe round n finished
        lab.probe_results(name) -> GuestResult  parse the console so far
        lab.console(name) -> str, lab.domstate(name) -> str ('' if undefined)
        lab.hook_calls() -> List[dict]  record_hooks=True: each qemu hook call in order, with
                                      argv, time, xml (stdin), netns, env
        lab.listener_log() -> str     '<unix time> port N from ADDR' per accepted connection
        lab.timings                   measured durations in seconds (images, network,
                                      virtlogd_start, libvirtd_start, libvirtd_restart, ...)

    GuestResult: name; probes {("v4", 25): "blocked", ...} (round 1); results: List[ProbeResult]
    (family, port, status, round, nic, t, end, rc, detail); round(n, nic=None) -> {(fam, port):
    status}; nics (probing NICs, "eth0"...; probes/round default to the first); rounds; macs
    (guest eth order); console; state; timings (virsh_start, boot_to_shutoff).

    Guest addresses and NICs: each guest name gets an index g (2, 3, ... in order of first use,
    or ``guest_ip=g``).  A probing NIC k (``probe_nic``: an index or a list, default eth0; the
    other NICs stay down) has 10.(99-k).0.g/24 and fd(99-k)::g/64 and probes ``inet4(k)`` /
    ``inet6(k)`` (10.(99-k).0.1, fd(99-k)::1, all on the internet side's inet0), so each NIC's
    probes leave through that NIC.  NIC 0 gets a libvirt-chosen MAC and an auto-named
    ``vnetN`` tap; NIC k > 0 gets MAC 52:54:00:aa:<k>:<g> and ``<target dev='<name[:11]>n<k>'/>``
    (like the recipe).  ``macs=[...]`` / ``targets=[...]`` (None entries keep the default) or
    ``interfaces=[raw <interface> XML, ...]`` override that.  Guest ethN follows XML order.
"""

import ctypes
import fcntl
import glob
import grp
import gzip
import hashlib
import json
import lzma
import os
import pwd
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]

NS_PREFIX = "sglab"
INET_PREFIX = "sginet"
INET4 = "10.99.0.1"
INET6 = "fd99::1"
# inet0's MAC, the same in every lab, as a fleet's gateway is the same for every hypervisor: a
# guest migrated from one lab to another keeps its neighbour entries and reaches its
# "internet" at once (with a random MAC per lab it would wait for its ARP/ND entries to expire)
INET_MAC = "02:5a:00:00:00:01"
PROBE_NICS = 4  # a guest's NIC k (0..3) probes from its own subnet: see inet4()/inet6()
PORTS = (80, 25, 465, 587)
CACHE_ENV = "SMTP_GATE_TEST_CACHE"
DEFAULT_CACHE = "/var/cache/smtp-gate-tests"
DAEMON_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
TOOL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# what virtio_net needs; the initramfs loads them in the order their `depends=` dictate
MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
           "virtio_pci", "failover", "net_failover", "virtio_net")
# directories libvirtd/virtlogd/QEMU write to, made private to the lab
PRIVATE_DIRS = ("/etc/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt")
_NS_RE = re.compile(r"^(?:%s|%s)(\d+)n(\d+)$" % (NS_PREFIX, INET_PREFIX))
_RESULT_RE = re.compile(r"LAB: RESULT (v4|v6) port=(\d+) status=(\w+)((?: \w+=\S*)*)")
_MAC_RE = re.compile(r"LAB: nic (\S+) mac ([0-9a-f:]{17})")
_NET_UP_RE = re.compile(r"LAB: net up dev=(\S+)")
_counter = 0


class LabError(RuntimeError):
    """Anything in the lab that did not work; the message says what and where the logs are."""


# ----------------------------------------------------------------------------- helpers

def inet4(k: int = 0) -> str:
    """The "internet" address guest NIC k probes over IPv4: 10.99.0.1 for NIC 0, 10.98.0.1 for NIC 1...

    Each probing NIC has a subnet of its own, so the guest's routing sends every probe out of
    the NIC under test (with that NIC's MAC, through that NIC's tap).
    """
    if not 0 <= k < PROBE_NICS:
        raise LabError("a guest can probe on NICs 0..%d" % (PROBE_NICS - 1))
    return "10.%d.0.1" % (99 - k)


def inet6(k: int = 0) -> str:
    """The "internet" IPv6 address guest NIC k probes: fd99::1 for NIC 0, fd98::1 for NIC 1..."""
    inet4(k)
    return "fd%d::1" % (99 - k)


def _which(name: str) -> Optional[str]:
    """shutil.which with the sbin directories, which a test's PATH may lack."""
    return shutil.which(name, path=TOOL_PATH + ":" + os.environ.get("PATH", ""))


def _run(cmd: Sequence[str], *, check: bool = True, input: Optional[str] = None,
         timeout: float = 60, env: Optional[Mapping[str, str]] = None,
         cwd: Optional[PathLike] = None) -> "subprocess.CompletedProcess[str]":
    """Run a command (never via a shell), capture text output, raise LabError on failure."""
    try:
        proc = subprocess.run(list(cmd), input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, timeout=timeout, env=dict(env) if env is not None else None,
                              cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        raise LabError("timed out after %ss: %s" % (timeout, " ".join(cmd))) from exc
    except OSError as exc:
        raise LabError("cannot run %s: %s" % (cmd[0], exc)) from exc
    if check and proc.returncode != 0:
        raise LabError("exit %d: %s\n%s%s" % (proc.returncode, " ".join(cmd), proc.stdout, proc.stderr))
    return proc


def _pid_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie (a dead daemon waiting to be reaped counts as gone)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _kill_pid(pid: int, proc: Optional[subprocess.Popen] = None, grace: float = 10.0) -> None:
    """SIGTERM one PID, wait up to grace seconds, then SIGKILL; reap it when it is our child."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not _pid_alive(pid):
            break
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        end = time.monotonic() + wait
        while time.monotonic() < end and _pid_alive(pid):
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.05)
    if proc is not None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


_LIBC = ctypes.CDLL(None, use_errno=True)


def _set_pdeathsig() -> None:
    """preexec_fn: SIGKILL the child when the test process dies, so a crash leaves less behind.

    (Linux sends it when the thread that started the child ends: start labs from the test's thread.)
    """
    _LIBC.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def _netns_list() -> List[str]:
    """Names of the network namespaces `ip netns` knows."""
    out = _run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(ns: str) -> List[int]:
    """PIDs of the processes living in a named network namespace."""
    out = _run(["ip", "netns", "pids", ns], check=False).stdout
    return [int(x) for x in out.split() if x.isdigit()]


def _empty_and_delete_netns(ns: str) -> None:
    """SIGKILL every process in ns (only lab processes live there), then delete it."""
    for _ in range(50):
        pids = [p for p in _netns_pids(ns) if _pid_alive(p)]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    _run(["ip", "netns", "delete", ns])


def cleanup_stale_labs() -> List[str]:
    """Delete lab namespaces left by a run whose process is gone, so a crash never blocks the next."""
    removed = []
    for ns in _netns_list():
        m = _NS_RE.match(ns)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            _empty_and_delete_netns(ns)
            removed.append(ns)
    return removed


def _is_static_elf(path: str) -> bool:
    """True if path is an ELF executable without a PT_INTERP header (needs no loader in the initramfs)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only
                return False
            phoff, = struct.unpack_from("<Q", head, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def _has_user_and_group(name: str) -> bool:
    """True if the host resolves name as both a user and a group."""
    try:
        pwd.getpwnam(name)
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _free_id() -> int:
    """A system uid/gid (999 downwards) used by neither a user nor a group on the host."""
    used = {p.pw_uid for p in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}
    return next(i for i in range(999, 100, -1) if i not in used)


def cache_dir() -> Path:
    """The directory holding the guest kernel, initramfs and QEMU capability cache."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def _busybox() -> Optional[str]:
    """Path of a statically linked busybox (busybox-static), or None."""
    for cand in ("/bin/busybox", "/usr/bin/busybox", _which("busybox") or ""):
        if cand and os.path.exists(cand) and _is_static_elf(os.path.realpath(cand)):
            return cand
    return None


def missing_requirements(fetch_kernel: bool = True) -> Optional[str]:
    """A reason to skip libvirt lab tests on this machine, or None when everything is there.

    Why a function: installing packages is the project's test command's job, never a test's;
    the tests skip with this reason instead.  With fetch_kernel, a missing guest kernel is
    downloaded into the cache now (that needs Debian's package lists and network).
    """
    if not sys.platform.startswith("linux"):
        return "libvirt lab needs Linux"
    if os.geteuid() != 0:
        return "libvirt lab needs root (network/mount namespaces, libvirtd)"
    tools = {"qemu-system-x86_64": "qemu-system-x86", "libvirtd": "libvirt-daemon",
             "virtlogd": "libvirt-daemon", "virsh": "libvirt-clients", "ip": "iproute2",
             "nft": "nftables", "unshare": "util-linux", "nsenter": "util-linux", "mount": "mount"}
    for tool, pkg in tools.items():
        if _which(tool) is None:
            return "no %s (Debian package %s)" % (tool, pkg)
    if not glob.glob("/usr/lib*/*/libvirt/connection-driver/libvirt_driver_qemu.so") + \
            glob.glob("/usr/lib*/libvirt/connection-driver/libvirt_driver_qemu.so"):
        return "no libvirt QEMU driver (Debian package libvirt-daemon-driver-qemu)"
    if _busybox() is None:
        return "no statically linked busybox (Debian package busybox-static)"
    if not os.path.exists("/proc/self/ns/net") or not os.path.exists("/proc/self/ns/mnt"):
        return "kernel without network/mount namespaces"
    if any(not os.path.isdir(d) for d in PRIVATE_DIRS + ("/run",)):
        with open("/proc/filesystems") as f:
            if "overlay" not in f.read():
                return "no overlayfs (needed to create libvirt's directories privately)"
    if not _kernel_cached(cache_dir()):
        if not fetch_kernel:
            return "no guest kernel cached in %s" % cache_dir()
        try:
            ensure_kernel(cache_dir())
        except LabError as exc:
            return "no guest kernel cached in %s and fetching one failed: %s" % (cache_dir(), exc)
    return None


# ----------------------------------------------------------------------------- guest image

INIT_SCRIPT = r"""#!/bin/busybox sh
# smtp-gate libvirt lab guest init: probe TCP ports on the "internet" from the first second
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "LAB: $*"; }
ip=10.99.0.2/24 ip6=fd99::2/64 target=10.99.0.1 target6=fd99::1 ports=80,25,465,587
hold=0 tmo=2 nic=0 nics=1 interval=0
for kv in $(cat /proc/cmdline); do
  case "$kv" in
    lab.*=*) k=${kv%%=*}; k=${k#lab.}
      case "$k" in ip|ip6|target|target6|ports|hold|tmo|nic|nics|interval) eval "$k=\${kv#*=}";; esac;;
  esac
done
# lab.nic is a comma list of the NICs that probe (ethK); lab.ip, lab.ip6, lab.target and
# lab.target6 are comma lists too, their i-th entry for the i-th NIC of lab.nic
nth() { echo "$1" | cut -d, -f"$2"; }
say "init start uptime=$(up) kernel=$(uname -r)"
for m in $(cat /lib/modules/order); do
  [ -d /sys/module/$m ] || insmod /lib/modules/$m.ko || say "insmod $m failed"
done
last=eth$((nics - 1))
for i in $(seq 100); do [ -e /sys/class/net/$last ] && break; sleep 0.05; done
for n in /sys/class/net/eth*; do say "nic ${n##*/} mac $(cat $n/address)"; done
ip link set lo up
# several NICs on one segment: each answers ARP only for its own address (no ARP flux)
echo 1 >/proc/sys/net/ipv4/conf/all/arp_ignore; echo 2 >/proc/sys/net/ipv4/conf/all/arp_announce
i=0
for k in $(echo $nic | tr , ' '); do
  i=$((i + 1)); dev=eth$k
  echo 0 >/proc/sys/net/ipv6/conf/$dev/accept_dad    # busybox ip has no "nodad"
  echo 0 >/proc/sys/net/ipv6/conf/$dev/router_solicitations
  ip link set $dev up
  ip addr add $(nth $ip $i) dev $dev; ip -6 addr add $(nth $ip6 $i) dev $dev
done
i=0
for k in $(echo $nic | tr , ' '); do
  i=$((i + 1)); dev=eth$k
  for j in $(seq 100); do [ "$(cat /sys/class/net/$dev/carrier 2>/dev/null)" = 1 ] && break; sleep 0.05; done
  say "net up dev=$dev ip=$(nth $ip $i) ip6=$(nth $ip6 $i) uptime=$(up)"
done
probe() {  # probe FAMILY ADDR PORT ROUND DEV -> one RESULT line in /tmp
  t0=$(up)
  out=$(nc -w $tmo $2 $3 </dev/null 2>&1); rc=$?
  t1=$(up)
  case "$out" in *"OK $3"*) st=open;; *refused*) st=refused;; *"timed out"*|*timeout*) st=blocked;; *) st=error;; esac
  echo "LAB: RESULT $1 port=$3 status=$st round=$4 nic=$5 t=$t0 end=$t1 rc=$rc detail=$(echo $out | tr ' ' '_')" >/tmp/r.$4.$5.$1.$3
}
round() {
  i=0
  for k in $(echo $nic | tr , ' '); do
    i=$((i + 1)); t4=$(nth $target $i); t6=$(nth $target6 $i)
    for p in $(echo $ports | tr , ' '); do probe v4 $t4 $p $1 eth$k & probe v6 $t6 $p $1 eth$k & done
  done
  wait
  cat /tmp/r.$1.*
  say "round $1 done uptime=$(up)"
}
round 1
if [ "$hold" != 0 ]; then
  say "holding ${hold}s interval=${interval}s"
  u=$(up); end=$(( ${u%.*} + hold )); r=1
  if [ "$interval" != 0 ]; then
    while :; do
      u=$(up); [ $(( ${u%.*} + interval )) -le $end ] || break
      sleep $interval; r=$((r + 1)); round $r
    done
  fi
  u=$(up); left=$(( end - ${u%.*} )); [ $left -gt 0 ] && sleep $left
fi
say "poweroff uptime=$(up)"
poweroff -f
"""


@dataclass
class KernelImage:
    """The cached guest kernel: what QEMU boots, and the virtio modules that match it.

    ``boot`` is the uncompressed ELF ``vmlinux`` when the kernel has a PVH entry note: QEMU then
    jumps straight into it, which saves the ~5 s a TCG guest spends decompressing ``vmlinuz``.
    """
    vmlinuz: Path
    modules: Path
    version: str
    boot: Path


def _kernel_cached(cache: Path) -> bool:
    """True if a complete kernel (vmlinuz, every module, version file) is in the cache."""
    k = cache / "kernel"
    return ((k / "vmlinuz").is_file() and (k / "version").is_file()
            and all((k / "modules" / (m + ".ko")).is_file() for m in MODULES))


class _CacheLock:
    """flock on <cache>/.lock: two test runs never build the same file at once."""

    def __init__(self, cache: Path) -> None:
        self.path = cache / ".lock"
        self.fd = -1

    def __enter__(self) -> "_CacheLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def ensure_kernel(cache: Path) -> KernelImage:
    """Return the cached guest kernel, downloading Debian's linux-image .deb once if needed.

    Only vmlinuz and the 8 virtio modules are kept (~12 MB instead of ~400 MB unpacked).
    """
    k = cache / "kernel"
    with _CacheLock(cache):
        if not _kernel_cached(cache):
            _fetch_kernel(cache)
        if not (k / "vmlinux").exists() and not (k / "no-pvh").exists():
            _extract_pvh_vmlinux(k / "vmlinuz", k / "vmlinux", k / "no-pvh")
    boot = k / "vmlinux" if (k / "vmlinux").exists() else k / "vmlinuz"
    return KernelImage(k / "vmlinuz", k / "modules", (k / "version").read_text().strip(), boot)


def _extract_pvh_vmlinux(vmlinuz: Path, dest: Path, marker: Path) -> None:
    """Unpack the ELF inside a bzImage (xz or gzip payload) if it has a PVH entry note.

    Leaves `marker` instead when that is not possible, so we do not retry on every run.
    """
    data = vmlinuz.read_bytes()
    elf = b""
    try:
        setup_sects = data[0x1F1] or 4
        offset, length = struct.unpack_from("<II", data, 0x248)
        payload = data[(setup_sects + 1) * 512 + offset:][:length]
        if payload.startswith(b"\xfd7zXZ\x00"):
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        elif payload.startswith(b"\x1f\x8b"):
            elf = gzip.decompress(payload)
    except (struct.error, IndexError, lzma.LZMAError, OSError, EOFError):
        elf = b""
    # Xen ELF note type 18 = XEN_ELFNOTE_PHYS32_ENTRY, the PVH entry point QEMU needs
    if elf[:4] == b"\x7fELF" and re.search(b"\x04\x00\x00\x00.\x00\x00\x00\x12\x00\x00\x00Xen\x00", elf, re.DOTALL):
        tmp = dest.with_suffix(".tmp%d" % os.getpid())
        tmp.write_bytes(elf)
        os.rename(str(tmp), str(dest))
    else:
        marker.write_text("no PVH-bootable ELF in %s; booting it compressed\n" % vmlinuz)


def _fetch_kernel(cache: Path) -> None:
    """Download linux-image-<abi>-amd64 with apt-get and extract vmlinuz + virtio modules."""
    for tool in ("apt-cache", "apt-get", "dpkg-deb"):
        if _which(tool) is None:
            raise LabError("%s not found (need Debian's apt to fetch the guest kernel)" % tool)
    dep = _run(["apt-cache", "depends", "linux-image-amd64"], check=False)
    m = re.search(r"Depends: (linux-image-\S+)", dep.stdout)
    if not m:
        raise LabError("cannot resolve linux-image-amd64 (run apt-get update first?): %s" % dep.stderr.strip())
    pkg = m.group(1)
    work = Path(tempfile.mkdtemp(prefix="kernel-", dir=str(cache)))
    try:
        _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", pkg], cwd=work, timeout=600)
        debs = sorted(work.glob(pkg + "_*.deb"))
        if not debs:
            raise LabError("apt-get download %s produced no .deb" % pkg)
        version = _run(["dpkg-deb", "-f", str(debs[0]), "Version"]).stdout.strip()
        wanted = {m + ".ko": m for m in MODULES}
        out = work / "kernel"
        (out / "modules").mkdir(parents=True)
        got = set()
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(debs[0])], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                base = os.path.basename(member.name)
                if not member.isfile():
                    continue
                if re.match(r"\./boot/vmlinuz-", member.name):
                    _copy_member(tar, member, out / "vmlinuz", False)
                    got.add("vmlinuz")
                for suffix, xz in ((".ko", False), (".ko.xz", True)):
                    if base.endswith(suffix) and base[:-len(suffix)] + ".ko" in wanted:
                        _copy_member(tar, member, out / "modules" / (base[:-len(suffix)] + ".ko"), xz)
                        got.add(base[:-len(suffix)])
        if proc.wait() != 0:
            raise LabError("dpkg-deb --fsys-tarfile %s failed" % debs[0])
        missing = {"vmlinuz", *MODULES} - got
        # a module built into the kernel is fine: the init skips what /sys/module already has
        if "vmlinuz" in missing:
            raise LabError("no vmlinuz in %s" % debs[0])
        for name in missing:
            (out / "modules" / (name + ".ko")).write_bytes(b"")
        (out / "version").write_text("%s %s\n" % (pkg, version))
        if (cache / "kernel").exists():
            shutil.rmtree(str(cache / "kernel"))
        os.rename(str(out), str(cache / "kernel"))
    finally:
        shutil.rmtree(str(work), ignore_errors=True)


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, xz: bool) -> None:
    """Write one tar member to dest, decompressing .ko.xz (busybox insmod cannot)."""
    src = tar.extractfile(member)
    assert src is not None
    data = src.read()
    dest.write_bytes(lzma.decompress(data) if xz else data)


def _cpio_newc(entries: Iterable[Tuple[str, int, bytes, int, int]]) -> bytes:
    """A newc cpio archive from (name, mode, data, rdev_major, rdev_minor); no mknod on the host."""
    out = bytearray()

    def pad() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    ino = 1
    for name, mode, data, rmaj, rmin in list(entries) + [("TRAILER!!!", 0, b"", 0, 0)]:
        bname = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 2 if mode & 0o040000 else 1, 0, len(data), 0, 0, rmaj, rmin, len(bname), 0)
        out.extend(b"070701" + b"".join(b"%08X" % v for v in fields) + bname)
        pad()
        out.extend(data)
        pad()
        ino += 1
    return bytes(out)


def _module_order(mods: Mapping[str, bytes]) -> List[str]:
    """Module names ordered so each comes after its `depends=` (read from .modinfo); skips empty ones."""
    deps = {}
    for name, data in mods.items():
        if data:
            m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
            deps[name] = [d for d in (m.group(1).decode().split(",") if m else []) if d in mods and mods[d]]
    order: List[str] = []

    def visit(name: str, stack: Tuple[str, ...]) -> None:
        if name in order:
            return
        if name in stack:
            raise LabError("module dependency loop: %s" % " -> ".join(stack + (name,)))
        for dep in deps[name]:
            visit(dep, stack + (name,))
        order.append(name)

    for name in deps:
        visit(name, ())
    return order


def ensure_initramfs(cache: Path, kernel: KernelImage) -> Path:
    """Return the cached initramfs, building it when the init script, modules or busybox changed."""
    busybox = _busybox()
    if busybox is None:
        raise LabError("no statically linked busybox (Debian package busybox-static)")
    bb = Path(busybox).read_bytes()
    mods = [(m, (kernel.modules / (m + ".ko")).read_bytes()) for m in MODULES]
    h = hashlib.sha256(b"initramfs-v1\0" + INIT_SCRIPT.encode() + bb)
    for m, data in mods:
        h.update(m.encode() + b"\0" + data)
    path = cache / ("initramfs-%s.cpio.gz" % h.hexdigest()[:16])
    if path.is_file():
        return path
    with _CacheLock(cache):
        if path.is_file():
            return path
        entries = [("bin", 0o040755, b"", 0, 0), ("dev", 0o040755, b"", 0, 0),
                   ("dev/console", 0o020600, b"", 5, 1), ("proc", 0o040755, b"", 0, 0),
                   ("sys", 0o040755, b"", 0, 0), ("tmp", 0o041777, b"", 0, 0),
                   ("lib", 0o040755, b"", 0, 0), ("lib/modules", 0o040755, b"", 0, 0),
                   ("bin/busybox", 0o100755, bb, 0, 0), ("init", 0o100755, INIT_SCRIPT.encode(), 0, 0)]
        entries += [("lib/modules/%s.ko" % m, 0o100644, data, 0, 0) for m, data in mods if data]
        entries.append(("lib/modules/order", 0o100644, " ".join(_module_order(dict(mods))).encode(), 0, 0))
        tmp = path.with_suffix(".tmp%d" % os.getpid())
        tmp.write_bytes(gzip.compress(_cpio_newc(entries), compresslevel=6, mtime=0))
        os.rename(str(tmp), str(path))
        for old in cache.glob("initramfs-*.cpio.gz"):  # older builds, unless a lab may still use them
            if old != path and old.stat().st_mtime < time.time() - 86400:
                old.unlink()
    return path


# ----------------------------------------------------------------------------- results

@dataclass
class ProbeResult:
    """One TCP connect attempt by the guest, as printed on its console."""
    family: str
    port: int
    status: str
    round: int = 1
    nic: str = ""
    t: float = 0.0
    end: float = 0.0
    rc: int = 0
    detail: str = ""


@dataclass
class GuestResult:
    """What a guest reported: probe results, NIC MACs, the whole console, the domain state.

    ``probes`` and ``round(n)`` are the first probing NIC's (``nics[0]``); ``round(n, nic)``
    another's.
    """
    name: str
    probes: Dict[Tuple[str, int], str]
    results: List[ProbeResult]
    macs: List[str]
    console: str
    state: str = ""
    timings: Dict[str, float] = field(default_factory=dict)
    nics: List[str] = field(default_factory=list)  # the probing NICs (eth0, ...), in lab.nic order

    def round(self, n: int, nic: Optional[str] = None) -> Dict[Tuple[str, int], str]:
        """{(family, port): status} of probe round n on NIC nic (default: the first probing NIC)."""
        nic = nic or (self.nics[0] if self.nics else None)
        return {(r.family, r.port): r.status for r in self.results
                if r.round == n and (nic is None or r.nic == nic)}

    @property
    def rounds(self) -> int:
        """How many probe rounds the console shows as finished."""
        return len(re.findall(r"LAB: round \d+ done", self.console))


def parse_console(name: str, text: str, state: str = "") -> GuestResult:
    """Parse the guest's console text (complete or so far) into a GuestResult."""
    results = []
    for m in _RESULT_RE.finditer(text):
        extra = dict(kv.split("=", 1) for kv in m.group(4).split())
        results.append(ProbeResult(m.group(1), int(m.group(2)), m.group(3), int(extra.get("round", 1)),
                                   extra.get("nic", ""), float(extra.get("t", 0) or 0),
                                   float(extra.get("end", 0) or 0), int(extra.get("rc", 0) or 0),
                                   extra.get("detail", "")))
    macs = [m.group(2) for m in _MAC_RE.finditer(text)]
    nics = list(dict.fromkeys(_NET_UP_RE.findall(text)))
    result = GuestResult(name, {}, results, macs, text, state, nics=nics)
    result.probes = result.round(1)
    return result


# ----------------------------------------------------------------------------- the lab

_HOLDER = r"""
import json, os, subprocess, sys
def run(*cmd):
    subprocess.run(cmd, check=True)
for step in json.loads(sys.argv[1]):
    if step[0] == "tmpfs":
        run("mount", "-t", "tmpfs", "-o", "mode=0755", "sglab-run", step[1])
    elif step[0] == "overlay":
        run("mount", "-t", "overlay", "sglab-overlay", "-o",
            "lowerdir=%s,upperdir=%s,workdir=%s" % (step[1], step[2], step[3]), step[1])
    elif step[0] == "mkdir":
        os.makedirs(step[1], exist_ok=True)
    elif step[0] == "touch":
        open(step[1], "a").close()
    elif step[0] == "bind":
        run("mount", "--bind", step[1], step[2])
    else:
        raise SystemExit("unknown step %r" % (step,))
sys.stdout.write("READY\n")
sys.stdout.flush()
sys.stdin.read()   # hold the mount namespace until the lab closes our stdin (or dies)
"""

_LISTENER = r"""
import selectors, socket, sys, time
sel = selectors.DefaultSelector()
for p in map(int, sys.argv[1:]):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)   # dual stack: v4-mapped too
    s.bind(("::", p)); s.listen(64); sel.register(s, selectors.EVENT_READ, p)
print("listening", *sys.argv[1:], flush=True)
while True:
    for key, _ in sel.select():
        c, addr = key.fileobj.accept()
        print("%.3f port %d from %s" % (time.time(), key.data, addr[0]), flush=True)
        try:
            c.sendall(b"OK %d\n" % key.data)
        except OSError:
            pass
        c.close()
"""

_RECORDER = r"""#!%(python)s
# smtp-gate libvirt lab: record every hook call (argv, time, stdin) as one JSON file
import json, os, sys, time
xml = sys.stdin.read()
ns = time.time_ns()
rec = {"time": ns / 1e9, "argv": sys.argv, "pid": os.getpid(), "xml": xml,
       "netns": os.readlink("/proc/self/ns/net"), "env": dict(os.environ)}
path = os.path.join(%(dir)r, "%%d-%%d.json" %% (ns, os.getpid()))
with open(path + ".tmp", "w") as f:
    json.dump(rec, f)
os.rename(path + ".tmp", path)
"""

_LIBVIRTD_CONF = """# smtp-gate libvirt lab: root-only socket, no polkit, log to stderr (captured)
unix_sock_rw_perms = "0700"
unix_sock_ro_perms = "0700"
unix_sock_admin_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "%s:stderr"
"""

_QEMU_CONF = """# smtp-gate libvirt lab: QEMU as root, no AppArmor/SELinux, no chown/xattrs on the cached
# kernel, no cgroups (the lab's /sys hides them anyway)
user = "root"
group = "root"
security_driver = "none"
dynamic_ownership = 0
remember_owner = 0
cgroup_controllers = [ ]
"""


class LibvirtLab:
    """A private libvirtd + virtlogd + bridge + "internet" for one test; use as a context manager."""

    def __init__(self, tmp_path: PathLike, hooks: Optional[Mapping[str, Union[PathLike, Sequence[PathLike]]]] = None,
                 record_hooks: bool = False, binds: Optional[Mapping[str, PathLike]] = None,
                 log_level: int = 3, host_uuid: Optional[str] = None) -> None:
        """tmp_path: where the lab keeps everything (the test's tmp_path); hooks: {driver: executable
        or list} linked into hooks/<driver>.d/ before libvirtd starts; record_hooks: also record every
        qemu hook call (see hook_calls); binds: {absolute path in the daemons' view: host file or dir}
        extra private mounts (e.g. a config dir the hooks read); log_level: libvirt's, 1 (debug)..4;
        host_uuid: libvirtd.conf's host_uuid, which a migration between two labs needs distinct
        (see migrate()).  None: libvirt's choice, this machine's SMBIOS UUID (the same for every
        lab) or, on a machine without one, a random UUID at each start.
        """
        if host_uuid is not None and not re.match(r"^[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$", host_uuid):
            raise LabError("host_uuid %r: expected a UUID like 6f9619ff-8b86-d011-b42d-00c04fc964ff" % host_uuid)
        global _counter
        _counter += 1
        self.root = Path(tmp_path) / "libvirt-lab"
        n = 1
        while self.root.exists():  # a second lab in the same test gets its own directory
            n += 1
            self.root = Path(tmp_path) / ("libvirt-lab-%d" % n)
        self.ns = "%s%dn%d" % (NS_PREFIX, os.getpid(), _counter)
        self.inet_ns = "%s%dn%d" % (INET_PREFIX, os.getpid(), _counter)
        self.etc_dir = self.root / "etc"
        self.hooks_dir = self.etc_dir / "hooks"
        self.state_dir = self.root / "state"
        self.hooklog_dir = self.state_dir / "hooklog"
        self.libvirtd_log = self.state_dir / "libvirtd.log"
        self.virtlogd_log = self.state_dir / "virtlogd.log"
        self.listener_log_path = self.state_dir / "listener.log"
        self.run_dir = self.root / "run"          # replaced by a short path if sockets would not fit
        self._short_run: Optional[str] = None
        self.record_hooks = record_hooks
        self.log_level = log_level
        self.host_uuid = host_uuid
        self.timings: Dict[str, float] = {}
        self._hooks = dict(hooks or {})
        self._binds = dict(binds or {})
        self._holder: Optional[subprocess.Popen] = None
        self._virtlogd: Optional[subprocess.Popen] = None
        self._libvirtd: Optional[subprocess.Popen] = None
        self._listener: Optional[subprocess.Popen] = None
        self._ip_index: Dict[str, int] = {}
        self._started = False
        self.kernel: Optional[KernelImage] = None
        self.initrd: Optional[Path] = None

    # -- paths ---------------------------------------------------------------------
    @property
    def socket_path(self) -> Path:
        """libvirtd's read-write socket as seen from the host."""
        return self.run_dir / "libvirt" / "libvirt-sock"

    @property
    def uri(self) -> str:
        """libvirt URI reaching this lab's libvirtd (virsh -c, libvirt.open)."""
        return "qemu:///system?socket=%s" % self.socket_path

    @property
    def peer_uri(self) -> str:
        """URI by which another lab's libvirtd reaches this one (the destination of a peer-to-peer
        migration).  ``qemu+unix``, not ``qemu``: inside a libvirtd, a plain ``qemu:///system``
        would open its own QEMU driver, not this lab's daemon.  The socket is a filesystem path
        every lab sees (its run dir is outside /run), so it crosses network namespaces."""
        return "qemu+unix:///system?socket=%s" % self.socket_path

    def qemu_log(self, name: str) -> Path:
        """The domain's QEMU log, written through virtlogd."""
        return self.root / "log" / "qemu" / ("%s.log" % name)

    def console_path(self, name: str) -> Path:
        """File receiving the guest's serial console."""
        return self.state_dir / ("%s.console.log" % name)

    # -- lifecycle -----------------------------------------------------------------
    def __enter__(self) -> "LibvirtLab":
        try:
            self.start()
        except BaseException:
            self.close(raise_errors=False)  # the start error is the one to see
            raise
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(raise_errors=exc_type is None)

    def start(self) -> None:
        """Build images, create namespaces, mounts, listener and daemons."""
        reason = missing_requirements()
        if reason:
            raise LabError("libvirt lab cannot run: " + reason)
        self._started = True
        cleanup_stale_labs()
        t0 = time.monotonic()
        cache = cache_dir()
        self.kernel = ensure_kernel(cache)
        self.initrd = ensure_initramfs(cache, self.kernel)
        self.timings["images"] = time.monotonic() - t0
        self._make_dirs()
        t = time.monotonic()
        self._setup_net()
        self._start_listener()
        self.timings["network"] = time.monotonic() - t
        t = time.monotonic()
        self._start_holder()
        self.timings["mount_namespace"] = time.monotonic() - t
        t = time.monotonic()
        self._start_virtlogd()
        self.timings["virtlogd_start"] = time.monotonic() - t
        self.start_libvirtd()
        self._save_caps_cache()
        self.timings["lab_start"] = time.monotonic() - t0

    def _make_dirs(self) -> None:
        """Create the lab root: private /etc/libvirt (configs, hooks) and the other libvirt dirs."""
        for d in ("etc", "lib", "cache", "log", "state", "overlay", "run"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.hooklog_dir.mkdir(parents=True, exist_ok=True)
        if len(str(self.root / "run/libvirt/libvirt-admin-sock")) > 100:  # sun_path is 108 bytes
            self._short_run = tempfile.mkdtemp(prefix="sglab-run-", dir="/tmp")
            self.run_dir = Path(self._short_run)
        (self.run_dir / "libvirt").mkdir(exist_ok=True)
        conf = _LIBVIRTD_CONF % self.log_level
        if self.host_uuid is not None:
            conf += 'host_uuid = "%s"\n' % self.host_uuid
        (self.etc_dir / "libvirtd.conf").write_text(conf)
        (self.etc_dir / "virtlogd.conf").write_text('log_outputs = "%s:stderr"\n' % self.log_level)
        (self.etc_dir / "qemu.conf").write_text(_QEMU_CONF)
        for driver in ("qemu", "lxc", "libxl", "network", "daemon"):
            (self.hooks_dir / (driver + ".d")).mkdir(parents=True, exist_ok=True)
        if self.record_hooks:
            rec = self.hooks_dir / "qemu.d" / "00-lab-record"
            rec.write_text(_RECORDER % {"python": sys.executable, "dir": str(self.hooklog_dir)})
            rec.chmod(0o755)
        for driver, paths in self._hooks.items():
            for p in ([paths] if isinstance(paths, (str, os.PathLike)) else list(paths)):
                self.install_hook(driver, p)
        caps = cache_dir() / "qemu-capabilities"
        if caps.is_dir():  # libvirtd re-probes QEMU (~8 s) unless it finds a valid cache
            shutil.copytree(str(caps), str(self.root / "cache" / "qemu" / "capabilities"), dirs_exist_ok=True)

    def _save_caps_cache(self) -> None:
        """Keep libvirtd's QEMU capability cache for the next lab (it validates it itself)."""
        src = self.root / "cache" / "qemu" / "capabilities"
        if src.is_dir() and any(src.iterdir()):
            dst = cache_dir() / "qemu-capabilities"
            with _CacheLock(cache_dir()):
                shutil.copytree(str(src), str(dst), dirs_exist_ok=True)

    def _setup_net(self) -> None:
        """Both namespaces, br0 + uplink veth, the internet side's addresses."""
        ns, inet = self.ns, self.inet_ns
        _run(["ip", "netns", "add", ns])
        _run(["ip", "netns", "add", inet])
        steps = [
            ["ip", "-n", ns, "link", "set", "lo", "up"],
            ["ip", "-n", inet, "link", "set", "lo", "up"],
            ["ip", "-n", ns, "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0"],
            ["ip", "-n", ns, "link", "add", "uplink", "type", "veth", "peer", "name", "inet0", "address", INET_MAC,
             "netns", inet],
            ["ip", "-n", ns, "link", "set", "uplink", "master", "br0"],
            ["ip", "-n", ns, "link", "set", "uplink", "up"],
            ["ip", "-n", ns, "link", "set", "br0", "up"],
        ]
        for k in range(PROBE_NICS):  # one subnet per probing guest NIC (see inet4)
            steps += [["ip", "-n", inet, "addr", "add", inet4(k) + "/24", "dev", "inet0"],
                      ["ip", "-n", inet, "addr", "add", inet6(k) + "/64", "dev", "inet0", "nodad"]]
        steps.append(["ip", "-n", inet, "link", "set", "inet0", "up"])
        for cmd in steps:
            _run(cmd)

    def _start_listener(self) -> None:
        """TCP listeners on PORTS in the internet namespace, logging every connection."""
        script = self.state_dir / "listener.py"
        script.write_text(_LISTENER)
        with open(str(self.listener_log_path), "ab") as log:
            self._listener = subprocess.Popen(
                ["ip", "netns", "exec", self.inet_ns, sys.executable, str(script)] + [str(p) for p in PORTS],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_set_pdeathsig)
        self._wait(lambda: "listening" in self.listener_log(), 10, "listener", self._listener,
                   self.listener_log_path)

    def _mount_steps(self) -> List[List[str]]:
        """The holder's mount plan: tmpfs on /run, overlays where a mount point is missing, binds."""
        binds: List[Tuple[str, Path]] = [("/run/libvirt", self.run_dir / "libvirt")]
        if os.path.realpath("/var/run") != "/run":
            binds.append(("/var/run/libvirt", self.run_dir / "libvirt"))
        binds += [("/etc/libvirt", self.etc_dir), ("/var/lib/libvirt", self.root / "lib"),
                  ("/var/cache/libvirt", self.root / "cache"), ("/var/log/libvirt", self.root / "log")]
        # QEMU's driver resolves its compiled-in user/group 'libvirt-qemu' before it reads qemu.conf;
        # libvirt-daemon-system would create them on the host: add them in the lab's view only
        if not _has_user_and_group("libvirt-qemu"):
            uid = _free_id()
            for db, line in (("passwd", "libvirt-qemu:x:%d:%d:libvirt lab:/var/lib/libvirt:/usr/sbin/nologin\n"
                              % (uid, uid)), ("group", "libvirt-qemu:x:%d:\n" % uid)):
                text = Path("/etc/" + db).read_text()
                (self.state_dir / db).write_text(text + ("\n" if text and not text.endswith("\n") else "") + line)
                binds.append(("/etc/" + db, self.state_dir / db))
        binds += [(t, Path(src)) for t, src in self._binds.items()]
        steps: List[List[str]] = [["tmpfs", "/run"], ["mkdir", "/run/lock"]]
        overlays: List[str] = []
        creates: List[List[str]] = []
        for target, src in binds:
            if not os.path.isabs(target) or not src.exists():
                raise LabError("bind %s -> %s: target must be absolute, source must exist" % (src, target))
            kind = "mkdir" if src.is_dir() else "touch"
            if target.startswith("/run/"):
                creates.append([kind, target])      # on our tmpfs
                continue
            if os.path.lexists(target):
                continue
            parent = os.path.dirname(target)
            if parent == "/" or not os.path.isdir(parent):
                raise LabError("cannot create mount point %s privately (parent missing or /)" % target)
            if parent not in overlays:
                overlays.append(parent)
            creates.append([kind, target])
        for parent in overlays:
            up = self.root / "overlay" / parent.strip("/").replace("/", "_")
            (up / "upper").mkdir(parents=True, exist_ok=True)
            (up / "work").mkdir(parents=True, exist_ok=True)
            steps.append(["overlay", parent, str(up / "upper"), str(up / "work")])
        steps += creates
        steps += [["bind", str(src), target] for target, src in sorted(binds, key=lambda b: len(b[0]))]
        return steps

    def _start_holder(self) -> None:
        """The process that owns the lab's private mount namespace (inside the lab netns)."""
        for p in [str(self.root), str(cache_dir())] + [str(v) for v in self._binds.values()]:
            if p == "/run" or p.startswith("/run/"):
                raise LabError("%s is under /run, which the lab's mount namespace replaces" % p)
        steps = self._mount_steps()
        (self.state_dir / "mounts.json").write_text(json.dumps(steps, indent=1))
        self._holder = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "unshare", "--mount", "--propagation", "private",
             sys.executable, "-c", _HOLDER, json.dumps(steps)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            env=DAEMON_ENV, preexec_fn=_set_pdeathsig)
        assert self._holder.stdout is not None
        line = self._holder.stdout.readline()
        if line.strip() != b"READY":
            err = self._holder.stderr.read() if self._holder.stderr else b""
            raise LabError("mount namespace setup failed: %s %s" % (line, err.decode(errors="replace")))

    def _nsenter(self, cmd: Sequence[str]) -> List[str]:
        """cmd run in the holder's mount + network namespaces (the daemons' view of the world)."""
        if self._holder is None or self._holder.poll() is not None:
            raise LabError("the lab's mount namespace holder is not running")
        return ["nsenter", "--target", str(self._holder.pid), "--mount", "--net", "--"] + list(cmd)

    def _spawn_daemon(self, name: str, log: Path) -> subprocess.Popen:
        """Start a daemon in the foreground inside the lab; nsenter execs it, so the PID is its own."""
        binary = _which(name)
        if binary is None:
            raise LabError("%s not found" % name)
        with open(str(log), "ab") as f:
            f.write(b"---- %s start %s\n" % (binary.encode(), time.strftime("%H:%M:%S").encode()))
            f.flush()
            proc = subprocess.Popen(self._nsenter([binary]), stdin=subprocess.DEVNULL, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True, env=DAEMON_ENV,
                                    cwd="/", preexec_fn=_set_pdeathsig)
        return proc

    def _wait(self, ready, timeout: float, what: str, proc: Optional[subprocess.Popen],
              log: Optional[Path]) -> None:
        """Poll ready() until true; fail early with the log tail when proc died."""
        start = time.monotonic()
        while time.monotonic() < start + timeout:
            if ready():
                return
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
        state = "exited %s" % proc.returncode if proc is not None and proc.poll() is not None else "not ready"
        raise LabError("%s %s after %.1fs; log %s:\n%s" % (what, state, time.monotonic() - start, log, tail))

    def _start_virtlogd(self) -> None:
        """virtlogd first: libvirtd hands QEMU's stdout/stderr to it."""
        self._virtlogd = self._spawn_daemon("virtlogd", self.virtlogd_log)
        sock = self.run_dir / "libvirt" / "virtlogd-sock"
        self._wait(sock.exists, 20, "virtlogd", self._virtlogd, self.virtlogd_log)
        self._check_exe(self._virtlogd, "virtlogd")

    @staticmethod
    def _check_exe(proc: subprocess.Popen, name: str) -> None:
        """Make sure the PID we will kill is the daemon itself, not a wrapper."""
        try:
            exe = os.readlink("/proc/%d/exe" % proc.pid)
        except OSError as exc:
            raise LabError("%s (pid %d) vanished: %s" % (name, proc.pid, exc)) from exc
        if os.path.basename(exe) != name:
            raise LabError("pid %d is %s, expected %s" % (proc.pid, exe, name))

    def start_libvirtd(self) -> float:
        """Start libvirtd and wait until it answers; returns the seconds it took."""
        if self._libvirtd is not None and self._libvirtd.poll() is None:
            raise LabError("libvirtd already running (pid %d)" % self._libvirtd.pid)
        t = time.monotonic()
        self._libvirtd = self._spawn_daemon("libvirtd", self.libvirtd_log)

        def ready() -> bool:
            return self.socket_path.exists() and self.virsh("-q", "version", check=False, timeout=30).returncode == 0

        self._wait(ready, 120, "libvirtd", self._libvirtd, self.libvirtd_log)
        self._check_exe(self._libvirtd, "libvirtd")
        took = time.monotonic() - t
        self.timings.setdefault("libvirtd_start", took)
        self.timings["libvirtd_last_start"] = took
        return took

    def stop_libvirtd(self) -> None:
        """SIGTERM libvirtd (by PID) and wait; running guests keep running, as in real life."""
        if self._libvirtd is not None:
            _kill_pid(self._libvirtd.pid, self._libvirtd)
            self._libvirtd = None
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass

    def restart_libvirtd(self) -> float:
        """Stop and start libvirtd: it re-reads hooks and fires 'reconnect begin' per running guest."""
        t = time.monotonic()
        self.stop_libvirtd()
        self.start_libvirtd()
        took = time.monotonic() - t
        self.timings["libvirtd_restart"] = took
        return took

    def libvirtd_pid(self) -> Optional[int]:
        """PID of the running libvirtd, if any."""
        return self._libvirtd.pid if self._libvirtd is not None and self._libvirtd.poll() is None else None

    def close(self, raise_errors: bool = True) -> None:
        """Tear everything down, each step even if an earlier one failed."""
        errors: List[str] = []

        def step(what: str, fn: Callable[..., Any], *args: Any) -> None:
            try:
                fn(*args)
            except Exception as exc:  # keep tearing down; report at the end
                errors.append("%s: %s" % (what, exc))

        if self._libvirtd is not None and self._libvirtd.poll() is None:
            step("destroy domains", self._destroy_all)
        step("stop libvirtd", self.stop_libvirtd)
        for attr in ("_virtlogd", "_listener"):
            proc = getattr(self, attr)
            if proc is not None:
                step("stop " + attr, _kill_pid, proc.pid, proc)
                setattr(self, attr, None)
        if self._holder is not None:
            if self._holder.stdin is not None:
                step("close holder stdin", self._holder.stdin.close)
            step("stop holder", _kill_pid, self._holder.pid, self._holder, 2.0)
            for s in (self._holder.stdout, self._holder.stderr):
                if s is not None:
                    s.close()
            self._holder = None
        if self._started:
            names: List[str] = []
            step("list netns", lambda: names.extend(_netns_list()))
            for ns in (self.ns, self.inet_ns):
                if ns in names:
                    step("delete netns " + ns, _empty_and_delete_netns, ns)
        if self._short_run is not None:
            step("remove " + self._short_run, shutil.rmtree, self._short_run)
            self._short_run = None
        self._started = False
        if errors and raise_errors:
            raise LabError("lab teardown: " + "; ".join(errors))

    def _destroy_all(self) -> None:
        """Destroy (all at once: each takes ~2 s of waiting for QEMU) and undefine every domain."""
        names = self.virsh("list", "--all", "--name", timeout=30).stdout.split()
        procs = [subprocess.Popen(["virsh", "-c", self.uri, "destroy", name], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for name in names if self.domstate(name) != "shut off"]
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for name in names:
            self.virsh("undefine", name, check=False, timeout=30)

    # -- commands ------------------------------------------------------------------
    def run_in_netns(self, cmd: Sequence[str], private_mounts: bool = False, check: bool = True,
                     input: Optional[str] = None, timeout: float = 60) -> "subprocess.CompletedProcess[str]":
        """Run cmd in the lab netns (where br0, the taps, libvirtd and the hooks live).

        private_mounts=True also enters the daemons' mount namespace (private /etc/libvirt etc.).
        """
        full = self._nsenter(cmd) if private_mounts else ["ip", "netns", "exec", self.ns] + list(cmd)
        return _run(full, check=check, input=input, timeout=timeout)

    def popen_in_netns(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start cmd in the background, in the daemons' network and mount namespaces (what
        the hooks see); the caller stops it."""
        return subprocess.Popen(self._nsenter(cmd), **kwargs)

    def bind_mount(self, src: PathLike, target: str) -> None:
        """Bind-mount host path src over target in the daemons' private mount namespace, now.

        Every process of the lab (libvirtd, the hooks it runs, run_in_netns(private_mounts=True))
        sees it at once; the host never does.  target must exist in the lab's view.
        """
        if not os.path.isabs(target) or not os.path.exists(str(src)):
            raise LabError("bind %s -> %s: target must be absolute, source must exist" % (src, target))
        self.run_in_netns(["mount", "--bind", str(src), target], private_mounts=True)

    def unmount(self, target: str) -> None:
        """Undo bind_mount (the topmost mount on target, in the private namespace only)."""
        self.run_in_netns(["umount", target], private_mounts=True)

    def run_in_inet(self, cmd: Sequence[str], check: bool = True, input: Optional[str] = None,
                    timeout: float = 60) -> "subprocess.CompletedProcess[str]":
        """Run cmd in the "internet" namespace."""
        return _run(["ip", "netns", "exec", self.inet_ns] + list(cmd), check=check, input=input,
                    timeout=timeout)

    def virsh(self, *args: str, check: bool = True, timeout: float = 120) -> "subprocess.CompletedProcess[str]":
        """virsh against this lab's libvirtd."""
        return _run(["virsh", "-c", self.uri] + list(args), check=check, timeout=timeout)

    def migrate(self, name: str, dest: "LibvirtLab", *flags: str, timeout: float = 180) -> float:
        """Live-migrate a running guest to another lab: ``virsh migrate --live --p2p --tunnelled
        FLAGS NAME <dest.peer_uri>``; returns the seconds it took (LabError if it failed).

        --p2p: this lab's libvirtd connects to dest's itself, over dest's unix socket (a path
        both labs see); --tunnelled: the migration stream goes through that connection too, so
        nothing needs an address the other network namespace can reach.  libvirt refuses a
        migration to a daemon with the same host UUID: both labs need distinct ``host_uuid``.
        The guest's kernel, initrd and emulator are the same paths in both labs; its console
        file too (use console_append=True so that the destination does not truncate it).
        """
        if self.host_uuid is None or dest.host_uuid is None or self.host_uuid.lower() == dest.host_uuid.lower():
            raise LabError("migrate: both labs need distinct host_uuid (have %s and %s)"
                           % (self.host_uuid, dest.host_uuid))
        t = time.monotonic()
        self.virsh("migrate", "--live", "--p2p", "--tunnelled", *flags, name, dest.peer_uri, timeout=timeout)
        took = time.monotonic() - t
        self.timings["migrate:" + name] = took
        return took

    def install_hook(self, driver: str, path: PathLike, name: Optional[str] = None,
                     restart: bool = False) -> Path:
        """Symlink an executable into hooks/<driver>.d/ (see the module doc for when libvirtd sees it)."""
        src = Path(path).resolve()
        if not os.access(str(src), os.X_OK) or not src.is_file():
            raise LabError("hook %s is not an executable file" % src)
        d = self.hooks_dir / (driver + ".d")
        d.mkdir(parents=True, exist_ok=True)
        link = d / (name or src.name)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(src)
        if restart:
            self.restart_libvirtd()
        return link

    def hook_calls(self) -> List[dict]:
        """Every recorded qemu hook call, oldest first (needs record_hooks=True)."""
        calls = []
        for p in sorted(self.hooklog_dir.glob("*.json"), key=lambda p: tuple(int(x) for x in p.stem.split("-"))):
            calls.append(json.loads(p.read_text()))
        return calls

    def listener_log(self) -> str:
        """Connections the internet side accepted ('<time> port N from ADDR' lines)."""
        try:
            return self.listener_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- guests --------------------------------------------------------------------
    def _index(self, name: str, guest_ip: Optional[int]) -> int:
        """The guest's address index g (10.99.0.g, fd99::g), stable per name."""
        if guest_ip is not None:
            if not 2 <= guest_ip <= 254:
                raise LabError("guest_ip must be 2..254")
            self._ip_index[name] = guest_ip
        elif name not in self._ip_index:
            used = set(self._ip_index.values())
            self._ip_index[name] = next(i for i in range(2, 255) if i not in used)
        return self._ip_index[name]

    def domain_xml(self, name: str, nics: int = 1, hold: int = 0, macs: Optional[Sequence[Optional[str]]] = None,
                   targets: Optional[Sequence[Optional[str]]] = None, interfaces: Optional[Sequence[str]] = None,
                   guest_ip: Optional[int] = None, interval: int = 0,
                   probe_nic: Union[int, Sequence[int]] = 0, ports: Sequence[int] = PORTS,
                   connect_timeout: int = 2, console_append: bool = False, metadata: str = "") -> str:
        """Domain XML of a diskless TCG guest that boots the lab kernel and probes the internet.

        probe_nic: the NIC index, or a list of them, that probe (each from its own subnet).
        console_append: the serial file is opened for appending (``append='on'``), not truncated.
        A migration destination opens it again while the source still writes to it: with this
        the console file keeps every line, from both sides, in order (see migrate()).
        metadata: raw XML put inside the domain's ``<metadata>`` (e.g. an element in its own
        namespace), so that the definition carries it from the start.
        """
        if self.kernel is None or self.initrd is None:
            raise LabError("lab not started")
        probing = [probe_nic] if isinstance(probe_nic, int) else list(probe_nic)
        if not probing or len(set(probing)) != len(probing):
            raise LabError("probe_nic: one NIC index or a list of distinct ones")
        if not re.match(r"^[A-Za-z0-9_.-]{1,50}$", name):
            raise LabError("guest name %r: use letters, digits, _ . -" % name)
        g = self._index(name, guest_ip)
        if interfaces is None:
            interfaces = []
            for k in range(nics):
                mac = macs[k] if macs is not None and k < len(macs) else None
                target = targets[k] if targets is not None and k < len(targets) else None
                if k > 0:
                    mac = mac or "52:54:00:aa:%02x:%02x" % (k, g)
                    target = target or "%sn%d" % (name[:11], k)
                if mac is not None and not re.match(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$", mac):
                    raise LabError("bad MAC %r" % mac)
                if target is not None and not re.match(r"^[A-Za-z0-9_.-]{1,15}$", target):
                    raise LabError("bad target dev %r" % target)
                interfaces.append(
                    "<interface type='bridge'>%s<source bridge='br0'/>%s<model type='virtio'/>"
                    "<rom enabled='no'/></interface>"
                    % ("<mac address='%s'/>" % mac if mac else "", "<target dev='%s'/>" % target if target else ""))
        for k in probing:
            inet4(k)  # raises for a NIC index without a subnet
            if not 0 <= k < len(interfaces):
                raise LabError("probe_nic %d: the guest has %d NIC(s)" % (k, len(interfaces)))
        cmdline = ("console=ttyS0 quiet panic=-1 i8042.noaux i8042.nopnp lab.ip=%s lab.ip6=%s "
                   "lab.target=%s lab.target6=%s lab.hold=%d lab.interval=%d lab.nic=%s lab.nics=%d "
                   "lab.ports=%s lab.tmo=%d"
                   % (",".join("%s%d/24" % (inet4(k)[:-1], g) for k in probing),
                      ",".join("%s%x/64" % (inet6(k)[:-1], g) for k in probing),
                      ",".join(inet4(k) for k in probing), ",".join(inet6(k) for k in probing),
                      hold, interval, ",".join(str(k) for k in probing), len(interfaces),
                      ",".join(str(p) for p in ports), connect_timeout))
        console = self.console_path(name)
        return """<domain type='qemu'>
  <name>{name}</name>{metadata}
  <memory unit='MiB'>192</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
    {interfaces}
    <serial type='file'><source path='{console}'{append}/><target port='0'/></serial>
    <controller type='usb' model='none'/>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
""".format(name=name, kernel=self.kernel.boot, initrd=self.initrd, cmdline=cmdline,
           emulator=_which("qemu-system-x86_64"), interfaces="\n    ".join(interfaces), console=console,
           append=" append='on'" if console_append else "",
           metadata="\n  <metadata>%s</metadata>" % metadata if metadata else "")

    def start_guest(self, name: str, **kwargs: Any) -> str:
        """Define (replacing an old definition) and `virsh start` a guest; returns at once."""
        xml = self.domain_xml(name, **kwargs)
        if self.virsh("dominfo", name, check=False).returncode == 0:
            if self.domstate(name) != "shut off":
                self.virsh("destroy", name)
            self.virsh("undefine", name)
        path = self.state_dir / ("%s.xml" % name)
        path.write_text(xml)
        console = self.console_path(name)
        if console.exists():
            console.unlink()
        self.virsh("define", str(path))
        t = time.monotonic()
        self.virsh("start", name)
        self.timings["virsh_start:" + name] = time.monotonic() - t
        return name

    def domstate(self, name: str) -> str:
        """virsh domstate (e.g. 'running', 'shut off'); '' when the domain is unknown."""
        proc = self.virsh("domstate", name, check=False, timeout=30)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def wait_shutoff(self, name: str, timeout: float = 180) -> bool:
        """Wait until the guest is shut off (or undefined); False on timeout."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.domstate(name) in ("shut off", ""):
                return True
            time.sleep(0.2)
        return False

    def console(self, name: str) -> str:
        """The guest's serial console so far."""
        try:
            return self.console_path(name).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_console(self, name: str, regex: str, timeout: float = 60) -> str:
        """Wait until a console line matches regex; returns the match (LabError on timeout)."""
        pat = re.compile(regex)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = pat.search(self.console(name))
            if m:
                return m.group(0)
            time.sleep(0.1)
        raise LabError("no console line /%s/ from %s within %ss; console:\n%s"
                       % (regex, name, timeout, self.console(name)[-3000:]))

    def wait_round(self, name: str, n: int = 1, timeout: float = 60) -> GuestResult:
        """Wait until probe round n finished on a running guest, then return what it reported."""
        self.wait_console(name, r"LAB: round %d done" % n, timeout)
        return self.probe_results(name)

    def probe_results(self, name: str) -> GuestResult:
        """Parse the console so far (the guest may still be running)."""
        return parse_console(name, self.console(name), self.domstate(name))

    def boot_guest(self, name: str, timeout: float = 180, keep: bool = False, **kwargs: Any) -> GuestResult:
        """Start a guest, wait until it powered off, return its results (undefined unless keep)."""
        t = time.monotonic()
        self.start_guest(name, **kwargs)
        if not self.wait_shutoff(name, timeout):
            self.virsh("destroy", name, check=False)
            raise LabError("guest %s still running after %ss; console:\n%s"
                           % (name, timeout, self.console(name)[-3000:]))
        took = time.monotonic() - t
        result = self.probe_results(name)
        result.timings = {"virsh_start": self.timings["virsh_start:" + name], "boot_to_shutoff": took}
        if not keep and self.virsh("dominfo", name, check=False).returncode == 0:
            self.virsh("undefine", name)
        return result
