//! `lifeboat reconcile`: consolidates every expired rollback point and finishes or undoes
//! interrupted ones; with `--adopt-orphans` also Lifeboat snapshots whose state file is gone.
//! Idempotent; meant for a timer (see `docs/reconcile-timer.md`).

use serde_json::json;

use super::emit;
use crate::cli::{GlobalOpts, ReconcileArgs};
use crate::error::{Error, ErrorKind, Result};
use crate::libvirt::Hypervisor;
use crate::repo::blocking;
use crate::rollback::ops;
use crate::rollback::state::{self, Phase};

/// `lifeboat reconcile`
pub async fn run(global: &GlobalOpts, args: ReconcileArgs) -> Result<()> {
    let filter = args.connect.clone();
    let only = args.vms.clone();
    let adopt = args.adopt_orphans;
    let (items, failures) = blocking(move || {
        let mut items = Vec::new();
        let mut failures = 0usize;
        for vm in state::list()?
            .into_iter()
            .filter(|v| only.is_empty() || only.contains(v))
        {
            let r = (|| -> Result<(String, String)> {
                let _lock = state::lock(&vm)?;
                let Some(mut st) = state::load(&vm)? else {
                    return Ok(("gone".into(), "no rollback point any more".into()));
                };
                if filter.as_deref().is_some_and(|u| u != st.uri) {
                    return Ok(("skipped".into(), format!("on {}", st.uri)));
                }
                let hv = Hypervisor::connect(&st.uri)
                    .map_err(|e| Error::with_source(ErrorKind::Source, "connect to libvirt", e))?;
                if let Some(msg) = ops::repair(&hv, &mut st)? {
                    return Ok(("repaired".into(), msg));
                }
                let now = jiff::Timestamp::now();
                if st.phase == Phase::Ready && st.expired(now) {
                    let o = ops::consolidate(&hv, &mut st)?;
                    Ok((
                        "consolidated".into(),
                        format!(
                            "expired at {}; consolidated in {:.1} s",
                            st.expires, o.seconds
                        ),
                    ))
                } else {
                    Ok(("kept".into(), format!("expires {}", st.expires)))
                }
            })();
            match r {
                Ok((action, msg)) => items.push((vm, action, msg)),
                Err(e) => {
                    failures += 1;
                    items.push((vm, "failed".into(), crate::error::format_chain(&e)));
                }
            }
        }
        // Lifeboat snapshots whose state file is gone: adopt them, so their expiry holds.
        let uri = filter
            .clone()
            .unwrap_or_else(|| "qemu:///system".to_string());
        if adopt {
            match adopt_orphans(&uri, &only) {
                Ok(found) => {
                    for (vm, action, msg, failed) in found {
                        failures += usize::from(failed);
                        items.push((vm, action, msg));
                    }
                }
                Err(e) => {
                    failures += 1;
                    items.push((uri, "failed".into(), crate::error::format_chain(&e)));
                }
            }
        }
        Ok((items, failures))
    })
    .await?;
    let j = json!({
        "points": items.iter().map(|(vm, a, m)| json!({"vm": vm, "action": a, "message": m})).collect::<Vec<_>>(),
        "failures": failures,
    });
    let mut text = String::new();
    for (vm, a, m) in &items {
        text.push_str(&format!("{vm}: {a}: {m}\n"));
    }
    if items.is_empty() {
        text.push_str("no rollback points\n");
    }
    emit(global, &j, text.trim_end());
    if failures > 0 {
        return Err(Error::new(
            ErrorKind::Other,
            format!("reconcile: {failures} rollback point(s) could not be handled"),
        ));
    }
    Ok(())
}

/// Finds `lifeboat-rb-*` snapshots without a state file on `uri`; rebuilds and saves their
/// state, consolidating the expired ones.
fn adopt_orphans(uri: &str, only: &[String]) -> Result<Vec<(String, String, String, bool)>> {
    let hv = Hypervisor::connect(uri)
        .map_err(|e| Error::with_source(ErrorKind::Source, "connect to libvirt", e))?;
    let mut out = Vec::new();
    let names = hv
        .list_domains()
        .map_err(|e| Error::with_source(ErrorKind::Source, "list domains", e))?;
    for vm in names
        .into_iter()
        .filter(|v| only.is_empty() || only.contains(v))
    {
        let Ok(dom) = hv.domain(&vm) else { continue };
        let Ok(snaps) = dom.snapshots() else { continue };
        for snap in snaps
            .iter()
            .filter(|s| s.name.starts_with(ops::SNAPSHOT_PREFIX))
        {
            let r = (|| -> Result<Option<(String, String)>> {
                let _lock = state::lock(&vm)?;
                if state::load(&vm)?.is_some() {
                    return Ok(None);
                }
                let Some(mut st) = ops::adopt(&dom, uri, snap)? else {
                    return Ok(Some((
                        "orphan".into(),
                        format!(
                            "Lifeboat snapshot {} has no state file and cannot be rebuilt: see audit-snapshots",
                            snap.name
                        ),
                    )));
                };
                state::save(&mut st)?;
                if st.expired(jiff::Timestamp::now()) {
                    let o = ops::consolidate(&hv, &mut st)?;
                    Ok(Some((
                        "consolidated".into(),
                        format!(
                            "{} had lost its state file; expired at {}; consolidated in {:.1} s",
                            snap.name, st.expires, o.seconds
                        ),
                    )))
                } else {
                    Ok(Some((
                        "adopted".into(),
                        format!(
                            "{} had lost its state file; rebuilt, expires {}",
                            snap.name, st.expires
                        ),
                    )))
                }
            })();
            match r {
                Ok(Some((a, m))) => out.push((vm.clone(), a, m, false)),
                Ok(None) => {}
                Err(e) => out.push((
                    vm.clone(),
                    "failed".into(),
                    crate::error::format_chain(&e),
                    true,
                )),
            }
        }
    }
    Ok(out)
}
