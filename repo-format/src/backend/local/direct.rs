//! Direct I/O for the local backend's chunk objects (FORMAT.md, "Local backend").
//!
//! A backup's chunk objects are written once and read only by a later restore or verify, so
//! they should neither evict the host's page cache nor cost the page-cache copy and its
//! writeback. An object of at least [`DIRECT_MIN_LEN`] bytes is written with `O_DIRECT` for its
//! [`DIRECT_ALIGN`]-aligned bulk (copied into an aligned buffer) and buffered for the tail.

use std::fs;
use std::os::unix::fs::FileExt as _;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::OFlags;
use rustix::io::Errno;

/// Chunk objects at least this long are written with direct I/O.
pub(super) const DIRECT_MIN_LEN: usize = 64 * 1024;
/// Offset, length and memory alignment of a direct write: the largest logical block size in
/// common use, so it satisfies every device and filesystem that takes `O_DIRECT` at all.
pub(super) const DIRECT_ALIGN: usize = 4096;

/// Writes `data` into the new, empty file `f`. With `direct` (the backend's flag, still set),
/// an object of at least [`DIRECT_MIN_LEN`] bytes has its bulk written with `O_DIRECT`. Where
/// the filesystem refuses direct I/O (`EINVAL`: tmpfs, some FUSE or network filesystems, an
/// alignment it does not take), the flag is cleared and the whole object is written buffered,
/// as every later one. Durability is the caller's fsync either way.
pub(super) fn write_object(
    f: &fs::File,
    data: &[u8],
    direct: Option<&AtomicBool>,
) -> std::io::Result<()> {
    let bulk = data.len() / DIRECT_ALIGN * DIRECT_ALIGN;
    let mut written = 0;
    if let Some(flag) = direct.filter(|_| data.len() >= DIRECT_MIN_LEN) {
        match write_direct(f, &data[..bulk]) {
            Ok(()) => written = bulk,
            Err(e) if e.raw_os_error() == Some(Errno::INVAL.raw_os_error()) => {
                flag.store(false, Ordering::Relaxed);
            }
            Err(e) => return Err(e),
        }
    }
    f.write_all_at(&data[written..], written as u64)
}

/// Writes `data` (a multiple of [`DIRECT_ALIGN`] bytes) at offset 0 of `f` with `O_DIRECT`,
/// then switches `f` back to buffered I/O.
fn write_direct(f: &fs::File, data: &[u8]) -> std::io::Result<()> {
    // One allocation per object from the process's heap (freed buffers are reused); the
    // data starts at its first aligned byte.
    let mut buf: Vec<u8> = Vec::with_capacity(data.len() + DIRECT_ALIGN);
    let pad = buf.as_ptr().align_offset(DIRECT_ALIGN);
    buf.resize(pad, 0);
    buf.extend_from_slice(data);
    let flags = rustix::fs::fcntl_getfl(f)?;
    rustix::fs::fcntl_setfl(f, flags | OFlags::DIRECT)?;
    // A short direct write ends on a block boundary, so the rest stays aligned.
    let result = f.write_all_at(&buf[pad..], 0);
    rustix::fs::fcntl_setfl(f, flags)?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file that refuses `O_DIRECT` (here a character device) gets the whole object through
    /// buffered writes, and the backend stops trying.
    #[test]
    fn a_refused_direct_write_falls_back() {
        let f = fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap();
        let flag = AtomicBool::new(true);
        write_object(&f, &vec![5u8; DIRECT_MIN_LEN * 2 + 17], Some(&flag)).unwrap();
        assert!(!flag.load(Ordering::Relaxed));
    }
}
