//! `lifeboat backup VM...`: back up libvirt domains.
//!
//! Running domain: the live job of [`crate::vm::job`] (freeze → pull-mode backup job with a new
//! checkpoint → thaw → read every disk's NBD export in parallel → commit → end job → prune).
//! Shut-off domain: each disk through `qemu-nbd` (incremental with the base checkpoint's
//! persistent bitmap, which libvirt names after the checkpoint), then a new bitmap is added with
//! `qemu-img` and a matching checkpoint is redefined in libvirt's metadata, so the chain goes on
//! when the VM runs again. Raw disks cannot carry bitmaps: they are read in full (allocated
//! extents only) every time.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use repo_format::{
    BackupMode, DiskEntry, DiskIndex, IndexId, Manifest, Repository, SnapshotId, SnapshotKind,
};
use serde_json::{json, Value};
use vmdisk::nbd::{Client, ConnectOptions, NbdAddr};
use vmdisk::qemu::{self, ImageInfo, QemuNbd, QemuNbdOptions};

use super::backup_image::{latest_of, NBD_TIMEOUT};
use super::{emit, human_bytes, mb_per_s};
use crate::cli::{BackupArgs, GlobalOpts, QuiesceArg, ThawGuardArgs};
use crate::error::{repo_err, Context, Error, ErrorKind, Result};
use crate::libvirt::{BackupDisk, BackupSpec, CheckpointSpec, Dom, Hypervisor};
use crate::pipeline::backup::{self, DiskBackupStats, Mode, ALLOCATION_CONTEXT};
use crate::pipeline::progress::Progress;
use crate::repo::{self, blocking};
use crate::vm::checkpoints::{self, RunDirs};
use crate::vm::host::LibvirtHost;
use crate::vm::job::{self, JobFacts, JobOptions, QuiescePolicy, Transfer};
use crate::vm::plan::{self, DiskFacts, DiskPlan};

/// Test hook: seconds to sleep after the job started and the guest is thawed, before reading.
pub const PAUSE_AFTER_BEGIN_ENV: &str = "LIFEBOAT_TEST_PAUSE_AFTER_BEGIN";
/// Test hook: seconds to sleep after the job started while the guest is still frozen.
pub const PAUSE_WHILE_FROZEN_ENV: &str = "LIFEBOAT_TEST_PAUSE_WHILE_FROZEN";

fn env_secs(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
}

/// `lifeboat __thaw-guard` (hidden).
pub async fn thaw_guard(a: ThawGuardArgs) -> Result<()> {
    blocking(move || {
        crate::vm::guard::run(&a.connect, &a.domain, Duration::from_secs(a.timeout.max(1)))
    })
    .await
}

/// `lifeboat backup`
pub async fn run(global: &GlobalOpts, args: BackupArgs) -> Result<()> {
    let repo = repo::open_async(global).await?;
    let mut outs = Vec::new();
    for vm in &args.vms {
        let (j, text) = backup_vm(global, &args, repo.clone(), vm, None).await?;
        if !global.quiet && !global.json {
            println!("{text}");
        }
        outs.push(j);
    }
    if global.json {
        let doc = if outs.len() == 1 {
            outs.pop().unwrap_or(Value::Null)
        } else {
            Value::Array(outs)
        };
        emit(global, &doc, "");
    }
    Ok(())
}

struct Prepared {
    dom: Dom,
    active: bool,
    inactive_xml: String,
    uuid: String,
    nvram: Option<PathBuf>,
    all_targets: Vec<String>,
    selected: Vec<plan::Selected>,
    skipped: Vec<(String, String)>,
    notes: Vec<String>,
    existing_cps: Vec<String>,
    base: std::result::Result<(String, Vec<String>), String>,
}

