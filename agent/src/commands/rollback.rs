//! `lifeboat rollback VM [--from-backup]`: back to the rollback point from local storage; if it
//! is gone, say so and (with `--from-backup`, or after confirmation on a terminal) restore the
//! VM's disks from the backup `protect` took.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;

use serde_json::json;

use super::emit;
use crate::cli::{GlobalOpts, NetworkArgs, RestoreArgs, RollbackArgs};
use crate::error::{Error, ErrorKind, Result};
use crate::libvirt::snapshot::{set_disk_sources, DiskSourceSpec};
use crate::libvirt::Hypervisor;
use crate::repo::blocking;
use crate::rollback::ops;
use crate::rollback::state::{self, Phase};

fn src(e: crate::libvirt::LibvirtError, what: impl Into<String>) -> Error {
    Error::with_source(ErrorKind::Source, what, e)
}

/// `lifeboat rollback`
pub async fn run(global: &GlobalOpts, args: RollbackArgs) -> Result<()> {
    let vm = args.vm.clone();
    let lock = state::lock(&vm)?;
    let vm2 = vm.clone();
    let r = blocking(
        move || -> Result<std::result::Result<(ops::Outcome, Vec<String>), String>> {
            let Some(mut st) = state::load(&vm2)? else {
                return Ok(Err(format!("{vm2} has no rollback point")));
            };
            let hv = Hypervisor::connect(&st.uri).map_err(|e| src(e, "connect to libvirt"))?;
            let mut notes = Vec::new();
            match (st.phase, st.complete) {
                (Phase::Ready, true) | (Phase::RollingBack, _) => {
                    if st.phase == Phase::RollingBack {
                        notes.push("finishing an interrupted rollback".to_string());
                    }
                    let o = ops::rollback(&hv, &mut st)?;
                    Ok(Ok((o, notes)))
                }
                _ => {
                    let msg = ops::repair(&hv, &mut st)?.unwrap_or_default();
                    Ok(Err(format!("{vm2}: {msg}")))
                }
            }
        },
    )
    .await?;
    match r {
        Ok((o, notes)) => {
            drop(lock);
            let all_notes: Vec<String> = notes.iter().chain(o.notes.iter()).cloned().collect();
            let j = json!({
                "vm": vm, "rolled_back": true, "seconds": o.seconds,
                "deleted": o.deleted, "notes": all_notes,
            });
            let mut text = format!(
                "{vm}: rolled back to the rollback point in {:.1} s",
                o.seconds
            );
            for n in notes.iter().chain(o.notes.iter()) {
                text.push_str(&format!("\n  {n}"));
            }
            emit(global, &j, &text);
            Ok(())
        }
        Err(why) => {
            let last = ops::last(&vm);
            let backup = last.as_ref().and_then(|l| l.backup.clone());
            let Some(b) = backup else {
                return Err(Error::new(
                    ErrorKind::Usage,
                    format!("{why}; no backup taken by protect is recorded either"),
                ));
            };
            let gone = last
                .as_ref()
                .map(|l| format!(" (it was consolidated at {})", l.updated))
                .unwrap_or_default();
            let confirmed = args.from_backup
                || confirm(&format!(
                    "{why}{gone}. Restore {vm} from the backup {} taken by protect? [y/N] ",
                    b.snapshot
                ));
            if !confirmed {
                return Err(Error::new(
                    ErrorKind::Usage,
                    format!(
                        "{why}{gone}; the backup taken by protect is snapshot {}: run `lifeboat rollback {vm} --from-backup` to restore it",
                        b.snapshot
                    ),
                ));
            }
            let uri = last
                .as_ref()
                .map(|l| l.uri.clone())
                .unwrap_or(args.connect.clone());
            from_backup(global, &vm, &uri, &b.snapshot).await
        }
    }
}

fn confirm(q: &str) -> bool {
    if !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
        return false;
    }
    eprint!("{q}");
    let mut s = String::new();
    std::io::stdin().read_line(&mut s).is_ok() && matches!(s.trim(), "y" | "Y" | "yes")
}

/// Restores the backup's disks next to the current ones (`<dir>/<vm>.restored-<time>/`), then
/// stops the VM, points its disks at the restored files and starts it. The old images are
/// left in place (reported), never deleted.
async fn from_backup(global: &GlobalOpts, vm: &str, uri: &str, snapshot: &str) -> Result<()> {
    let (vm2, uri2) = (vm.to_string(), uri.to_string());
    let disks = blocking(move || {
        let hv = Hypervisor::connect(&uri2).map_err(|e| src(e, "connect to libvirt"))?;
        let dom = hv
            .domain(&vm2)
            .map_err(|e| src(e, format!("no domain {vm2}")))?;
        dom.disks().map_err(|e| src(e, "read disks"))
    })
    .await?;
    let first = disks
        .iter()
        .find_map(|d| d.source_path().map(|p| p.to_path_buf()))
        .ok_or_else(|| Error::new(ErrorKind::Usage, format!("{vm} has no file disk")))?;
    let dir = first
        .parent()
        .map(|p| {
            p.join(format!(
                "{vm}.restored-{}",
                jiff::Timestamp::now().as_second()
            ))
        })
        .unwrap_or_else(|| PathBuf::from(format!("{vm}.restored")));
    let rargs = RestoreArgs {
        snapshot: snapshot.to_string(),
        to: dir.clone(),
        disks: Vec::new(),
        format: None,
        force: false,
        connect: uri.to_string(),
        define: false,
        start: false,
        name: None,
        network: NetworkArgs {
            network_map: Vec::new(),
            no_network: false,
        },
    };
    let quiet = GlobalOpts {
        quiet: true,
        json: false,
        ..global.clone()
    };
    super::restore::run(&quiet, rargs).await?;
    let (vm2, uri2, dir2) = (vm.to_string(), uri.to_string(), dir.clone());
    let changed = blocking(move || {
        let hv = Hypervisor::connect(&uri2).map_err(|e| src(e, "connect to libvirt"))?;
        let dom = hv
            .domain(&vm2)
            .map_err(|e| src(e, format!("no domain {vm2}")))?;
        let mut map = BTreeMap::new();
        for d in dom.disks().map_err(|e| src(e, "read disks"))? {
            for f in ["qcow2", "raw"] {
                let p = dir2.join(format!("{}.{f}", d.target));
                if p.exists() {
                    map.insert(
                        d.target.clone(),
                        DiskSourceSpec {
                            path: p,
                            format: f.into(),
                        },
                    );
                }
            }
        }
        dom.destroy().map_err(|e| src(e, "stop the domain"))?;
        let xml = dom.xml(true).map_err(|e| src(e, "read domain XML"))?;
        let new = set_disk_sources(&xml, &map)
            .map_err(|e| src(e, "point disks to the restored images"))?;
        let dom = hv
            .define_xml(&new)
            .map_err(|e| src(e, "redefine the domain"))?;
        dom.start().map_err(|e| src(e, "start the domain"))?;
        Ok(map.keys().cloned().collect::<Vec<_>>())
    })
    .await?;
    let j = json!({"vm": vm, "restored_from_backup": snapshot, "dir": dir, "disks": changed});
    emit(
        global,
        &j,
        &format!(
            "{vm}: restored from backup {snapshot} into {} and started (the previous images were kept)",
            dir.display()
        ),
    );
    Ok(())
}
