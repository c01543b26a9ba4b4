#!/usr/bin/env bash
# The main job, end to end on this machine: install what is needed, build Lifeboat, boot a small
# test VM under libvirt (TCG), write files in it, back it up live (full, then incremental), restore
# both snapshots and check the files from the host; then the same round trip for a bare disk image.
# Run as root on Debian 12:   scripts/quickstart.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD
work=${1:-/var/tmp/lifeboat-quickstart}
scripts/install-deps.sh
command -v cargo >/dev/null || { echo "quickstart: cargo not found: install the Rust toolchain (rustup) first" >&2; exit 1; }
cargo build --release -q -p lifeboat
lb="$top/target/release/lifeboat"

rm -rf "$work"; mkdir -p "$work"
export LIFEBOAT_REPO="$work/repo" LIFEBOAT_PASSWORD="quickstart-demo-passphrase"
step() { printf '\n== %s\n' "$*"; }

vm=lifeboat-quickstart
gexec() { # run a shell command in the guest through the guest agent, wait for it, print stdout
    local pid out
    pid=$(virsh -q qemu-agent-command "$vm" --timeout 30 \
        "$(python3 -c 'import json,sys; print(json.dumps({"execute":"guest-exec","arguments":{"path":"/bin/sh","arg":["-c",sys.argv[1]],"capture-output":True}}))' "$1")" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["return"]["pid"])')
    for _ in $(seq 600); do
        out=$(virsh -q qemu-agent-command "$vm" --timeout 30 "{\"execute\":\"guest-exec-status\",\"arguments\":{\"pid\":$pid}}")
        if echo "$out" | grep -q '"exited":true'; then
            echo "$out" | python3 -c 'import json,sys,base64; r=json.load(sys.stdin)["return"]; sys.stdout.write(base64.b64decode(r.get("out-data","")).decode()); sys.exit(r.get("exitcode",1))'
            return
        fi
        sleep 0.2
    done
    echo "quickstart: guest command timed out: $1" >&2; return 1
}
cleanup_vm() { virsh destroy "$vm" >/dev/null 2>&1 || true; virsh undefine --checkpoints-metadata "$vm" >/dev/null 2>&1 || true; }

step "part 1: a live VM — build the test guest, define and boot it"
scripts/start-services.sh >/dev/null
eval "$(scripts/build-test-guest.sh | grep -E '^(kernel|initrd)=')"
cleanup_vm
trap cleanup_vm EXIT
truncate -s 64M "$work/vda.raw" && mkfs.ext4 -q -F -L vda "$work/vda.raw"
qemu-img convert -f raw -O qcow2 -o compat=1.1 "$work/vda.raw" "$work/vda.qcow2" && rm "$work/vda.raw"
cat >"$work/domain.xml" <<XML
<domain type='qemu'>
  <name>$vm</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>$kernel</kernel><initrd>$initrd</initrd>
    <cmdline>console=ttyS0 quiet panic=-1</cmdline></os>
  <features><acpi/></features><on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$work/vda.qcow2'/>
      <target dev='vda' bus='virtio'/><serial>vda</serial></disk>
    <controller type='usb' model='none'/><serial type='file'><source path='$work/console.log'/></serial>
    <channel type='unix'><source mode='bind'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <video><model type='none'/></video><memballoon model='none'/></devices>
</domain>
XML
virsh -q define "$work/domain.xml" >/dev/null && virsh -q start "$vm" >/dev/null
for _ in $(seq 120); do virsh -q qemu-agent-command "$vm" --timeout 2 '{"execute":"guest-ping"}' >/dev/null 2>&1 && break; sleep 1; done

step "create an encrypted repository"
"$lb" repo init

step "write files in the guest, back it up live (freeze, pull-mode backup job, thaw)"
gexec 'echo "hello from the guest" > /mnt/vda/hello.txt && sync'
"$lb" backup "$vm"
step "write 8 MiB more, back up incrementally (reads only what changed)"
gexec 'dd if=/dev/urandom of=/mnt/vda/big bs=1M count=8 2>/dev/null && sync'
sum=$(gexec 'md5sum /mnt/vda/big' | cut -d' ' -f1)
"$lb" backup "$vm"
"$lb" snapshots "$vm"

step "restore both snapshots and check the files from the host"
first=$("$lb" snapshots "$vm" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"][:12])')
"$lb" restore "$first" --to "$work/vm-first"
"$lb" restore "$vm@latest" --to "$work/vm-latest"
for d in "$work/vm-first" "$work/vm-latest"; do
    qemu-img convert -O raw "$d/vda.qcow2" "$d/vda.raw"
    e2fsck -fn "$d/vda.raw" >/dev/null
    [ "$(debugfs -R 'cat /hello.txt' "$d/vda.raw" 2>/dev/null)" = "hello from the guest" ]
done
[ "$(debugfs -R 'cat /big' "$work/vm-latest/vda.raw" 2>/dev/null | md5sum | cut -d' ' -f1)" = "$sum" ]
printf '\nquickstart: live VM OK — both snapshots restore to clean filesystems with the guest'"'"'s files\n'
cleanup_vm

step "part 2: a bare disk image"
step "make a 512 MiB qcow2 disk image with real files, random data, duplicates, zeros and holes"
scripts/make-mixed-image.sh "$work/disk.qcow2" 512 qcow2 >/dev/null
qemu-img info "$work/disk.qcow2" | sed -n '1,4p'

step "full backup"
"$lb" backup-image "$work/disk.qcow2" --name demo-vm --disk vda
cp --sparse=always "$work/disk.qcow2" "$work/disk-at-first-backup.qcow2"

step "change 8 MiB of the disk (the persistent dirty bitmap records it), back up incrementally"
qemu-io -f qcow2 -c 'write -P 0x5a 100M 4M' -c 'write -P 0xa5 300M 4M' "$work/disk.qcow2" >/dev/null
"$lb" backup-image "$work/disk.qcow2" --name demo-vm --disk vda

step "snapshots in the repository"
"$lb" snapshots

step "verify every chunk (decrypt, decompress, re-hash)"
"$lb" verify --read-data

step "restore the latest and the first snapshot, compare with the sources"
first=$("$lb" snapshots demo-vm --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"][:12])')
"$lb" restore demo-vm@latest --to "$work/restore-latest"
"$lb" restore "$first" --to "$work/restore-first"
qemu-img compare "$work/disk.qcow2" "$work/restore-latest/vda.qcow2"
qemu-img compare "$work/disk-at-first-backup.qcow2" "$work/restore-first/vda.qcow2"
printf '\nquickstart: OK — both restored images are identical to the source at backup time (%s)\n' "$work"
