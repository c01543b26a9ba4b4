//! `lifeboat commit VM` ("the patch went fine"): consolidate the rollback point now.

use serde_json::json;

use super::emit;
use crate::cli::{CommitArgs, GlobalOpts};
use crate::error::{Error, ErrorKind, Result};
use crate::libvirt::Hypervisor;
use crate::repo::blocking;
use crate::rollback::ops;
use crate::rollback::state::{self, Phase};

/// `lifeboat commit`
pub async fn run(global: &GlobalOpts, args: CommitArgs) -> Result<()> {
    let vm = args.vm.clone();
    let _lock = state::lock(&vm)?;
    let vm2 = vm.clone();
    let (o, note) = blocking(move || {
        let Some(mut st) = state::load(&vm2)? else {
            return Err(Error::new(
                ErrorKind::Usage,
                format!("{vm2} has no rollback point to commit"),
            ));
        };
        let hv = Hypervisor::connect(&st.uri)
            .map_err(|e| Error::with_source(ErrorKind::Source, "connect to libvirt", e))?;
        match (st.phase, st.complete) {
            (Phase::Ready, true) | (Phase::Committing, _) => {
                let note = (st.phase == Phase::Committing)
                    .then(|| "finished an interrupted consolidation".to_string());
                Ok((ops::consolidate(&hv, &mut st)?, note))
            }
            _ => {
                let msg = ops::repair(&hv, &mut st)?.unwrap_or_default();
                Err(Error::new(ErrorKind::Other, format!("{vm2}: {msg}")))
            }
        }
    })
    .await?;
    let j = json!({"vm": vm, "committed": true, "seconds": o.seconds, "deleted": o.deleted, "note": note});
    let mut text = format!(
        "{vm}: rollback point consolidated into the disks in {:.1} s",
        o.seconds
    );
    if let Some(n) = note {
        text.push_str(&format!(" ({n})"));
    }
    emit(global, &j, &text);
    Ok(())
}
