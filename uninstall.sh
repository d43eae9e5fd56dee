#!/usr/bin/env bash
# uninstall.sh - undo install.sh: stop and remove the systemd units, our libvirt hooks,
# /usr/bin/smtp-gate and our nft table.  Keeps the application directory, with the live
# config/smtp-gate.conf and config/whitelist.csv, and says how to delete it.  See --help.
set -euo pipefail
umask 022

PROG=uninstall.sh
# MARKER, DEFAULT_APP_DIR, DRIVERS, the output helpers, the common options, paths and checks:
# shared with install.sh, next to this script (in the application directory or a checkout).
# SC1091 off: without -x shellcheck would only say it does not follow the file.
# shellcheck source-path=SCRIPTDIR source=install-common.sh disable=SC1091
. "$(dirname -- "$(readlink -f -- "${BASH_SOURCE[0]}")")/install-common.sh"
# stop order: the timer and the watcher first, so that nothing re-applies what we remove
UNITS=(smtp-gate-rebuild.timer smtp-gate-watch.service smtp-gate-rebuild.service smtp-gate.service)

usage() {
    cat <<EOF
Usage: ./uninstall.sh [OPTIONS]

Remove what install.sh installed: stop and disable the systemd units, remove them, our libvirt
hooks (only entries that point into the application directory or that install.sh wrote),
/usr/bin/smtp-gate, and our nft table (bridge smtp_gate).  Guests are no longer blocked
afterwards.  The application directory is kept, with config/smtp-gate.conf and
config/whitelist.csv; delete it yourself if you want (the command is printed).

Options:
  --root DIR          remove from the tree DIR: nothing on the live system is touched
                      (no systemctl, no nft, no libvirt restart)
  --app-dir DIR       application directory (default $DEFAULT_APP_DIR)
  --restart-libvirt   reload the running libvirt daemons afterwards (systemctl reload-or-restart).
                      Not needed with libvirt >= 6.5, which skips hooks that are gone; after an
                      install for libvirt < 6.5 (our hook in /etc/libvirt/hooks/<driver>) the
                      daemons are reloaded anyway, as that libvirt fails on a vanished hook
  -h, --help          show this help

Exit status: 0 removed (or nothing to remove), 1 error (something could not be removed), 2 usage.
EOF
}

# (say, did, same, warn, die, usage_error: install-common.sh)
ERRORS=0
error() { ERRORS=$((ERRORS + 1)); printf '%s: error: %s\n' "$PROG" "$*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        *) common_option "$@"; shift "$OPT_ARGS" ;;      # --root, --app-dir, --restart-libvirt, unknown
    esac
done

check_app_dir
[ -z "$ROOT" ] || [ -d "$ROOT" ] || die "--root $ROOT is not a directory"
settle_root
[ "$(id -u)" = 0 ] || [ "$LIVE" = 0 ] || die "run as root (sudo ./uninstall.sh), or use --root DIR"

set_paths
# (shown, is_ours: install-common.sh)
remove_ours() {  # remove_ours PATH WHAT
    local p="$1"
    if [ ! -e "$p" ] && [ ! -L "$p" ]; then
        return 0
    elif is_ours "$p"; then
        rm -f -- "$p"
        did removed "$(shown "$p")${2:+ ($2)}"
    else
        same kept "$(shown "$p") (not ours: neither a link into $APP_DIR nor written by install.sh)"
    fi
}

say "smtp-gate uninstall.sh: removing $( [ "$LIVE" = 1 ] && echo "from this system" || echo "from the tree $ROOT (nothing live is touched)")"

# 1. stop and disable the units first: the watcher and the timer would put the table back
say "systemd units"
if [ "$SYSTEMD_RUNNING" = 1 ]; then
    for u in "${UNITS[@]}"; do
        [ -e "$UNIT_DIR/$u" ] || continue
        if [ "$u" != smtp-gate-rebuild.service ] && [ "$(systemctl is-enabled "$u" 2>/dev/null || true)" = enabled ]; then
            systemctl disable --quiet "$u"
            did disabled "$u"
        fi
        # stop whatever the state: a watcher waiting to be restarted is not "active" yet
        state="$(systemctl is-active "$u" 2>/dev/null || true)"
        systemctl stop "$u"
        case "$state" in
            inactive|failed|unknown|"") ;;
            *) did stopped "$u (stopping removes no enforcement by itself)" ;;
        esac
    done
elif [ "$LIVE" = 1 ]; then
    say "  systemd is not running here: nothing to stop"
fi

# 2. hooks, before the table: a guest starting meanwhile would have its 'prepare' hook put the
#    table back
say "libvirt hooks"
MONOLITHIC_REMOVED=0
for d in "${DRIVERS[@]}"; do
    remove_ours "$HOOKS_DIR/$d.d/smtp-gate" ""
    # an install made for libvirt < 6.5 put our hook in the driver's own place, when that was free
    if [ -L "$HOOKS_DIR/$d" ] || { [ -f "$HOOKS_DIR/$d" ] && is_ours "$HOOKS_DIR/$d"; }; then
        before=$CHANGES
        remove_ours "$HOOKS_DIR/$d" "our hook for libvirt < 6.5"
        [ "$CHANGES" = "$before" ] || MONOLITHIC_REMOVED=1
    elif [ -e "$HOOKS_DIR/$d" ]; then
        same kept "$(shown "$HOOKS_DIR/$d") (someone else's hook; if you made it call $APP_DIR/hooks/$d, remove that line)"
    fi
    if [ -d "$HOOKS_DIR/$d.d" ] && rmdir -- "$HOOKS_DIR/$d.d" 2>/dev/null; then
        did removed "$(shown "$HOOKS_DIR/$d.d")/ (empty)"
    fi
