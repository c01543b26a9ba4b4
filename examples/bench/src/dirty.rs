//! What the bench writes into a disk between a full and an incremental backup: 64 KiB pieces
//! spread over the disk, through `qemu-io`.

use std::path::Path;

use anyhow::Result;

use crate::proc;
#[cfg(test)]
use crate::MIB;

/// Size of each dirtied piece.
pub(crate) const DIRTY_PIECE: u64 = 64 * 1024;

/// Byte offsets of `total` bytes of [`DIRTY_PIECE`] pieces spread evenly over `size` bytes
/// (one per stride; the offset inside the stride varies so that the pieces fall in different
/// places of their chunks).
pub(crate) fn dirty_offsets(size: u64, total: u64) -> Vec<u64> {
    let piece = DIRTY_PIECE;
    let n = (total / piece).max(1);
    let stride = (size / n) / piece * piece;
    (0..n)
        .map(|i| i * stride + (stride / 2 + (i / 255) * piece) % stride.max(piece) / piece * piece)
        .collect()
}

/// `qemu-io` commands writing `total` bytes in 64 KiB pieces spread evenly over `size` bytes.
/// The byte pattern and the offset inside the stride vary, so that no two dirtied chunks have
/// the same content (deduplication would flatter the incremental).
pub(crate) fn dirty_cmds(size: u64, total: u64, seed: u64) -> Vec<String> {
    dirty_offsets(size, total)
        .iter()
        .enumerate()
        .map(|(i, off)| {
            let pattern = (i as u64 + seed) % 255 + 1;
            format!("write -q -P {pattern} {off} {DIRTY_PIECE}")
        })
        .collect()
}

/// Runs `qemu-io` on the qcow2 image `img` with the commands `cmds`.
pub(crate) fn qemu_io(img: &Path, cmds: &[String], scratch: &Path) -> Result<()> {
    let p = img.to_string_lossy();
    let mut argv: Vec<&str> = vec!["qemu-io", "-f", "qcow2"];
    for c in cmds {
        argv.push("-c");
        argv.push(c);
    }
    argv.push(&p);
    proc::run(&argv, &[], scratch).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_offsets_are_spread_over_the_disk_without_repeats() {
        let size = 2u64 << 30;
        let o = dirty_offsets(size, size / 100);
        let n = o.len() as u64;
        assert_eq!(n, size / 100 / DIRTY_PIECE);
        let mut s = o.clone();
        s.sort_unstable();
        s.dedup();
        assert_eq!(s.len(), o.len(), "a piece is dirtied twice");
        assert!(o
            .iter()
            .all(|&x| x % DIRTY_PIECE == 0 && x + DIRTY_PIECE <= size));
        // One piece per stride: the first in the first stride, the last in the last.
        let stride = size / n;
        assert!(o[0] < stride);
        assert!(o[o.len() - 1] >= size - 2 * stride);
        // Not all at the same place of their 1 MiB chunk.
        let mut within: Vec<u64> = o.iter().map(|x| x % MIB).collect();
        within.sort_unstable();
        within.dedup();
        assert!(within.len() > 1);
    }

    #[test]
    fn dirty_cmds_write_the_offsets() {
        let c = dirty_cmds(512 * MIB, 5 * MIB, 7);
        let o = dirty_offsets(512 * MIB, 5 * MIB);
        assert_eq!(c.len(), o.len());
        assert_eq!(c[0], format!("write -q -P 8 {} 65536", o[0]));
    }
}
