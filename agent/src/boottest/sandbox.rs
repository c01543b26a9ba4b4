//! Everything a boot test creates, and its teardown.
//!
//! [`Sandbox::create`]: the snapshot's disks are served read-only by instant restore's NBD server
//! (`commands::instant_restore::serve`), each gets a throw-away qcow2 overlay backed by its
//! export in the sandbox directory (so the backup is never modified and guest writes go nowhere
//! that lasts), the stored domain XML is rewritten (`relocate::prepare`: new name, no UUID, no
//! MACs, every `<interface>` removed, disks on the overlays) and isolated
//! ([`super::xml::sandbox_xml`]), and the domain is created **transient** with
//! `VIR_DOMAIN_START_AUTODESTROY`: libvirt keeps no definition, and destroys the domain by itself
//! if our connection goes away (even on `kill -9`).
//!
//! Teardown ([`Sandbox::teardown`], and [`Drop`] for every other path — an error, a timeout, or
//! Ctrl-C/SIGTERM, which drop the command's future): destroy the domain (through a fresh
//! connection, so a guest-agent call in flight cannot block it), stop the NBD server, remove the
//! sockets, the overlays and console log (the sandbox directory), and libvirt's per-domain QEMU
//! log. Nothing is left: no domain, no definition, no file, no server.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use repo_format::{Manifest, Repository};

use super::xml::{sandbox_xml, SandboxXml};
use crate::commands::instant_restore::{create_overlays, serve, Serving, StateDisk};
use crate::error::{Context, Error, ErrorKind, Result};
use crate::libvirt::rewrite::{NetworkPolicy, NewDisk};
use crate::libvirt::{Dom, Hypervisor};
use crate::relocate::{self, Layout};
use crate::repo::blocking;

/// Where libvirt's system instance writes per-domain QEMU logs.
const QEMU_LOG_DIR: &str = "/var/log/libvirt/qemu";

/// The sandbox domain handle, shared with blocking threads (guest-agent calls).
pub type SharedDom = Arc<Mutex<Dom>>;

/// A running sandbox. Dropping it tears everything down (blocking).
pub struct Sandbox {
    /// Domain name.
    pub name: String,
    /// libvirt URI.
    pub uri: String,
    /// Sandbox directory (overlays, console log).
    pub dir: PathBuf,
    /// Console log file.
    pub console: PathBuf,
    /// The XML it was created from and what it found.
    pub xml: SandboxXml,
    socket_dir: PathBuf,
    serving: Option<Serving>,
    dom: Option<SharedDom>,
    torn_down: bool,
}

