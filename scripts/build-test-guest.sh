#!/bin/sh
# Build the end-to-end test guest from the host's Debian packages: a copy of the Debian kernel and
# an initramfs holding busybox-static, qemu-ga (with the shared libraries it needs) and the kernel
# modules for virtio disks, the virtio-serial agent channel and ext4.
#
#   scripts/build-test-guest.sh [OUTDIR]
#
# The result is cached under /var/cache/lifeboat-tests/guest/<key>/{vmlinuz,initrd.img}, keyed by
# a hash of this script, the kernel, qemu-ga and busybox; a rerun with the same inputs only
# prints the paths. With OUTDIR the two files are also copied there. The last two lines of
# output are always `kernel=PATH` and `initrd=PATH`.
#
# Guest behaviour (see the /init written below): mounts every /dev/vd? holding ext4 at
# /mnt/<vdX>, prints LIFEBOAT-GUEST-READY on the serial console (ttyS0), and runs qemu-ga on the
# virtio-serial port named org.qemu.guest_agent.0 (restarting it if it exits). `guest-shutdown`
# (virsh shutdown --mode agent) unmounts the data disks and powers off. A guest booted through
# UEFI has the firmware's variables at /sys/firmware/efi/efivars (efivarfs).
set -eu

OUTDIR=${1:-}
CACHE_ROOT=${LIFEBOAT_GUEST_CACHE:-/var/cache/lifeboat-tests/guest}
log() { echo "build-test-guest: $*" >&2; }
die() { log "error: $*"; log "missing tools or packages? run scripts/install-deps.sh"; exit 1; }

for tool in busybox cpio gzip ldd sha256sum flock; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found"
done
QGA=/usr/sbin/qemu-ga
[ -x "$QGA" ] || die "$QGA not found (package qemu-guest-agent)"
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX not found (package busybox-static)"
# A static busybox is required: the initramfs has no libc of its own beyond qemu-ga's libraries.
if ldd "$BUSYBOX" >/dev/null 2>&1; then die "$BUSYBOX is dynamically linked; install busybox-static"; fi

# Newest Debian kernel that has its modules installed.
KVER=${LIFEBOAT_GUEST_KERNEL:-}
if [ -z "$KVER" ]; then
    for k in $(ls /boot/vmlinuz-* 2>/dev/null | sed 's|/boot/vmlinuz-||' | sort -V); do
        [ -f "/lib/modules/$k/modules.dep" ] && KVER=$k
    done
fi
[ -n "$KVER" ] || die "no /boot/vmlinuz-* with /lib/modules/<version>/modules.dep (package linux-image-amd64)"
KERNEL=/boot/vmlinuz-$KVER
MODDIR=/lib/modules/$KVER
[ -r "$KERNEL" ] || die "$KERNEL not readable"

SELF=$(readlink -f "$0")
KEY=$( {
    cat "$SELF"
    echo "kernel=$KVER $(stat -c '%s %Y' "$KERNEL")"
    "$QGA" --version 2>&1
    sha256sum "$QGA" "$BUSYBOX"
} | sha256sum | cut -c1-16)
DEST=$CACHE_ROOT/$KEY

finish() {
    if [ -n "$OUTDIR" ]; then
        mkdir -p "$OUTDIR"
        cp "$DEST/vmlinuz" "$DEST/initrd.img" "$OUTDIR/"
        chmod 0644 "$OUTDIR/vmlinuz" "$OUTDIR/initrd.img"
        echo "kernel=$OUTDIR/vmlinuz"
        echo "initrd=$OUTDIR/initrd.img"
    else
        echo "kernel=$DEST/vmlinuz"
        echo "initrd=$DEST/initrd.img"
    fi
}

if [ -f "$DEST/done" ]; then
    finish
    exit 0
fi

mkdir -p "$CACHE_ROOT"
chmod 0755 "$(dirname "$CACHE_ROOT")" "$CACHE_ROOT" 2>/dev/null || true
# Serialise concurrent builds (parallel test binaries).
exec 9>"$CACHE_ROOT/.lock"
flock -w 300 9 || die "timed out waiting for $CACHE_ROOT/.lock"
if [ -f "$DEST/done" ]; then
    finish
    exit 0
fi

