#!/usr/bin/env bash
# install.sh - install smtp-gate: application directory, /usr/bin/smtp-gate, libvirt hooks,
# systemd units.  Idempotent: a second run changes nothing and says so.  See --help.
#
# Layout (paths relative to --root, default /):
#   <app dir>  (default /usr/local/smtp-gate)  the application, a git checkout: `git pull` updates it;
#              its config/ holds the live smtp-gate.conf and whitelist.csv (never overwritten)
#   /usr/bin/smtp-gate                          small Python wrapper running smtp_gate.cli:main
#   /etc/libvirt/hooks/{qemu,lxc,libxl}.d/smtp-gate   symlinks to <app dir>/hooks/<driver>
#   /etc/systemd/system/smtp-gate{,-rebuild,-watch}.service, smtp-gate-rebuild.timer
# Every symlink and wrapper refers to the app dir by a path relative to itself, so a tree
# installed with --root works in place (tests, image builds) and once copied to /.
set -euo pipefail
umask 022

PROG=install.sh
SRC="$(cd -- "$(dirname -- "$(readlink -f -- "${BASH_SOURCE[0]}")")" && pwd -P)"   # this checkout
# MARKER, DEFAULT_APP_DIR, DRIVERS, the output helpers, the common options, paths and checks:
# shared with uninstall.sh, next to this script (a copy stays in the application directory).
# SC1091 off: without -x shellcheck would only say it does not follow the file.
# shellcheck source-path=SCRIPTDIR source=install-common.sh disable=SC1091
. "$SRC/install-common.sh"
UNITS=(smtp-gate.service smtp-gate-rebuild.service smtp-gate-rebuild.timer smtp-gate-watch.service)
ENABLE=(smtp-gate.service smtp-gate-watch.service smtp-gate-rebuild.timer)
PY_MODULES=(lxml libvirt filelock)
declare -A PIP_NAME=([lxml]=lxml [libvirt]=libvirt-python [filelock]=filelock)
declare -A DEB_NAME=([lxml]=python3-lxml [libvirt]=python3-libvirt [filelock]=python3-filelock)
declare -A RPM_NAME=([lxml]=python3-lxml [libvirt]=python3-libvirt [filelock]=python3-filelock)

usage() {
    cat <<EOF
Usage: ./install.sh [OPTIONS]

Install smtp-gate: the application directory (a git checkout), /usr/bin/smtp-gate, the libvirt
hooks (drop-ins in /etc/libvirt/hooks/<driver>.d/) and the systemd units.  Safe to run again:
it changes only what differs, never overwrites the live config or whitelist, and never
replaces files it did not write.

Options:
  --root DIR          install into the tree DIR (packaging, tests): nothing on the live system
                      is touched (no systemctl, no nft ruleset change, no libvirt restart);
                      missing prerequisites are warnings, not errors
  --app-dir DIR       application directory (default $DEFAULT_APP_DIR).  If it does not exist,
                      this checkout is cloned there (git clone; a copy if this is no checkout);
                      if it exists it is used as it is (update it with git pull); if this
                      script runs from inside it, this checkout is used as it is
  --restart-libvirt   make the running libvirt daemons call the new hooks now: systemctl
                      reload-or-restart (libvirt re-reads its hook directory on reload, SIGHUP,
                      and on start; guests keep running).  Without it nothing is reloaded
  --no-start          enable the systemd units but do not start them now (enforcement then
                      starts at the next boot, or with: smtp-gate apply)
  --python PATH       Python (>= 3.9) to run smtp-gate with (default: /usr/bin/python3, else
                      the newest /usr/bin/python3.X >= 3.9)
  --no-venv           never build <app dir>/.venv: without the distribution's python3-lxml,
                      python3-libvirt and python3-filelock that is an error (a warning with --root)
  --hook-python PATH  interpreter for the libvirt hooks (stdlib only; default /usr/bin/python3
                      when it is >= 3.9, else the --python one through a small wrapper)
  --libvirt-version X.Y  assume this libvirt version instead of asking libvirtd/virtqemud
                      (with --root the default is to assume >= 6.5, i.e. drop-in hooks)
  --libvirt-uri URI   ask this libvirt URI (read-only) which bridges the running guests use,
                      instead of the config's LIBVIRT_URI/HYPERVISOR (default: every local
                      driver).  With --root libvirt is asked only when this is given.  A new
                      config gets BRIDGE= naming those bridges; an existing one is never
                      changed: install.sh prints the BRIDGE= line to set when guests use
                      bridges it does not name
  -h, --help          show this help

Exit status: 0 installed (warnings, if any, on stderr), 1 error, 2 usage.
EOF
}

# ---------------------------------------------------------------- output helpers
# (say, did, same, warn, die, usage_error: install-common.sh)
# how to get a package, on both families
howto() { printf '      Debian/Ubuntu:   apt-get install %s\n      AlmaLinux/RHEL:  dnf install %s\n' "$1" "$2"; }

