#!/bin/sh
# Install everything Lifeboat's builds and end-to-end tests need on a fresh Debian 12 (bookworm)
# machine. Run as root. Idempotent: when every package is already installed it only checks
# (dpkg-query) and exits without touching apt.
#
#   scripts/install-deps.sh            # install what is missing
#   scripts/install-deps.sh --check    # exit 1 and list what is missing, install nothing
set -eu

PACKAGES="
qemu-system-x86
qemu-utils
libvirt-daemon-system
libvirt-clients
libvirt-dev
libnbd-bin
qemu-guest-agent
busybox-static
cpio
gzip
e2fsprogs
linux-image-amd64
ovmf
pkg-config
python3
util-linux
"

log() { echo "install-deps: $*"; }

missing=""
for p in $PACKAGES; do
    st=$(dpkg-query -W -f '${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$st" = installed ] || missing="$missing $p"
done

# QEMU's tools must come from the same release as qemu-system-x86: a backported qemu-utils
# (e.g. 10.x) conflicts with bookworm's qemu-system-x86 7.2 and gets removed when the latter is
# installed. Check the installed versions match.
sys_ver=$(dpkg-query -W -f '${Version}' qemu-system-x86 2>/dev/null || true)
utils_ver=$(dpkg-query -W -f '${Version}' qemu-utils 2>/dev/null || true)
if [ -n "$sys_ver" ] && [ -n "$utils_ver" ] && [ "$sys_ver" != "$utils_ver" ]; then
    log "qemu-utils $utils_ver does not match qemu-system-x86 $sys_ver"
    missing="$missing qemu-utils"
fi

if [ -z "$missing" ]; then
    log "all packages present, nothing to do"
    exit 0
fi
log "missing:$missing"
if [ "${1:-}" = "--check" ]; then
    exit 1
fi
if [ "$(id -u)" != 0 ]; then
    log "must run as root to install packages" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
log "apt-get update"
apt-get update -q

# Pin qemu-utils to the version of qemu-system-x86 that bookworm (not backports) provides.
qemu_ver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2; exit}')
if [ -z "$qemu_ver" ] || [ "$qemu_ver" = "(none)" ]; then
    log "cannot determine the candidate version of qemu-system-x86" >&2
    exit 1
fi
pkgs=""
for p in $PACKAGES; do
    case $p in
        qemu-utils) pkgs="$pkgs qemu-utils=$qemu_ver" ;;
        qemu-system-x86) pkgs="$pkgs qemu-system-x86=$qemu_ver" ;;
        *) pkgs="$pkgs $p" ;;
    esac
done
log "apt-get install$pkgs"
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends --allow-downgrades $pkgs
log "done"
