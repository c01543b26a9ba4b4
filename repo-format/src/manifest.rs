//! Snapshot manifests (JSON plaintext, sealed as object kind 3).
//!
//! Pure code: no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::id::{IndexId, SnapshotId};
use crate::magic;

/// What a snapshot captured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    /// A standalone disk image.
    Image,
    /// A libvirt virtual machine (all its disks plus its metadata).
    Vm,
    /// A kind written by a newer version; kept verbatim.
    #[serde(untagged)]
    Other(String),
}

/// How a disk's data was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupMode {
    /// Every allocated block was read.
    Full,
    /// Only blocks changed since the parent snapshot were read (the rest reuses its index).
    Incremental,
}

/// One disk of a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskEntry {
    /// Disk name, e.g. `"vda"`.
    pub name: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Image format of the source, e.g. `"qcow2"` or `"raw"`.
    pub format: String,
    /// Chunk size of the index.
    pub chunk_size: u32,
    /// The disk's index object.
    pub index: IndexId,
    /// Source path, if any.
    #[serde(default)]
    pub source: Option<String>,
    /// `qemu-img info --output=json` of the source, if captured.
    #[serde(default)]
    pub qemu_img_info: Option<serde_json::Value>,
    /// Options to recreate the image (e.g. `cluster_size`, `compat`).
    #[serde(default)]
    pub create_options: BTreeMap<String, String>,
    /// Full or incremental.
    pub backup_mode: BackupMode,
    /// Bytes read from the source.
    #[serde(default)]
    pub bytes_read: u64,
    /// Stored (compressed, sealed) bytes of the chunks this backup added.
    #[serde(default)]
    pub bytes_new: u64,
    /// Number of chunks this backup added.
    #[serde(default)]
    pub chunks_new: u64,
    /// Change-tracking state (bitmap / checkpoint name), owned by the agent.
    #[serde(default)]
    pub cbt: Option<serde_json::Value>,
}

/// A snapshot manifest. A snapshot exists iff its manifest object exists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest version; this build writes and reads [`Manifest::VERSION`].
    pub version: u32,
    /// VM or image name.
    pub name: String,
    /// Host that made the backup.
    pub hostname: String,
    /// When the backup started.
    pub time: jiff::Timestamp,
    /// Version of the tool that wrote the snapshot.
    pub tool_version: String,
    /// Snapshot this one is incremental to, if any.
    #[serde(default)]
    pub parent: Option<SnapshotId>,
    /// What was captured.
    pub kind: SnapshotKind,
    /// The disks.
    #[serde(default)]
    pub disks: Vec<DiskEntry>,
    /// Free-form metadata (domain XML, checkpoint XML, ...).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// User tags.
    #[serde(default)]
    pub tags: Vec<String>,
}

impl Manifest {
    /// The manifest version this build writes.
    pub const VERSION: u32 = magic::MANIFEST_VERSION;

    /// A manifest with the current version, no disks and no metadata.
    pub fn new(
        name: impl Into<String>,
        kind: SnapshotKind,
        hostname: impl Into<String>,
        time: jiff::Timestamp,
    ) -> Manifest {
        Manifest {
            version: Self::VERSION,
            name: name.into(),
            hostname: hostname.into(),
            time,
            tool_version: env!("CARGO_PKG_VERSION").to_owned(),
            parent: None,
            kind,
            disks: Vec::new(),
            metadata: BTreeMap::new(),
            tags: Vec::new(),
        }
    }

    /// The plaintext encoding (compact JSON).
    pub fn encode(&self) -> Result<Vec<u8>> {
        if self.version != Self::VERSION {
            return Err(Error::invalid(format!(
                "cannot write manifest version {}; this build writes version {}",
                self.version,
                Self::VERSION
            )));
        }
        serde_json::to_vec(self).map_err(|e| {
            Error::with_source(ErrorKind::InvalidArgument, "cannot encode manifest", e)
        })
    }

    /// Decodes the plaintext encoding. Unknown fields are ignored; a version other than 1 is
    /// [`ErrorKind::UnsupportedVersion`]; anything else malformed is [`ErrorKind::Corrupt`].
    pub fn decode(bytes: &[u8]) -> Result<Manifest> {
        #[derive(Deserialize)]
        struct VersionOnly {
            version: u32,
        }
        let v: VersionOnly = serde_json::from_slice(bytes).map_err(|e| {
            Error::with_source(ErrorKind::Corrupt, "manifest has no valid version field", e)
        })?;
        if v.version != Self::VERSION {
            return Err(Error::new(
                ErrorKind::UnsupportedVersion,
                format!("manifest version {} is not supported", v.version),
            ));
        }
        serde_json::from_slice(bytes)
            .map_err(|e| Error::with_source(ErrorKind::Corrupt, "manifest is malformed", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        let mut m = Manifest::new(
            "web1",
            SnapshotKind::Vm,
            "host",
            "2024-05-01T10:00:00Z".parse().unwrap(),
        );
        m.disks.push(DiskEntry {
            name: "vda".into(),
            virtual_size: 1 << 30,
            format: "qcow2".into(),
            chunk_size: 1 << 20,
            index: IndexId::from_bytes([3; 32]),
            source: Some("/var/lib/libvirt/images/web1.qcow2".into()),
            qemu_img_info: Some(serde_json::json!({"virtual-size": 1073741824})),
            create_options: [("cluster_size".to_owned(), "65536".to_owned())].into(),
            backup_mode: BackupMode::Full,
            bytes_read: 10,
            bytes_new: 5,
            chunks_new: 1,
            cbt: None,
        });
        m.metadata.insert("domain.xml".into(), "<domain/>".into());
        m
    }

    #[test]
    fn round_trip_and_forward_compat() {
        let m = sample();
        let enc = m.encode().unwrap();
        assert_eq!(Manifest::decode(&enc).unwrap(), m);

        let mut v: serde_json::Value = serde_json::from_slice(&enc).unwrap();
        v["future_field"] = serde_json::json!(42);
        v["kind"] = serde_json::json!("container");
        let m2 = Manifest::decode(&serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(m2.kind, SnapshotKind::Other("container".into()));

        v["version"] = serde_json::json!(2);
        let e = Manifest::decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnsupportedVersion);
        assert_eq!(
            Manifest::decode(b"[]").unwrap_err().kind(),
            ErrorKind::Corrupt
        );
    }
}
