#!/bin/bash
# systemd_container.sh - boot this machine's own systemd in a throwaway container, to run
# install.sh/uninstall.sh LIVE against a real service manager without touching the host.
#
#   systemd_container.sh start DIR [--host-layer LAYER] [--keep-host-install]
#                                    boot; prints the host PID of the container's systemd (PID 1 inside)
#   systemd_container.sh stop DIR [--keep-layer]
#                                    kill it, unmount and remove DIR (always safe to call)
#   run a command inside:  nsenter -t PID -m -u -i -n -p -C -r -w COMMAND...
#
# Isolation: new mount, PID, network, UTS, IPC and cgroup namespaces.  The root file system is
# an overlay of the host's / (read-only lower layer) with a tmpfs upper layer at DIR/layer,
# mounted in the HOST mount namespace so that a second `start DIR` boots the same upper layer
# again (a reboot); /run and /dev are fresh, the rest (/tmp too) is the host's, copied up on write.  The network namespace has only `lo`, so
# nft inside edits a ruleset of its own; systemd gets a cgroup2 subtree of its own under the
# host's unified hierarchy.  Host services that have no business in there are masked.
# Needs root, unshare, overlayfs and a writable cgroup2 hierarchy (mounted at
# /sys/fs/cgroup or /sys/fs/cgroup/unified).  No product code lives here.
#
# The host's own smtp-gate installation, if it has one, is hidden: the container is a fresh
# host for install.sh.  Every path of HOST_INSTALL below that exists on the host (or in the
# host layer) gets an overlayfs whiteout in the upper layer, unless the container already wrote
# that path itself (a reboot keeps its own files).  /run is a fresh tmpfs, so /run/smtp-gate is
# never the host's.  --host-layer LAYER lays a copy of the tree LAYER over the host's / (read-only,
# below the upper layer): a test puts a decoy "host installation" there to check that it stays
# hidden; --keep-host-install skips the hiding, only to show that the decoy would be seen.
set -euo pipefail

# relative to /, globs allowed; a path under a symlinked directory (/lib -> usr/lib) is
# whited out at its real place
HOST_INSTALL=(
    usr/local/smtp-gate usr/bin/smtp-gate etc/libvirt/hooks
    'etc/systemd/system/smtp-gate*' 'etc/systemd/system/*.wants/smtp-gate*'
    'etc/systemd/system/*.requires/smtp-gate*'
    'usr/lib/systemd/system/smtp-gate*' 'lib/systemd/system/smtp-gate*'
    'usr/lib/systemd/system/*.wants/smtp-gate*' 'lib/systemd/system/*.wants/smtp-gate*'
)

usage() { echo "usage: $0 start DIR [--host-layer LAYER] [--keep-host-install] | stop DIR [--keep-layer]" >&2; exit 2; }
cmd="${1:-}"; dir="${2:-}"
if [ -z "$cmd" ] || [ -z "$dir" ]; then usage; fi
shift 2
host_layer=""; hide_host_install=1; keep_layer=0
while [ $# -gt 0 ]; do
    case "$1" in
        --host-layer) [ $# -ge 2 ] || usage; host_layer="$(realpath -e "$2")"; shift 2 ;;
        --keep-host-install) hide_host_install=0; shift ;;
        --keep-layer) keep_layer=1; shift ;;
        *) usage ;;
    esac
done
mkdir -p "$dir"
dir="$(realpath -e "$dir")"
name="sgct-$(printf '%s' "$dir" | md5sum | cut -c1-10)"

hide_host_install() {  # whiteouts in the upper layer for every HOST_INSTALL path a lower layer has
    local upper="$dir/layer/upper" lower pattern match rel real
    for lower in ${host_layer:+"$host_layer"} /; do
        for pattern in "${HOST_INSTALL[@]}"; do
            for match in "${lower%/}"/$pattern; do
                [ -e "$match" ] || [ -L "$match" ] || continue
                rel="${match#"${lower%/}"/}"
                real="$(realpath -m "/$(dirname "$rel")")/$(basename "$rel")"
                [ -e "$upper$real" ] || [ -L "$upper$real" ] && continue  # whited out already, or the container's own
                mkdir -p "$upper$(dirname "$real")"
                mknod "$upper$real" c 0 0
            done
        done
    done
}

cgroup_base() {
    if [ -f /sys/fs/cgroup/cgroup.procs ] && [ "$(stat -f -c %T /sys/fs/cgroup)" = cgroup2fs ]; then
        echo /sys/fs/cgroup
    elif [ -f /sys/fs/cgroup/unified/cgroup.procs ]; then
        echo /sys/fs/cgroup/unified
    else
        echo "no cgroup2 hierarchy found" >&2; exit 1
    fi
}

