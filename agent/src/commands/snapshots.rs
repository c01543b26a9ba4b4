//! `lifeboat snapshots [NAME]`

use serde_json::json;

use super::{emit, human_bytes};
use crate::cli::{GlobalOpts, SnapshotsArgs};
use crate::error::{repo_err, Result};
use crate::repo::{self, blocking};

/// `lifeboat snapshots`
pub async fn run(global: &GlobalOpts, args: SnapshotsArgs) -> Result<()> {
    let repo = repo::open_async(global).await?;
    let all = blocking(move || {
        repo.list_snapshots()
            .map_err(|e| repo_err(e, "cannot list snapshots"))
    })
    .await?;
    let list: Vec<_> = all
        .into_iter()
        .filter(|(_, m)| args.name.as_ref().is_none_or(|n| &m.name == n))
        .collect();

    let json = json!(list
        .iter()
        .map(|(id, m)| json!({
            "id": id.to_string(),
            "name": m.name,
            "time": m.time.to_string(),
            "hostname": m.hostname,
            "kind": m.kind,
            "parent": m.parent.map(|p| p.to_string()),
            "tags": m.tags,
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
            "{:<12}  {:<25}  {:<20}  {:<11}  {:>10}  {:>10}  disks\n",
            "id", "time", "name", "mode", "size", "new"
        ));
        for (id, m) in &list {
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
            text.push_str(&format!(
                "{:<12}  {:<25}  {:<20}  {:<11}  {:>10}  {:>10}  {}\n",
                id.to_string().get(..12).unwrap_or_default(),
                time,
                m.name,
                mode,
                human_bytes(size),
                human_bytes(new),
                disks.join(",")
            ));
        }
        text.pop();
    }
    emit(global, &json, &text);
    Ok(())
}
