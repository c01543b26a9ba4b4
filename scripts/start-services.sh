#!/bin/sh
# Start virtlogd and libvirtd (this project's machines have no systemd) if they are not running,
# then wait until libvirt answers on qemu:///system. Idempotent; run as root.
#   scripts/start-services.sh [TIMEOUT_SECONDS]   (default 30)
set -eu

timeout=${1:-30}
log() { echo "start-services: $*"; }

# running PIDFILE -> true when the pid file names a live process
running() {
    [ -s "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

mkdir -p /run/libvirt /var/log/libvirt
# Parallel test processes may call this at the same time: one starts the daemons, the others wait.
if command -v flock >/dev/null 2>&1; then
    exec 9>/run/lifeboat-start-services.lock
    flock -w "$timeout" 9 || { log "timed out waiting for /run/lifeboat-start-services.lock" >&2; exit 1; }
fi

if [ -S /run/libvirt/virtlogd-sock ] && running /run/virtlogd.pid; then
    :
else
    log "starting virtlogd"
    rm -f /run/libvirt/virtlogd-sock /run/libvirt/virtlogd-admin-sock
    # 9>&-: the daemons must not inherit the lock's descriptor, or they hold the lock forever.
    virtlogd -d 9>&-
fi

if [ -S /run/libvirt/libvirt-sock ] && running /run/libvirtd.pid; then
    :
else
    log "starting libvirtd"
    libvirtd -d 9>&-
fi

i=0
while ! virsh -q -c qemu:///system version >/dev/null 2>&1; do
    i=$((i + 1))
    if [ "$i" -gt $((timeout * 5)) ]; then
        log "libvirtd did not answer within ${timeout}s" >&2
        virsh -c qemu:///system version >&2 || true
        exit 1
    fi
    sleep 0.2
done
log "libvirt ready"