log "building test guest $KEY (kernel $KVER, $("$QGA" --version 2>&1))"
WORK=$(mktemp -d "$CACHE_ROOT/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
mkdir -p "$ROOT"
cd "$ROOT"
mkdir -p bin sbin usr/bin usr/sbin lib lib64 etc proc sys dev run tmp mnt var/log modules
ln -s ../run var/run
chmod 1777 tmp

# busybox and its applets
cp "$BUSYBOX" bin/busybox
for applet in $("$BUSYBOX" --list); do
    [ -e "bin/$applet" ] || ln -s busybox "bin/$applet"
done

# qemu-ga and every shared library it needs, including the dynamic loader, at their host paths.
cp "$QGA" usr/sbin/qemu-ga
for lib in $(ldd "$QGA" | awk '/=>/ { if ($3 ~ /^\//) print $3 } !/=>/ { if ($1 ~ /^\//) print $1 }'); do
    mkdir -p "./$(dirname "$lib")"
    cp -L "$lib" "./$lib"
done

# Kernel modules in dependency order (modules.dep lists a module's dependencies; depth first,
# dependencies before dependents). crc32c_generic is loaded explicitly because ext4 and jbd2
# request "crc32c" through the crypto API at mount time and there is no modprobe to load it then.
WANT="crc32c_generic virtio_pci virtio_blk virtio_console virtio_net ext4"
ORDER=$WORK/order
: >"$ORDER"
modpath() { # module name -> path relative to MODDIR ('-' and '_' are interchangeable)
    n=$(echo "$1" | tr '_' '-')
    u=$(echo "$1" | tr '-' '_')
    awk -F: -v a="/$n.ko" -v b="/$u.ko" '{ p = $1; sub(/\.(xz|zst|gz)$/, "", p) }
        substr(p, length(p) - length(a) + 1) == a || substr(p, length(p) - length(b) + 1) == b { print $1; exit }' \
        "$MODDIR/modules.dep"
}
add_module() { # relative path
    grep -qxF "$1" "$ORDER" && return 0
    deps=$(awk -F: -v m="$1" '$1 == m { print $2; exit }' "$MODDIR/modules.dep")
    for d in $deps; do add_module "$d"; done
    grep -qxF "$1" "$ORDER" || echo "$1" >>"$ORDER"
}
for m in $WANT; do
    p=$(modpath "$m")
    if [ -z "$p" ]; then
        if grep -q "/$m.ko" "$MODDIR/modules.builtin" 2>/dev/null || grep -q "/$(echo "$m" | tr _ -).ko" "$MODDIR/modules.builtin" 2>/dev/null; then
            log "$m is built into the kernel"
            continue
        fi
        die "module $m not found in $MODDIR/modules.dep"
    fi
    add_module "$p"
done
i=0
: >modules/load-order
while read -r rel; do
    i=$((i + 1))
    base=$(basename "$rel")
    name=$(printf '%02d-%s' "$i" "$base" | sed 's/\.\(xz\|zst\|gz\)$//')
    case $rel in
        *.ko.xz) xz -dc "$MODDIR/$rel" >"modules/$name" ;;
        *.ko.zst) zstd -qdc "$MODDIR/$rel" >"modules/$name" ;;
        *.ko.gz) gzip -dc "$MODDIR/$rel" >"modules/$name" ;;
        *) cp "$MODDIR/$rel" "modules/$name" ;;
    esac
    echo "$name" >>modules/load-order
done <"$ORDER"
log "modules: $(tr '\n' ' ' <modules/load-order)"
# efivarfs only loads on UEFI firmware: kept out of the load order, /init loads and mounts it at
# /sys/firmware/efi/efivars when the guest booted through UEFI (tests write UEFI variables).
p=$(modpath efivarfs)
case $p in
    "") grep -q "/efivarfs.ko" "$MODDIR/modules.builtin" 2>/dev/null || die "module efivarfs not found" ;;
    *.ko.xz) xz -dc "$MODDIR/$p" >modules/efivarfs.ko ;;
    *.ko.zst) zstd -qdc "$MODDIR/$p" >modules/efivarfs.ko ;;
    *.ko.gz) gzip -dc "$MODDIR/$p" >modules/efivarfs.ko ;;
    *) cp "$MODDIR/$p" modules/efivarfs.ko ;;
esac

cat >init <<'INIT'
#!/bin/sh
# Lifeboat test guest init (generated by scripts/build-test-guest.sh).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755 tmpfs /run
while read -r m; do
    insmod "/modules/$m" 2>/dev/null || echo "lifeboat-guest: insmod $m failed"
done </modules/load-order
if [ -d /sys/firmware/efi ]; then
    [ -f /modules/efivarfs.ko ] && insmod /modules/efivarfs.ko
    mount -t efivarfs efivarfs /sys/firmware/efi/efivars ||
        echo "lifeboat-guest: cannot mount efivarfs"
