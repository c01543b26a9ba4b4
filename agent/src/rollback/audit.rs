//! `audit-snapshots`: every domain's snapshots (internal and external, Lifeboat's or not), disk
//! backing chains (each layer's size and age; an overlay's actual size is its growth) and
//! checkpoints, with flags for what is past policy. Blocking.

use std::path::Path;
use std::time::{Duration, SystemTime};

use jiff::Timestamp;
use serde::Serialize;

use super::images::qemu_img;
use super::ops::SNAPSHOT_PREFIX;
use super::state;
use crate::error::{Error, ErrorKind, Result};
use crate::libvirt::{DiskSource, Hypervisor};

/// One snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct SnapItem {
    /// Name.
    pub name: String,
    /// `internal` / `external`.
    pub kind: String,
    /// Domain state when taken.
    pub state: String,
    /// Creation time.
    pub created: Option<Timestamp>,
    /// Age in seconds.
    pub age_seconds: i64,
    /// Made by Lifeboat (`lifeboat-rb-…`).
    pub lifeboat: bool,
    /// Expiry of a Lifeboat rollback point (from its state file).
    pub expires: Option<Timestamp>,
    /// Description.
    pub description: Option<String>,
    /// Overlay / memory files.
    pub files: Vec<String>,
    /// Why it is past policy (empty = fine).
    pub flags: Vec<String>,
}

/// One layer of a disk's backing chain (top first).
#[derive(Debug, Clone, Serialize)]
pub struct Layer {
    /// File.
    pub file: String,
    /// Format.
    pub format: String,
    /// Bytes used on the host (for an overlay: its growth since it was created).
    pub actual_size: Option<u64>,
    /// Guest-visible size.
    pub virtual_size: Option<u64>,
    /// Age in seconds from the file's birth time (or mtime).
    pub age_seconds: Option<i64>,
    /// Seconds since the last write (mtime).
    pub idle_seconds: Option<i64>,
}

/// One disk.
#[derive(Debug, Clone, Serialize)]
pub struct DiskChain {
    /// Target.
    pub target: String,
    /// Layers, top (active) first; more than one = overlays.
    pub chain: Vec<Layer>,
    /// Flags.
    pub flags: Vec<String>,
    /// qemu-img could not read the chain.
    pub error: Option<String>,
}

/// One checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct CpItem {
    /// Name.
    pub name: String,
    /// Age in seconds.
    pub age_seconds: i64,
    /// Flags.
    pub flags: Vec<String>,
}

/// One domain.
#[derive(Debug, Clone, Serialize)]
pub struct DomainAudit {
    /// Name.
    pub name: String,
    /// Running?
    pub active: bool,
    /// Snapshots.
    pub snapshots: Vec<SnapItem>,
    /// Disks.
    pub disks: Vec<DiskChain>,
    /// Checkpoints.
    pub checkpoints: Vec<CpItem>,
    /// Could not be read completely.
    pub error: Option<String>,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct Audit {
    /// Policy threshold in seconds.
    pub older_than_seconds: u64,
    /// When.
    pub time: Timestamp,
    /// Domains.
    pub domains: Vec<DomainAudit>,
    /// How many items are flagged.
    pub flagged: usize,
}

fn age_of(meta: &std::fs::Metadata, now: SystemTime) -> (Option<i64>, Option<i64>) {
    let secs = |t: SystemTime| {
        now.duration_since(t)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    };
    let mtime = meta.modified().ok().map(secs);
    let born = meta.created().ok().map(secs).or(mtime);
    (born, mtime)
}

fn chain(source: &Path, format: Option<&str>, now: SystemTime) -> Result<Vec<Layer>> {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "info".as_ref(),
        "--backing-chain".as_ref(),
        "-U".as_ref(),
        "--output=json".as_ref(),
    ];
    if let Some(f) = format {
        args.push("-f".as_ref());
        args.push(f.as_ref());
    }
    args.push(source.as_os_str());
    let out = qemu_img(&args)?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| {
        Error::with_source(ErrorKind::Other, "qemu-img info printed invalid JSON", e)
    })?;
    let list = match v {
        serde_json::Value::Array(a) => a,
        other => vec![other],
    };
    Ok(list
        .iter()
        .map(|l| {
            let file = l
                .get("filename")
                .and_then(|f| f.as_str())
                .unwrap_or("?")
                .to_string();
            let (age, idle) = std::fs::metadata(&file)
                .map(|m| age_of(&m, now))
                .unwrap_or((None, None));
            Layer {
                format: l
                    .get("format")
                    .and_then(|f| f.as_str())
                    .unwrap_or("?")
                    .to_string(),
                actual_size: l.get("actual-size").and_then(|x| x.as_u64()),
                virtual_size: l.get("virtual-size").and_then(|x| x.as_u64()),
                age_seconds: age,
                idle_seconds: idle,
                file,
            }
        })
        .collect())
}

