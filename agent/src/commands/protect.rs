//! `lifeboat protect VM --rollback-for 4h [--reason R] [--memory]`: a backup into the repository
//! (the live job of `lifeboat backup`) and a local rollback point, taken inside the job's frozen
//! window (its `during_freeze` hook, right before the backup job begins). The command fails,
//! and the rollback point is consolidated again, unless the backup commits.

use std::sync::{Arc, Mutex};

use serde_json::json;

use super::emit;
use crate::cli::{BackupArgs, GlobalOpts, ProtectArgs};
use crate::error::{Error, ErrorKind, Result};
use crate::libvirt::Hypervisor;
use crate::repo::blocking;
use crate::rollback::ops;
use crate::rollback::state::{self, BackupRef, RollbackState};
use crate::rollback::take::{self, TakeOptions};
use crate::vm::job::FreezeHook;

fn src(e: crate::libvirt::LibvirtError, what: impl Into<String>) -> Error {
    Error::with_source(ErrorKind::Source, what, e)
}

/// Refuses when a rollback point exists; repairs an interrupted one first.
pub(crate) fn check_no_point(hv: &Hypervisor, vm: &str) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    if let Some(mut st) = state::load(vm)? {
        if let Some(msg) = ops::repair(hv, &mut st)? {
            tracing::warn!("{msg}");
            notes.push(msg);
        }
        if let Some(st) = state::load(vm)? {
            return Err(Error::new(
                ErrorKind::Usage,
                format!(
                    "{vm} already has a rollback point ({}, taken {}, expires {}): `lifeboat commit {vm}` or `lifeboat rollback {vm}` first",
                    st.snapshot, st.created, st.expires
                ),
            ));
        }
    }
    Ok(notes)
}

