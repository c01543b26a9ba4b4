//! Snapshot manifests: storing, loading, listing and resolving references.

use super::{index_key, snapshot_key, Repository};
#[cfg(doc)] // for the intra-doc link to `Backend::flush`
use crate::backend::Backend;
use crate::error::{Error, ErrorKind, Result};
use crate::id::SnapshotId;
use crate::magic;
use crate::manifest::Manifest;
use crate::object;

impl Repository {
    /// Commits a snapshot by writing its manifest, which must come after every chunk and index
    /// it references. Checks that the disks' indexes exist, makes everything stored so far
    /// durable ([`Backend::flush`]) before writing the manifest, and the manifest durable before
    /// returning. Returns the snapshot id.
    pub fn commit_snapshot(&self, manifest: &Manifest) -> Result<SnapshotId> {
        for disk in &manifest.disks {
            if !self.backend.exists(&index_key(&disk.index))? {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "cannot commit snapshot of {}: index {} of disk {} is not stored",
                        manifest.name, disk.index, disk.name
                    ),
                ));
            }
        }
        let plain = manifest.encode()?;
        let id = SnapshotId::from_bytes(object::object_hash(self.keys.as_ref(), &plain));
        let sealed = object::seal(
            self.keys.as_ref(),
            magic::KIND_MANIFEST,
            id.as_bytes(),
            &plain,
            self.config.zstd_level,
        )?;
        // Chunks and indexes first: a committed snapshot never refers to a lost object.
        self.backend.flush()?;
        self.backend.put_if_absent(&snapshot_key(&id), &sealed)?;
        self.backend.flush()?;
        Ok(id)
    }

    /// Loads and verifies a snapshot manifest.
    pub fn load_snapshot(&self, id: &SnapshotId) -> Result<Manifest> {
        let key = snapshot_key(id);
        let bytes = self.get_object(&key, "snapshot")?;
        let plain = object::open(
            self.keys.as_ref(),
            magic::KIND_MANIFEST,
            id.as_bytes(),
            bytes,
            magic::MAX_METADATA_OBJECT,
            &key,
        )?;
        Manifest::decode(&plain).map_err(|e| e.wrap(format!("object {key} is corrupt")))
    }

    /// Every snapshot id (without loading manifests), sorted by id.
    pub fn list_snapshot_ids(&self) -> Result<Vec<SnapshotId>> {
        let mut ids = Vec::new();
        for key in self.backend.list(magic::PREFIX_SNAPSHOTS)? {
            let name = key.strip_prefix(magic::PREFIX_SNAPSHOTS).unwrap_or(&key);
            let id: SnapshotId = name.parse().map_err(|e: Error| {
                Error::with_source(
                    ErrorKind::Corrupt,
                    format!("object {key} has an invalid snapshot name"),
                    e,
                )
            })?;
            ids.push(id);
        }
        ids.sort_unstable();
        Ok(ids)
    }

    /// Every snapshot with its manifest, sorted by time (then id). A manifest that does not
    /// verify is an error naming it.
    pub fn list_snapshots(&self) -> Result<Vec<(SnapshotId, Manifest)>> {
        let mut out = Vec::new();
        for id in self.list_snapshot_ids()? {
            out.push((id, self.load_snapshot(&id)?));
        }
        out.sort_by_key(|a| (a.1.time, a.0));
        Ok(out)
    }

    /// Resolves a snapshot reference:
    /// - a unique hex prefix of a snapshot id (at least 4 digits);
    /// - `NAME@latest`: the latest snapshot of `NAME`;
    /// - `NAME@TIME`: the latest snapshot of `NAME` at or before `TIME`, an RFC 3339 timestamp
    ///   (`2024-05-01T10:00:00Z`), a civil date-time taken as UTC (`2024-05-01T10:00:00`) or a
    ///   date (`2024-05-01`, meaning the end of that day, UTC).
    pub fn resolve(&self, reference: &str) -> Result<SnapshotId> {
        if let Some((name, when)) = reference.rsplit_once('@') {
            return self.resolve_by_name(name, when);
        }
        let prefix = reference.to_ascii_lowercase();
        if prefix.len() < 4 || prefix.len() > 64 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::invalid(format!(
                "invalid snapshot reference {reference:?}: expected an id prefix of 4 to 64 hex \
                 digits, NAME@latest or NAME@TIME"
            )));
        }
        let matches: Vec<SnapshotId> = self
            .list_snapshot_ids()?
            .into_iter()
            .filter(|id| id.to_hex().starts_with(&prefix))
            .collect();
        match matches.as_slice() {
            [] => Err(Error::new(
                ErrorKind::NotFound,
                format!("no snapshot id starts with {reference}"),
            )),
            [one] => Ok(*one),
            more => Err(Error::new(
                ErrorKind::Ambiguous,
                format!(
                    "snapshot id prefix {reference} matches {} snapshots; use more digits",
                    more.len()
                ),
            )),
        }
    }

    fn resolve_by_name(&self, name: &str, when: &str) -> Result<SnapshotId> {
        if name.is_empty() {
            return Err(Error::invalid(
                "snapshot reference has an empty name before `@`",
            ));
        }
        let limit = if when == "latest" {
            None
        } else {
            Some(parse_time(when)?)
        };
        let found = self
            .list_snapshots()?
            .into_iter()
            .rfind(|(_, m)| m.name == name && limit.is_none_or(|t| m.time <= t));
        found.map(|(id, _)| id).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                match limit {
                    None => format!("no snapshot of {name}"),
                    Some(t) => format!("no snapshot of {name} at or before {t}"),
                },
            )
        })
    }
}

fn parse_time(s: &str) -> Result<jiff::Timestamp> {
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        return Ok(t);
    }
    if let Ok(dt) = s.parse::<jiff::civil::DateTime>() {
        if s.contains('T') || s.contains(' ') {
            if let Ok(z) = dt.to_zoned(jiff::tz::TimeZone::UTC) {
                return Ok(z.timestamp());
            }
        }
    }
    if let Ok(d) = s.parse::<jiff::civil::Date>() {
        let end = d
            .tomorrow()
            .ok()
            .and_then(|t| t.to_zoned(jiff::tz::TimeZone::UTC).ok())
            .and_then(|z| {
                z.timestamp()
                    .checked_sub(jiff::SignedDuration::from_nanos(1))
                    .ok()
            });
        if let Some(t) = end {
            return Ok(t);
        }
    }
    Err(Error::invalid(format!(
        "invalid time {s:?}: expected `latest`, an RFC 3339 timestamp or a date (YYYY-MM-DD)"
    )))
}
