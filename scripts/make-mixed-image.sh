#!/usr/bin/env bash
# Make a disk image with realistic mixed content, for tests, the quick start and benchmarks.
#   make-mixed-image.sh OUT SIZE_MIB [raw|qcow2] [SEED]
# Layout (fractions of SIZE):
#   [0, 1/2)      an ext4 filesystem filled with real files from /usr (text, binaries, libraries)
#   [1/2, 5/8)    incompressible random data
#   [5/8, 11/16)  a copy of the first half of the random data (duplicate chunks)
#   [11/16, 3/4)  explicit zeros written (allocated in raw, zero clusters in qcow2)
#   [3/4, 1)      holes, except one 1 MiB random block at 7/8
set -euo pipefail
out=${1:?usage: make-mixed-image.sh OUT SIZE_MIB [raw|qcow2] [SEED]}
size_mib=${2:?size in MiB}
fmt=${3:-qcow2}
seed=${4:-1}
(( size_mib >= 64 )) || { echo "size must be at least 64 MiB" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
raw="$tmp/disk.raw"
half=$(( size_mib / 2 ))
eighth=$(( size_mib / 8 ))
sixteenth=$(( size_mib / 16 ))

# Real files: text, binaries and libraries from /usr, up to about 70% of the filesystem.
src="$tmp/src"; mkdir -p "$src"
budget=$(( half * 1024 * 1024 * 7 / 10 ))   # bytes
find /usr/share/doc /usr/share/man /usr/lib /usr/bin /usr/share -xdev -type f -size -8M 2>/dev/null \
  | LC_ALL=C sort -u | python3 -c '
import os, sys
budget, used = int(sys.argv[1]), 0
for line in sys.stdin:
    p = line.rstrip("\n")
    try:
        n = os.path.getsize(p)
    except OSError:
        continue
    if used + n > budget:
        break
    used += n
    print(p)
' "$budget" | tar -cf - --files-from=- 2>/dev/null | tar -xf - -C "$src" 2>/dev/null || true
truncate -s "${half}M" "$tmp/fs.img"
mkfs.ext4 -q -F -L mixed -d "$src" "$tmp/fs.img" >/dev/null 2>&1 || mkfs.ext4 -q -F -L mixed "$tmp/fs.img" >/dev/null
rm -rf "$src"

truncate -s "${size_mib}M" "$raw"
dd if="$tmp/fs.img" of="$raw" bs=1M conv=notrunc,sparse status=none
rm -f "$tmp/fs.img"
# Deterministic incompressible data from the seed (openssl is not assumed: use a keyed stream).
python3 - "$raw" "$size_mib" "$seed" <<'PY'
import hashlib, sys
path, size_mib, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3]
MiB = 1 << 20
def rand_block(i):
    out = bytearray()
    ctr = 0
    while len(out) < MiB:
        out += hashlib.shake_256(f"{seed}:{i}:{ctr}".encode()).digest(1 << 16)
        ctr += 1
    return bytes(out[:MiB])
with open(path, "r+b") as f:
    start = size_mib // 2
    n_rand = size_mib // 8
    for i in range(n_rand):
        f.seek((start + i) * MiB); f.write(rand_block(i))
    dup_start = start + n_rand
    for i in range(size_mib // 16):
        f.seek((dup_start + i) * MiB); f.write(rand_block(i))
    zero_start = size_mib * 11 // 16
    for i in range(size_mib // 16):
        f.seek((zero_start + i) * MiB); f.write(b"\0" * MiB)
    f.seek((size_mib * 7 // 8) * MiB); f.write(rand_block(10**6))
PY
if [ "$fmt" = qcow2 ]; then
  qemu-img convert -q -f raw -O qcow2 -o compat=1.1 "$raw" "$out"
  # qemu-img convert skips zeros; write the explicit zero range as zero clusters so it is "allocated zero".
  qemu-io -f qcow2 -c "write -z $(( size_mib * 11 / 16 ))M ${sixteenth}M" "$out" >/dev/null
else
  mv "$raw" "$out"
fi
echo "$out"
