//! `lifeboat reconcile`: consolidates every expired rollback point and finishes or undoes
//! interrupted ones. Idempotent; meant for a timer (see `docs/reconcile-timer.md`).

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
    let (items, failures) = blocking(move || {
        let mut items = Vec::new();
        let mut failures = 0usize;
        for vm in state::list()? {
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
