#!/bin/bash
# virtnbdbackup vs `lifeboat backup` on one running libvirt domain (TCG, no guest OS: its only
# disk is lifeboat-bench's cached 2 GiB mixed image), two rounds, each tool on a fresh copy.
# Not yet part of lifeboat-bench (not interleaved with the ceilings).
# Incrementals run with nothing dirty: without a guest OS nothing can write to the running disk
# (HMP qemu-io is refused: the virtio-blk device does not share write access, and libvirt
# refuses <shareable/> on qcow2).
# Needs libvirtd (scripts/start-services.sh), virtnbdbackup (scripts/install-bench-peers.sh), a
# previous lifeboat-bench run (image and key file), and LIFEBOAT=/path/to/release/lifeboat.
set -u
W=${WORK:-/var/tmp/lb-virt}
LB=${LIFEBOAT:?set LIFEBOAT to the lifeboat binary}
K=/var/tmp/lifeboat-bench/cache/bench.key
IMG=/var/tmp/lifeboat-bench/cache/mixed-2048M.qcow2
V="virsh -c qemu:///system"
mkdir -p "$W" && cd "$W" || exit 1
cat > dom.xml <<XML
<domain type='qemu'>
  <name>lb-bench</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><boot dev='hd'/></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$W/disk.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
XML
reset() {
  $V destroy lb-bench >/dev/null 2>&1; $V undefine lb-bench --checkpoints-metadata >/dev/null 2>&1
  rm -f disk.qcow2; cp --sparse=always "$IMG" disk.qcow2; sync disk.qcow2
  $V define dom.xml >/dev/null && $V start lb-bench >/dev/null
}
t() { /usr/bin/time -f "$1: %e s wall, %U+%S s CPU, %M KiB peak RSS" "${@:2}" >/dev/null 2>>times.err || echo "FAILED $1"; tail -1 times.err; }
: > times.err
for round in 1 2; do
  reset; rm -rf vb vbc repo
  t "virtnbdbackup full" virtnbdbackup -d lb-bench -l full -o vb
  t "virtnbdbackup inc (nothing dirty)" virtnbdbackup -d lb-bench -l inc -o vb
  echo "virtnbdbackup output $(du -sm vb | cut -f1) MiB"
  reset
  t "virtnbdbackup --compress full" virtnbdbackup -d lb-bench -l full -o vbc --compress
  t "virtnbdbackup --compress inc (nothing dirty)" virtnbdbackup -d lb-bench -l inc -o vbc --compress
  echo "virtnbdbackup --compress output $(du -sm vbc | cut -f1) MiB"
  reset; "$LB" -r repo --key-file $K repo init -q
  t "lifeboat backup full" "$LB" -r repo --key-file $K -q backup lb-bench
  t "lifeboat backup inc (nothing dirty)" "$LB" -r repo --key-file $K -q backup lb-bench
  echo "lifeboat repo $(du -sm repo | cut -f1) MiB; load $(cut -d' ' -f1-3 /proc/loadavg)"
done
$V destroy lb-bench >/dev/null 2>&1; $V undefine lb-bench --checkpoints-metadata >/dev/null 2>&1