impl Sandbox {
    /// Serves the snapshot, creates the overlays and the transient domain. On failure everything
    /// created so far is removed again.
    pub async fn create(
        repo: &Arc<Repository>,
        manifest: &Manifest,
        uri: &str,
        work_root: &Path,
        name: &str,
    ) -> Result<Sandbox> {
        std::fs::create_dir_all(work_root).ctx(ErrorKind::Target, || {
            format!("cannot create '{}'", work_root.display())
        })?;
        let root = std::fs::canonicalize(work_root).ctx(ErrorKind::Target, || {
            format!("cannot resolve '{}'", work_root.display())
        })?;
        let dir = root.join(name);
        std::fs::create_dir(&dir).ctx(ErrorKind::Target, || {
            format!("cannot create the sandbox directory '{}'", dir.display())
        })?;
        let socket_dir = crate::socket_dirs::for_storage(&dir);
        let console = dir.join("console.log");
        // From here on, Drop cleans up.
        let mut sb = Sandbox {
            name: name.to_string(),
            uri: uri.to_string(),
            dir: dir.clone(),
            console: console.clone(),
            xml: SandboxXml {
                xml: String::new(),
                graphics: false,
                agent_channel: false,
                removed: Vec::new(),
            },
            socket_dir: socket_dir.clone(),
            serving: None,
            dom: None,
            torn_down: false,
        };
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755));
        }
        let disks: Vec<StateDisk> = manifest
            .disks
            .iter()
            .map(|d| StateDisk {
                target: d.name.clone(),
                overlay: dir.join(format!("{}.qcow2", d.name)),
                socket: socket_dir.join(format!("{}.sock", d.name)),
            })
            .collect();
        sb.serving = Some(serve(repo, manifest, &disks, 256).await?);
        create_overlays(manifest, &disks).await?;

        let targets: Vec<(String, PathBuf)> = disks
            .iter()
            .map(|d| (d.target.clone(), d.overlay.clone()))
            .collect();
        let d2 = dir.clone();
        let prepared = relocate::prepare(
            manifest,
            uri,
            Some(name),
            false,
            move |_| Layout {
                disks: targets
                    .into_iter()
                    .map(|(t, p)| {
                        (
                            t,
                            NewDisk {
                                path: p,
                                format: "qcow2".into(),
                            },
                        )
                    })
                    .collect(),
                nvram: None,
                dir: d2,
            },
            NetworkPolicy::Remove,
        )
        .await?;
        sb.xml = sandbox_xml(&prepared.rewritten.xml, &console)?;
        if prepared.rewritten.removed_interfaces > 0 {
            sb.xml.removed.push(format!(
                "{} network interface(s)",
                prepared.rewritten.removed_interfaces
            ));
        }
        for d in &prepared.rewritten.dropped_disks {
            sb.xml
                .removed
                .push(format!("disk {d} (not in the snapshot)"));
        }
        let xml = sb.xml.xml.clone();
        let u = uri.to_string();
        let n = name.to_string();
        let dom = blocking(move || {
            let hv = Hypervisor::connect(&u).map_err(|e| {
                Error::with_source(
                    ErrorKind::Source,
                    format!("cannot connect to libvirt at {u}"),
                    e,
                )
            })?;
            hv.create_transient(&xml, true).map_err(|e| {
                Error::with_source(
                    ErrorKind::Source,
                    format!("libvirt could not start the sandbox domain '{n}'"),
                    e,
                )
            })
        })
        .await?;
        sb.dom = Some(Arc::new(Mutex::new(dom)));
        Ok(sb)
    }

    /// The domain handle.
    pub fn dom(&self) -> Option<SharedDom> {
        self.dom.clone()
    }

    /// Orderly teardown; returns what could not be removed (empty when clean).
    pub async fn teardown(mut self) -> Vec<String> {
        let serving = self.serving.take();
        let name = self.name.clone();
        let uri = self.uri.clone();
        let problems = blocking(move || Ok(destroy_domain(&uri, &name)))
            .await
            .unwrap_or_else(|e| vec![e.to_string()]);
        if let Some(s) = serving {
            s.shutdown().await;
        }
        let mut problems = problems;
        problems.extend(self.remove_files());
        self.torn_down = true;
        problems
    }

    fn remove_files(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for d in [&self.socket_dir, &self.dir] {
            if d.exists() {
                if let Err(e) = std::fs::remove_dir_all(d) {
                    problems.push(format!("cannot remove '{}': {e}", d.display()));
                }
            }
        }
        if self.uri.starts_with("qemu:///system") {
            let _ =
                std::fs::remove_file(Path::new(QEMU_LOG_DIR).join(format!("{}.log", self.name)));
        }
        problems
    }
}

/// Destroys the (transient) domain through a fresh connection; returns problems.
fn destroy_domain(uri: &str, name: &str) -> Vec<String> {
    let hv = match Hypervisor::connect(uri) {
        Ok(h) => h,
        Err(e) => {
            return vec![format!(
                "cannot connect to libvirt to destroy '{name}': {e}"
            )]
        }
    };
    match hv.domain(name) {
        Ok(d) => {
            let mut p = Vec::new();
            if let Err(e) = d.destroy() {
                p.push(format!("cannot destroy '{name}': {e}"));
            }
            // A transient domain is gone now; a persistent one (never created by us) would not be.
            if hv.domain_exists(name).unwrap_or(false) {
                p.push(format!("domain '{name}' still exists after destroy"));
            }
            p
        }
        Err(e) if e.kind() == crate::libvirt::ErrorKind::NoSuchDomain => Vec::new(),
        Err(e) => vec![format!("cannot look up '{name}': {e}")],
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.torn_down {
            return;
        }
        tracing::info!(sandbox = %self.name, "tearing the sandbox down");
        if self.dom.is_some() || self.serving.is_some() {
            for p in destroy_domain(&self.uri, &self.name) {
                tracing::warn!("{p}");
            }
        }
        // Serving's own Drop signals its tasks to stop; the sockets go with the directory.
        self.serving.take();
        for p in self.remove_files() {
            tracing::warn!("{p}");
        }
    }
}
