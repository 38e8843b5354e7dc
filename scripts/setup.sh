# Shared set-up for scripts/example, scripts/test and the others (sourced, not run).
# Installs what vmlease needs on Debian 12 or 13 when it is missing: the apt
# packages (with sudo when not root: the only step that needs it), a virtualenv
# in .venv with vmlease and its dev tools, the tiny image. A step that fails is
# tried again on the next run; nothing is recorded as done until it is.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

APT_PACKAGES=(qemu-system-x86 qemu-system-arm gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-utils busybox-static lz4 zstd xz-utils e2fsprogs gcc libc6-dev mmdebstrap
    uidmap openssh-client genisoimage python3 python3-venv ovmf qemu-efi-aarch64 syslinux syslinux-common mtools
    dosfstools systemd-boot-efi rsync)
APT_UPDATED=0

apt_install() {
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || { echo "setup: need root (or sudo) to install: $*" >&2; exit 1; }
        sudo=sudo
    fi
    if [ $APT_UPDATED = 0 ]; then
        echo "setup: apt-get update" >&2
        $sudo apt-get update -q >/dev/null
        APT_UPDATED=1
    fi
    if [ $# -gt 0 ]; then
        echo "setup: apt-get install $*" >&2
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
    fi
}

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# The tiny image's kernel comes through apt: it needs package lists.
if [ ${#missing[@]} -gt 0 ] || ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
    apt_install "${missing[@]}"
fi

# The libvirt backend's tests: a libvirtd they start themselves, sshd for qemu+ssh://,
# and what the Python binding builds against. Where these cannot be installed,
# those tests are skipped with the reason.
LIBVIRT_PACKAGES=(libvirt-daemon-system libvirt-clients libvirt-dev pkg-config python3-dev openssh-server
    netcat-openbsd)
missing=()
for pkg in "${LIBVIRT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    ( apt_install "${missing[@]}" ) || echo "setup: libvirt could not be installed; its tests will be skipped" >&2
fi

# A normal user builds Debian images in a user namespace with subordinate ids
# (/etc/subuid, /etc/subgid); Debian gives them to users made by useradd, but
# not every user has them. The next free range of 65536 is added once.
if [ "$(id -u)" != 0 ]; then
    me=$(id -un)
    for kind in subuid subgid; do
        if ! grep -qE "^($me|$(id -u)):[0-9]+:([0-9]{5,})$" "/etc/$kind" 2>/dev/null; then
            start=$(awk -F: 'BEGIN {m = 100000} {e = $2 + $3; if (e > m) m = e} END {print m}' \
                "/etc/$kind" 2>/dev/null || echo 100000)
            flag=--add-subuids; [ $kind = subgid ] && flag=--add-subgids
            echo "setup: sudo usermod $flag $start-$((start + 65535)) $me" >&2
            sudo usermod "$flag" "$start-$((start + 65535))" "$me"
        fi
    done
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    if ! python3 -m venv .venv >/dev/null 2>&1; then
        rm -rf .venv
        apt_install python3-venv
        python3 -m venv .venv
    fi
fi
if ! .venv/bin/python -c 'import vmlease, pytest, mypy, ruff, testinfra' >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.installed ]; then
    echo "setup: pip install -e '.[dev,tools]'" >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev,tools]'
    touch .venv/.installed
fi
# The libvirt binding builds against libvirt-dev and python3-dev; until it has
# built, every run tries again (its tests are skipped, saying why, meanwhile).
if pkg-config --exists libvirt 2>/dev/null && ! .venv/bin/python -c 'import libvirt' >/dev/null 2>&1; then
    echo "setup: pip install -e '.[libvirt]'" >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[libvirt]' \
        || echo "setup: the libvirt binding did not build; its tests will be skipped (tried again next run)" >&2
fi
export PATH="$ROOT/.venv/bin:$PATH"

vmlease image build tiny >/dev/null
