//! `lifeboat instant-restore SNAPSHOT --connect URI [--name NEW] [--storage DIR]`: run a VM from a
//! snapshot within seconds, whatever its size, then move its data to local storage.
//!
//! 1. Every disk of the snapshot is served read-only over NBD by our own server
//!    ([`vmdisk::nbd::Server`] over [`RepoSource`]) on a unix socket
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
//! the background: see [`RepoSource::lazy`]), creating the overlays (`qemu-img create -u`, which
//! does not open the backing) and define+start are all O(1) in the size; each phase is logged
//! and reported in `--json` (`phases`).
//!
//! A chunk that fails its checks makes reads of it fail (EIO to the guest) and the pull fail;
//! instant-restore then stops the VM, undefines it (the overlays are kept for inspection) and
//! exits with the "corrupt" exit code.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use repo_format::{Manifest, Repository, SnapshotId};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;
use vmdisk::nbd::{BlockSource, Server, ServerOptions};

use super::restore::resolve;
use super::{emit, human_bytes};
use crate::cli::{GlobalOpts, InstantRestoreArgs};
use crate::error::{repo_err, Context, Error, ErrorKind, Result};
use crate::libvirt::rewrite::{disk_has_backing, NewDisk};
use crate::libvirt::Hypervisor;
use crate::pipeline::serve::RepoSource;
use crate::relocate::{self, Layout};
use crate::repo::{self, blocking};
use crate::socket_dirs;

/// How long a block pull that stops without a repository failure is restarted (see
/// `move_data`): covers QEMU's NBD reconnect backoff (up to 16 s) with a margin.
const PULL_RETRY_WINDOW: Duration = Duration::from_secs(60);

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

/// Fewest chunks cached per disk, whatever the budget: QEMU reads a chunk in many small pieces.
const MIN_CACHE_CHUNKS_PER_DISK: usize = 4;

/// The running NBD server: stops (and removes its sockets) when dropped.
pub(crate) struct Serving {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    sources: Vec<(String, Arc<RepoSource>)>,
    index_loads: std::sync::Mutex<Vec<tokio::task::JoinHandle<std::result::Result<(), String>>>>,
}

impl Serving {
    /// Waits until every index is loaded; the first failure is a "corrupt" error.
    pub(crate) async fn wait_indexes(&self) -> Result<()> {
        let loads: Vec<_> = match self.index_loads.lock() {
            Ok(mut l) => l.drain(..).collect(),
            Err(_) => Vec::new(),
        };
        for l in loads {
            l.await
                .map_err(|e| Error::with_source(ErrorKind::Other, "a worker thread failed", e))?
                .map_err(|e| Error::new(ErrorKind::Corrupt, e))?;
        }
        Ok(())
    }

    /// An index that has already failed to load, if any (does not wait).
    pub(crate) fn index_failure(&self) -> Option<String> {
        self.sources
            .iter()
            .find_map(|(_, s)| s.index_state().and_then(|r| r.err()))
    }

    pub(crate) async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }

    pub(crate) fn failures(&self) -> Option<String> {
        self.sources.iter().find_map(|(d, s)| {
            let (n, last) = s.failures();
            (n > 0).then(|| {
                format!(
                    "disk {d}: {n} failed reads, last: {}",
                    last.unwrap_or_default()
                )
            })
        })
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Load every index, start serving each disk on its socket (fails if an index cannot be
/// loaded).
pub(crate) async fn serve(
    repo: &Arc<Repository>,
    manifest: &Manifest,
    disks: &[StateDisk],
    cache_chunks: usize,
) -> Result<Serving> {
    let serving = serve_lazy(repo, manifest, disks, cache_chunks).await?;
    serving.wait_indexes().await?;
    Ok(serving)
}

/// Start serving each disk on its socket at once; the indexes (O(disk size)) load in the
/// background and requests that arrive earlier wait for them (see
/// [`RepoSource::lazy`](crate::pipeline::serve::RepoSource::lazy)). Check
/// [`Serving::index_failure`] / [`Serving::wait_indexes`] before relying on the data.
pub(crate) async fn serve_lazy(
    repo: &Arc<Repository>,
    manifest: &Manifest,
    disks: &[StateDisk],
    cache_chunks: usize,
) -> Result<Serving> {
    let (stop, rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut sources = Vec::new();
    let mut index_loads = Vec::new();
    // The cache budget is for the whole VM, so memory does not grow with the number of disks.
    let per_disk_cache = (cache_chunks / disks.len().max(1)).max(MIN_CACHE_CHUNKS_PER_DISK);
    for sd in disks {
        let entry = manifest
            .disks
            .iter()
            .find(|d| d.name == sd.target)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Corrupt,
                    format!("snapshot has no disk '{}'", sd.target),
                )
            })?;
        let src = Arc::new(RepoSource::lazy(repo.clone(), entry, per_disk_cache));
        let loader = src.clone();
        index_loads.push(tokio::task::spawn_blocking(move || {
            loader.load_index().map(|_| ())
        }));
        let mut exports: HashMap<String, Arc<dyn BlockSource>> = HashMap::new();
        exports.insert(sd.target.clone(), src.clone());
        sources.push((sd.target.clone(), src));
        let server = Arc::new(Server::new(exports, ServerOptions::default()));
        if let Some(dir) = sd.socket.parent() {
            std::fs::create_dir_all(dir).ctx(ErrorKind::Other, || {
                format!("cannot create '{}'", dir.display())
            })?;
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
        }
        let listener = Server::bind_unix(&sd.socket)
            .map_err(|e| Error::with_source(ErrorKind::Other, "cannot start the NBD server", e))?;
        tasks.push(tokio::spawn(server.serve(
            listener,
            Some(sd.socket.clone()),
            rx.clone(),
        )));
    }
    Ok(Serving {
        stop,
        tasks,
        sources,
        index_loads: std::sync::Mutex::new(index_loads),
    })
}

