//! Moving a running instant restore's data into its local overlays: one libvirt block pull per
//! disk, restarted while QEMU's NBD client reconnects.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::serving::Serving;
use super::{lv, State};
use crate::cli::GlobalOpts;
use crate::commands::human_bytes;
use crate::error::{Context, Error, ErrorKind, Result};
use crate::libvirt::rewrite::disk_has_backing;
use crate::libvirt::Hypervisor;
use crate::relocate;
use crate::repo::blocking;

/// How long a block pull that stops without a repository failure is restarted (see
/// `move_data`): covers QEMU's NBD reconnect backoff (up to 16 s) with a margin.
const PULL_RETRY_WINDOW: Duration = Duration::from_secs(60);

/// Pull every disk that still has a backing file; returns the time it took.
pub(super) async fn move_data(
    global: &GlobalOpts,
    state: &State,
    serving: &Serving,
    total: u64,
) -> Result<Duration> {
    let t = Instant::now();
    let uri = state.uri.clone();
    let name = state.name.clone();
    let targets: Vec<String> = state.disks.iter().map(|d| d.target.clone()).collect();
    let progress =
        crate::pipeline::progress::Progress::new(!global.quiet && !global.json, total, "move");
    let (active, pending) = {
        let targets = targets.clone();
        blocking(move || {
            let hv = Hypervisor::connect(&uri).map_err(|e| lv(e, "cannot connect to libvirt"))?;
            let dom = hv
                .domain(&name)
                .map_err(|e| lv(e, "cannot find the restored domain"))?;
            let active = dom
                .is_active()
                .map_err(|e| lv(e, "cannot query the domain"))?;
            let mut pending = Vec::new();
            if active {
                let xml = dom
                    .xml(false)
                    .map_err(|e| lv(e, "cannot read the live XML"))?;
                for t in &targets {
                    if disk_has_backing(&xml, t).map_err(|e| lv(e, "bad live XML"))? != Some(false)
                    {
                        if dom.block_job(t).map_err(|e| lv(e, "block job"))?.is_none() {
                            dom.block_pull(t)
                                .map_err(|e| lv(e, "cannot start the block pull"))?;
                        }
                        pending.push(t.clone());
                    }
                }
            }
            Ok((active, pending))
        })
        .await?
    };
    if !active {
        // Shut off: finish offline, copying what the overlays lack while we serve it.
        for d in &state.disks {
            let info = vmdisk::qemu::image_info(&d.overlay)
                .await
                .ctx(ErrorKind::Target, || {
                    format!("cannot inspect '{}'", d.overlay.display())
                })?;
            if info.raw.get("backing-filename").is_none() {
                continue;
            }
            let out = tokio::process::Command::new("qemu-img")
                .args(["rebase", "-q", "-f", "qcow2", "-b", ""])
                .arg(&d.overlay)
                .output()
                .await
                .ctx(ErrorKind::Other, || "cannot run qemu-img rebase".into())?;
            if !out.status.success() {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "moving '{}' offline failed: {}{}",
                        d.target,
                        String::from_utf8_lossy(&out.stderr).trim(),
                        serving
                            .failures()
                            .map(|f| format!(" ({f})"))
                            .unwrap_or_default()
                    ),
                ));
            }
        }
        progress.add(total);
        progress.finish();
        return Ok(t.elapsed());
    }
    // Poll the jobs.
    let mut done_bytes: BTreeMap<String, u64> = BTreeMap::new();
    let mut remaining = pending;
    let mut last_log = Instant::now();
    // A pull that fails without a repository failure is restarted until this deadline: QEMU's
    // NBD client may not have reconnected yet (after --resume, its background reconnect
    // retries with a backoff of 1 s doubling up to 16 s; until then requests fail with EIO).
    let retry_until = Instant::now() + PULL_RETRY_WINDOW;
    while !remaining.is_empty() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let uri = state.uri.clone();
        let name = state.name.clone();
        let rem = remaining.clone();
        let status = blocking(move || {
            let hv = Hypervisor::connect(&uri).map_err(|e| lv(e, "cannot connect to libvirt"))?;
            let dom = hv
                .domain(&name)
                .map_err(|e| lv(e, "cannot find the restored domain"))?;
            let mut out = Vec::new();
            for t in &rem {
                let job = dom.block_job(t).map_err(|e| lv(e, "block job"))?;
                let backing = match job {
                    Some(_) => None,
                    None => {
                        let xml = dom
                            .xml(false)
                            .map_err(|e| lv(e, "cannot read the live XML"))?;
                        disk_has_backing(&xml, t).map_err(|e| lv(e, "bad live XML"))?
                    }
                };
                out.push((t.clone(), job, backing));
            }
            let active = dom
                .is_active()
                .map_err(|e| lv(e, "cannot query the domain"))?;
            Ok((out, active))
        })
        .await?;
        let (status, dom_active) = status;
        let mut still = Vec::new();
        for (t, job, backing) in status {
            match (job, backing) {
                (Some((cur, end)), _) => {
                    let prev = done_bytes.insert(t.clone(), cur).unwrap_or(0);
                    progress.add(cur.saturating_sub(prev));
                    if last_log.elapsed() > Duration::from_secs(5) {
                        tracing::info!(disk = %t, "moved {} of {}", human_bytes(cur), human_bytes(end));
                    }
                    still.push(t);
                }
                (None, Some(false)) => {
                    tracing::info!(disk = %t, "moved: no longer depends on the repository");
                }
                (None, _) if !dom_active => {
                    return Err(Error::new(
                        ErrorKind::Other,
                        format!(
                            "the VM stopped before disk '{t}' was moved: finish with instant-restore --resume"
                        ),
                    ));
                }
                (None, _) => {
                    // The job ended but the backing is still there: the pull failed.
                    let why = serving.failures();
                    if why.is_some() {
                        tracing::error!("the data of '{t}' cannot be read from the repository: stopping and undefining the VM (overlays kept)");
                        relocate::undo_define(&state.uri, &state.name).await;
                        return Err(Error::new(
                            ErrorKind::Corrupt,
                            format!(
                                "moving disk '{t}' failed: {}; VM '{}' was stopped and undefined, its overlays are kept",
                                why.unwrap_or_default(),
                                state.name
                            ),
                        ));
                    }
                    if Instant::now() < retry_until {
                        tracing::info!(disk = %t, "the block pull stopped early (NBD not reconnected yet?): restarting it");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        let (uri, name, t2) = (state.uri.clone(), state.name.clone(), t.clone());
                        blocking(move || {
                            let hv = Hypervisor::connect(&uri)
                                .map_err(|e| lv(e, "cannot connect to libvirt"))?;
                            let dom = hv
                                .domain(&name)
                                .map_err(|e| lv(e, "cannot find the restored domain"))?;
                            dom.block_pull(&t2)
                                .map_err(|e| lv(e, "cannot restart the block pull"))
                        })
                        .await?;
                        done_bytes.remove(&t);
                        still.push(t);
                        continue;
                    }
                    return Err(Error::new(
                        ErrorKind::Other,
                        format!("the block pull of disk '{t}' stopped before completing: retry with --resume"),
                    ));
                }
            }
        }
        if last_log.elapsed() > Duration::from_secs(5) {
            last_log = Instant::now();
        }
        remaining = still;
    }
    progress.finish();
    Ok(t.elapsed())
}
