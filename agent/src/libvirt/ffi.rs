//! libvirt calls that the `virt` 0.4 crate does not wrap (backup, checkpoints, FS freeze/thaw,
//! abort job), made through its raw bindings `virt::sys`.
//!
//! This is the only place in Lifeboat that may use `unsafe`. Every function takes a live
//! `virt::domain::Domain` (which owns a reference to its `virDomainPtr`) and C strings prepared
//! by the caller, and converts the C result into owned Rust values before returning. Errors
//! are read from libvirt's thread-local last error right after the failing call, on the same
//! thread (`virt::error::Error::last_error`).
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_uint, CStr};
use std::ptr;

use virt::domain::Domain;
use virt::error::Error;
use virt::sys;

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

/// `virDomainBackupBegin(dom, backup_xml, checkpoint_xml, 0)`.
pub(super) fn backup_begin(
    dom: &Domain,
    backup_xml: &CStr,
    checkpoint_xml: Option<&CStr>,
) -> Result<(), Error> {
    let cp = checkpoint_xml.map_or(ptr::null(), CStr::as_ptr);
    // SAFETY: `dom` holds a valid domain reference for the duration of the call; both strings
    // are valid NUL-terminated strings (or null for the optional checkpoint) that libvirt only
    // reads during the call.
    check(unsafe { sys::virDomainBackupBegin(dom.as_ptr(), backup_xml.as_ptr(), cp, 0) })?;
    Ok(())
}

/// `virDomainBackupGetXMLDesc(dom, 0)`.
pub(super) fn backup_get_xml_desc(dom: &Domain) -> Result<String, Error> {
    // SAFETY: `dom` is a valid domain reference; the call has no other pointer arguments.
    let p = unsafe { sys::virDomainBackupGetXMLDesc(dom.as_ptr(), 0) };
    // SAFETY: libvirt returns null or a malloc'ed string owned by the caller.
    unsafe { take_string(p) }
}

/// `virDomainGetJobStats(dom, 0)`: the job type (`VIR_DOMAIN_JOB_NONE` = no job) and the
/// `operation` parameter, if reported. (`virt` 0.4.3's `get_job_stats` builds a `Vec` from
/// libvirt's allocation, which is undefined behaviour when no parameters are returned.)
pub(super) fn job_stats(dom: &Domain) -> Result<(i32, Option<i32>), Error> {
    let mut job_type: c_int = 0;
    let mut params: sys::virTypedParameterPtr = ptr::null_mut();
    let mut nparams: c_int = 0;
    // SAFETY: `dom` is valid; the out-pointers point to live locals; on success libvirt sets
    // `params` to an array of `nparams` typed parameters (or null) that we own.
    check(unsafe {
        sys::virDomainGetJobStats(dom.as_ptr(), &mut job_type, &mut params, &mut nparams, 0)
    })?;
    let mut op: c_int = 0;
    let found = if params.is_null() {
        0
    } else {
        // SAFETY: `params`/`nparams` are what libvirt returned; the name is a static C string;
        // `op` is a live local.
        unsafe {
            sys::virTypedParamsGetInt(
                params,
                nparams,
                sys::VIR_DOMAIN_JOB_OPERATION.as_ptr(),
                &mut op,
            )
        }
    };
    // SAFETY: frees the array libvirt gave us (null-safe), exactly once.
    unsafe { sys::virTypedParamsFree(params, nparams) };
    Ok((job_type, (found == 1).then_some(op)))
}

/// `virDomainAbortJob(dom)`.
pub(super) fn abort_job(dom: &Domain) -> Result<(), Error> {
    // SAFETY: `dom` is a valid domain reference.
    check(unsafe { sys::virDomainAbortJob(dom.as_ptr()) })?;
    Ok(())
}

/// `virDomainFSFreeze` (`thaw == false`) or `virDomainFSThaw`; an empty list means all
/// mounted filesystems. Returns the number of filesystems frozen / thawed.
pub(super) fn fs_freeze_thaw(
    dom: &Domain,
    mountpoints: &[&CStr],
    thaw: bool,
) -> Result<u32, Error> {
    let mut ptrs: Vec<*const c_char> = mountpoints.iter().map(|m| m.as_ptr()).collect();
    let list = if ptrs.is_empty() {
        ptr::null_mut()
    } else {
        ptrs.as_mut_ptr()
    };
    let n = c_uint::try_from(ptrs.len()).unwrap_or(c_uint::MAX);
    let ret = if thaw {
        // SAFETY: `dom` is valid; `list` is null (with n == 0) or points to `n` valid C strings
        // that outlive the call; libvirt does not modify or keep the array.
        unsafe { sys::virDomainFSThaw(dom.as_ptr(), list, n, 0) }
    } else {
        // SAFETY: as above.
        unsafe { sys::virDomainFSFreeze(dom.as_ptr(), list, n, 0) }
    };
    let n = check(ret)?;
    Ok(u32::try_from(n).unwrap_or(0))
}