/// Back up one domain; returns the JSON report and its text form. `during_freeze` runs inside
/// the frozen window of a running domain's job (see [`JobOptions::during_freeze`]); for a
/// shut-off domain it is not called.
pub async fn backup_vm(
    global: &GlobalOpts,
    args: &BackupArgs,
    repo: Arc<Repository>,
    name: &str,
    during_freeze: Option<job::FreezeHook>,
) -> Result<(Value, String)> {
    let repo2 = repo.clone();
    let n2 = name.to_string();
    let parent = blocking(move || latest_of(&repo2, &n2)).await?;
    let parent_m = parent.as_ref().map(|(_, m)| m.clone());
    let base_name = parent_m
        .as_ref()
        .and_then(|m| m.metadata.get("checkpoint").cloned());
    let stored_xml = parent_m
        .as_ref()
        .and_then(|m| m.metadata.get("checkpoint_xml").cloned());
    let parent_uuid = parent_m
        .as_ref()
        .and_then(|m| m.metadata.get("domain_uuid").cloned());
    let prefix = checkpoints::prefix(repo.id());

    let uri = args.connect.clone();
    let vm = name.to_string();
    let exclude = args.exclude_disks.clone();
    let prep = blocking(move || -> Result<Prepared> {
        let hv = Hypervisor::connect(&uri)
            .ctx(ErrorKind::Source, || format!("cannot connect to libvirt at {uri}"))?;
        let dom = hv
            .domain(&vm)
            .ctx(ErrorKind::Source, || format!("no domain {vm}"))?;
        let vm2 = vm.clone();
        let src = move |w: &'static str| {
            let vm = vm2.clone();
            move || format!("cannot read the {w} of domain {vm}")
        };
        let active = dom.is_active().ctx(ErrorKind::Source, src("state"))?;
        let inactive_xml = dom.xml(true).ctx(ErrorKind::Source, src("XML"))?;
        let live = crate::libvirt::parse_domain_xml(&dom.xml(false).ctx(ErrorKind::Source, src("XML"))?)
            .ctx(ErrorKind::Source, src("XML"))?;
        let uuid = dom.uuid().ctx(ErrorKind::Source, src("UUID"))?;
        let (selected, skipped) = plan::select_disks(&live.disks, &exclude);
        let mut keep = base_name.clone();
        let mut notes = Vec::new();
        if parent_uuid.as_deref().is_some_and(|u| u != uuid) {
            keep = None;
        }
        notes.extend(checkpoints::clean_leftovers(&dom, &prefix, keep.as_deref())?);
        let existing_cps = dom
            .checkpoints()
            .ctx(ErrorKind::Source, src("checkpoints"))?
            .into_iter()
            .map(|c| c.name)
            .collect();
        let base = match (&base_name, keep.is_some()) {
            (None, _) => Err("the previous snapshot recorded no checkpoint".to_string()),
            (Some(_), false) => Err("the domain's UUID differs from the previous snapshot's".into()),
            (Some(b), true) if active => {
                match checkpoints::validate_live(&dom, b, stored_xml.as_deref()) {
                    checkpoints::Base::Usable { name, disks, redefined } => {
                        if redefined {
                            notes.push(format!(
                                "checkpoint {name} was missing from libvirt: redefined from the repository"
                            ));
                        }
                        Ok((name, disks))
                    }
                    checkpoints::Base::Unusable(why) => Err(why),
                }
            }
            // Shut off: each disk's bitmap is checked with qemu-img below.
            (Some(b), true) => Ok((b.clone(), selected.iter().map(|s| s.target.clone()).collect())),
        };
        // Never reuse the base's name (its metadata may be gone while its bitmap stays).
        let mut existing_cps: Vec<String> = existing_cps;
        existing_cps.extend(base_name.iter().cloned());
        Ok(Prepared {
            dom,
            active,
            inactive_xml,
            uuid,
            nvram: live.nvram,
            all_targets: live.disks.iter().map(|d| d.target.clone()).collect(),
            selected,
            skipped,
            notes,
            existing_cps,
            base,
        })
    })
    .await?;
    for n in &prep.notes {
        tracing::warn!(domain = name, "{n}");
    }
    if prep.selected.is_empty() {
        return Err(Error::new(
            ErrorKind::Usage,
            format!("domain {name}: no disk to back up"),
        ));
    }

    // Per-disk facts: size, qemu-img info, and (shut off) the base bitmap's state.
    let mut infos = BTreeMap::new();
    let mut disks = Vec::new();
    for s in &prep.selected {
        let info = qemu::image_info_as(&s.path, Some(&s.format))
            .await
            .ctx(ErrorKind::Source, || {
                format!("cannot inspect disk {} ({})", s.target, s.path.display())
            })?;
        let bitmap_problem = match (&prep.base, prep.active) {
            (Ok((b, _)), false) if s.format == "qcow2" => {
                match info.bitmaps.iter().find(|x| &x.name == b) {
                    None => Some(format!(
                        "bitmap '{b}' of the previous snapshot is missing from the image"
                    )),
                    Some(x) if x.is_inconsistent() || x.flags.iter().any(|f| f == "in-use") => {
                        Some(format!(
                            "bitmap '{b}' is marked {:?} (QEMU did not close the image cleanly)",
                            x.flags
                        ))
                    }
                    Some(_) => None,
                }
            }
            _ => None,
        };
        disks.push((
            s.clone(),
            DiskFacts {
                virtual_size: info.virtual_size,
                bitmap_problem,
            },
        ));
        infos.insert(s.target.clone(), info);
    }
    let plans = plan::plan(
        &disks,
        parent_m.as_ref(),
        &prep.base,
        repo.chunk_size(),
        args.full,
    );
    let base_used = plans
        .iter()
        .any(|p| p.incremental)
        .then(|| prep.base.as_ref().ok().map(|(n, _)| n.clone()))
        .flatten();
    let tracked: Vec<String> = plans
        .iter()
        .filter(|p| p.tracked)
        .map(|p| p.disk.target.clone())
        .collect();
    let new_cp = (!tracked.is_empty())
        .then(|| checkpoints::new_name(repo.id(), &prep.existing_cps));
    // Prune: our older checkpoints (everything but the new one) once committed.
    let mut prune: Vec<String> = prep
        .existing_cps
        .iter()
        .filter(|c| c.starts_with(&checkpoints::prefix(repo.id())))
        .cloned()
        .collect();
    prune.reverse();

    let dirs = RunDirs::create(name)?;
    let mut transfer = VmTransfer {
        repo: repo.clone(),
        global: global.clone(),
        name: name.to_string(),
        tags: args.tags.clone(),
        plans: plans.clone(),
        infos,
        parent: parent.clone(),
        base: base_used.clone(),
        source: if prep.active {
            Source::Libvirt(dirs.socket())
        } else {
            Source::Files(dirs.run.clone())
        },
        nvram: prep.nvram.clone(),
        inactive_xml: prep.inactive_xml.clone(),
        uuid: prep.uuid.clone(),
        new_cp: new_cp.clone(),
        done: Vec::new(),
        nvram_done: None,
    };

    let started = Instant::now();
    let (snap, facts) = if prep.active {
        let spec = BackupSpec {
            socket: dirs.socket(),
            disks: plans
                .iter()
                .map(|p| BackupDisk {
                    target: p.disk.target.clone(),
                    scratch: dirs.scratch_file(&p.disk.target),
                    full: !p.incremental,
                })
                .collect(),
            incremental_from: base_used.clone(),
            new_checkpoint: new_cp.as_ref().map(|n| CheckpointSpec {
                name: n.clone(),
                description: Some(format!("lifeboat backup of {name}")),
                disks: tracked.clone(),
            }),
        };
        let opts = JobOptions {
            quiesce: match args.quiesce {
                QuiesceArg::Auto => QuiescePolicy::Auto,
                QuiesceArg::Required => QuiescePolicy::Required,
                QuiesceArg::Off => QuiescePolicy::Off,
            },
            mountpoints: args.freeze_mountpoints.clone(),
            pre_freeze: args.pre_freeze.clone(),
            post_thaw: args.post_thaw.clone(),
            prune,
            pause_while_frozen: env_secs(PAUSE_WHILE_FROZEN_ENV),
            pause_after_begin: env_secs(PAUSE_AFTER_BEGIN_ENV),
            during_freeze,
        };
        let host = Arc::new(LibvirtHost::new(
            prep.dom,
            &args.connect,
            Duration::from_secs(args.freeze_limit.max(1)),
        ));
        let r = job::run(host, &opts, spec, &mut transfer).await?;
        (r.snapshot, r.facts)
    } else {
        offline(
            &prep.dom,
            &mut transfer,
            &prep.all_targets,
            &tracked,
            &prune,
            args,
        )
        .await?
    };
    drop(dirs);

    // Report.
    let mut jd = Vec::new();
    let mut lines = Vec::new();
    for (p, st) in &transfer.done {
        let secs = st.elapsed.as_secs_f64();
        jd.push(json!({
            "name": p.disk.target,
            "mode": if p.incremental { "incremental" } else { "full" },
            "full_reason": p.full_reason,
            "virtual_size": st.index.disk_size,
            "allocated_bytes": st.allocated_bytes,
            "dirty_bytes": st.dirty_bytes,
            "bytes_read": st.bytes_read,
            "bytes_new": st.bytes_new,
            "chunks_new": st.chunks_new,
            "seconds": secs,
        }));
        let why = p
            .full_reason
            .as_ref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        lines.push(format!(
            "  {}: {}{why}: {} virtual, {} allocated, read {}, stored {} new, {:.1} s ({:.0} MB/s)",
            p.disk.target,
            if p.incremental { "incremental" } else { "full" },
            human_bytes(st.index.disk_size),
            human_bytes(st.allocated_bytes),
            human_bytes(st.bytes_read),
            human_bytes(st.bytes_new),
            secs,
            mb_per_s(st.bytes_read, secs),
        ));
    }
    let window_ms = facts.freeze_window.map(|d| d.as_secs_f64() * 1000.0);
    let mode = if transfer.done.iter().any(|(p, _)| p.incremental) {
        "incremental"
    } else {
        "full"
    };
    let j = json!({
        "name": name,
        "snapshot": snap.to_string(),
        "mode": mode,
        "state": if prep.active { "running" } else { "shut off" },
        "quiesce": facts.quiesce,
        "freeze_window_ms": window_ms,
        "freeze_status_at_begin": facts.freeze_status_at_begin,
        "checkpoint": new_cp,
        "base_checkpoint": base_used,
        "disks": jd,
        "skipped_disks": prep.skipped.iter().map(|(d, w)| json!({"name": d, "reason": w})).collect::<Vec<_>>(),
        "nvram": transfer.nvram_done.is_some(),
        "notes": prep.notes,
        "warnings": facts.warnings,
        "seconds": started.elapsed().as_secs_f64(),
    });
    let text = format!(
        "snapshot {} of {name}: {mode}, {}{}\n{}",
        snap.to_string().get(..12).unwrap_or_default(),
        facts.quiesce,
        window_ms
            .map(|w| format!(", freeze window {w:.0} ms"))
            .unwrap_or_default(),
        lines.join("\n")
    );
    Ok((j, text))
}

