//! Early writeback of what a restore wrote.
//!
//! A restore fsyncs its image before it reports success. Left to itself, the kernel starts
//! writing dirty pages back only past `dirty_background_ratio` (10 % of RAM): a restore smaller
//! than that put everything in the page cache first and then waited, cores idle, for the whole
//! image in the final fsync (1.23–1.42 s of a raw restore of 1.3 GB here; 0.93–1.00 s with
//! early writeback, then mostly the device's cache flush), and a larger one filled the page
//! cache of a hypervisor host with gigabytes of dirty pages. Starting writeback of each range
//! as soon as it is written overlaps the disk with decryption and decompression and bounds the
//! dirty pages to what the device has not yet absorbed (≤ 2 MiB in that restore, against
//! 1.2 GiB); the final fsync still decides durability and reports any write error.

use std::fs::File;

/// Ask the kernel to start writing `len` bytes at `offset` of `file` back to the device,
/// without waiting for it. A hint: the caller's final fsync is what makes the data durable and
/// reports I/O errors, so a failure here (say, a filesystem without support) is ignored.
#[allow(unsafe_code)]
pub fn start(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd as _;
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: sync_file_range only reads its integer arguments; the descriptor is valid
        // for the call because `file` is borrowed across it.
        let _ =
            unsafe { libc::sync_file_range(file.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE) };
    }
}
