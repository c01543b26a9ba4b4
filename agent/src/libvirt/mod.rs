//! Lifeboat's only contact with libvirt, behind a narrow, synchronous interface.
//!
//! [`Hypervisor`] is a connection, [`Dom`] a domain handle. Everything blocks: callers run
//! these calls on a blocking thread. Errors are [`LibvirtError`] with an [`ErrorKind`] to
//! branch on; pure XML helpers (parse domain / checkpoint / backup-job XML, build backup and
//! checkpoint XML) live in [`xml`] and are re-exported here.
//!
//! Pull-mode backups, as verified against libvirt 9.0 / QEMU 7.2 (`agent/tests/libvirt.rs`):
//! - each disk is exported over NBD under its target name (`vda`);
//! - for an incremental backup the changed blocks are the NBD meta context
//!   `qemu:dirty-bitmap:backup-<target>`; a full backup exposes no dirty-bitmap context;
//! - a checkpoint's persistent bitmap in each qcow2 image is named after the checkpoint, so for
//!   a shut-off domain the same data is reachable with `qemu-nbd -B <checkpoint name>`;
//! - [`Dom::abort_job`] ends the job: NBD server stopped, scratch files deleted;
//! - QEMU (user `libvirt-qemu`) creates the NBD socket, so its directory must be writable by
//!   that user (e.g. `/run/lifeboat/<job>/` chowned to it); scratch files may live in a
//!   root-owned 0755 directory (libvirt creates and labels them);
//! - a second `backup_begin` while a job runs would block 30 s on libvirt's job lock, so it is
//!   refused up front with [`ErrorKind::JobActive`];
//! - a checkpoint name whose bitmap is still in the image (metadata deleted with
//!   `metadata_only`) cannot be reused: [`ErrorKind::CheckpointExists`] ("Bitmap already
//!   exists"); redefine it instead.

mod error;
mod ffi;
pub mod rewrite;
pub mod snapshot;
pub mod xml;

use std::ffi::CString;
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

pub use error::{ErrorKind, LibvirtError, Result};
pub use xml::{
    backup_xml, checkpoint_xml, parse_backup_job_xml, parse_checkpoint_xml, parse_domain_xml,
    BackupDisk, BackupJobDisk, BackupJobInfo, BackupSpec, CheckpointInfo, CheckpointSpec,
    DiskDevice, DiskInfo, DiskSource, DomainXmlInfo,
};

/// How long [`Dom::abort_job`] waits for libvirt to finish the aborted job.
pub const ABORT_TIMEOUT: Duration = Duration::from_secs(30);

fn cstring(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| {
        LibvirtError::new(
            ErrorKind::InvalidData,
            format!("{what} contains a NUL byte"),
        )
    })
}

/// A connection to a libvirt hypervisor (e.g. `qemu:///system`).
pub struct Hypervisor {
    conn: Connect,
    uri: String,
}

impl std::fmt::Debug for Hypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hypervisor")
            .field("uri", &self.uri)
            .finish()
    }
}

impl Hypervisor {
    /// Opens a read-write connection. Also silences libvirt's default error printer (errors
    /// reach the caller as [`LibvirtError`]).
    pub fn connect(uri: &str) -> Result<Self> {
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(uri)).map_err(|e| {
            LibvirtError::with_source(
                ErrorKind::Connect,
                format!("connect to libvirt at {uri}"),
                e,
            )
        })?;
        Ok(Self {
            conn,
            uri: uri.to_owned(),
        })
    }

    /// The URI given to [`Hypervisor::connect`].
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Looks a domain up by name.
    pub fn domain(&self, name: &str) -> Result<Dom> {
        if name.contains('\0') {
            return Err(LibvirtError::new(
                ErrorKind::InvalidData,
                "domain name contains a NUL byte",
            ));
        }
        Domain::lookup_by_name(&self.conn, name)
            .map(|d| Dom::new(d, name.to_owned()))
            .map_err(|e| LibvirtError::from_virt(format!("look up domain {name}"), e))
    }

    /// Names of all domains, running and defined-but-inactive.
    pub fn list_domains(&self) -> Result<Vec<String>> {
        let doms = self
            .conn
            .list_all_domains(0)
            .map_err(|e| LibvirtError::from_virt("list domains", e))?;
        doms.iter()
            .map(|d| {
                d.get_name()
                    .map_err(|e| LibvirtError::from_virt("get domain name", e))
            })
            .collect()
    }

    /// Whether a domain with this name is defined (running or not).
    pub fn domain_exists(&self, name: &str) -> Result<bool> {
        match self.domain(name) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NoSuchDomain => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Defines (persistently) a domain from XML, replacing the definition of a domain with the
    /// same name and UUID.
    pub fn define_xml(&self, xml: &str) -> Result<Dom> {
        cstring("domain XML", xml)?;
        let d = Domain::define_xml(&self.conn, xml)
            .map_err(|e| LibvirtError::from_virt("define domain", e))?;
        let name = d
            .get_name()
            .map_err(|e| LibvirtError::from_virt("get name of defined domain", e))?;
        Ok(Dom::new(d, name))
    }
}