/// Shut-off domain: no freeze and no job; bitmaps via qemu-img, checkpoint metadata redefined.
async fn offline(
    dom: &Dom,
    transfer: &mut VmTransfer,
    all_targets: &[String],
    tracked: &[String],
    prune: &[String],
    _args: &BackupArgs,
) -> Result<(SnapshotId, JobFacts)> {
    let mut facts = JobFacts {
        quiesce: "consistent: the domain is shut off".to_string(),
        ..JobFacts::default()
    };
    let mut added = Vec::new();
    let result = async {
        if let Some(cp) = &transfer.new_cp {
            for p in transfer.plans.iter().filter(|p| p.tracked) {
                qemu::bitmap_add(&p.disk.path, cp)
                    .await
                    .ctx(ErrorKind::Source, || {
                        format!("cannot add bitmap {cp} to {}", p.disk.path.display())
                    })?;
                added.push(p.disk.path.clone());
            }
            facts.checkpoint = Some((
                cp.clone(),
                offline_checkpoint_xml(cp, all_targets, tracked, &transfer.inactive_xml),
            ));
        }
        transfer.transfer().await?;
        transfer.commit(&facts).await
    }
    .await;
    match result {
        Ok(snap) => {
            let dom_name = dom.name().to_string();
            let cp = facts.checkpoint.clone();
            let prune = prune.to_vec();
            let uri_dom = dom;
            // Redefine the new checkpoint in libvirt's metadata, then prune the old ones.
            if let Some((_, xml)) = &cp {
                if let Err(e) = uri_dom.redefine_checkpoint(xml) {
                    facts.warnings.push(format!(
                        "could not redefine the new checkpoint in libvirt (the next live backup redefines it from the repository): {e}"
                    ));
                }
            }
            for old in prune {
                if let Err(e) = checkpoints::delete(uri_dom, &old) {
                    facts
                        .warnings
                        .push(format!("could not delete old checkpoint {old}: {e}"));
                }
            }
            // Bitmaps of our old checkpoints that libvirt never knew.
            if let Some(b) = &transfer.base {
                for p in transfer.plans.iter().filter(|p| p.tracked) {
                    let _ = checkpoints::remove_bitmap_if_present(&p.disk.path, b);
                }
            }
            tracing::debug!(domain = dom_name, "offline backup committed");
            Ok((snap, facts))
        }
        Err(e) => {
            if let Some(cp) = &transfer.new_cp {
                for p in &added {
                    let _ = qemu::bitmap_remove(p, cp).await;
                }
            }
            Err(e)
        }
    }
}