inner() {  # runs as PID 1 of the new PID namespace, in the new namespaces
    local r="$dir/root"
    mount -t overlay overlay -o "lowerdir=${host_layer:+$dir/host-layer:}/,upperdir=$dir/layer/upper,workdir=$dir/layer/work" "$r"
    mount -t proc proc "$r/proc"
    mount -t sysfs sysfs "$r/sys"
    mount -t cgroup2 cgroup2 "$r/sys/fs/cgroup"
    mount -t tmpfs -o mode=755 tmpfs "$r/dev"
    for n in null zero full random urandom tty; do touch "$r/dev/$n"; mount --bind "/dev/$n" "$r/dev/$n"; done
    mkdir -p "$r/dev/pts" "$r/dev/shm"
    mount -t devpts -o newinstance,ptmxmode=0666 devpts "$r/dev/pts"
    ln -s pts/ptmx "$r/dev/ptmx"
    mount -t tmpfs tmpfs "$r/dev/shm"
    mount -t tmpfs -o mode=755 tmpfs "$r/run"
    hostname "$name"
    cd "$r"
    export container=smtp-gate-test
    exec chroot "$r" /lib/systemd/systemd --log-target=journal --show-status=false
}

case "$cmd" in
start)
    mkdir -p "$dir/root" "$dir/layer"
    if ! mountpoint -q "$dir/layer"; then
        mount -t tmpfs -o mode=755 tmpfs "$dir/layer"
    fi
    mkdir -p "$dir/layer/upper/etc/systemd/system" "$dir/layer/work"
    if [ -n "$host_layer" ] && ! mountpoint -q "$dir/host-layer"; then
        # a copy on a file system of its own: overlayfs refuses a lower layer inside another (/)
        mkdir -p "$dir/host-layer"
        mount -t tmpfs -o mode=755 tmpfs "$dir/host-layer"
        cp -a "$host_layer/." "$dir/host-layer/"
    fi
    for u in getty@tty1.service console-getty.service container-getty@.service serial-getty@.service \
             systemd-timesyncd.service systemd-networkd.service networking.service systemd-logind.service \
             postgresql.service e2scrub_reap.service e2scrub_all.timer systemd-pstore.service remote-fs.target \
             apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer fstrim.timer man-db.timer; do
        [ -e "$dir/layer/upper/etc/systemd/system/$u" ] || ln -s /dev/null "$dir/layer/upper/etc/systemd/system/$u"
    done
    # keep the host's /tmp visible (read-only below the overlay): Debian's tmp.conf empties /tmp at
    # boot ("D /tmp"), which would hide the files a test wants to run in there
    mkdir -p "$dir/layer/upper/etc/tmpfiles.d"
    printf 'd /tmp 1777 root root -\n' >"$dir/layer/upper/etc/tmpfiles.d/tmp.conf"
    [ "$hide_host_install" = 0 ] || hide_host_install
    cg="$(cgroup_base)/$name"
    mkdir -p "$cg"
    export -f inner
    export dir name host_layer
    # the outer shell joins the container's cgroup first, so that the new cgroup namespace is rooted there
    # shellcheck disable=SC2016  # $$ and $0 belong to that inner shell
    setsid bash -c 'echo $$ > "$0/cgroup.procs"; exec unshare --mount --propagation private --pid --fork \
        --net --uts --ipc --cgroup bash -c inner' "$cg" </dev/null >"$dir/console.log" 2>&1 &
    outer=$!
    echo "$outer" >"$dir/unshare.pid"
    # booted = "running"; with the host's installation left visible its units may fail ("degraded")
    booted=running
    [ "$hide_host_install" = 1 ] || booted="running|degraded"
    for _ in $(seq 100); do
        pid="$(pgrep -P "$outer" -x systemd || true)"
        if [ -n "$pid" ]; then
            state="$(nsenter -t "$pid" -m -u -i -n -p -C -r -w systemctl is-system-running --wait 2>/dev/null || true)"
            if [[ "$state" =~ ^($booted)$ ]]; then
                echo "$pid"
                exit 0
            fi
        fi
        sleep 0.1
    done
    echo "the container did not boot; see $dir/console.log" >&2
    exit 1
    ;;
stop)
    if [ -f "$dir/unshare.pid" ]; then
        outer="$(cat "$dir/unshare.pid")"
        # killing the container's PID 1 kills everything in its PID namespace
        pid="$(pgrep -P "$outer" -x systemd || true)"
        [ -z "$pid" ] || kill -KILL "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$outer" 2>/dev/null || break; sleep 0.1; done
        rm -f "$dir/unshare.pid"
    fi
    cg="$(cgroup_base)/$name"
    if [ -d "$cg" ]; then
        # remove the container's cgroup subtree, deepest first (they are empty once PID 1 is gone)
        find "$cg" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    fi
    if [ "$keep_layer" = 0 ]; then
        for m in layer host-layer; do
            if mountpoint -q "$dir/$m"; then umount "$dir/$m"; fi
        done
        rm -rf "$dir"
    fi
    ;;
*)
    usage ;;
esac