/// Transient domains and screenshots, used by boot tests.
impl Hypervisor {
    /// Creates and starts a transient domain (`virDomainCreateXML`): it has no persistent
    /// definition and is gone once destroyed. With `autodestroy` libvirt also destroys it when
    /// this connection closes (including when the process dies), so a killed caller leaves no
    /// running domain. The returned [`Dom`] keeps the connection open.
    pub fn create_transient(&self, xml: &str, autodestroy: bool) -> Result<Dom> {
        cstring("domain XML", xml)?;
        let flags = if autodestroy {
            sys::VIR_DOMAIN_START_AUTODESTROY
        } else {
            sys::VIR_DOMAIN_NONE
        };
        let d = Domain::create_xml(&self.conn, xml, flags)
            .map_err(|e| LibvirtError::from_virt("create transient domain", e))?;
        let name = d
            .get_name()
            .map_err(|e| LibvirtError::from_virt("get name of created domain", e))?;
        Ok(Dom::new(d, name))
    }
}

impl Dom {
    /// A screenshot of the domain's first display (`virDomainScreenshot`): the image bytes (QEMU
    /// sends PPM) and their MIME type. Reads at most `max_bytes`.
    pub fn screenshot(&self, max_bytes: usize) -> Result<(Vec<u8>, String)> {
        let conn = self
            .dom
            .get_connect()
            .map_err(|e| self.err("get connection", e))?;
        let stream = virt::stream::Stream::new(&conn, 0).map_err(|e| self.err("new stream", e))?;
        let mime = self
            .dom
            .screenshot(&stream, 0, 0)
            .map_err(|e| self.err("screenshot", e))?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = stream
                .recv(&mut buf)
                .map_err(|e| self.err("read screenshot stream", e))?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(buf.get(..n).unwrap_or_default());
            if out.len() > max_bytes {
                let _ = stream.abort();
                return Err(LibvirtError::new(
                    ErrorKind::InvalidData,
                    format!(
                        "screenshot of domain {} exceeds {max_bytes} bytes",
                        self.name
                    ),
                ));
            }
        }
        let _ = stream.finish();
        Ok((out, mime))
    }
}

impl Drop for Hypervisor {
    fn drop(&mut self) {
        // `virt` 0.4's Connect does not close itself; domains keep their own reference to the
        // connection, so open `Dom`s stay usable.
        let _ = self.conn.close();
    }
}

/// Run state of a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomState {
    /// Running (or blocked on a resource).
    Running,
    /// Paused by the user or by libvirt.
    Paused,
    /// Being shut down.
    ShuttingDown,
    /// Not running.
    ShutOff,
    /// Crashed.
    Crashed,
    /// Suspended by guest power management.
    PmSuspended,
    /// Another `virDomainState` value.
    Other(u32),
}

/// Kind of job active on a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// A backup job (`VIR_DOMAIN_JOB_OPERATION_BACKUP`).
    Backup,
    /// Another job (migration, save, dump, ...), by `virDomainJobOperation` number.
    Other(i32),
}

/// Whether [`Dom::redefine_checkpoint`] had libvirt check the bitmaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Redefined {
    /// Running domain: libvirt verified every bitmap of the checkpoint exists and is usable.
    Validated,
    /// Shut-off domain: metadata recreated without checking the images.
    Unvalidated,
}

