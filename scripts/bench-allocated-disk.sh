#!/usr/bin/env bash
# Peak memory of backing up a *fully allocated* disk with many chunks, without the disk space:
# a raw file on a loop-mounted XFS whose extents are reflinks of one random MiB (every chunk
# allocated and non-zero; 16 distinct 64 KiB chunks, so the repository stays small; every index
# page is the same object). Prints the peak RSS and wall time of a full backup and of `verify`
# (which with a passphrase includes Argon2id's 64 MiB).
#   scripts/bench-allocated-disk.sh [SIZE_GIB (64)] [CHUNK (64K)] [LIFEBOAT (target/release/lifeboat)]
# Run as root; installs xfsprogs if missing. Everything lives under a temporary directory in
# /var/tmp, removed at the end.
set -euo pipefail
size_gib=${1:-64}
chunk=${2:-64K}
lifeboat=$(realpath "${3:-target/release/lifeboat}")
command -v mkfs.xfs >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q xfsprogs >/dev/null
command -v qemu-nbd >/dev/null || { echo "qemu-nbd missing: run scripts/install-deps.sh" >&2; exit 1; }

work=$(mktemp -d /var/tmp/lifeboat-alloc-XXXXXX)
cleanup() { umount "$work/mnt" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
truncate -s 1G "$work/xfs.img"
mkfs.xfs -q -m reflink=1 "$work/xfs.img"
mkdir "$work/mnt"
mount -o loop "$work/xfs.img" "$work/mnt"
chmod 755 "$work" "$work/mnt"

# One random MiB, then the file cloned onto its own end until it is SIZE_GIB GiB.
python3 - "$work/mnt/disk.raw" "$size_gib" <<'PY'
import fcntl, os, struct, sys
path, gib = sys.argv[1], int(sys.argv[2])
FICLONERANGE = 0x4020940d
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
os.write(fd, os.urandom(1 << 20))
size = 1 << 20
while size < gib << 30:
    n = min(size, (gib << 30) - size)
    fcntl.ioctl(fd, FICLONERANGE, struct.pack("=qQQQ", fd, 0, n, size))
    size += n
os.close(fd)
PY
echo "disk: $(du -h --apparent-size "$work/mnt/disk.raw" | cut -f1) apparent, $(du -h "$work/mnt/disk.raw" | cut -f1) on the filesystem"

export LIFEBOAT_REPO="$work/repo" LIFEBOAT_PASSWORD=bench
"$lifeboat" repo init --chunk-size "$chunk" --quiet
run() {
    local what=$1; shift
    # The measurement goes to standard output (GNU time writes to stderr unless -o).
    /usr/bin/time -o "$work/time.txt" -f "$what: peak RSS %M KiB, %e s wall, %U s user, %S s sys" \
        "$lifeboat" --quiet "$@"
    cat "$work/time.txt"
}
run "full backup (${size_gib} GiB, ${chunk} chunks)" backup-image "$work/mnt/disk.raw" --name alloc --disk vda
run "verify" verify
echo "index objects: $(find "$work/repo/indexes" -type f | wc -l), repository: $(du -sh "$work/repo" | cut -f1)"
