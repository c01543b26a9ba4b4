#!/usr/bin/env bash
# The main job, end to end on this machine: install what is needed, build Lifeboat, make a disk
# image with real files, back it up into a new encrypted repository, change it, back it up
# incrementally, restore both snapshots and prove they are identical to the source.
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

step "make a 512 MiB qcow2 disk image with real files, random data, duplicates, zeros and holes"
scripts/make-mixed-image.sh "$work/disk.qcow2" 512 qcow2 >/dev/null
qemu-img info "$work/disk.qcow2" | sed -n '1,4p'

step "create an encrypted repository"
"$lb" repo init

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
