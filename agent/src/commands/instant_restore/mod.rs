//! `lifeboat instant-restore SNAPSHOT --connect URI [--name NEW] [--storage DIR]`: run a VM from a
//! snapshot within seconds, whatever its size, then move its data to local storage.
//!
//! 1. Every disk of the snapshot is served read-only over NBD by our own server
//!    ([`vmdisk::nbd::Server`] over [`RepoSource`](crate::pipeline::serve::RepoSource)) on a unix socket
//!    `/run/lifeboat/instant/<id>/<disk>.sock` (mode 0666, so QEMU — user `libvirt-qemu` — can
//!    connect). Zero chunks are holes for `base:allocation`, so QEMU never reads them.
//! 2. For each disk a local qcow2 overlay `STORAGE/<NAME>/<disk>.qcow2` is created with the
//!    export as its backing file (`nbd+unix:///<disk>?socket=…`, format raw). The domain XML from
//!    the snapshot is rewritten (new name, UUID, MACs; disks → overlays; see
//!    [`crate::relocate`]), defined and started: the guest runs as soon as QEMU has opened the
//!    overlays. Guest writes go to the overlays.
//! 3. A libvirt block pull per disk (`virDomainBlockPull`) copies everything the overlay does
//!    not yet hold from the export into it; guest writes keep landing in the overlay and are
//!    never overwritten (pull only fills what the overlay does not have). When a pull finishes,
//!    QEMU drops the backing file from the overlay; when every disk is done the state file is
//!    removed and the server exits. Progress is logged (and drawn on a terminal).
//!
//! The process serves in the foreground until the move completes: run it under `nohup` or
//! `systemd-run --unit lifeboat-instant-NAME lifeboat instant-restore …`.
//!
//! **If the server dies before the move completes** (process killed, host reboot), the VM keeps
//! running (tested: `tests/tests/instant_restore.rs`, SIGKILL mid-move). What the guest sees
//! while it is down, with QEMU 7.2's NBD client (default `reconnect-delay` 0):
//! - reads of regions already moved, and of everything the guest wrote, are served from the
//!   overlay and work;
//! - reads of regions not yet moved fail at once with EIO (`dd: /dev/vda: Input/output error`;
//!   a filesystem may log errors or remount read-only); writes still land in the overlay;
//! - the running block pull fails and libvirt drops the job; the NBD backing stays in the chain.
//!
//! `lifeboat instant-restore --resume --name NAME --storage DIR --connect URI` reads the state
//! file `STORAGE/<NAME>/lifeboat-instant.json`, serves the same snapshot again on the same
//! sockets and restarts the pull of every disk that still has its NBD backing. QEMU reconnects
//! by itself: its background reconnect retries with a backoff of 1 s doubling to 16 s, so reads
//! of unmoved regions keep failing until its next attempt (at most ~16 s after the server is
//! back); a pull that fails in that window is restarted (for up to a minute). A shut-off VM is
//! finished offline with `qemu-img rebase` (which copies the remaining data into the overlay).
//! Nothing is lost as long as the overlays are kept.
//!
//! **Time to running** does not depend on the disk size: opening the repository and the
//! manifest, rewriting the XML, starting the server (the indexes, one entry per chunk, load in
//! the background: see [`RepoSource::lazy`](crate::pipeline::serve::RepoSource::lazy)), creating the overlays (`qemu-img create -u`, which
//! does not open the backing) and define+start are all O(1) in the size; each phase is logged
//! and reported in `--json` (`phases`).
//!
//! A chunk that fails its checks makes reads of it fail (EIO to the guest) and the pull fail;
//! instant-restore then stops the VM, undefines it (the overlays are kept for inspection) and
//! exits with the "corrupt" exit code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use repo_format::SnapshotId;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::restore::resolve;
use super::{emit, human_bytes};
use crate::cli::{GlobalOpts, InstantRestoreArgs};
use crate::error::{repo_err, Context, Error, ErrorKind, Result};
use crate::libvirt::rewrite::NewDisk;
use crate::relocate::{self, Layout};
use crate::repo::{self, blocking};
use crate::socket_dirs;

mod pull;
mod serving;

use pull::move_data;
use serving::serve_lazy;
pub(crate) use serving::{create_overlays, serve, Serving};

/// Name of the state file in the VM's storage directory.
pub const STATE_FILE: &str = "lifeboat-instant.json";

/// What `--resume` needs, written before the domain is defined.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// Snapshot id (hex).
    pub snapshot: String,
    /// Repository location used.
    pub repo: Option<String>,
    /// libvirt URI.
    pub uri: String,
    /// Domain name.
    pub name: String,
    /// Disks: target, overlay, socket.
    pub disks: Vec<StateDisk>,
}

/// One served disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateDisk {
    /// Target (`vda`) = export name.
    pub target: String,
    /// The local qcow2 overlay.
    pub overlay: PathBuf,
    /// The NBD socket its backing file names.
    pub socket: PathBuf,
}

