//! Pull-mode backup job, job stats and abort, FS freeze/thaw through the guest agent, and
//! checkpoints (lookup, create/redefine, list, XML).

use std::ffi::{c_char, c_int, c_uint, CStr};
use std::ptr;

use virt::domain::Domain;
use virt::error::Error;
use virt::sys;

use super::{check, take_string};

/// `virDomainBackupBegin(dom, backup_xml, checkpoint_xml, 0)`.
pub(in crate::libvirt) fn backup_begin(
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
pub(in crate::libvirt) fn backup_get_xml_desc(dom: &Domain) -> Result<String, Error> {
    // SAFETY: `dom` is a valid domain reference; the call has no other pointer arguments.
    let p = unsafe { sys::virDomainBackupGetXMLDesc(dom.as_ptr(), 0) };
    // SAFETY: libvirt returns null or a malloc'ed string owned by the caller.
    unsafe { take_string(p) }
}

/// `virDomainGetJobStats(dom, 0)`: the job type (`VIR_DOMAIN_JOB_NONE` = no job) and the
/// `operation` parameter, if reported. (`virt` 0.4.3's `get_job_stats` builds a `Vec` from
/// libvirt's allocation, which is undefined behaviour when no parameters are returned.)
pub(in crate::libvirt) fn job_stats(dom: &Domain) -> Result<(i32, Option<i32>), Error> {
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
pub(in crate::libvirt) fn abort_job(dom: &Domain) -> Result<(), Error> {
    // SAFETY: `dom` is a valid domain reference.
    check(unsafe { sys::virDomainAbortJob(dom.as_ptr()) })?;
    Ok(())
}

/// `virDomainFSFreeze` (`thaw == false`) or `virDomainFSThaw`; an empty list means all
/// mounted filesystems. Returns the number of filesystems frozen / thawed.
pub(in crate::libvirt) fn fs_freeze_thaw(
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
pub(in crate::libvirt) struct Checkpoint(sys::virDomainCheckpointPtr);

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
    pub(in crate::libvirt) fn xml(&self) -> Result<String, Error> {
        // SAFETY: `self.0` is a valid checkpoint reference.
        let p = unsafe { sys::virDomainCheckpointGetXMLDesc(self.0, 0) };
        // SAFETY: libvirt returns null or a malloc'ed string owned by the caller.
        unsafe { take_string(p) }
    }

    /// `virDomainCheckpointDelete(cp, flags)`.
    pub(in crate::libvirt) fn delete(&self, metadata_only: bool) -> Result<(), Error> {
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
pub(in crate::libvirt) fn checkpoint_lookup(
    dom: &Domain,
    name: &CStr,
) -> Result<Checkpoint, Error> {
    // SAFETY: `dom` is valid and `name` a valid C string read only during the call.
    let p = unsafe { sys::virDomainCheckpointLookupByName(dom.as_ptr(), name.as_ptr(), 0) };
    // SAFETY: the returned reference (if any) is owned by us.
    unsafe { Checkpoint::from_raw(p) }
}

/// `virDomainCheckpointCreateXML(dom, xml, flags)`.
pub(in crate::libvirt) fn checkpoint_create(
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
pub(in crate::libvirt) const CHECKPOINT_REDEFINE: c_uint =
    sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE;

/// Flags for redefining a checkpoint from saved XML, checking its bitmaps exist in the images.
pub(in crate::libvirt) const CHECKPOINT_REDEFINE_VALIDATE: c_uint =
    sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
        | sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE;

/// `virDomainListAllCheckpoints(dom, &list, TOPOLOGICAL)`: parents before children.
pub(in crate::libvirt) fn list_checkpoints(dom: &Domain) -> Result<Vec<Checkpoint>, Error> {
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
