//! Block jobs: pull (instant restore), active commit and abort/pivot (rollback points), and
//! a job's progress.

use std::ffi::CStr;
use std::ptr;

use virt::domain::Domain;
use virt::error::Error;
use virt::sys;

use super::check;

/// `virDomainBlockPull(dom, disk, 0, 0)`: start pulling the backing chain of `disk` into its
/// top image (a block job; guest writes keep going to the top image).
pub(in crate::libvirt) fn block_pull(dom: &Domain, disk: &CStr) -> Result<(), Error> {
    // SAFETY: `dom` is a valid domain reference; `disk` is a valid NUL-terminated string that
    // libvirt only reads during the call.
    check(unsafe { sys::virDomainBlockPull(dom.as_ptr(), disk.as_ptr(), 0, 0) })?;
    Ok(())
}

/// `virDomainGetBlockJobInfo(dom, disk, &info, 0)`: `None` when no block job runs on `disk`,
/// else (cur, end) progress.
pub(in crate::libvirt) fn block_job_info(
    dom: &Domain,
    disk: &CStr,
) -> Result<Option<(u64, u64)>, Error> {
    let mut info = sys::virDomainBlockJobInfo {
        type_: 0,
        bandwidth: 0,
        cur: 0,
        end: 0,
    };
    // SAFETY: `dom` is valid, `disk` a valid C string, `info` a live local libvirt fills in.
    let r =
        check(unsafe { sys::virDomainGetBlockJobInfo(dom.as_ptr(), disk.as_ptr(), &mut info, 0) })?;
    Ok((r == 1).then_some((info.cur, info.end)))
}

/// `virDomainBlockCommit(dom, disk, NULL, NULL, 0, ACTIVE | SHALLOW)`: commit the active
/// (top) image of `disk` into its immediate backing image. The job then mirrors guest writes
/// until it is pivoted ([`block_job_abort`] with `pivot`).
pub(in crate::libvirt) fn block_commit_active(dom: &Domain, disk: &CStr) -> Result<(), Error> {
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
pub(in crate::libvirt) fn block_job_abort(
    dom: &Domain,
    disk: &CStr,
    pivot: bool,
) -> Result<(), Error> {
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
