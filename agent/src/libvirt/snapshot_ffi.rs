//! libvirt calls for rollback points that the `virt` 0.4 crate does not wrap: active block
//! commit, block job abort / pivot, restore from a memory state file with a replacement XML.
//!
//! Same rules as [`super::ffi`] (kept separate so that the rollback work does not edit a file
//! others change at the same time): every function takes a live `virt` handle and C strings
//! prepared by the caller; errors are read from libvirt's thread-local last error right after
//! the failing call, on the same thread.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::ptr;

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::Error;
use virt::sys;

fn check(ret: i32) -> Result<i32, Error> {
    if ret < 0 {
        Err(Error::last_error())
    } else {
        Ok(ret)
    }
}

/// `virDomainBlockCommit(dom, disk, NULL, NULL, 0, ACTIVE | SHALLOW)`: commit the active
/// (top) image of `disk` into its immediate backing image. The job then mirrors guest writes
/// until it is pivoted ([`block_job_abort`] with `pivot`).
pub(super) fn block_commit_active(dom: &Domain, disk: &CStr) -> Result<(), Error> {
    let flags = sys::VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | sys::VIR_DOMAIN_BLOCK_COMMIT_SHALLOW;
    // SAFETY: `dom` is a valid domain reference; `disk` is a valid NUL-terminated string that
    // libvirt only reads during the call; base and top are null (meaning "backing of top" with
    // SHALLOW, and "the active layer").
    check(unsafe {
        sys::virDomainBlockCommit(
            dom.as_ptr(),
            disk.as_ptr(),
            ptr::null(),
            ptr::null(),
            0,
            flags,
        )
    })?;
    Ok(())
}

/// `virDomainBlockJobAbort(dom, disk, pivot ? PIVOT : 0)` (synchronous: returns when the job
/// has ended, or failed).
pub(super) fn block_job_abort(dom: &Domain, disk: &CStr, pivot: bool) -> Result<(), Error> {
    let flags = if pivot {
        sys::VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT
    } else {
        0
    };
    // SAFETY: `dom` is a valid domain reference; `disk` is a valid NUL-terminated string that
    // libvirt only reads during the call.
    check(unsafe { sys::virDomainBlockJobAbort(dom.as_ptr(), disk.as_ptr(), flags) })?;
    Ok(())
}

/// `virDomainRestoreFlags(conn, file, dxml, RUNNING)`: start a domain from a saved memory
/// state file, with `dxml` replacing the domain XML stored in the file.
pub(super) fn restore_flags(conn: &Connect, file: &CStr, dxml: &CStr) -> Result<(), Error> {
    // SAFETY: `conn` holds a valid connection; both strings are valid NUL-terminated strings
    // that libvirt only reads during the call.
    check(unsafe {
        sys::virDomainRestoreFlags(
            conn.as_ptr(),
            file.as_ptr(),
            dxml.as_ptr(),
            sys::VIR_DOMAIN_SAVE_RUNNING,
        )
    })?;
    Ok(())
}