/// `lifeboat instant-restore`
pub async fn run(global: &GlobalOpts, args: InstantRestoreArgs) -> Result<()> {
    for p in socket_dirs::sweep_stale(Path::new(socket_dirs::ROOT), socket_dirs::SWEEP_MIN_AGE) {
        tracing::debug!(path = %p.display(), "removed a stale instant-restore socket or directory");
    }
    if args.resume {
        return resume(global, args).await;
    }
    let t0 = Instant::now();
    let mut phases = Phases::new(t0);
    let reference = args.snapshot.clone().unwrap_or_default();
    let repo = repo::open_async(global).await?;
    phases.mark("open_repo");
    let (snap_id, manifest) = resolve(&repo, &reference).await?;
    phases.mark("load_manifest");
    relocate::stored_domain_xml(&manifest)?;
    if manifest
        .disks
        .iter()
        .any(|d| d.name == relocate::nvram_entry(&manifest))
    {
        return Err(Error::new(
            ErrorKind::Usage,
            "instant restore of a VM with UEFI variables (NVRAM) is not supported yet: use restore --define",
        ));
    }
    for d in &manifest.disks {
        if d.name.is_empty() || d.name.contains(['/', '?', '&']) || d.name.starts_with('.') {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("refusing disk name '{}'", d.name),
            ));
        }
    }
    std::fs::create_dir_all(&args.storage).ctx(ErrorKind::Target, || {
        format!("cannot create '{}'", args.storage.display())
    })?;
    let storage = std::fs::canonicalize(&args.storage).ctx(ErrorKind::Target, || {
        format!("cannot resolve '{}'", args.storage.display())
    })?;

    // Name, paths and XML, checked before anything is created.
    let targets: Vec<String> = manifest.disks.iter().map(|d| d.name.clone()).collect();
    let st2 = storage.clone();
    let prepared = relocate::prepare(
        &manifest,
        &args.connect,
        args.name.as_deref(),
        false,
        move |name| {
            let dir = st2.join(name);
            let disks = targets
                .iter()
                .map(|t| {
                    (
                        t.clone(),
                        NewDisk {
                            path: dir.join(format!("{t}.qcow2")),
                            format: "qcow2".into(),
                        },
                    )
                })
                .collect::<BTreeMap<_, _>>();
            Layout {
                disks,
                nvram: None,
                dir,
            }
        },
        relocate::network_policy(&args.network),
    )
    .await?;
    phases.mark("prepare");
    let vm_dir = storage.join(&prepared.name);
    if vm_dir.exists() {
        return Err(Error::new(
            ErrorKind::Target,
            format!(
                "'{}' exists: remove it or choose another --name",
                vm_dir.display()
            ),
        ));
    }
    std::fs::create_dir_all(&vm_dir).ctx(ErrorKind::Target, || {
        format!("cannot create '{}'", vm_dir.display())
    })?;
    let mut cleanup = DirGuard(Some(vm_dir.clone()));
    let sock_dir = socket_dirs::for_storage(&vm_dir);
    let state = State {
        snapshot: snap_id.to_string(),
        repo: global.repo.clone(),
        uri: prepared.uri.clone(),
        name: prepared.name.clone(),
        disks: manifest
            .disks
            .iter()
            .map(|d| StateDisk {
                target: d.name.clone(),
                overlay: vm_dir.join(format!("{}.qcow2", d.name)),
                socket: sock_dir.join(format!("{}.sock", d.name)),
            })
            .collect(),
    };

    // Nothing here may scale with the disk size: the indexes load in the background (reads
    // wait for them), the overlays are created without opening their backing.
    let serving = serve_lazy(&repo, &manifest, &state.disks, args.cache_chunks).await?;
    phases.mark("start_server");
    create_overlays(&manifest, &state.disks).await?;
    write_state(&vm_dir, &state)?;
    phases.mark("create_overlays");
    if let Some(e) = serving.index_failure() {
        // Known bad before anything is defined: fail without a domain.
        return Err(Error::new(ErrorKind::Corrupt, e));
    }
    let (define_took, start_took) = relocate::define_timed(&prepared, true).await?;
    phases.add("define", define_took);
    phases.add("start", start_took);
    let running_after = t0.elapsed();
    phases.log();
    cleanup.0 = None; // the domain exists now: keep its files whatever happens
    tracing::info!(
        "domain '{}' running after {:.2} s; moving data to {}",
        prepared.name,
        running_after.as_secs_f64(),
        vm_dir.display()
    );
    if !global.quiet && !global.json {
        eprintln!(
            "domain '{}' is running ({:.2} s); moving its data into {} — keep this process running",
            prepared.name,
            running_after.as_secs_f64(),
            vm_dir.display()
        );
    }
    let total: u64 = manifest.disks.iter().map(|d| d.virtual_size).sum();
    let moved = move_data(global, &state, &serving, total).await;
    let moved = match moved {
        Ok(m) => m,
        Err(e) => {
            serving.shutdown().await;
            return Err(e);
        }
    };
    serving.shutdown().await;
    let _ = std::fs::remove_file(vm_dir.join(STATE_FILE));
    let _ = std::fs::remove_dir(&sock_dir);
    let text = format!(
        "instant restore of {} ({}) as '{}': running after {:.2} s, {} moved in {:.1} s; the VM no longer depends on the repository",
        manifest.name,
        snap_id.to_string().get(..12).unwrap_or_default(),
        prepared.name,
        running_after.as_secs_f64(),
        human_bytes(total),
        moved.as_secs_f64()
    );
    emit(
        global,
        &json!({
            "snapshot": snap_id.to_string(), "name": prepared.name, "uri": prepared.uri,
            "running_after_seconds": running_after.as_secs_f64(),
            "phases": phases.json(),
            "move_seconds": moved.as_secs_f64(),
            "disks": state.disks.iter().map(|d| json!({"disk": d.target, "path": d.overlay})).collect::<Vec<_>>(),
        }),
        &text,
    );
    Ok(())
}