# ---------------------------------------------------------------- options
NO_START=0
NO_VENV=0
PYTHON_OPT=""
HOOK_PYTHON_OPT=""
LIBVIRT_VERSION_OPT=""
LIBVIRT_URI_OPT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --python) [ $# -ge 2 ] || usage_error "--python needs a path"; PYTHON_OPT="$2"; shift 2 ;;
        --python=*) PYTHON_OPT="${1#*=}"; shift ;;
        --hook-python) [ $# -ge 2 ] || usage_error "--hook-python needs a path"; HOOK_PYTHON_OPT="$2"; shift 2 ;;
        --hook-python=*) HOOK_PYTHON_OPT="${1#*=}"; shift ;;
        --libvirt-version) [ $# -ge 2 ] || usage_error "--libvirt-version needs X.Y"; LIBVIRT_VERSION_OPT="$2"; shift 2 ;;
        --libvirt-version=*) LIBVIRT_VERSION_OPT="${1#*=}"; shift ;;
        --libvirt-uri) [ $# -ge 2 ] || usage_error "--libvirt-uri needs a URI"; LIBVIRT_URI_OPT="$2"; shift 2 ;;
        --libvirt-uri=*) LIBVIRT_URI_OPT="${1#*=}"; shift ;;
        --no-start) NO_START=1; shift ;;
        --no-venv) NO_VENV=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) common_option "$@"; shift "$OPT_ARGS" ;;      # --root, --app-dir, --restart-libvirt, unknown
    esac
done

check_app_dir
[ -z "$ROOT" ] || mkdir -p -- "$ROOT" || die "cannot create --root $ROOT"
settle_root
if [ -n "$LIBVIRT_VERSION_OPT" ] && ! [[ "$LIBVIRT_VERSION_OPT" =~ ^[0-9]+\.[0-9]+(\.[0-9]+)?$ ]]; then
    usage_error "--libvirt-version expects X.Y or X.Y.Z"
fi
[ "$(id -u)" = 0 ] || [ "$LIVE" = 0 ] || die "run as root (sudo ./install.sh), or use --root DIR to install into a tree"

set_paths

