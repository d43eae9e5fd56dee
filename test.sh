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
)

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "test.sh: installing ${missing[*]}" >&2
    apt-get update -q >/dev/null
    # --no-install-recommends: libvirt-daemon-system would set up (and start) a host libvirtd
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
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
