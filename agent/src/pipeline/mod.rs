//! The data path. Backup: NBD extents → chunk → hash → (skip if known) → compress → encrypt →
//! store. Restore: index → load + verify chunks in parallel → write into a sparse image.
//!
//! Memory is bounded by the number of chunks in flight ([`concurrency`]; a backup keeps as many
//! again in their object write + fsync, holding only the sealed bytes); hashing, compression,
//! encryption and storage run on the blocking thread pool so that all cores work while the NBD
//! connection keeps many reads in flight.

pub mod backup;
pub mod limit;
pub mod progress;
pub mod restore;
pub mod serve;
mod writeback;

/// How many chunks are in flight at once: enough to keep every core busy and the NBD connection
/// pipelined, small enough to bound memory (each chunk in flight holds about two chunk buffers).
pub fn concurrency() -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    (cores * 2 + 4).clamp(8, 64)
}

pub use repo_format::is_zero;

/// A test hook's per-chunk delay: environment variable `var` in milliseconds (unset, 0 or not
/// a number: none). See the hooks in [`serve`] and [`restore`].
fn test_delay(var: &str) -> Option<std::time::Duration> {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(std::time::Duration::from_millis)
}

/// The byte range `[start, end)` of chunk `idx` on a disk of `disk_size` bytes.
pub fn chunk_range(idx: u64, chunk_size: u64, disk_size: u64) -> (u64, u64) {
    let start = idx.saturating_mul(chunk_size).min(disk_size);
    let end = start.saturating_add(chunk_size).min(disk_size);
    (start, end)
}

/// Number of chunks covering `disk_size` bytes.
pub fn chunk_count(disk_size: u64, chunk_size: u64) -> u64 {
    disk_size.div_ceil(chunk_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 33]));
        let mut v = vec![0u8; 1000];
        v[999] = 1;
        assert!(!is_zero(&v));
        v[999] = 0;
        v[3] = 7;
        assert!(!is_zero(&v));
    }

    #[test]
    fn ranges() {
        assert_eq!(chunk_count(0, 4), 0);
        assert_eq!(chunk_count(9, 4), 3);
        assert_eq!(chunk_range(2, 4, 9), (8, 9));
        assert_eq!(chunk_range(5, 4, 9), (9, 9));
    }
}