/// A handle to one domain. `Send`: it can be moved to a blocking thread.
pub struct Dom {
    dom: Domain,
    name: String,
}

impl std::fmt::Debug for Dom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dom").field("name", &self.name).finish()
    }
}

impl Dom {
    fn new(dom: Domain, name: String) -> Self {
        Self { dom, name }
    }

    fn err(&self, what: &str, e: virt::error::Error) -> LibvirtError {
        LibvirtError::from_virt(format!("{what} (domain {})", self.name), e)
    }

    fn agent_err(&self, what: &str, e: virt::error::Error) -> LibvirtError {
        LibvirtError::from_virt_agent(format!("{what} (domain {})", self.name), e)
    }

    /// Domain name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Domain UUID (lower-case, with dashes).
    pub fn uuid(&self) -> Result<String> {
        self.dom
            .get_uuid_string()
            .map_err(|e| self.err("get UUID", e))
    }

    /// Current run state.
    pub fn state(&self) -> Result<DomState> {
        let (state, _reason) = self.dom.get_state().map_err(|e| self.err("get state", e))?;
        Ok(match state {
            sys::VIR_DOMAIN_RUNNING | sys::VIR_DOMAIN_BLOCKED => DomState::Running,
            sys::VIR_DOMAIN_PAUSED => DomState::Paused,
            sys::VIR_DOMAIN_SHUTDOWN => DomState::ShuttingDown,
            sys::VIR_DOMAIN_SHUTOFF => DomState::ShutOff,
            sys::VIR_DOMAIN_CRASHED => DomState::Crashed,
            sys::VIR_DOMAIN_PMSUSPENDED => DomState::PmSuspended,
            other => DomState::Other(other),
        })
    }

    /// Whether the domain is running (has a QEMU process).
    pub fn is_active(&self) -> Result<bool> {
        self.dom
            .is_active()
            .map_err(|e| self.err("query active", e))
    }

    /// Domain XML: the live one, or the persistent definition (`inactive`). Secrets (VNC
    /// passwords) are not included.
    pub fn xml(&self, inactive: bool) -> Result<String> {
        let flags = if inactive {
            sys::VIR_DOMAIN_XML_INACTIVE
        } else {
            0
        };
        self.dom
            .get_xml_desc(flags)
            .map_err(|e| self.err("get domain XML", e))
    }

    /// Disks, parsed from the live XML (which for a shut-off domain is the definition).
    pub fn disks(&self) -> Result<Vec<DiskInfo>> {
        Ok(parse_domain_xml(&self.xml(false)?)?.disks)
    }

    /// Sends a raw QEMU guest agent command (`virDomainQemuAgentCommand`), waiting at most
    /// `timeout_secs` (at least 1) for the reply. No agent → [`ErrorKind::NoAgent`].
    pub fn agent_command(&self, json: &str, timeout_secs: u32) -> Result<String> {
        cstring("agent command", json)?;
        let timeout = i32::try_from(timeout_secs.max(1)).unwrap_or(i32::MAX);
        self.dom
            .qemu_agent_command(json, timeout, 0)
            .map_err(|e| self.agent_err("guest agent command", e))
    }

    /// Freezes guest filesystems through the guest agent (all when `mountpoints` is empty);
    /// returns how many were frozen. No agent → [`ErrorKind::NoAgent`]. libvirt applies its
    /// agent response timeout (`virsh guest-agent-timeout`).
    pub fn fs_freeze(&self, mountpoints: &[String]) -> Result<u32> {
        self.freeze_thaw(mountpoints, false)
    }

    /// Thaws guest filesystems (all when `mountpoints` is empty); returns how many.
    pub fn fs_thaw(&self, mountpoints: &[String]) -> Result<u32> {
        self.freeze_thaw(mountpoints, true)
    }

    fn freeze_thaw(&self, mountpoints: &[String], thaw: bool) -> Result<u32> {
        let cs = mountpoints
            .iter()
            .map(|m| cstring("mountpoint", m))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&std::ffi::CStr> = cs.iter().map(|c| c.as_c_str()).collect();
        let what = if thaw {
            "thaw guest filesystems"
        } else {
            "freeze guest filesystems"
        };
        ffi::fs_freeze_thaw(&self.dom, &refs, thaw).map_err(|e| self.agent_err(what, e))
    }