fi

# wait (up to 5 s) for the virtio devices to appear
i=0
while [ $i -lt 50 ]; do
    ls /sys/class/virtio-ports/*/name >/dev/null 2>&1 && break
    i=$((i + 1)); sleep 0.1
done
mdev -s 2>/dev/null

# Mount point: /mnt/<disk serial> when the disk has a serial (the harness sets it to the libvirt
# target name, so target vdb is at /mnt/vdb even when the guest kernel names it vda), else
# /mnt/<kernel name>.
for dev in /dev/vd?; do
    [ -b "$dev" ] || continue
    name=${dev#/dev/}
    serial=$(cat "/sys/block/$name/serial" 2>/dev/null)
    case $serial in
        "" | *[!A-Za-z0-9_.-]*) ;;
        *) name=$serial ;;
    esac
    mkdir -p "/mnt/$name"
    if mount -t ext4 "$dev" "/mnt/$name" 2>/dev/null; then
        echo "lifeboat-guest: mounted $dev at /mnt/$name"
    else
        rmdir "/mnt/$name"
    fi
done

port=
for f in /sys/class/virtio-ports/*/name; do
    [ -r "$f" ] || continue
    if [ "$(cat "$f")" = org.qemu.guest_agent.0 ]; then
        d=${f%/name}
        port=/dev/${d##*/}
    fi
done
if [ -z "$port" ]; then
    echo "lifeboat-guest: no virtio-serial port named org.qemu.guest_agent.0"
fi
# Extra agents for tests that talk to qemu-ga directly (guest-quiesce's unix socket transport):
# one per port named org.lifeboat.qga.*, each with its own pid file and state directory.
for f in /sys/class/virtio-ports/*/name; do
    [ -r "$f" ] || continue
    case $(cat "$f") in
        org.lifeboat.qga.*)
            d=${f%/name}
            p=/dev/${d##*/}
            mkdir -p "/run/qga-${d##*/}"
            (while :; do
                qemu-ga -m virtio-serial -p "$p" -t "/run/qga-${d##*/}" -f "/run/qga-${d##*/}.pid" \
                    -l "/var/log/qemu-ga-${d##*/}.log"
                sleep 1
            done) &
            echo "lifeboat-guest: extra agent on $p"
            ;;
    esac
done
echo "LIFEBOAT-GUEST-READY agent-port=$port"
while [ -n "$port" ]; do
    qemu-ga -m virtio-serial -p "$port" -t /run -l /var/log/qemu-ga.log
    echo "lifeboat-guest: qemu-ga exited ($?), restarting"
    sleep 1
done
exec sh
INIT
chmod 0755 init

# qemu-ga's guest-shutdown runs /sbin/shutdown -h|-r -P +0 MESSAGE.
cat >sbin/shutdown <<'SHUTDOWN'
#!/bin/sh
sync
for m in /mnt/*; do
    mountpoint -q "$m" && { umount "$m" 2>/dev/null || mount -o remount,ro "$m"; }
done
sync
case " $* " in
    *" -r "*) reboot -f ;;
    *" -H "*) halt -f ;;
    *) poweroff -f ;;
esac
SHUTDOWN
chmod 0755 sbin/shutdown
for a in poweroff reboot halt; do ln -sf ../bin/busybox "sbin/$a"; done
echo 'root:x:0:0:root:/root:/bin/sh' >etc/passwd
echo 'root:x:0:' >etc/group

find . -print0 | sort -z | cpio --null -o -H newc --quiet -R 0:0 | gzip -6 >"$WORK/initrd.img"
cp "$KERNEL" "$WORK/vmlinuz"
chmod 0644 "$WORK/initrd.img" "$WORK/vmlinuz"
rm -rf "$DEST"
mkdir -p "$DEST.tmp"
mv "$WORK/vmlinuz" "$WORK/initrd.img" "$DEST.tmp/"
chmod 0755 "$DEST.tmp"
touch "$DEST.tmp/done"
mv "$DEST.tmp" "$DEST"
log "built $DEST ($(du -h "$DEST/initrd.img" | cut -f1) initrd)"
# Drop builds for other inputs that nobody has used for two days.
find "$CACHE_ROOT" -mindepth 1 -maxdepth 1 -type d ! -name "$KEY" ! -name '.*' -mtime +2 \
    -exec rm -rf {} + 2>/dev/null || true
finish
