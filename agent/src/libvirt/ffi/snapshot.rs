//! Start a domain from a saved memory state file (rollback with `--memory`).

use std::ffi::CStr;

use virt::connect::Connect;
use virt::error::Error;
use virt::sys;

use super::check;

/// `virDomainRestoreFlags(conn, file, dxml, RUNNING)`: start a domain from a saved memory
/// state file, with `dxml` replacing the domain XML stored in the file.
pub(in crate::libvirt) fn restore_flags(
    conn: &Connect,
    file: &CStr,
    dxml: &CStr,
) -> Result<(), Error> {
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