fn offline_checkpoint_xml(name: &str, all: &[String], tracked: &[String], dom_xml: &str) -> String {
    use crate::libvirt::xml::escape;
    let now = jiff::Timestamp::now().as_second();
    let mut x = format!(
        "<domaincheckpoint>\n  <name>{}</name>\n  <creationTime>{now}</creationTime>\n  <disks>\n",
        escape(name)
    );
    for t in all {
        if tracked.contains(t) {
            x.push_str(&format!(
                "    <disk name='{}' checkpoint='bitmap' bitmap='{}'/>\n",
                escape(t),
                escape(name)
            ));
        } else {
            x.push_str(&format!(
                "    <disk name='{}' checkpoint='no'/>\n",
                escape(t)
            ));
        }
    }
    x.push_str("  </disks>\n");
    x.push_str(dom_xml.trim());
    x.push_str("\n</domaincheckpoint>\n");
    x
}

enum Source {
    /// libvirt's pull-mode NBD server: one export per disk target.
    Libvirt(PathBuf),
    /// qemu-nbd per disk file, sockets in this directory.
    Files(PathBuf),
}

struct VmTransfer {
    repo: Arc<Repository>,
    global: GlobalOpts,
    name: String,
    tags: Vec<String>,
    plans: Vec<DiskPlan>,
    infos: BTreeMap<String, ImageInfo>,
    parent: Option<(SnapshotId, Manifest)>,
    base: Option<String>,
    source: Source,
    nvram: Option<PathBuf>,
    inactive_xml: String,
    uuid: String,
    new_cp: Option<String>,
    done: Vec<(DiskPlan, DiskBackupStats)>,
    nvram_done: Option<(DiskBackupStats, IndexId, u64)>,
}