/// An owned `virDomainCheckpointPtr`, freed on drop.
pub(super) struct Checkpoint(sys::virDomainCheckpointPtr);

impl Drop for Checkpoint {
    fn drop(&mut self) {
        // SAFETY: `self.0` is a non-null checkpoint reference we own; freed exactly once.
        unsafe { sys::virDomainCheckpointFree(self.0) };
    }
}

impl Checkpoint {
    /// # Safety
    /// `p` must be null (then the last libvirt error is returned) or an owned checkpoint
    /// reference.
    unsafe fn from_raw(p: sys::virDomainCheckpointPtr) -> Result<Self, Error> {
        if p.is_null() {
            Err(Error::last_error())
        } else {
            Ok(Self(p))
        }
    }

    /// `virDomainCheckpointGetXMLDesc(cp, 0)`: full XML including `<domain>`, suitable for
    /// redefinition.
    pub(super) fn xml(&self) -> Result<String, Error> {
        // SAFETY: `self.0` is a valid checkpoint reference.
        let p = unsafe { sys::virDomainCheckpointGetXMLDesc(self.0, 0) };
        // SAFETY: libvirt returns null or a malloc'ed string owned by the caller.
        unsafe { take_string(p) }
    }

    /// `virDomainCheckpointDelete(cp, flags)`.
    pub(super) fn delete(&self, metadata_only: bool) -> Result<(), Error> {
        let flags = if metadata_only {
            sys::VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
        } else {
            0
        };
        // SAFETY: `self.0` is a valid checkpoint reference; deleting does not free it.
        check(unsafe { sys::virDomainCheckpointDelete(self.0, flags) })?;
        Ok(())
    }
}

/// `virDomainCheckpointLookupByName(dom, name, 0)`.
pub(super) fn checkpoint_lookup(dom: &Domain, name: &CStr) -> Result<Checkpoint, Error> {
    // SAFETY: `dom` is valid and `name` a valid C string read only during the call.
    let p = unsafe { sys::virDomainCheckpointLookupByName(dom.as_ptr(), name.as_ptr(), 0) };
    // SAFETY: the returned reference (if any) is owned by us.
    unsafe { Checkpoint::from_raw(p) }
}

/// `virDomainCheckpointCreateXML(dom, xml, flags)`.
pub(super) fn checkpoint_create(
    dom: &Domain,
    xml: &CStr,
    flags: c_uint,
) -> Result<Checkpoint, Error> {
    // SAFETY: `dom` is valid and `xml` a valid C string read only during the call.
    let p = unsafe { sys::virDomainCheckpointCreateXML(dom.as_ptr(), xml.as_ptr(), flags) };
    // SAFETY: the returned reference (if any) is owned by us.
    unsafe { Checkpoint::from_raw(p) }
}

/// Flags for redefining a checkpoint from saved XML.
pub(super) const CHECKPOINT_REDEFINE: c_uint = sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE;

/// Flags for redefining a checkpoint from saved XML, checking its bitmaps exist in the images.
pub(super) const CHECKPOINT_REDEFINE_VALIDATE: c_uint = sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
    | sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE;

/// `virDomainListAllCheckpoints(dom, &list, TOPOLOGICAL)`: parents before children.
pub(super) fn list_checkpoints(dom: &Domain) -> Result<Vec<Checkpoint>, Error> {
    let mut list: *mut sys::virDomainCheckpointPtr = ptr::null_mut();
    // SAFETY: `dom` is valid; `list` is a valid out-pointer that libvirt sets to a malloc'ed
    // array of `n` owned checkpoint references.
    let n = check(unsafe {
        sys::virDomainListAllCheckpoints(
            dom.as_ptr(),
            &mut list,
            sys::VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL,
        )
    })?;
    let n = usize::try_from(n).unwrap_or(0);
    let mut out = Vec::with_capacity(n);
    if !list.is_null() {
        for i in 0..n {
            // SAFETY: `i < n`, the array has `n` elements.
            let p = unsafe { *list.add(i) };
            if !p.is_null() {
                out.push(Checkpoint(p));
            }
        }
        // SAFETY: the array itself was malloc'ed by libvirt and is ours; its elements are now
        // owned by `out`.
        unsafe { libc::free(list.cast()) };
    }
    Ok(out)
}

/// `virDomainBlockPull(dom, disk, 0, 0)`: start pulling the backing chain of `disk` into its
/// top image (a block job; guest writes keep going to the top image).
pub(super) fn block_pull(dom: &Domain, disk: &CStr) -> Result<(), Error> {
    // SAFETY: `dom` is a valid domain reference; `disk` is a valid NUL-terminated string that
    // libvirt only reads during the call.
    check(unsafe { sys::virDomainBlockPull(dom.as_ptr(), disk.as_ptr(), 0, 0) })?;
    Ok(())
}

/// `virDomainGetBlockJobInfo(dom, disk, &info, 0)`: `None` when no block job runs on `disk`,
/// else (cur, end) progress.
pub(super) fn block_job_info(dom: &Domain, disk: &CStr) -> Result<Option<(u64, u64)>, Error> {
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
