#!/usr/bin/env bash
# The whole test suite on a fresh Debian/Ubuntu machine, as root:
#   sudo ./test.sh            (extra arguments go to pytest, e.g. ./test.sh -k hooks)
# Installs what the suite needs (nftables, iproute2, the build deps of libvirt-python,
# a private libvirtd + QEMU for the end-to-end test, systemd-analyze for the unit files),
# builds a virtualenv in .venv and runs pytest.  Tests that need root or a kernel feature
# skip with the reason when it is missing; as root on a kernel with nftables they run.
# CI (.ci/run) runs SMTP_GATE_REQUIRE_ALL=1 ./test.sh: there a skip is a failure.
set -euo pipefail
cd "$(dirname "$0")"

PACKAGES=(
  nftables iproute2 util-linux procps              # the product and the namespaces tests build
  python3 python3-venv python3-dev gcc pkg-config libvirt-dev   # the virtualenv and libvirt-python
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 busybox-static   # e2e lab
  systemd git shellcheck                           # systemd-analyze verify, install.sh tests
  prometheus prometheus-node-exporter              # promtool and node_exporter (tests/test_metrics.py), run as plain processes
)
# Packages whose maintainer scripts start (and enable) a daemon: installed for their binaries only.
NO_SERVICE=(prometheus.service prometheus-node-exporter.service)

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "test.sh: installing ${missing[*]}" >&2
    apt-get update -q >/dev/null
    # No daemon of these packages may start on this machine (prometheus would listen on :9090,
    # node_exporter on :9100): while apt runs, a policy-rc.d that denies every start (exit 101,
    # which invoke-rc.d and deb-systemd-invoke honour), unless the machine already has one.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      policy=/usr/sbin/policy-rc.d
      printf '#!/bin/sh\n# test.sh: no service starts while it installs packages\nexit 101\n' >"$policy"
      chmod 755 "$policy"
      trap 'rm -f "$policy"' EXIT
    fi
    # --no-install-recommends: libvirt-daemon-system would set up (and start) a host libvirtd
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    if [ -n "$policy" ]; then rm -f "$policy"; trap - EXIT; fi
    # ...and none starts at the next boot either: undo the enabling their postinst did (systemd
    # links, and SysV rc links through systemd-sysv-install), for the units of packages
    # installed just now: an operator's own node_exporter is left alone.  Works without a
    # running systemd (containers); with one, --now also stops what a lax policy-rc.d let start.
    now=()
    [ -d /run/systemd/system ] && now=(--now)
    for unit in "${NO_SERVICE[@]}"; do
      for p in "${missing[@]}"; do
        if [ "$p.service" = "$unit" ] && command -v systemctl >/dev/null; then
          systemctl disable "${now[@]}" "$unit" >/dev/null 2>&1 || echo "test.sh: could not disable $unit" >&2
        fi
      done
    done
  fi
  # The end-to-end tests' guest kernel: Debian's linux-image-amd64, which tests/libvirt_lab.py
  # downloads (apt-get download, once) into ${SMTP_GATE_TEST_CACHE:-/var/cache/smtp-gate-tests}
  # and reuses; it never boots this machine's /boot.  apt needs package lists to resolve it.
  cache="${SMTP_GATE_TEST_CACHE:-/var/cache/smtp-gate-tests}"
  if [ ! -f "$cache/kernel/vmlinuz" ] && ! apt-cache depends linux-image-amd64 2>/dev/null | grep -q 'Depends: linux-image-'; then
    echo "test.sh: apt-get update (to resolve linux-image-amd64 for the guest kernel cache in $cache)" >&2
    apt-get update -q >/dev/null
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# compat: a .pth path entry, not an import hook, so PYTHONPATH can point a test at another copy
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' --config-settings editable_mode=compat
exec .venv/bin/python -m pytest -q -ra "$@"