impl VmTransfer {
    fn parent_entry(&self, target: &str) -> Option<DiskEntry> {
        self.parent
            .as_ref()
            .and_then(|(_, m)| m.disks.iter().find(|d| d.name == target).cloned())
    }
}

async fn read_one(
    repo: Arc<Repository>,
    show: bool,
    addr_dir: &Source,
    path: PathBuf,
    format: &str,
    target: &str,
    incremental_from: Option<(String, DiskEntry)>,
) -> Result<DiskBackupStats> {
    let mut contexts = vec![ALLOCATION_CONTEXT.to_string()];
    let (nbd, addr, export, dirty) = match addr_dir {
        Source::Libvirt(sock) => (
            None,
            NbdAddr::Unix(sock.clone()),
            target.to_string(),
            format!("qemu:dirty-bitmap:backup-{target}"),
        ),
        Source::Files(dir) => {
            let bitmap = incremental_from.as_ref().map(|(b, _)| b.clone());
            let n = QemuNbd::start(QemuNbdOptions {
                image: path.clone(),
                format: format.to_string(),
                read_only: true,
                bitmap: bitmap.clone(),
                socket_dir: dir.clone(),
                ..QemuNbdOptions::default()
            })
            .await
            .ctx(ErrorKind::Source, || {
                format!("cannot export '{}' over NBD", path.display())
            })?;
            let addr = n.addr();
            let export = n.export_name().to_string();
            (
                Some(n),
                addr,
                export,
                format!("qemu:dirty-bitmap:{}", bitmap.unwrap_or_default()),
            )
        }
    };
    if incremental_from.is_some() {
        contexts.push(dirty.clone());
    }
    let client = Client::connect(
        &addr,
        ConnectOptions {
            export,
            meta_contexts: contexts,
            timeout: NBD_TIMEOUT,
            ..ConnectOptions::default()
        },
    )
    .await
    .ctx(ErrorKind::Source, || {
        format!("cannot connect to the NBD export of disk {target}")
    })?;
    let mode = match incremental_from {
        Some((_, pe)) => {
            let r2 = repo.clone();
            let idx = pe.index;
            let parent_index: DiskIndex = blocking(move || {
                r2.load_index(&idx)
                    .map_err(|e| repo_err(e, "cannot load the previous snapshot's index"))
            })
            .await?;
            Mode::Incremental {
                context: dirty,
                parent: Arc::new(parent_index),
            }
        }
        None => Mode::Full,
    };
    let progress = Progress::new(show, client.size(), target);
    let stats = backup::backup_disk(repo, std::slice::from_ref(&client), mode, &progress).await;
    progress.finish();
    let _ = client.disconnect().await;
    if let Some(n) = nbd {
        let _ = n.stop().await;
    }
    stats.map_err(|e| Error::with_source(e.kind(), format!("backup of disk {target} failed"), e))
}