fn fmt_age(s: i64) -> String {
    if s >= 86400 {
        format!("{}d{}h", s / 86400, (s % 86400) / 3600)
    } else if s >= 3600 {
        format!("{}h{}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// Audits every domain of `hv`.
pub fn audit(hv: &Hypervisor, older_than: Duration) -> Result<Audit> {
    let now_ts = Timestamp::now();
    let now = SystemTime::now();
    let limit = i64::try_from(older_than.as_secs()).unwrap_or(i64::MAX);
    let mut names = hv
        .list_domains()
        .map_err(|e| Error::with_source(ErrorKind::Source, "list domains", e))?;
    names.sort();
    let mut domains = Vec::new();
    let mut flagged = 0;
    for name in names {
        let mut d = DomainAudit {
            name: name.clone(),
            active: false,
            snapshots: Vec::new(),
            disks: Vec::new(),
            checkpoints: Vec::new(),
            error: None,
        };
        let dom = match hv.domain(&name) {
            Ok(x) => x,
            Err(e) => {
                d.error = Some(e.to_string());
                domains.push(d);
                continue;
            }
        };
        d.active = dom.is_active().unwrap_or(false);
        let st = state::load(&name).ok().flatten();
        match dom.snapshots() {
            Ok(list) => {
                for s in list {
                    let age = now_ts.as_second() - s.creation_time;
                    let lifeboat = s.name.starts_with(SNAPSHOT_PREFIX);
                    let expires = st
                        .as_ref()
                        .filter(|x| x.snapshot == s.name)
                        .map(|x| x.expires);
                    let mut flags = Vec::new();
                    if age > limit {
                        flags.push(format!("older than {}", fmt_age(limit)));
                    }
                    if let Some(e) = expires {
                        if e <= now_ts {
                            flags.push("rollback point past its expiry".into());
                        }
                    } else if lifeboat {
                        flags.push("Lifeboat rollback point without a state file".into());
                    }
                    let mut files: Vec<String> = s
                        .disks
                        .iter()
                        .filter_map(|x| x.file.as_ref().map(|f| f.display().to_string()))
                        .collect();
                    files.extend(s.memory_file.iter().map(|f| f.display().to_string()));
                    d.snapshots.push(SnapItem {
                        kind: if s.is_external() {
                            "external".into()
                        } else {
                            "internal".into()
                        },
                        state: s.state.clone(),
                        created: Timestamp::from_second(s.creation_time).ok(),
                        age_seconds: age,
                        lifeboat,
                        expires,
                        description: s.description.clone(),
                        files,
                        name: s.name,
                        flags,
                    });
                }
            }
            Err(e) => d.error = Some(format!("snapshots: {e}")),
        }
        match dom.disks() {
            Ok(disks) => {
                for disk in disks {
                    let path = match &disk.source {
                        DiskSource::File(p) | DiskSource::Block(p) => p.clone(),
                        _ => continue,
                    };
                    if disk.readonly {
                        continue;
                    }
                    let mut dc = DiskChain {
                        target: disk.target.clone(),
                        chain: Vec::new(),
                        flags: Vec::new(),
                        error: None,
                    };
                    match chain(&path, disk.driver_type.as_deref(), now) {
                        Ok(c) => {
                            let overlays = c.len().saturating_sub(1);
                            for l in c.iter().take(overlays) {
                                if l.age_seconds.is_some_and(|a| a > limit) {
                                    dc.flags.push(format!(
                                        "overlay {} older than {}",
                                        l.file,
                                        fmt_age(limit)
                                    ));
                                }
                            }
                            dc.chain = c;
                        }
                        Err(e) => dc.error = Some(e.to_string()),
                    }
                    d.disks.push(dc);
                }
            }
            Err(e) => d.error = Some(format!("disks: {e}")),
        }
        match dom.checkpoints() {
            Ok(cps) => {
                for c in cps {
                    let age = now_ts.as_second() - c.creation_time;
                    let mut flags = Vec::new();
                    if age > limit {
                        flags.push(format!("older than {}", fmt_age(limit)));
                    }
                    d.checkpoints.push(CpItem {
                        name: c.name,
                        age_seconds: age,
                        flags,
                    });
                }
            }
            Err(e) => d.error = Some(format!("checkpoints: {e}")),
        }
        flagged += d.snapshots.iter().filter(|s| !s.flags.is_empty()).count()
            + d.disks.iter().map(|x| x.flags.len()).sum::<usize>()
            + d.checkpoints.iter().filter(|c| !c.flags.is_empty()).count();
        domains.push(d);
    }
    Ok(Audit {
        older_than_seconds: older_than.as_secs(),
        time: now_ts,
        domains,
        flagged,
    })
}

/// Text table of an audit.
pub fn render(a: &Audit) -> String {
    let h = super::super::commands::human_bytes;
    let mut out = format!(
        "{:<24} {:<10} {:<36} {:>9} {:>11}  {}\n",
        "DOMAIN", "KIND", "NAME / FILE", "AGE", "SIZE", "FLAGS"
    );
    for d in &a.domains {
        for s in &d.snapshots {
            out.push_str(&format!(
                "{:<24} {:<10} {:<36} {:>9} {:>11}  {}\n",
                d.name,
                format!("snap-{}", if s.kind == "external" { "ext" } else { "int" }),
                s.name,
                fmt_age(s.age_seconds),
                "",
                s.flags.join("; ")
            ));
        }
        for dc in &d.disks {
            let n = dc.chain.len();
            for (i, l) in dc.chain.iter().enumerate() {
                let kind = if i + 1 == n {
                    if n > 1 {
                        "base".to_string()
                    } else {
                        "image".to_string()
                    }
                } else {
                    "overlay".to_string()
                };
                let flags = if i + 1 < n {
                    dc.flags
                        .iter()
                        .filter(|f| f.contains(&l.file))
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("; ")
                } else {
                    String::new()
                };
                out.push_str(&format!(
                    "{:<24} {:<10} {:<36} {:>9} {:>11}  {}\n",
                    d.name,
                    format!("{}:{kind}", dc.target),
                    l.file,
                    l.age_seconds.map(fmt_age).unwrap_or_default(),
                    l.actual_size.map(h).unwrap_or_default(),
                    flags
                ));
            }
            if let Some(e) = &dc.error {
                out.push_str(&format!("{:<24} {:<10} error: {e}\n", d.name, dc.target));
            }
        }
        for c in &d.checkpoints {
            out.push_str(&format!(
                "{:<24} {:<10} {:<36} {:>9} {:>11}  {}\n",
                d.name,
                "checkpoint",
                c.name,
                fmt_age(c.age_seconds),
                "",
                c.flags.join("; ")
            ));
        }
        if let Some(e) = &d.error {
            out.push_str(&format!("{:<24} error: {e}\n", d.name));
        }
    }
    out.push_str(&format!(
        "{} item(s) past policy (older than {})",
        a.flagged,
        fmt_age(i64::try_from(a.older_than_seconds).unwrap_or(i64::MAX))
    ));
    out
}
