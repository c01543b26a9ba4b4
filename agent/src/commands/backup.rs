//! `lifeboat backup VM...`: back up libvirt domains (CLI glue).
//!
//! Per domain: the parent snapshot and what libvirt says ([`crate::vm::prepare`]), full or
//! incremental per disk ([`crate::vm::plan`]), then either the live job of [`crate::vm::job`]
//! (running domain: freeze → pull-mode backup job with a new checkpoint → thaw → read every
//! disk's NBD export in parallel → commit → end job → prune) or [`crate::vm::offline`] (shut-off
//! domain: each disk through `qemu-nbd`, checkpoint redefined afterwards). Both read through
//! [`crate::vm::transfer`]. Raw disks cannot carry bitmaps: they are read in full (allocated
//! extents only) every time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use repo_format::Repository;
use serde_json::{json, Value};

use super::{emit, mb_per_s};
use crate::backup_common::{self as common, latest_of};
use crate::cli::{BackupArgs, GlobalOpts, QuiesceArg, ThawGuardArgs};
use crate::error::{Error, ErrorKind, Result};
use crate::libvirt::{BackupDisk, BackupSpec, CheckpointSpec};
use crate::repo::{self, blocking};
use crate::vm::checkpoints::{self, RunDirs};
use crate::vm::guard::EarlyGuard;
use crate::vm::host::LibvirtHost;
use crate::vm::job::{self, JobOptions, QuiescePolicy, StepTimes};
use crate::vm::transfer::{Source, VmTransfer};
use crate::vm::{offline, plan, prepare};

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
    let mut steps = StepTimes::default();
    let mut t = Instant::now();
    let repo2 = repo.clone();
    let n2 = name.to_string();
    let parent = blocking(move || latest_of(&repo2, &n2)).await?;
    t = steps.mark("find the parent snapshot", t);
    let parent_m = parent.as_ref().map(|(_, m)| m.clone());
    let prep = prepare::domain(
        &args.connect,
        name,
        &args.exclude_disks,
        parent_m.as_ref(),
        checkpoints::prefix(repo.id()),
    )
    .await?;
    t = steps.mark("libvirt: domain, disks, checkpoints", t);
    let freeze_limit = Duration::from_secs(args.freeze_limit.max(1));
    // A running domain that may be frozen: its thaw guard starts now, while the disks are
    // inspected and the guest agent is pinged; it is armed only right before the freeze, and
    // exits untouched if the run does not freeze (no agent, or an error before).
    let early_guard = match (prep.active, args.quiesce) {
        (true, QuiesceArg::Auto | QuiesceArg::Required) => {
            EarlyGuard::start(&args.connect, name, freeze_limit)
        }
        _ => EarlyGuard::none(),
    };
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
    let (infos, disks) = prepare::disk_facts(&prep).await?;
    t = steps.mark("disk facts (qemu-img info)", t);
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
    let new_cp =
        (!tracked.is_empty()).then(|| checkpoints::new_name(repo.id(), &prep.existing_cps));
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
        show_progress: !global.quiet && !global.json,
        limits: common::limits(&args.limits),
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
    steps.mark("plan", t);
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
            freeze_limit,
            early_guard,
        ));
        let r = job::run(host, &opts, spec, &mut transfer).await?;
        steps.0.extend(r.steps.0);
        (r.snapshot, r.facts)
    } else {
        let r = offline::run(prep.dom, &mut transfer, &prep.all_targets, &tracked, &prune).await?;
        steps.mark("transfer, commit, checkpoints (shut-off domain)", started);
        r
    };
    drop(dirs);

    // Report.
    let mut jd = Vec::new();
    let mut lines = Vec::new();
    for (p, st) in &transfer.done {
        let secs = st.elapsed.as_secs_f64();
        let mut d = common::disk_json(&p.disk.target, st);
        d["mode"] = json!(common::mode_name(p.incremental));
        d["full_reason"] = json!(p.full_reason);
        jd.push(d);
        lines.push(format!(
            "  {}: {}{}: {}, {:.1} s ({:.0} MB/s)",
            p.disk.target,
            common::mode_name(p.incremental),
            common::reason_suffix(p.full_reason.as_ref()),
            common::sizes_text(st),
            secs,
            mb_per_s(st.bytes_read, secs),
        ));
    }
    let window_ms = facts.freeze_window.map(|d| d.as_secs_f64() * 1000.0);
    let mode = common::mode_name(transfer.done.iter().any(|(p, _)| p.incremental));
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
        "limits": common::limits_json(&args.limits),
        "steps_ms": steps.0.iter().map(|(s, d)| json!({"step": s, "ms": d.as_secs_f64() * 1000.0})).collect::<Vec<_>>(),
    });
    let text = format!(
        "snapshot {} of {name}: {mode}, {}{}\n{}",
        common::short_id(&snap),
        facts.quiesce,
        window_ms
            .map(|w| format!(", freeze window {w:.0} ms"))
            .unwrap_or_default(),
        lines.join("\n")
    );
    Ok((j, text))
}
