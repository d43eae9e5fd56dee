# shellcheck shell=bash
# install-common.sh - what install.sh and uninstall.sh share: the output helpers, the options both
# take (--root, --app-dir, --restart-libvirt) and their checks, the installed paths,
# systemd detection, and how to tell an entry install.sh wrote.  Not a command: both scripts
# source it from the directory they live in (a checkout, or the application directory, which
# keeps a copy so that uninstall.sh works from there), after setting PROG.
# The variables set here are the sourcing scripts' (SC2034: unused in this file alone).
# shellcheck disable=SC2034

MARKER="smtp-gate-install"          # marks every file install.sh writes outside the app dir
DEFAULT_APP_DIR=/usr/local/smtp-gate
DRIVERS=(qemu lxc libxl)

# ---------------------------------------------------------------- output helpers
CHANGES=0
WARNINGS=0
say() { printf '%s\n' "$*"; }
did() { CHANGES=$((CHANGES + 1)); printf '  %-10s %s\n' "$1" "$2"; }     # a change
same() { printf '  %-10s %s\n' "$1" "$2"; }                              # no change
warn() { WARNINGS=$((WARNINGS + 1)); printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
usage_error() { printf '%s: %s (see --help)\n' "$PROG" "$*" >&2; exit 2; }

# ---------------------------------------------------------------- options both scripts take
ROOT=""
APP_DIR="$DEFAULT_APP_DIR"
RESTART_LIBVIRT=0
# common_option ARGS...: take the option in $1 (and its value), setting OPT_ARGS to how many
# arguments it used; anything else is a usage error.  For the last case of a script's option loop.
common_option() {
    case "$1" in
        --root) [ $# -ge 2 ] || usage_error "--root needs a directory"; ROOT="$2"; OPT_ARGS=2 ;;
        --root=*) ROOT="${1#*=}"; OPT_ARGS=1 ;;
        --app-dir) [ $# -ge 2 ] || usage_error "--app-dir needs a directory"; APP_DIR="$2"; OPT_ARGS=2 ;;
        --app-dir=*) APP_DIR="${1#*=}"; OPT_ARGS=1 ;;
        --restart-libvirt) RESTART_LIBVIRT=1; OPT_ARGS=1 ;;
        *) usage_error "unknown argument '$1'" ;;
    esac
}

# Paths are pasted into generated files: keep them to a plain character set.
SAFE_PATH='^/[A-Za-z0-9._/+-]*$'
# check_app_dir: APP_DIR made absolute and normal, or a usage error
check_app_dir() {
    case "$APP_DIR" in /*) APP_DIR="$(realpath -m -s -- "$APP_DIR")" ;; *) APP_DIR="" ;; esac
    if ! [[ "$APP_DIR" =~ $SAFE_PATH ]] || [ "$APP_DIR" = / ]; then
        usage_error "--app-dir must be an absolute path of letters, digits and ._/+- (not /)"
    fi
}
# settle_root: ROOT (a directory by now, if given) resolved, "" for /; LIVE=1 when it is empty
settle_root() {
    if [ -n "$ROOT" ]; then
        ROOT="$(realpath -e -- "$ROOT")"
        [ "$ROOT" != / ] || ROOT=""
    fi
    LIVE=1; [ -z "$ROOT" ] || LIVE=0
}

# ---------------------------------------------------------------- installed paths
# set_paths: the paths as they are on this machine (under --root), and whether a running systemd
# is there to talk to (never with --root)
set_paths() {
    APP="$(realpath -m -- "$ROOT$APP_DIR")"      # where the app dir is on this machine
    BIN="$ROOT/usr/bin/smtp-gate"
    HOOKS_DIR="$ROOT/etc/libvirt/hooks"
    UNIT_DIR="$ROOT/etc/systemd/system"
    SYSTEMD_RUNNING=0
    if [ "$LIVE" = 1 ] && [ -d /run/systemd/system ] && [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ] \
        && command -v systemctl >/dev/null 2>&1; then
        SYSTEMD_RUNNING=1
    fi
}
# show a path as it is on the installed system (without the --root prefix)
shown() { if [ -n "$ROOT" ] && [ "${1#"$ROOT"}" != "$1" ]; then printf '%s' "${1#"$ROOT"}"; else printf '%s' "$1"; fi; }
# is $1 an entry install.sh (or an older layout of the same app dir) owns?
# ours: a symlink that resolves into the app dir, or a regular file carrying install.sh's marker.
is_ours() {
    local p="$1" target
    if [ -L "$p" ]; then
        target="$(readlink -f -- "$p" 2>/dev/null || true)"
        case "$target" in "$APP"/*) return 0 ;; esac
        # a dangling link into the app dir (not installed yet) still names it
        target="$(readlink -- "$p")"
        case "$target" in
            /*) target="$(realpath -m -- "$ROOT$target")" ;;     # absolute: inside --root
            *) target="$(realpath -m -- "$(dirname -- "$p")/$target")" ;;
        esac
        case "$target" in "$APP"/*) return 0 ;; esac
        return 1
    fi
    [ -f "$p" ] && grep -q -- "$MARKER" "$p" 2>/dev/null
}