/// `lifeboat protect`
pub async fn run(global: &GlobalOpts, args: ProtectArgs) -> Result<()> {
    let rollback_for = ops::parse_duration(&args.rollback_for)?;
    let vm = args.vm.clone();
    let lock = state::lock(&vm)?;
    let uri = args.connect.clone();
    let topts = TakeOptions {
        rollback_for,
        reason: args.reason.clone(),
        memory: args.memory,
    };
    let (vm2, uri2) = (vm.clone(), uri.clone());
    let (plan, excluded, notes, active) = blocking(move || {
        let hv = Hypervisor::connect(&uri2).map_err(|e| src(e, "connect to libvirt"))?;
        let notes = check_no_point(&hv, &vm2)?;
        let dom = hv
            .domain(&vm2)
            .map_err(|e| src(e, format!("no domain {vm2}")))?;
        let active = dom.is_active().map_err(|e| src(e, "query domain state"))?;
        let (st, excluded) = take::plan(&dom, &uri2, &topts)?;
        Ok((st, excluded, notes, active))
    })
    .await?;
    if args.memory && !active {
        return Err(Error::new(
            ErrorKind::Usage,
            format!("--memory: {vm} is not running"),
        ));
    }

    // The point, shared with the hook.
    let taken: Arc<Mutex<Option<RollbackState>>> = Arc::default();
    let take = {
        let (uri, vm, plan, excluded, taken) = (
            uri.clone(),
            vm.clone(),
            plan.clone(),
            excluded.clone(),
            taken.clone(),
        );
        move |frozen: Option<bool>| -> Result<()> {
            let hv = Hypervisor::connect(&uri).map_err(|e| src(e, "connect to libvirt"))?;
            let dom = hv
                .domain(&vm)
                .map_err(|e| src(e, format!("no domain {vm}")))?;
            // Inside the backup job's window: frozen only if the agent answered and the freeze
            // worked (`--quiesce auto` may go on crash-consistent); ask the agent.
            let frozen = frozen.unwrap_or_else(|| {
                dom.agent_command(r#"{"execute":"guest-fsfreeze-status"}"#, 5)
                    .is_ok_and(|r| r.contains("\"frozen\""))
            });
            let mut st = plan.clone();
            let r = take::take(&hv, &dom, &mut st, &excluded, frozen);
            if let Ok(mut t) = taken.lock() {
                *t = Some(st);
            }
            r
        }
    };

    let t0 = std::time::Instant::now();
    let mut backup_json = serde_json::Value::Null;
    let result: Result<()> = if args.no_backup {
        let (uri, vm) = (uri.clone(), vm.clone());
        let take = take.clone();
        blocking(move || {
            // Test path: our own short freeze around the snapshot.
            let hv = Hypervisor::connect(&uri).map_err(|e| src(e, "connect to libvirt"))?;
            let dom = hv
                .domain(&vm)
                .map_err(|e| src(e, format!("no domain {vm}")))?;
            let frozen = active && dom.fs_freeze(&[]).is_ok();
            let r = take(Some(frozen));
            if frozen {
                let _ = dom.fs_thaw(&[]);
            }
            r
        })
        .await
    } else {
        let repo = crate::repo::open_async(global).await?;
        let bargs = BackupArgs {
            vms: vec![vm.clone()],
            connect: uri.clone(),
            full: false,
            exclude_disks: Vec::new(),
            quiesce: args.quiesce,
            freeze_mountpoints: Vec::new(),
            pre_freeze: None,
            post_thaw: None,
            freeze_limit: args.freeze_limit,
            tags: {
                let mut t = args.tags.clone();
                t.push("protect".into());
                t
            },
            limits: args.limits.clone(),
        };
        let hook_take = take.clone();
        let hook = FreezeHook(Arc::new(move || hook_take(None)));
        let quiet = GlobalOpts {
            quiet: true,
            json: false,
            ..global.clone()
        };
        match super::backup::backup_vm(&quiet, &bargs, repo.clone(), &vm, Some(hook)).await {
            Ok((j, _text)) => {
                // A shut-off domain: no frozen window; nothing writes, take the point now.
                let needs_take = taken.lock().map(|t| t.is_none()).unwrap_or(true);
                let r = if needs_take {
                    let take = take.clone();
                    blocking(move || take(Some(false))).await
                } else {
                    Ok(())
                };
                backup_json = j;
                r
            }
            Err(e) => Err(e),
        }
    };

    let st = taken.lock().ok().and_then(|mut t| t.take());
    match (result, st) {
        (Ok(()), Some(mut st)) => {
            ops::crash_point("protect-before-complete");
            st.backup = backup_json
                .get("snapshot")
                .and_then(|s| s.as_str())
                .map(|s| BackupRef {
                    repo: global.repo.clone(),
                    snapshot: s.to_string(),
                });
            st.complete = true;
            state::save(&mut st)?;
            if let Some(b) = &st.backup {
                // Label the libvirt snapshot with the backup too (best effort; an offline
                // point has no libvirt metadata).
                let (uri, vm, name) = (uri.clone(), st.vm.clone(), st.snapshot.clone());
                let desc = format!("{}; backup: {}", take::description(&st), b.snapshot);
                let r = blocking(move || {
                    let hv = Hypervisor::connect(&uri).map_err(|e| src(e, "connect to libvirt"))?;
                    let dom = hv.domain(&vm).map_err(|e| src(e, "look up domain"))?;
                    if dom
                        .snapshots()
                        .map_err(|e| src(e, "list snapshots"))?
                        .iter()
                        .any(|s| s.name == name)
                    {
                        dom.set_snapshot_description(&name, &desc)
                            .map_err(|e| src(e, "label the snapshot with the backup"))?;
                    }
                    Ok(())
                })
                .await;
                if let Err(e) = r {
                    tracing::warn!("{}", crate::error::format_chain(&e));
                }
            }
            drop(lock);
            let secs = t0.elapsed().as_secs_f64();
            let j = json!({
                "vm": st.vm,
                "rollback_point": st.snapshot,
                "reason": st.reason,
                "created": st.created.to_string(),
                "expires": st.expires.to_string(),
                "overlays": st.disks.iter().map(|d| json!({"disk": d.target, "base": d.base, "overlay": d.overlay})).collect::<Vec<_>>(),
                "memory": st.memory,
                "backup": backup_json,
                "notes": notes,
                "seconds": secs,
            });
            let text = format!(
                "{}: rollback point {} until {} ({}), backup {}; {:.1} s\n  undo the patch: lifeboat rollback {}\n  keep it:        lifeboat commit {}",
                st.vm,
                st.snapshot,
                st.expires,
                st.reason.as_deref().unwrap_or("no reason given"),
                st.backup
                    .as_ref()
                    .map(|b| b.snapshot.clone())
                    .unwrap_or_else(|| "none (--no-backup)".into()),
                secs,
                st.vm,
                st.vm
            );
            emit(global, &j, &text);
            Ok(())
        }
        (Ok(()), None) => Err(Error::new(
            ErrorKind::Other,
            format!("protect {vm}: the rollback point was not taken"),
        )),
        (Err(e), _) => {
            // Undo a point taken for a backup that did not commit.
            let vm2 = vm.clone();
            let uri2 = uri.clone();
            let undo = blocking(move || {
                let Some(mut st) = state::load(&vm2)? else {
                    return Ok(None);
                };
                let hv = Hypervisor::connect(&uri2).map_err(|e| src(e, "connect to libvirt"))?;
                ops::repair(&hv, &mut st)
            })
            .await;
            match undo {
                Ok(Some(msg)) => tracing::warn!("{msg}"),
                Ok(None) => {}
                Err(u) => tracing::error!(
                    "the rollback point of {vm} could not be undone after the failure: {u}; run `lifeboat reconcile`"
                ),
            }
            Err(Error::with_source(
                e.kind(),
                format!("protect {vm} failed: no rollback point was kept"),
                e,
            ))
        }
    }
}