done

# 2b. libvirt daemons.  libvirt >= 6.5 skips hooks that are gone: nothing to do.  A libvirt older
#    than 6.5 caches "this driver has a hook" and then fails every guest start and stop on the
#    missing file, until its daemon is reloaded (SIGHUP re-scans the hooks) - so that case is
#    reloaded without being asked.
say "libvirt"
if [ "$RESTART_LIBVIRT" = 1 ] || [ $MONOLITHIC_REMOVED = 1 ]; then
    why="--restart-libvirt"
    [ $MONOLITHIC_REMOVED = 0 ] || why="libvirt < 6.5 would fail guest starts on the removed hook until reloaded"
    if [ "$SYSTEMD_RUNNING" = 1 ]; then
        for d in libvirtd virtqemud virtlxcd virtxend; do
            if systemctl is-active --quiet "$d.service"; then
                if systemctl reload-or-restart "$d.service"; then
                    did reloaded "$d.service ($why)"
                else
                    error "systemctl reload-or-restart $d.service failed: restart it yourself ($why)"
                fi
            fi
        done
    elif [ "$LIVE" = 1 ] && [ $MONOLITHIC_REMOVED = 1 ]; then
        warn "reload the running libvirt daemon NOW (kill -HUP <its pid>, or restart it): $why"
    elif [ $MONOLITHIC_REMOVED = 1 ]; then
        same note "on the installed system, reload libvirtd (systemctl reload libvirtd): $why"
    else
        warn "--restart-libvirt ignored: $( [ "$LIVE" = 1 ] && echo "systemd is not running here" || echo "--root")"
    fi
else
    same nothing "libvirt needs no reload: it skips hooks that no longer exist (libvirt >= 6.5)"
fi

# 3. our nft table
say "nftables"
if [ "$LIVE" = 1 ]; then
    removed_table=0
    if [ -x "$BIN" ] && is_ours "$BIN"; then
        had_switch=0
        [ ! -e "$APP/config/disabled" ] || had_switch=1
        if out="$("$BIN" rollback 2>&1)"; then
            removed_table=1
            case "$out" in
                *"was not installed"*) same absent "table bridge smtp_gate (not installed)" ;;
                *) did removed "table bridge smtp_gate (smtp-gate rollback)" ;;
            esac
        else
            warn "smtp-gate rollback failed: $out; removing the table with nft directly"
        fi
        # rollback records the operator's off-switch (config/disabled); one made only by this
        # uninstall would keep a later reinstall from enforcing.  One the operator set before stays.
        [ $had_switch = 1 ] || rm -f -- "$APP/config/disabled"
    fi
    if [ $removed_table = 0 ]; then
        if ! command -v nft >/dev/null 2>&1; then
            same absent "nft is not installed: no table to remove"
        elif ! nft list table bridge smtp_gate >/dev/null 2>&1; then
            same absent "table bridge smtp_gate (not installed)"
        elif nft delete table bridge smtp_gate; then
            did removed "table bridge smtp_gate (nft delete table)"
        else
            error "could not remove table bridge smtp_gate: guests stay blocked; remove it with: nft delete table bridge smtp_gate"
        fi
    fi
    if [ -d /run/smtp-gate ]; then
        rm -rf -- /run/smtp-gate
        did removed "/run/smtp-gate (runtime state: lock and hook records)"
    fi
    # the metrics file (METRICS_DIR's default): node_exporter would serve it, stale, forever
    prom=/var/lib/prometheus/node-exporter/smtp_gate.prom
    if [ -e "$prom" ]; then
        rm -f -- "$prom"
        did removed "$prom (metrics for node_exporter; a METRICS_DIR of your own keeps its smtp_gate.prom)"
    fi
else
    same skipped "--root: the live nft ruleset is not touched"
fi

# 4. unit files, then the command
say "files"
UNITS_REMOVED=0
for u in "${UNITS[@]}"; do
    before=$CHANGES
    remove_ours "$UNIT_DIR/$u" ""
    [ "$CHANGES" = "$before" ] || UNITS_REMOVED=1
done
if [ "$SYSTEMD_RUNNING" = 1 ] && [ $UNITS_REMOVED = 1 ]; then
    systemctl daemon-reload
    systemctl reset-failed "${UNITS[@]}" >/dev/null 2>&1 || true
    did reloaded "systemd (systemctl daemon-reload)"
fi
remove_ours "$BIN" ""

# 6. the application directory stays
say "application directory"
if [ -d "$APP" ]; then
    same kept "$APP_DIR (the application, with config/smtp-gate.conf and config/whitelist.csv)"
    say "  to delete it too: rm -rf $APP   (keep a copy of its config/ if you may come back)"
else
    same absent "$APP_DIR"
fi

if [ $ERRORS -gt 0 ]; then
    say "uninstall.sh: finished with $ERRORS error(s) (above)"
    exit 1
elif [ "$CHANGES" = 0 ]; then
    say "uninstall.sh: nothing to remove: smtp-gate is not installed (beyond the kept directory)"
else
    say "uninstall.sh: done ($CHANGES change(s))$( [ "$LIVE" = 1 ] && echo "; smtp-gate no longer blocks any guest")"
fi
exit 0