fn backing_uri(target: &str, socket: &Path) -> String {
    format!("nbd+unix:///{target}?socket={}", socket.display())
}

/// Creates each disk's local qcow2 overlay backed by its NBD export (`disks` and
/// `manifest.disks` in the same order).
pub(crate) async fn create_overlays(manifest: &Manifest, disks: &[StateDisk]) -> Result<()> {
    for (sd, d) in disks.iter().zip(&manifest.disks) {
        let mut opts: Vec<(String, String)> = vec![
            ("backing_file".into(), backing_uri(&sd.target, &sd.socket)),
            ("backing_fmt".into(), "raw".into()),
        ];
        if d.format == "qcow2" {
            if let Some(cs) = d.create_options.get("cluster_size") {
                opts.push(("cluster_size".into(), cs.clone()));
            }
        }
        // -u: do not open the backing (an NBD connection and a probe for nothing: size and
        // backing format are known).
        vmdisk::qemu::create_image_unchecked_backing(&sd.overlay, "qcow2", d.virtual_size, &opts)
            .await
            .ctx(ErrorKind::Target, || {
                format!("cannot create the overlay '{}'", sd.overlay.display())
            })?;
    }
    Ok(())
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

/// Pull every disk that still has a backing file; returns the time it took.
async fn move_data(
    global: &GlobalOpts,
    state: &State,
    serving: &Serving,
    total: u64,
) -> Result<Duration> {
    let t = Instant::now();
    let uri = state.uri.clone();
    let name = state.name.clone();
    let targets: Vec<String> = state.disks.iter().map(|d| d.target.clone()).collect();
    let progress =
        crate::pipeline::progress::Progress::new(!global.quiet && !global.json, total, "move");
    let (active, pending) = {
        let targets = targets.clone();
        blocking(move || {
            let hv = Hypervisor::connect(&uri).map_err(|e| lv(e, "cannot connect to libvirt"))?;
            let dom = hv
                .domain(&name)
                .map_err(|e| lv(e, "cannot find the restored domain"))?;
            let active = dom
                .is_active()
                .map_err(|e| lv(e, "cannot query the domain"))?;
            let mut pending = Vec::new();
            if active {
                let xml = dom
                    .xml(false)
                    .map_err(|e| lv(e, "cannot read the live XML"))?;
                for t in &targets {
                    if disk_has_backing(&xml, t).map_err(|e| lv(e, "bad live XML"))? != Some(false)
                    {
                        if dom.block_job(t).map_err(|e| lv(e, "block job"))?.is_none() {
                            dom.block_pull(t)
                                .map_err(|e| lv(e, "cannot start the block pull"))?;
                        }
                        pending.push(t.clone());
                    }
                }
            }
            Ok((active, pending))
        })
        .await?
    };
    if !active {
        // Shut off: finish offline, copying what the overlays lack while we serve it.
        for d in &state.disks {
            let info = vmdisk::qemu::image_info(&d.overlay)
                .await
                .ctx(ErrorKind::Target, || {
                    format!("cannot inspect '{}'", d.overlay.display())
                })?;
            if info.raw.get("backing-filename").is_none() {
                continue;
            }
            let out = tokio::process::Command::new("qemu-img")
                .args(["rebase", "-q", "-f", "qcow2", "-b", ""])
                .arg(&d.overlay)
                .output()
                .await
                .ctx(ErrorKind::Other, || "cannot run qemu-img rebase".into())?;
            if !out.status.success() {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "moving '{}' offline failed: {}{}",
                        d.target,
                        String::from_utf8_lossy(&out.stderr).trim(),
                        serving
                            .failures()
                            .map(|f| format!(" ({f})"))
                            .unwrap_or_default()
                    ),
                ));
            }
        }
        progress.add(total);
        progress.finish();
        return Ok(t.elapsed());
    }
    // Poll the jobs.
    let mut done_bytes: BTreeMap<String, u64> = BTreeMap::new();
    let mut remaining = pending;
    let mut last_log = Instant::now();
    // A pull that fails without a repository failure is restarted until this deadline: QEMU's
    // NBD client may not have reconnected yet (after --resume, its background reconnect
    // retries with a backoff of 1 s doubling up to 16 s; until then requests fail with EIO).
    let retry_until = Instant::now() + PULL_RETRY_WINDOW;
    while !remaining.is_empty() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let uri = state.uri.clone();
        let name = state.name.clone();
        let rem = remaining.clone();
        let status = blocking(move || {
            let hv = Hypervisor::connect(&uri).map_err(|e| lv(e, "cannot connect to libvirt"))?;
            let dom = hv
                .domain(&name)
                .map_err(|e| lv(e, "cannot find the restored domain"))?;
            let mut out = Vec::new();
            for t in &rem {
                let job = dom.block_job(t).map_err(|e| lv(e, "block job"))?;
                let backing = match job {
                    Some(_) => None,
                    None => {
                        let xml = dom
                            .xml(false)
                            .map_err(|e| lv(e, "cannot read the live XML"))?;
                        disk_has_backing(&xml, t).map_err(|e| lv(e, "bad live XML"))?
                    }
                };
                out.push((t.clone(), job, backing));
            }
            let active = dom
                .is_active()
                .map_err(|e| lv(e, "cannot query the domain"))?;
            Ok((out, active))
        })
        .await?;
        let (status, dom_active) = status;
        let mut still = Vec::new();
        for (t, job, backing) in status {
            match (job, backing) {
                (Some((cur, end)), _) => {
                    let prev = done_bytes.insert(t.clone(), cur).unwrap_or(0);
                    progress.add(cur.saturating_sub(prev));
                    if last_log.elapsed() > Duration::from_secs(5) {
                        tracing::info!(disk = %t, "moved {} of {}", human_bytes(cur), human_bytes(end));
                    }
                    still.push(t);
                }
                (None, Some(false)) => {
                    tracing::info!(disk = %t, "moved: no longer depends on the repository");
                }
                (None, _) if !dom_active => {
                    return Err(Error::new(
                        ErrorKind::Other,
                        format!(
                            "the VM stopped before disk '{t}' was moved: finish with instant-restore --resume"
                        ),
                    ));
                }
                (None, _) => {
                    // The job ended but the backing is still there: the pull failed.
                    let why = serving.failures();
                    if why.is_some() {
                        tracing::error!("the data of '{t}' cannot be read from the repository: stopping and undefining the VM (overlays kept)");
                        relocate::undo_define(&state.uri, &state.name).await;
                        return Err(Error::new(
                            ErrorKind::Corrupt,
                            format!(
                                "moving disk '{t}' failed: {}; VM '{}' was stopped and undefined, its overlays are kept",
                                why.unwrap_or_default(),
                                state.name
                            ),
                        ));
                    }
                    if Instant::now() < retry_until {
                        tracing::info!(disk = %t, "the block pull stopped early (NBD not reconnected yet?): restarting it");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        let (uri, name, t2) = (state.uri.clone(), state.name.clone(), t.clone());
                        blocking(move || {
                            let hv = Hypervisor::connect(&uri)
                                .map_err(|e| lv(e, "cannot connect to libvirt"))?;
                            let dom = hv
                                .domain(&name)
                                .map_err(|e| lv(e, "cannot find the restored domain"))?;
                            dom.block_pull(&t2)
                                .map_err(|e| lv(e, "cannot restart the block pull"))
                        })
                        .await?;
                        done_bytes.remove(&t);
                        still.push(t);
                        continue;
                    }
                    return Err(Error::new(
                        ErrorKind::Other,
                        format!("the block pull of disk '{t}' stopped before completing: retry with --resume"),
                    ));
                }
            }
        }
        if last_log.elapsed() > Duration::from_secs(5) {
            last_log = Instant::now();
        }
        remaining = still;
    }
    progress.finish();
    Ok(t.elapsed())
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