impl Transfer for VmTransfer {
    async fn transfer(&mut self) -> Result<()> {
        let show = !self.global.quiet && !self.global.json;
        let futs = self.plans.iter().map(|p| {
            let inc = if p.incremental {
                self.base.clone().zip(self.parent_entry(&p.disk.target))
            } else {
                None
            };
            read_one(
                self.repo.clone(),
                show,
                &self.source,
                p.disk.path.clone(),
                &p.disk.format,
                &p.disk.target,
                inc,
            )
        });
        let stats = futures::future::try_join_all(futs).await?;
        self.done = self.plans.iter().cloned().zip(stats).collect();

        // NVRAM: a copy (QEMU may hold the file) read as a small raw disk.
        if let Some(nv) = self.nvram.clone().filter(|p| p.is_file()) {
            let dir = match &self.source {
                Source::Libvirt(s) => s.parent().map(PathBuf::from).unwrap_or_default(),
                Source::Files(d) => d.clone(),
            };
            let copy = dir.join("nvram.copy");
            std::fs::copy(&nv, &copy).ctx(ErrorKind::Source, || {
                format!("cannot copy NVRAM {}", nv.display())
            })?;
            let st = read_one(
                self.repo.clone(),
                false,
                &Source::Files(dir.clone()),
                copy.clone(),
                "raw",
                "nvram",
                None,
            )
            .await;
            let _ = std::fs::remove_file(&copy);
            let st = st?;
            let r2 = self.repo.clone();
            let index = st.index.clone();
            let id = blocking(move || {
                r2.store_index(&index)
                    .map_err(|e| repo_err(e, "cannot store the NVRAM index"))
            })
            .await?;
            let size = st.index.disk_size;
            self.nvram_done = Some((st, id, size));
        }
        Ok(())
    }