/// Wall-clock time of each step up to the running VM (logged, and in `--json` as `phases`).
struct Phases {
    last: Instant,
    done: Vec<(&'static str, Duration)>,
}

impl Phases {
    fn new(t0: Instant) -> Self {
        Phases {
            last: t0,
            done: Vec::new(),
        }
    }

    /// The step `name` ended now (it started where the previous one ended).
    fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.done.push((name, now - self.last));
        self.last = now;
    }

    /// A step measured elsewhere, ending now.
    fn add(&mut self, name: &'static str, d: Duration) {
        self.done.push((name, d));
        self.last = Instant::now();
    }

    fn log(&self) {
        for (n, d) in &self.done {
            tracing::info!(phase = n, "{n}: {:.3} s", d.as_secs_f64());
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.done
                .iter()
                .map(|(n, d)| (format!("{n}_seconds"), json!(d.as_secs_f64())))
                .collect(),
        )
    }
}

/// Removes a directory on drop unless disarmed.
struct DirGuard(Option<PathBuf>);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn write_state(dir: &Path, state: &State) -> Result<()> {
    let p = dir.join(STATE_FILE);
    let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
    let data = serde_json::to_vec_pretty(state)
        .map_err(|e| Error::with_source(ErrorKind::Other, "cannot encode the state", e))?;
    std::fs::write(&tmp, data)
        .and_then(|_| std::fs::rename(&tmp, &p))
        .ctx(ErrorKind::Target, || {
            format!("cannot write '{}'", p.display())
        })
}

fn lv(e: crate::libvirt::LibvirtError, what: &str) -> Error {
    Error::with_source(ErrorKind::Source, what.to_string(), e)
}

/// `--resume`: serve the recorded snapshot again and finish the move.
async fn resume(global: &GlobalOpts, args: InstantRestoreArgs) -> Result<()> {
    let name = args
        .name
        .clone()
        .ok_or_else(|| Error::new(ErrorKind::Usage, "--resume needs --name"))?;
    let storage = std::fs::canonicalize(&args.storage).ctx(ErrorKind::Usage, || {
        format!("cannot resolve '{}'", args.storage.display())
    })?;
    let vm_dir = storage.join(&name);
    let sp = vm_dir.join(STATE_FILE);
    let data = std::fs::read(&sp).ctx(ErrorKind::Usage, || {
        format!(
            "no instant restore of '{name}' to resume ('{}' is missing)",
            sp.display()
        )
    })?;
    let state: State = serde_json::from_slice(&data).map_err(|e| {
        Error::with_source(
            ErrorKind::Corrupt,
            format!("bad state file '{}'", sp.display()),
            e,
        )
    })?;
    let mut g = global.clone();
    if g.repo.is_none() {
        g.repo = state.repo.clone();
    }
    let repo = repo::open_async(&g).await?;
    let id: SnapshotId = state
        .snapshot
        .parse()
        .map_err(|_| Error::new(ErrorKind::Corrupt, "bad snapshot id in the state file"))?;
    let manifest = {
        let r = repo.clone();
        blocking(move || {
            r.load_snapshot(&id)
                .map_err(|e| repo_err(e, "cannot load the snapshot"))
        })
        .await?
    };
    let serving = serve(&repo, &manifest, &state.disks, args.cache_chunks).await?;
    let total: u64 = manifest.disks.iter().map(|d| d.virtual_size).sum();
    let moved = move_data(global, &state, &serving, total).await;
    serving.shutdown().await;
    let moved = moved?;
    let _ = std::fs::remove_file(&sp);
    if let Some(d) = state.disks.first().and_then(|d| d.socket.parent()) {
        let _ = std::fs::remove_dir(d);
    }
    emit(
        global,
        &json!({ "name": state.name, "resumed": true, "move_seconds": moved.as_secs_f64() }),
        &format!(
            "instant restore of '{}' completed after resume ({:.1} s)",
            state.name,
            moved.as_secs_f64()
        ),
    );
    Ok(())
}