    /// All checkpoints, parents before children, with their full XML.
    pub fn checkpoints(&self) -> Result<Vec<CheckpointInfo>> {
        let list = ffi::list_checkpoints(&self.dom).map_err(|e| self.err("list checkpoints", e))?;
        list.iter()
            .map(|c| {
                let xml = c.xml().map_err(|e| self.err("get checkpoint XML", e))?;
                parse_checkpoint_xml(&xml)
            })
            .collect()
    }

    fn checkpoint(&self, name: &str) -> Result<ffi::Checkpoint> {
        let c = cstring("checkpoint name", name)?;
        ffi::checkpoint_lookup(&self.dom, &c)
            .map_err(|e| self.err(&format!("look up checkpoint {name}"), e))
    }

    /// Full XML of one checkpoint (including `<domain>`): what to save in the repository to
    /// [`Dom::redefine_checkpoint`] it later.
    pub fn checkpoint_xml(&self, name: &str) -> Result<String> {
        self.checkpoint(name)?
            .xml()
            .map_err(|e| self.err(&format!("get XML of checkpoint {name}"), e))
    }

    /// Recreates checkpoint metadata from saved XML (`REDEFINE`). Redefining a checkpoint
    /// that exists with the same XML succeeds (idempotent). On a running domain libvirt also
    /// validates (`REDEFINE_VALIDATE`) that the bitmaps exist in the images: a missing or
    /// broken bitmap is [`ErrorKind::CheckpointInconsistent`]. libvirt refuses validation for a
    /// shut-off domain, so there the metadata is redefined unchecked
    /// ([`Redefined::Unvalidated`]); check the bitmaps with `qemu-img info` instead. Parents
    /// must be redefined before children.
    pub fn redefine_checkpoint(&self, xml: &str) -> Result<Redefined> {
        let c = cstring("checkpoint XML", xml)?;
        let name = parse_checkpoint_xml(xml).map_or_else(|_| "?".to_owned(), |c| c.name);
        let (flags, outcome) = if self.is_active()? {
            (ffi::CHECKPOINT_REDEFINE_VALIDATE, Redefined::Validated)
        } else {
            (ffi::CHECKPOINT_REDEFINE, Redefined::Unvalidated)
        };
        ffi::checkpoint_create(&self.dom, &c, flags)
            .map_err(|e| self.err(&format!("redefine checkpoint {name}"), e))?;
        Ok(outcome)
    }

    /// Deletes a checkpoint. With `metadata_only` only libvirt's record goes, the bitmaps stay
    /// in the images (to be redefined later); otherwise libvirt also removes (merges into the
    /// parent) the bitmaps.
    pub fn delete_checkpoint(&self, name: &str, metadata_only: bool) -> Result<()> {
        self.checkpoint(name)?
            .delete(metadata_only)
            .map_err(|e| self.err(&format!("delete checkpoint {name}"), e))
    }

    /// Starts a pull-mode backup job (and creates `spec.new_checkpoint` atomically with it).
    /// The NBD server listens on `spec.socket` once this returns.
    pub fn backup_begin(&self, spec: &BackupSpec) -> Result<()> {
        let bx = cstring("backup XML", &backup_xml(spec)?)?;
        let cx = match &spec.new_checkpoint {
            Some(c) => Some(cstring("checkpoint XML", &checkpoint_xml(c)?)?),
            None => None,
        };
        // libvirt would wait 30 s for the domain's job lock before failing; fail fast instead
        // (a job starting between this check and the call still gets libvirt's error).
        if let Some(job) = self.active_job()? {
            return Err(LibvirtError::new(
                ErrorKind::JobActive,
                format!(
                    "begin backup job (domain {}): a {job:?} job is already active",
                    self.name
                ),
            ));
        }
        ffi::backup_begin(&self.dom, &bx, cx.as_deref())
            .map_err(|e| self.err("begin backup job", e))
    }

