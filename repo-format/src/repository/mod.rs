//! The repository: config, key slots and typed object access over a [`Backend`].
//!
//! The shared types and object names are here; `keys.rs` creates, opens and unlocks a
//! repository and manages its key slots, `chunks.rs` and `framing.rs` seal, open, store and
//! load chunks, and `snapshots.rs` stores and loads indexes and snapshot manifests.

use std::sync::Arc;

use crate::backend::Backend;
use crate::config::{Cipher, Config};
use crate::crypto::{KdfParams, KeySlotKind, Keys, Secret};
use crate::error::{Error, ErrorKind, Result};
use crate::id::{ChunkId, IndexId, KeySlotId, SnapshotId};
use crate::magic;

/// Default chunk size: 1 MiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Smallest chunk size: 64 KiB (QEMU's dirty-bitmap granularity).
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// Largest chunk size: 16 MiB.
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Default zstd level of new repositories: 1. On the 64 KiB frames Lifeboat compresses, level 1
/// costs about a quarter less CPU than zstd's own default, 3, for about 2 % more stored data
/// (2 GiB mixed disk, docs/BENCHMARKS.md); a backup agent shares the host's cores with its VMs.
/// Proxmox Backup Server compresses its chunks at level 1 too. The level is the repository's
/// (`repo init --zstd-level`); readers do not depend on it.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
/// Default frame size of new repositories: 64 KiB, QEMU's default dirty-bitmap granularity,
/// so that an incremental backup reads and seals only the 64 KiB frames a guest changed.
pub const DEFAULT_FRAME_SIZE: u32 = 64 << 10;

/// Whether and how to encrypt a new repository.
#[derive(Debug, Clone)]
pub enum Encryption {
    /// Encrypt; the first key slot opens with `secret`.
    Encrypted {
        /// Passphrase or key file for the first key slot.
        secret: Secret,
        /// Argon2id parameters for a passphrase slot (ignored for key files).
        kdf: KdfParams,
    },
    /// No encryption (ids are plain BLAKE3, objects are only compressed).
    None,
}

/// Options of [`Repository::init`].
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Encryption.
    pub encryption: Encryption,
    /// Chunk size: a power of two between 64 KiB and 16 MiB.
    pub chunk_size: u32,
    /// zstd compression level.
    pub zstd_level: i32,
    /// Frame size of chunk objects (`None`: unframed, a version-1 repository). A frame size
    /// not smaller than the chunk size means unframed too.
    pub frame_size: Option<u32>,
    /// The object cipher of an encrypted repository (ignored with [`Encryption::None`]).
    pub cipher: Cipher,
}

impl InitOptions {
    /// Default chunk size and compression with the given encryption.
    pub fn new(encryption: Encryption) -> Self {
        InitOptions {
            encryption,
            chunk_size: DEFAULT_CHUNK_SIZE,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            frame_size: Some(DEFAULT_FRAME_SIZE),
            cipher: Cipher::preferred(),
        }
    }
}

/// A chunk's id, with the chaining values of its frames when it is to be sealed framed (from
/// [`Repository::hash_chunk`], for [`Repository::try_seal_hashed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkHash {
    /// The chunk id.
    pub id: ChunkId,
    cvs: Vec<[u8; 32]>,
}

/// A chunk ready to store: its id, sealed bytes and plaintext length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedChunk {
    /// The chunk id.
    pub id: ChunkId,
    /// The sealed object bytes (header, nonce, ciphertext).
    pub bytes: Vec<u8>,
    /// Length of the plaintext chunk.
    pub plain_len: usize,
}

/// Buffers reused by [`Repository::load_chunk_into`] from one chunk to the next (one set per
/// worker thread).
#[derive(Debug, Default)]
pub struct ChunkBuffers {
    sealed: Vec<u8>,
    /// A delta object's base.
    base: Vec<u8>,
    plain: Vec<u8>,
}

/// Public description of a key slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlotInfo {
    /// Slot id.
    pub id: KeySlotId,
    /// Password or key file.
    pub kind: KeySlotKind,
    /// When the slot was created.
    pub created: jiff::Timestamp,
    /// Host that created it.
    pub hostname: String,
    /// User label.
    pub label: String,
}

/// An open repository. `Send + Sync`; share it with `Arc`.
///
/// The pure methods ([`Repository::chunk_id`], [`Repository::seal_chunk`],
/// [`Repository::open_chunk`]) do no I/O and can run on a CPU thread pool; the others call the
/// backend.
#[derive(Debug)]
pub struct Repository {
    backend: Arc<dyn Backend>,
    config: Config,
    keys: Option<Keys>,
}

mod chunks;
mod framing;
mod indexes;
pub use indexes::{IndexPage, IndexPages, IndexWriter};
mod keys;
mod snapshots;

fn chunk_key(id: &ChunkId) -> String {
    let h = id.to_hex();
    format!("{}{}/{}", magic::PREFIX_CHUNKS, &h[..2], h)
}

fn index_key(id: &IndexId) -> String {
    let h = id.to_hex();
    format!("{}{}/{}", magic::PREFIX_INDEXES, &h[..2], h)
}

fn snapshot_key(id: &SnapshotId) -> String {
    format!("{}{}", magic::PREFIX_SNAPSHOTS, id.to_hex())
}

fn key_slot_key(id: &KeySlotId) -> String {
    format!("{}{}", magic::PREFIX_KEYS, id.to_hex())
}

impl Repository {
    /// The config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The chunk size.
    pub fn chunk_size(&self) -> u32 {
        self.config.chunk_size
    }

    /// The frame size of chunk objects, `None` when chunks are sealed unframed.
    pub fn frame_size(&self) -> Option<u32> {
        self.config.frame_size
    }

    /// The frame size as a `usize`, when a chunk of `len` bytes is sealed framed.
    fn framing(&self, len: usize) -> Option<usize> {
        let fs = self.config.frame_size? as usize;
        crate::framed::frames_for(len, fs).map(|_| fs)
    }

    /// Whether objects are encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.keys.is_some()
    }

    /// The random repository id (32 hex digits).
    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The object keys (none when unencrypted), for sealing other object kinds in this crate.
    pub(crate) fn keys(&self) -> Option<&Keys> {
        self.keys.as_ref()
    }

    /// Reads an object, mapping a missing one to [`ErrorKind::NotFound`] naming it.
    pub(crate) fn get_named(&self, key: &str, what: &str) -> Result<Vec<u8>> {
        self.get_object(key, what)
    }

    /// The ids named by the keys under `prefix` (the last path component; keys that are not
    /// ids are skipped), sorted.
    fn list_ids<T: std::str::FromStr + Ord>(&self, prefix: &str) -> Result<Vec<T>> {
        let mut ids: Vec<T> = self
            .backend
            .list(prefix)?
            .iter()
            .filter_map(|k| k.rsplit('/').next().and_then(|n| n.parse().ok()))
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    fn get_object(&self, key: &str, what: &str) -> Result<Vec<u8>> {
        self.backend
            .get(key)
            .map_err(|e| object_read_error(e, key, what))
    }
}

fn object_read_error(e: Error, key: &str, what: &str) -> Error {
    let kind = e.kind();
    let msg = if kind == ErrorKind::NotFound {
        format!("{what} {key} not found")
    } else {
        format!("cannot read {what} {key}")
    };
    Error::with_source(kind, msg, e)
}
