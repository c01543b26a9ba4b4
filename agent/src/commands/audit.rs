//! `lifeboat audit-snapshots [--older-than 24h] [--json]`: the snapshot sprawl report.

use super::emit;
use crate::cli::{AuditSnapshotsArgs, GlobalOpts};
use crate::error::{Context, Error, ErrorKind, Result};
use crate::libvirt::Hypervisor;
use crate::repo::blocking;
use crate::rollback::{audit, ops};

/// `lifeboat audit-snapshots`
pub async fn run(global: &GlobalOpts, args: AuditSnapshotsArgs) -> Result<()> {
    let older = ops::parse_duration(&args.older_than)?;
    let uri = args.connect.clone();
    let a = blocking(move || {
        let hv = Hypervisor::connect(&uri)
            .map_err(|e| Error::with_source(ErrorKind::Source, "connect to libvirt", e))?;
        audit::audit(&hv, older)
    })
    .await?;
    let j = serde_json::to_value(&a).ctx(ErrorKind::Other, || "encode the audit".into())?;
    emit(global, &j, &audit::render(&a));
    Ok(())
}