# ---------------------------------------------------------------- small utilities
version_ge() {  # version_ge A B: A >= B (dotted numbers)
    [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}
py_ok() { [ -x "$1" ] && "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' 2>/dev/null; }
py_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo "?"; }
py_missing() {  # the modules of PY_MODULES that interpreter $1 cannot import, one a line
    local m
    for m in "${PY_MODULES[@]}"; do "$1" -c "import $m" >/dev/null 2>&1 || printf '%s\n' "$m"; done
}
# relative path from directory $1 to path $2, both resolved physically (they must be on this machine)
relpath() { realpath -m --relative-to="$(realpath -m -- "$1")" -- "$(realpath -m -- "$2")"; }
# (shown, is_ours: install-common.sh)
# write content $3 to file $1 with mode $2 unless it already has exactly that; atomically
put_file() {
    local dest="$1" mode="$2" content="$3" label="$4" tmp
    if [ -f "$dest" ] && [ ! -L "$dest" ] && [ "$(stat -c %a -- "$dest")" = "$mode" ] \
        && [ "$(cat -- "$dest"; printf x)" = "${content}x" ]; then
        same unchanged "$(shown "$dest")"
        return 0
    fi
    local verb=installed
    if [ -e "$dest" ] || [ -L "$dest" ]; then verb=updated; fi
    mkdir -p -- "$(dirname -- "$dest")"
    tmp="$(mktemp -- "$(dirname -- "$dest")/.smtp-gate.XXXXXX")"
    printf '%s' "$content" >"$tmp"
    chmod "$mode" -- "$tmp"
    mv -f -T -- "$tmp" "$dest"
    did "$verb" "$(shown "$dest")${label:+ ($label)}"
}
# make $1 a symlink to $2 (a path relative to the link's directory)
put_link() {
    local link="$1" target="$2" label="$3" verb=installed
    if [ -L "$link" ] && [ "$(readlink -- "$link")" = "$target" ]; then
        same unchanged "$(shown "$link") -> $target"
        return 0
    fi
    if [ -e "$link" ] || [ -L "$link" ]; then verb=updated; fi
    mkdir -p -- "$(dirname -- "$link")"
    ln -sfn -- "$target" "$link.smtp-gate-new"
    mv -f -T -- "$link.smtp-gate-new" "$link"
    did "$verb" "$(shown "$link") -> $target${label:+ ($label)}"
}

# ---------------------------------------------------------------- 1. prerequisites
say "smtp-gate install.sh: installing $( [ "$LIVE" = 1 ] && echo "on this system" || echo "into the tree $ROOT (nothing live is touched)")"
say "  application directory: $APP_DIR"
PROBLEMS=0
problem() {  # problem "what is missing" deb-packages rpm-packages [extra line]
    PROBLEMS=$((PROBLEMS + 1))
    printf '%s: %s: %s\n' "$PROG" "$( [ "$LIVE" = 1 ] && echo missing || echo "warning: missing (--root: continuing)")" "$1" >&2
    [ -z "${2:-}" ] || howto "$2" "$3" >&2
    [ -z "${4:-}" ] || printf '      %s\n' "$4" >&2
}

say "checking prerequisites"
if command -v nft >/dev/null 2>&1; then
    NFT_VERSION="$(nft --version 2>/dev/null | sed -n 's/^nftables v\([0-9.]*\).*/\1/p')"
    same found "nft ${NFT_VERSION:-(unknown version)} ($(command -v nft))"
    if [ -n "$NFT_VERSION" ] && ! version_ge "$NFT_VERSION" 1.0.3; then
        warn "nft $NFT_VERSION is older than 1.0.3: interface name patterns (GUEST_PATTERNS) need nft >= 1.0.3 (Debian 12, Ubuntu 22.10, AlmaLinux/RHEL 9)"
    fi
    # The bridge family, tried in a throwaway network namespace: the live ruleset is never touched.
    PROBE='add table bridge smtp_gate_probe
add chain bridge smtp_gate_probe probe_forward { type filter hook forward priority -200; policy accept; }
add chain bridge smtp_gate_probe probe_input { type filter hook input priority -200; policy accept; }
delete table bridge smtp_gate_probe'
    probe_out=""; probe_rc=0; probe_how=""
    if command -v unshare >/dev/null 2>&1 && unshare --net true >/dev/null 2>&1; then
        probe_how="unshare --net"
        probe_out="$(printf '%s\n' "$PROBE" | unshare --net nft -f - 2>&1)" || probe_rc=$?
    elif command -v ip >/dev/null 2>&1 && ip netns add "smtpgate-probe-$$" >/dev/null 2>&1; then
        probe_how="ip netns"
        probe_out="$(printf '%s\n' "$PROBE" | ip netns exec "smtpgate-probe-$$" nft -f - 2>&1)" || probe_rc=$?
        ip netns delete "smtpgate-probe-$$" >/dev/null 2>&1 || true
    fi
    if [ -z "$probe_how" ]; then
        warn "could not create a throwaway network namespace (unshare/ip netns) to test the kernel's nftables bridge support; 'smtp-gate selftest' will tell"
    elif [ $probe_rc = 0 ]; then
        same found "kernel nftables bridge family (tested in a throwaway namespace, $probe_how)"
    else
        problem "kernel support for nftables on bridges (nf_tables with the bridge family): nft said: $(printf '%s' "$probe_out" | head -n 3 | tr '\n' ' ')" \
            "" "" "the distributions' stock kernels have it (Debian linux-image-*, RHEL kernel); a custom kernel needs CONFIG_NF_TABLES_BRIDGE; in a container, the host kernel must provide it"
    fi
else
    problem "nft (the nftables command)" nftables nftables
fi

# Python for the command: >= 3.9
PY=""
if [ -n "$PYTHON_OPT" ]; then
    if py_ok "$PYTHON_OPT"; then PY="$PYTHON_OPT"
    else problem "Python >= 3.9 at --python $PYTHON_OPT ($( [ -x "$PYTHON_OPT" ] && echo "it is $(py_version "$PYTHON_OPT")" || echo "not an executable"))" "" ""
    fi
else
    for c in /usr/bin/python3 /usr/bin/python3.{14,13,12,11,10,9} /usr/local/bin/python3.{14,13,12,11,10,9}; do
        if py_ok "$c"; then PY="$c"; break; fi
    done
    if [ -z "$PY" ]; then
        problem "Python >= 3.9 ($( [ -x /usr/bin/python3 ] && echo "/usr/bin/python3 is $(py_version /usr/bin/python3)" || echo "no /usr/bin/python3"))" \
            "python3 (Ubuntu 20.04: python3.9)" "python3 (RHEL/AlmaLinux 8: python39)" "or point --python at one"
    fi
fi
MISSING_MODULES=()
if [ -n "$PY" ]; then
    same found "Python $(py_version "$PY") ($PY)"
    mapfile -t MISSING_MODULES < <(py_missing "$PY")
    if [ ${#MISSING_MODULES[@]} -gt 0 ] && [ $NO_VENV = 1 ] && [ "$LIVE" = 1 ]; then
        debs=""; rpms=""
        for m in "${MISSING_MODULES[@]}"; do debs+="${DEB_NAME[$m]} "; rpms+="${RPM_NAME[$m]} "; done
        problem "Python modules ${MISSING_MODULES[*]} for $PY (--no-venv forbids building a virtual environment)" \
            "${debs% }" "${rpms% }" "(python3-filelock comes from EPEL on some RHEL releases)"
    fi
fi

# Python for the hooks: stdlib only; /usr/bin/python3 if it is recent enough
HOOK_PY=/usr/bin/python3
if [ -n "$HOOK_PYTHON_OPT" ]; then
    py_ok "$HOOK_PYTHON_OPT" || problem "Python >= 3.9 at --hook-python $HOOK_PYTHON_OPT" "" ""
    HOOK_PY="$HOOK_PYTHON_OPT"
elif ! py_ok /usr/bin/python3; then
    if [ -n "$PY" ]; then
        HOOK_PY="$PY"
        say "  /usr/bin/python3 is not >= 3.9: the libvirt hooks will run $PY through a small wrapper"
    fi
fi

# git, only to clone the app dir
NEED_CLONE=0
if [ "$SRC" != "$APP" ] && [ ! -e "$APP" ] && [ -e "$SRC/.git" ]; then
    NEED_CLONE=1
    command -v git >/dev/null 2>&1 || problem "git (to clone this checkout into $APP_DIR)" git git
fi

if [ $PROBLEMS -gt 0 ] && [ "$LIVE" = 1 ]; then
    die "$PROBLEMS prerequisite(s) missing (above): nothing was changed"
fi

# ---------------------------------------------------------------- 2. conflicts, before any change
LIBVIRT_VERSION=""
if [ -n "$LIBVIRT_VERSION_OPT" ]; then
    LIBVIRT_VERSION="$LIBVIRT_VERSION_OPT"
elif [ "$LIVE" = 1 ]; then
    for d in libvirtd virtqemud virtlxcd virtxend; do
        if command -v "$d" >/dev/null 2>&1; then
            LIBVIRT_VERSION="$("$d" --version 2>/dev/null | awk '{print $NF; exit}')"
            [ -z "$LIBVIRT_VERSION" ] || break
        fi
    done
fi
DROPINS=1
if [ -n "$LIBVIRT_VERSION" ] && ! version_ge "$LIBVIRT_VERSION" 6.5; then DROPINS=0; fi

CONFLICTS=()
check_ours() { if { [ -e "$1" ] || [ -L "$1" ]; } && ! is_ours "$1"; then CONFLICTS+=("$1"); fi; }
check_ours "$BIN"
for d in "${DRIVERS[@]}"; do
    [ $DROPINS = 0 ] || check_ours "$HOOKS_DIR/$d.d/smtp-gate"
done
for u in "${UNITS[@]}"; do check_ours "$UNIT_DIR/$u"; done
if [ ${#CONFLICTS[@]} -gt 0 ]; then
    for p in "${CONFLICTS[@]}"; do
        printf '%s: refusing to replace %s: this install.sh did not write it (no "%s" marker, not a link into %s)\n' \
            "$PROG" "$(shown "$p")" "$MARKER" "$APP_DIR" >&2
    done
    die "move the file(s) above away (if one is an older smtp-gate's, disable and remove it first), then run install.sh again: nothing was changed"
fi

# ---------------------------------------------------------------- 3. application directory
is_app() { [ -f "$1/smtp_gate/cli.py" ] && [ -d "$1/hooks" ] && [ -d "$1/systemd" ] && [ -f "$1/config/smtp-gate.conf.example" ]; }
say "application directory"
if [ "$SRC" = "$APP" ]; then
    same "in place" "$APP_DIR: this checkout, used as it is (update it with: git -C $APP_DIR pull)"
elif [ -e "$APP" ]; then
    is_app "$APP" || die "$(shown "$APP") exists but is not an smtp-gate application directory (no smtp_gate/cli.py, hooks/, systemd/, config/*.example): choose another --app-dir or move it away"
    same exists "$APP_DIR: left as it is; update it with: git -C $APP_DIR pull"
elif [ $NEED_CLONE = 1 ]; then
    if [ -n "$(git -c safe.directory="$SRC" -C "$SRC" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
        warn "$SRC has uncommitted changes: git clone copies commits only, so they are NOT installed"
    fi
    mkdir -p -- "$(dirname -- "$APP")"
    git -c safe.directory="$SRC" -c safe.directory="$SRC/.git" clone --quiet --no-hardlinks -- "$SRC" "$APP" \
        || die "git clone $SRC $APP failed"
    origin="$(git -c safe.directory="$SRC" -C "$SRC" remote get-url origin 2>/dev/null || true)"
    if [ -n "$origin" ]; then
        git -C "$APP" remote set-url origin "$origin"
    fi
    did cloned "$SRC -> $APP_DIR (commit $(git -C "$APP" rev-parse --short HEAD); git pull there fetches from ${origin:-$SRC})"
else
    mkdir -p -- "$APP"
    tar -C "$SRC" --exclude=./.venv --exclude=./.git --exclude=__pycache__ --exclude=./.pytest_cache \
        --exclude=./config/smtp-gate.conf --exclude=./config/whitelist.csv -cf - . | tar -C "$APP" -xf -
    did copied "$SRC -> $APP_DIR (not a git checkout: update by replacing its files, keeping config/)"
fi
is_app "$APP" || die "$(shown "$APP") is not a complete smtp-gate application directory"
for d in "${DRIVERS[@]}"; do
    if ! [ -f "$APP/hooks/$d" ] || ! [ -x "$APP/hooks/$d" ]; then die "$APP_DIR/hooks/$d is missing or not executable"; fi
done

# ---------------------------------------------------------------- 4. live config, never overwritten
say "configuration"
NEW_CONFIG=0      # 1: smtp-gate.conf was created by this run (BRIDGE may then be written, below)
for spec in smtp-gate.conf:644 whitelist.csv:640; do
    name="${spec%%:*}"; mode="${spec##*:}"
    dest="$APP/config/$name"
    if [ -e "$dest" ] || [ -L "$dest" ]; then
        same kept "$(shown "$dest") (exists: install.sh never overwrites it)"
    else
        [ -f "$dest.example" ] || die "$(shown "$dest").example is missing"
        tmp="$(mktemp -- "$APP/config/.smtp-gate.XXXXXX")"
        cat -- "$dest.example" >"$tmp"
        chmod "$mode" -- "$tmp"
        mv -n -T -- "$tmp" "$dest"
        rm -f -- "$tmp"
        did created "$(shown "$dest") (from $name.example: edit it)"
        [ "$name" != smtp-gate.conf ] || NEW_CONFIG=1
    fi
done

# ---------------------------------------------------------------- 5. Python dependencies
say "python dependencies (lxml, libvirt, filelock)"
RUN_PY="${PY:-/usr/bin/python3}"      # the interpreter path written into /usr/bin/smtp-gate
VENV="$APP/.venv"
if [ -z "$PY" ]; then
    warn "no Python >= 3.9: /usr/bin/smtp-gate will use /usr/bin/python3 and will not run until one is installed"
else
    missing=("${MISSING_MODULES[@]+"${MISSING_MODULES[@]}"}")
    if [ ${#missing[@]} -eq 0 ]; then
        same found "the distribution's packages, importable by $PY"
    elif [ -x "$VENV/bin/python" ] && [ -z "$(py_missing "$VENV/bin/python")" ]; then
        RUN_PY="$APP_DIR/.venv/bin/python"
        same unchanged "$(shown "$VENV") (virtual environment)"
    elif [ $NO_VENV = 1 ]; then   # live: already refused with the prerequisites
        debs=""; rpms=""
        for m in "${missing[@]}"; do debs+="${DEB_NAME[$m]} "; rpms+="${RPM_NAME[$m]} "; done
        warn "--no-venv: $PY cannot import ${missing[*]}; files are laid out anyway, but smtp-gate will not run until they are installed (Debian/Ubuntu: apt-get install ${debs% }; AlmaLinux/RHEL: dnf install ${rpms% })"
    else
        pips=(); for m in "${missing[@]}"; do pips+=("${PIP_NAME[$m]}"); done
        say "  $PY cannot import ${missing[*]}: building a virtual environment in $APP_DIR/.venv (it also sees the distribution's packages)"
        venv_failed() {
            printf '%s: could not build %s: %s\n' "$PROG" "$APP_DIR/.venv" "$1" >&2
            printf '      either install the distribution packages instead:\n' >&2
            howto "python3-lxml python3-libvirt python3-filelock" "python3-lxml python3-libvirt python3-filelock" >&2
            printf '      or the tools to build them (libvirt-python compiles against libvirt):\n' >&2
            howto "python3-venv python3-dev libvirt-dev pkg-config gcc" "python3-devel libvirt-devel pkgconf-pkg-config gcc" >&2
            if [ "$LIVE" = 1 ]; then
                printf '      then run install.sh again (what is installed so far stays; nothing is enforced yet)\n' >&2
                exit 1
            fi
            warn "--root: continuing without the virtual environment"
        }
        if ! "$PY" -m venv --system-site-packages -- "$VENV" >/dev/null 2>&1; then
            venv_failed "'$PY -m venv' failed (Debian/Ubuntu need python3-venv)"
        elif ! "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input --quiet "${pips[@]}"; then
            venv_failed "pip install ${pips[*]} failed"
        elif [ -n "$(py_missing "$VENV/bin/python")" ]; then
            venv_failed "the modules still do not import"
        else
            RUN_PY="$APP_DIR/.venv/bin/python"
            did built "$(shown "$VENV") (pip install ${pips[*]})"
        fi
    fi
fi

# The units run with ProtectHome=yes and PrivateTmp=yes: nothing they need may live under
# /home, /root, /run/user, /tmp or /var/tmp (neither the interpreter as named, e.g. a
# virtualenv's, nor the one it resolves to).
for p in "$RUN_PY" "$(readlink -f -- "$RUN_PY" 2>/dev/null || printf '%s' "$RUN_PY")" "$APP_DIR/"; do
    case "$p" in
        /home/*|/root/*|/run/user/*)
            warn "$p is under /home, /root or /run/user, which the systemd units hide (ProtectHome=yes): use a Python and an --app-dir outside them, or lift it with a drop-in (systemctl edit smtp-gate.service: [Service] ProtectHome=no; the same for smtp-gate-rebuild and smtp-gate-watch)" ;;
        /tmp/*|/var/tmp/*)
            warn "$p is under /tmp or /var/tmp, which the systemd units replace with a private one (PrivateTmp=yes): use a Python and an --app-dir outside them, or lift it with a drop-in (systemctl edit smtp-gate.service: [Service] PrivateTmp=no; the same for smtp-gate-rebuild and smtp-gate-watch)" ;;
    esac
done

# ---------------------------------------------------------------- 6. /usr/bin/smtp-gate
say "command"
mkdir -p -- "$(dirname -- "$BIN")"
WRAPPER="#!$RUN_PY -I
# smtp-gate command ($MARKER: written by install.sh; run install.sh again to rewrite it).
# Runs smtp_gate.cli:main from the application directory $APP_DIR with the interpreter above
# (-I: the current directory and PYTHON* variables cannot inject modules into a root command).
import os
import sys

APP = os.path.normpath(os.path.join(os.path.dirname(os.path.realpath(__file__)), \"$(relpath "$(dirname -- "$BIN")" "$APP")\"))
sys.path.insert(0, APP)
from smtp_gate.cli import main  # noqa: E402

sys.exit(main())
"
put_file "$BIN" 755 "$WRAPPER" "runs $RUN_PY"

# ---------------------------------------------------------------- 6b. the bridges guests use
# Read-only, through the installed command: which bridges the running guests' NICs are on
# (smtp-gate guest-bridges).  A config created by this run gets BRIDGE= naming them, before
# any unit applies it; an existing config is only compared, and the line to set is printed.
say "bridges of running guests"
CONF="$APP/config/smtp-gate.conf"
ASK_LIBVIRT=1
if [ "$LIVE" = 0 ] && [ -z "$LIBVIRT_URI_OPT" ]; then
    ASK_LIBVIRT=0
    say "  --root: libvirt not asked which bridges the guests use (--libvirt-uri URI asks one)"
elif [ -z "$PY" ]; then
    ASK_LIBVIRT=0
    warn "no Python >= 3.9: could not ask libvirt which bridges the guests use; set BRIDGE= in $(shown "$CONF") yourself"
fi
if [ $ASK_LIBVIRT = 1 ]; then
    uri_args=()
    [ -z "$LIBVIRT_URI_OPT" ] || uri_args=(--libvirt-uri "$LIBVIRT_URI_OPT")
    gb_err="$(mktemp)"
    gb_rc=0
    here_py="$RUN_PY"      # the wrapper's interpreter, as a path on this machine (--root: under it)
    [ "$RUN_PY" != "$APP_DIR/.venv/bin/python" ] || here_py="$VENV/bin/python"
    gb_out="$("$here_py" -I "$BIN" --config "$CONF" guest-bridges ${uri_args[@]+"${uri_args[@]}"} 2>"$gb_err")" || gb_rc=$?
    gb_msg="$(sed -n 's/^smtp-gate: error: //p' -- "$gb_err" | head -n 1)"
    unseen="$(grep -c 'UNPROTECTED:' -- "$gb_err" || true)"
    rm -f -- "$gb_err"
    if [ "$gb_rc" != 0 ]; then
        warn "could not ask libvirt which bridges the guests use: ${gb_msg:-smtp-gate guest-bridges exited $gb_rc}; BRIDGE in $(shown "$CONF") is left as it is: check it (smtp-gate guest-bridges, smtp-gate status)"
    else
        used=(); configured=(); missing=()
        while read -r br state _count; do
            [ -n "$br" ] || continue
            [[ "$br" =~ ^[A-Za-z0-9._+@-]{1,15}$ ]] || continue     # the command validated it; belt and braces
            case "$state" in
                protected) used+=("$br"); configured+=("$br") ;;
                unused) configured+=("$br") ;;
                unprotected) used+=("$br"); missing+=("$br") ;;
            esac
        done <<<"$gb_out"
        if [ ${#used[@]} -eq 0 ]; then
            same none "no running guest has a NIC on a Linux bridge: BRIDGE left as it is"
        elif [ $NEW_CONFIG = 1 ]; then
            line="BRIDGE=\"${used[*]}\""
            tmp="$(mktemp -- "$APP/config/.smtp-gate.XXXXXX")"
            awk -v line="$line" 'BEGIN { done = 0 }
                !done && /^#?[ \t]*BRIDGE=/ { print line; done = 1; next }
                { print }
                END { if (!done) print line }' "$CONF" >"$tmp" || { rm -f -- "$tmp"; die "could not write $line into $(shown "$CONF")"; }
            chmod 644 -- "$tmp"
            mv -f -T -- "$tmp" "$CONF"
            did configured "$line in $(shown "$CONF"): the bridges the running guests use"
        elif [ ${#missing[@]} -gt 0 ]; then
            warn "running guests use bridge(s) that BRIDGE does not name: ${missing[*]}.  smtp-gate does not filter guest NICs there (smtp-gate status lists them as UNPROTECTED).  To filter them, set in $(shown "$CONF"):
    BRIDGE=\"${configured[*]+${configured[*]} }${missing[*]}\"
then run: smtp-gate apply"
        else
            same ok "BRIDGE names every bridge the running guests use (${used[*]})"
        fi
    fi
    if [ "${unseen:-0}" != 0 ]; then
        say "  $unseen running guest NIC(s) are of a kind no bridge rule sees (macvtap, hostdev, vhost-user, ...): smtp-gate status lists them as UNPROTECTED"
    fi
fi

# ---------------------------------------------------------------- 7. libvirt hooks
say "libvirt hooks"
hook_entry() {  # hook_entry PATH DRIVER: a link to our hook, or a wrapper when the hook needs another Python
    local path="$1" driver="$2" rel
    mkdir -p -- "$(dirname -- "$path")"
    rel="$(relpath "$(dirname -- "$path")" "$APP/hooks/$driver")"
    if [ "$HOOK_PY" = /usr/bin/python3 ]; then
        put_link "$path" "$rel" ""
    else
        put_file "$path" 755 "#!/bin/sh
# smtp-gate libvirt $driver hook ($MARKER: written by install.sh, because /usr/bin/python3 is not
# Python >= 3.9).  Runs $APP_DIR/hooks/$driver with $HOOK_PY; stdin, stdout and arguments pass through.
exec $HOOK_PY \"\$(dirname \"\$(readlink -f \"\$0\")\")/$rel\" \"\$@\"
" "wrapper running $HOOK_PY"
    fi
}
if [ $DROPINS = 1 ]; then
    [ -n "$LIBVIRT_VERSION" ] || say "  libvirt version $( [ "$LIVE" = 1 ] && echo "unknown (no libvirtd/virtqemud found)" || echo "not checked (--root)"): assuming >= 6.5 (hooks/<driver>.d/)"
    for d in "${DRIVERS[@]}"; do
        hook_entry "$HOOKS_DIR/$d.d/smtp-gate" "$d"
        mono="$HOOKS_DIR/$d"
        if { [ -e "$mono" ] || [ -L "$mono" ]; } && is_ours "$mono"; then
            # an install made for libvirt < 6.5: the drop-in replaces it (else the hook would run twice)
            rm -f -- "$mono"
            did removed "$(shown "$mono") (our hook for libvirt < 6.5: $d.d/smtp-gate replaces it)"
        elif [ -e "$mono" ] || [ -L "$mono" ]; then
            same kept "$(shown "$mono") (someone else's hook: untouched; libvirt runs it, then $d.d/*)"
        fi
    done
else
    say "  libvirt $LIBVIRT_VERSION is older than 6.5: it runs only /etc/libvirt/hooks/<driver>, not <driver>.d/"
    for d in "${DRIVERS[@]}"; do
        mono="$HOOKS_DIR/$d"
        if [ ! -e "$mono" ] && [ ! -L "$mono" ] || is_ours "$mono"; then
            hook_entry "$mono" "$d"
        else
            warn "$(shown "$mono") is someone else's hook: left untouched.  Make it call ours: add near its top
    # smtp-gate: pass the domain XML to its hook; it prints nothing on stdout
    xml=\$(cat); printf '%s' \"\$xml\" | $APP_DIR/hooks/$d \"\$@\" >/dev/null
and let the rest of that script read \"\$xml\" instead of its stdin"
        fi
    done
fi

# ---------------------------------------------------------------- 8. systemd units
say "systemd units"
UNITS_CHANGED=0
for u in "${UNITS[@]}"; do
    [ -f "$APP/systemd/$u" ] || die "$APP_DIR/systemd/$u is missing"
    content="# $MARKER: written by install.sh from $APP_DIR/systemd/$u; change it with
# \`systemctl edit $u\` (a drop-in): install.sh rewrites this file.
$(sed "s|$DEFAULT_APP_DIR|$APP_DIR|g" -- "$APP/systemd/$u")
"
    before=$CHANGES
    put_file "$UNIT_DIR/$u" 644 "$content" ""
    [ "$CHANGES" = "$before" ] || UNITS_CHANGED=1
done

if [ "$SYSTEMD_RUNNING" = 1 ]; then
    if [ $UNITS_CHANGED = 1 ]; then
        systemctl daemon-reload
        did reloaded "systemd (systemctl daemon-reload)"
        if systemctl is-active --quiet smtp-gate-watch.service; then
            systemctl try-restart smtp-gate-watch.service
            did restarted "smtp-gate-watch.service (its unit changed)"
        fi
    fi
    for u in "${ENABLE[@]}"; do
        if systemctl is-enabled --quiet "$u" 2>/dev/null && [ $UNITS_CHANGED = 1 ]; then
            systemctl reenable --quiet "$u"      # its [Install] section may have changed
            same enabled "$u (re-enabled: the unit files changed)"
        elif systemctl is-enabled --quiet "$u" 2>/dev/null; then
            same enabled "$u"
        else
            systemctl enable --quiet "$u"
            did enabled "$u"
        fi
    done
    if [ $NO_START = 1 ]; then
        say "  not started (--no-start): enforcement starts at the next boot, or now with: systemctl start ${ENABLE[*]}"
    else
        for u in "${ENABLE[@]}"; do
            if systemctl is-active --quiet "$u"; then
                same running "$u"
            elif systemctl start "$u"; then
                did started "$u"
            else
                warn "systemctl start $u failed: see systemctl status $u and journalctl -u $u"
            fi
        done
    fi
else
    if [ "$LIVE" = 1 ]; then
        say "  systemd is not running here: nothing enabled.  On a systemd host run:"
    else
        say "  --root: nothing enabled.  On the installed system run:"
    fi
    say "    systemctl daemon-reload && systemctl enable --now ${ENABLE[*]}"
fi

# ---------------------------------------------------------------- 9. libvirt daemons
# libvirt scans its hook directory when its daemon starts and again on SIGHUP (systemctl reload:
# the daemon's reload handler calls the daemon hook with "reload", which re-runs the scan), and
# caches per driver whether any hook exists: a daemon running since before this install does not
# run ours yet.  A reload is enough; it keeps guests running and fires no hook for them.
say "libvirt"
say "  libvirt looks for hooks when its daemon starts or is reloaded (SIGHUP): a daemon running since"
say "  before this install does not call them yet."
# What guests face until then, as it is on this host now: --no-start, a host without systemd or a
# unit that failed to start leave no table, and then nothing blocks them.  (--root: nothing runs.)
if [ "$LIVE" = 1 ]; then
    if command -v nft >/dev/null 2>&1 && nft list table bridge smtp_gate >/dev/null 2>&1; then
        if [ "$SYSTEMD_RUNNING" = 1 ] && systemctl is-active --quiet smtp-gate-rebuild.timer; then
            say "  Meanwhile guests stay blocked by smtp-gate's table (bridge smtp_gate), and the 60 s rebuild"
            say "  keeps allowances exact."
        else
            say "  Meanwhile guests stay blocked by smtp-gate's table (bridge smtp_gate); no rebuild timer runs,"
            say "  so allowances change only with smtp-gate rebuild or the whitelist commands."
        fi
    else
        say "  Enforcement is NOT active: no smtp-gate table is installed, so guests are not blocked until"
        say "  smtp-gate apply (or systemctl start smtp-gate.service) installs it, or a guest starts once"
        say "  libvirt calls the hooks."
    fi
fi
if [ "$SYSTEMD_RUNNING" = 1 ]; then
    running=()
    for d in libvirtd virtqemud virtlxcd virtxend; do
        state="$(systemctl is-active "$d.service" 2>/dev/null || true)"
        enabled="$(systemctl is-enabled "$d.service" 2>/dev/null || true)/$(systemctl is-enabled "$d.socket" 2>/dev/null || true)"
        if [ "$state" = active ]; then
            running+=("$d.service")
            same running "$d.service ($( [ "$d" = libvirtd ] && echo "the monolithic daemon" || echo "a modular daemon"))"
        elif [[ "$enabled" == *enabled* ]]; then
            same enabled "$d ($( [ "$d" = libvirtd ] && echo "monolithic" || echo "modular"), not running now: it will find the hooks when it starts)"
        fi
    done
    if [ ${#running[@]} -eq 0 ]; then
        say "  no libvirt daemon is running: nothing to reload"
    elif [ "$RESTART_LIBVIRT" = 1 ]; then
        for s in "${running[@]}"; do
            if systemctl reload-or-restart "$s"; then
                did reloaded "$s (--restart-libvirt: it now calls the hooks; guests keep running)"
            else
                warn "systemctl reload-or-restart $s failed: restart it yourself (systemctl restart $s)"
            fi
        done
    else
        say "  to make them call the hooks now: systemctl reload ${running[*]}   (or: install.sh --restart-libvirt)"
    fi
elif [ "$LIVE" = 1 ]; then
    daemons="$(pgrep -x -l 'libvirtd|virtqemud|virtlxcd|virtxend' 2>/dev/null | awk '{print $2}' | sort -u | tr '\n' ' ' || true)"
    if [ -n "$daemons" ]; then
        say "  running: ${daemons}- no systemd here: send each a SIGHUP (kill -HUP <its pid>) or restart it"
    fi
    [ "$RESTART_LIBVIRT" = 0 ] || warn "--restart-libvirt: systemd is not running here; reload the libvirt daemon yourself"
else
    say "  on the installed system: systemctl reload libvirtd (monolithic daemon) or virtqemud, virtlxcd,"
    say "  virtxend (modular daemons), whichever run"
    [ "$RESTART_LIBVIRT" = 0 ] || warn "--restart-libvirt is ignored with --root"
fi

# the operator's off-switch (smtp-gate disable) outlives an update, an uninstall and a reinstall
if [ -e "$APP/config/disabled" ]; then
    warn "enforcement is disabled by the operator ($(shown "$APP/config/disabled"); see smtp-gate status): the units and hooks install nothing until: smtp-gate enable"
fi

# ---------------------------------------------------------------- 10. summary
if [ "$CHANGES" = 0 ]; then
    say "install.sh: nothing changed: smtp-gate is already installed as above"
else
    say "install.sh: done ($CHANGES change(s))"
fi
say "next: edit $APP_DIR/config/smtp-gate.conf (BRIDGE=...), then: smtp-gate apply; smtp-gate status; smtp-gate selftest"
[ "$WARNINGS" = 0 ] || say "($WARNINGS warning(s) above, on stderr)"
exit 0
