//! `lifeboat snapshots [NAME]`

use serde_json::json;

use super::{emit, human_bytes};
use crate::cli::{GlobalOpts, SnapshotsArgs};
use crate::error::{repo_err, Result};
use crate::repo::{self, blocking};

/// `lifeboat snapshots`
pub async fn run(global: &GlobalOpts, args: SnapshotsArgs) -> Result<()> {
    let repo = repo::open_async(global).await?;
    let name = args.name.clone();
    let list = blocking(move || {
        let all = repo
            .list_snapshots()
            .map_err(|e| repo_err(e, "cannot list snapshots"))?;
        // With each snapshot, its last boot-test result (an unreadable one is reported as such).
        Ok(all
            .into_iter()
            .filter(|(_, m)| name.as_ref().is_none_or(|n| &m.name == n))
            .map(|(id, m)| {
                let bt = repo.last_boot_test(&id).map_err(|e| e.to_string());
                (id, m, bt)
            })
            .collect::<Vec<_>>())
    })
    .await?;

    let json = json!(list
        .iter()
        .map(|(id, m, bt)| json!({
            "id": id.to_string(),
            "name": m.name,
            "time": m.time.to_string(),
            "hostname": m.hostname,
            "kind": m.kind,
            "parent": m.parent.map(|p| p.to_string()),
            "tags": m.tags,
            "boot_test": match bt {
                Ok(Some(r)) => json!({
                    "verdict": r.verdict,
                    "rto_seconds": r.rto_seconds,
                    "reason": r.reason,
                    "finished": r.finished.to_string(),
                    "hostname": r.hostname,
                }),
                Ok(None) => serde_json::Value::Null,
                Err(e) => json!({ "error": e }),
            },
            "disks": m.disks.iter().map(|d| json!({
                "name": d.name,
                "format": d.format,
                "virtual_size": d.virtual_size,
                "backup_mode": d.backup_mode,
                "bytes_read": d.bytes_read,
                "bytes_new": d.bytes_new,
            })).collect::<Vec<_>>(),
        }))
        .collect::<Vec<_>>());

    let mut text = String::new();
    if list.is_empty() {
        text.push_str("no snapshots");
    } else {
        text.push_str(&format!(
            "{:<12}  {:<25}  {:<20}  {:<11}  {:>10}  {:>10}  {:<14}  disks\n",
            "id", "time", "name", "mode", "size", "new", "boot test"
        ));
        for (id, m, bt) in &list {
            let size: u64 = m.disks.iter().map(|d| d.virtual_size).sum();
            let new: u64 = m.disks.iter().map(|d| d.bytes_new).sum();
            let mode = if m
                .disks
                .iter()
                .any(|d| d.backup_mode == repo_format::BackupMode::Incremental)
            {
                "incremental"
            } else {
                "full"
            };
            let disks: Vec<&str> = m.disks.iter().map(|d| d.name.as_str()).collect();
            let time = m.time.strftime("%Y-%m-%d %H:%M:%S UTC").to_string();
            let boot = match bt {
                Ok(Some(r)) => match r.rto_seconds {
                    Some(rto) if r.verdict == repo_format::Verdict::Pass => {
                        format!("pass {rto:.0}s")
                    }
                    _ => r.verdict.as_str().to_string(),
                },
                Ok(None) => "-".to_string(),
                Err(_) => "unreadable".to_string(),
            };
            text.push_str(&format!(
                "{:<12}  {:<25}  {:<20}  {:<11}  {:>10}  {:>10}  {:<14}  {}\n",
                id.to_string().get(..12).unwrap_or_default(),
                time,
                m.name,
                mode,
                human_bytes(size),
                human_bytes(new),
                boot,
                disks.join(",")
            ));
        }
        text.pop();
    }
    emit(global, &json, &text);
    Ok(())
}
