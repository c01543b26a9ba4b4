//! libvirt calls that the `virt` 0.4 crate does not wrap, made through its raw bindings
//! `virt::sys`:
//!
//! - `backup.rs`: pull-mode backup job, job stats / abort, FS freeze/thaw, checkpoints;
//! - `block_job.rs`: block pull, block job info, active block commit, block job abort/pivot;
//! - `snapshot.rs`: start a domain from a memory state file with a replacement XML.
//!
//! This is the only place in Lifeboat that may use `unsafe` freely (`#![allow(unsafe_code)]` below
//! covers this module and its children; the crate denies it everywhere else, except for the
//! `mallopt` calls (one block) at the start of `main` and the one `sync_file_range` call in
//! `pipeline/writeback.rs`). Every block
//! carries a `// SAFETY:` comment. Every function takes a live `virt` handle
//! (`virt::domain::Domain` / `virt::connect::Connect`, which own a reference to their C
//! pointer) and C strings prepared by the caller, and converts the C result into owned Rust
//! values before returning. Errors are read from libvirt's thread-local last error right after
//! the failing call, on the same thread (`virt::error::Error::last_error`).
#![allow(unsafe_code)]

use std::ffi::{c_char, CStr};

use virt::error::Error;

mod backup;
mod block_job;
mod snapshot;

pub(super) use backup::*;
pub(super) use block_job::*;
pub(super) use snapshot::*;

/// Takes ownership of a `char *` returned by libvirt: copies it and frees it.
///
/// # Safety
/// `p` must be null or a NUL-terminated string allocated with malloc that nobody else owns.
unsafe fn take_string(p: *mut c_char) -> Result<String, Error> {
    if p.is_null() {
        return Err(Error::last_error());
    }
    // SAFETY: per this function's contract `p` is a valid NUL-terminated string.
    let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    // SAFETY: libvirt allocated `p` with malloc (glib's g_malloc is malloc on Linux) and
    // transferred ownership to us; it is freed exactly once here.
    unsafe { libc::free(p.cast()) };
    Ok(s)
}

fn check(ret: i32) -> Result<i32, Error> {
    if ret < 0 {
        Err(Error::last_error())
    } else {
        Ok(ret)
    }
}