    /// XML of the running backup job (`virDomainBackupGetXMLDesc`): export names, bitmaps,
    /// scratch files. See [`parse_backup_job_xml`] / [`Dom::backup_job`].
    pub fn backup_xml_desc(&self) -> Result<String> {
        ffi::backup_get_xml_desc(&self.dom).map_err(|e| self.err("get backup job XML", e))
    }

    /// The running backup job, parsed.
    pub fn backup_job(&self) -> Result<BackupJobInfo> {
        parse_backup_job_xml(&self.backup_xml_desc()?)
    }

    /// The job active on the domain, if any. A shut-off domain has none.
    pub fn active_job(&self) -> Result<Option<JobKind>> {
        if !self.is_active()? {
            return Ok(None);
        }
        let (job_type, operation) = match ffi::job_stats(&self.dom) {
            Ok(s) => s,
            Err(e) => {
                let e = self.err("get job stats", e);
                // Raced with a shutdown.
                return if e.kind() == ErrorKind::NotRunning {
                    Ok(None)
                } else {
                    Err(e)
                };
            }
        };
        if job_type == sys::VIR_DOMAIN_JOB_NONE as i32 {
            return Ok(None);
        }
        Ok(Some(match operation {
            Some(op) if op == sys::VIR_DOMAIN_JOB_OPERATION_BACKUP as i32 => JobKind::Backup,
            op => JobKind::Other(op.unwrap_or(0)),
        }))
    }

    /// Aborts the active job; for a pull backup this ends it: the NBD server stops, the
    /// fleecing state is dropped and libvirt deletes the scratch files. libvirt returns before
    /// the job is gone, so this waits until no job is active (at most [`ABORT_TIMEOUT`]; then
    /// [`ErrorKind::JobActive`]). No job → [`ErrorKind::NoJob`].
    pub fn abort_job(&self) -> Result<()> {
        ffi::abort_job(&self.dom).map_err(|e| self.err("abort job", e))?;
        let start = Instant::now();
        while self.active_job()?.is_some() {
            if start.elapsed() > ABORT_TIMEOUT {
                return Err(LibvirtError::new(
                    ErrorKind::JobActive,
                    format!(
                        "job of domain {} still active {}s after abort",
                        self.name,
                        ABORT_TIMEOUT.as_secs()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

/// Lifecycle and block jobs, used by restore and instant restore.
impl Dom {
    /// Starts the (defined, inactive) domain.
    pub fn start(&self) -> Result<()> {
        self.dom.create().map_err(|e| self.err("start", e))?;
        Ok(())
    }

    /// Stops the domain at once (power off), if it runs.
    pub fn destroy(&self) -> Result<()> {
        if self.is_active()? {
            self.dom.destroy().map_err(|e| self.err("destroy", e))?;
        }
        Ok(())
    }

    /// Removes the definition (with checkpoint and snapshot metadata). The NVRAM file is kept
    /// (`keep_nvram`) or deleted by libvirt.
    pub fn undefine(&self, keep_nvram: bool) -> Result<()> {
        let nvram = if keep_nvram {
            sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM
        } else {
            sys::VIR_DOMAIN_UNDEFINE_NVRAM
        };
        let flags = nvram
            | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA;
        self.dom
            .undefine_flags(flags)
            .map_err(|e| self.err("undefine", e))
    }

    /// Starts a block pull on disk `target`: QEMU copies everything the top image reads from
    /// its backing chain into the top image, then drops the backing chain. Guest writes keep
    /// going to the top image meanwhile. See [`Dom::block_job`].
    pub fn block_pull(&self, target: &str) -> Result<()> {
        let t = cstring("disk target", target)?;
        ffi::block_pull(&self.dom, &t).map_err(|e| self.err(&format!("block pull {target}"), e))
    }

    /// Progress `(done, total)` of the block job on `target`, or `None` when none runs (it
    /// finished, failed or was never started: check the backing chain to tell).
    pub fn block_job(&self, target: &str) -> Result<Option<(u64, u64)>> {
        let t = cstring("disk target", target)?;
        ffi::block_job_info(&self.dom, &t)
            .map_err(|e| self.err(&format!("block job info {target}"), e))
    }
}