    async fn commit(&mut self, facts: &JobFacts) -> Result<SnapshotId> {
        let mut entries = Vec::new();
        let mut metadata = BTreeMap::new();
        for (p, st) in &self.done {
            let r2 = self.repo.clone();
            let index = st.index.clone();
            let id = blocking(move || {
                r2.store_index(&index)
                    .map_err(|e| repo_err(e, "cannot store the disk index"))
            })
            .await?;
            let info = self.infos.get(&p.disk.target);
            let mut create_options = BTreeMap::new();
            if p.disk.format == "qcow2" {
                if let Some(cs) = info.and_then(|i| i.cluster_size) {
                    create_options.insert("cluster_size".to_string(), cs.to_string());
                }
                if let Some(c) = info.and_then(|i| i.compat.clone()) {
                    create_options.insert("compat".to_string(), c);
                }
            }
            let cbt = match (&self.new_cp, p.tracked) {
                (Some(cp), true) => Some(json!({
                    "type": "libvirt-checkpoint",
                    "checkpoint": cp,
                    "bitmap": cp,
                })),
                _ => None,
            };
            metadata.insert(
                format!("mode.{}", p.disk.target),
                if p.incremental { "incremental" } else { "full" }.to_string(),
            );
            if let Some(r) = &p.full_reason {
                metadata.insert(format!("full_reason.{}", p.disk.target), r.clone());
            }
            entries.push(DiskEntry {
                name: p.disk.target.clone(),
                virtual_size: st.index.disk_size,
                format: p.disk.format.clone(),
                chunk_size: self.repo.chunk_size(),
                index: id,
                source: Some(p.disk.path.display().to_string()),
                qemu_img_info: info.map(|i| i.raw.clone()),
                create_options,
                backup_mode: if p.incremental {
                    BackupMode::Incremental
                } else {
                    BackupMode::Full
                },
                bytes_read: st.bytes_read,
                bytes_new: st.bytes_new,
                chunks_new: st.chunks_new,
                cbt,
            });
        }
        if let Some((st, id, size)) = &self.nvram_done {
            entries.push(DiskEntry {
                name: "nvram".to_string(),
                virtual_size: *size,
                format: "raw".to_string(),
                chunk_size: self.repo.chunk_size(),
                index: *id,
                source: self.nvram.as_ref().map(|p| p.display().to_string()),
                qemu_img_info: None,
                create_options: BTreeMap::new(),
                backup_mode: BackupMode::Full,
                bytes_read: st.bytes_read,
                bytes_new: st.bytes_new,
                chunks_new: st.chunks_new,
                cbt: None,
            });
            metadata.insert("nvram_entry".to_string(), "nvram".to_string());
            if let Some(p) = &self.nvram {
                metadata.insert("nvram_path".to_string(), p.display().to_string());
            }
        }
        metadata.insert("domain_xml".to_string(), self.inactive_xml.clone());
        metadata.insert("domain_uuid".to_string(), self.uuid.clone());
        metadata.insert("quiesce".to_string(), facts.quiesce.clone());
        if let Some(w) = facts.freeze_window {
            metadata.insert("freeze_window_ms".to_string(), w.as_millis().to_string());
        }
        if let Some(s) = &facts.freeze_status_at_begin {
            metadata.insert("freeze_status_at_begin".to_string(), s.clone());
        }
        if let Some((n, x)) = &facts.checkpoint {
            metadata.insert("checkpoint".to_string(), n.clone());
            metadata.insert("checkpoint_xml".to_string(), x.clone());
        }
        if let Some(b) = &self.base {
            metadata.insert("base_checkpoint".to_string(), b.clone());
        }
        let incremental = self.done.iter().any(|(p, _)| p.incremental);
        let manifest = Manifest {
            version: 1,
            name: self.name.clone(),
            hostname: super::hostname(),
            time: jiff::Timestamp::now(),
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            parent: if incremental {
                self.parent.as_ref().map(|(id, _)| *id)
            } else {
                None
            },
            kind: SnapshotKind::Vm,
            disks: entries,
            metadata,
            tags: self.tags.clone(),
        };
        let r2 = self.repo.clone();
        blocking(move || {
            r2.commit_snapshot(&manifest)
                .map_err(|e| repo_err(e, "cannot commit the snapshot"))
        })
        .await
    }
}
