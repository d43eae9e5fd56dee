#!/bin/bash
# systemd_container.sh - boot this machine's own systemd in a throwaway container, to run
# install.sh/uninstall.sh LIVE against a real service manager without touching the host.
#
#   systemd_container.sh start DIR   boot; prints the host PID of the container's systemd (PID 1 inside)
#   systemd_container.sh stop DIR    kill it, unmount and remove DIR (always safe to call)
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
set -euo pipefail

cmd="${1:-}"; dir="${2:-}"
if [ -z "$cmd" ] || [ -z "$dir" ]; then echo "usage: $0 start|stop DIR [--keep-layer]" >&2; exit 2; fi
mkdir -p "$dir"
dir="$(realpath -e "$dir")"
name="sgct-$(printf '%s' "$dir" | md5sum | cut -c1-10)"

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
    mount -t overlay overlay -o "lowerdir=/,upperdir=$dir/layer/upper,workdir=$dir/layer/work" "$r"
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
    cg="$(cgroup_base)/$name"
    mkdir -p "$cg"
    export -f inner
    export dir name
    # the outer shell joins the container's cgroup first, so that the new cgroup namespace is rooted there
    # shellcheck disable=SC2016  # $$ and $0 belong to that inner shell
    setsid bash -c 'echo $$ > "$0/cgroup.procs"; exec unshare --mount --propagation private --pid --fork \
        --net --uts --ipc --cgroup bash -c inner' "$cg" </dev/null >"$dir/console.log" 2>&1 &
    outer=$!
    echo "$outer" >"$dir/unshare.pid"
    for _ in $(seq 100); do
        pid="$(pgrep -P "$outer" -x systemd || true)"
        if [ -n "$pid" ] && nsenter -t "$pid" -m -u -i -n -p -C -r -w \
            systemctl is-system-running --wait >/dev/null 2>&1; then
            echo "$pid"
            exit 0
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
    if [ "${3:-}" != --keep-layer ]; then
        if mountpoint -q "$dir/layer"; then umount "$dir/layer"; fi
        rm -rf "$dir"
    fi
    ;;
*)
    echo "usage: $0 start|stop DIR [--keep-layer]" >&2; exit 2 ;;
esac
