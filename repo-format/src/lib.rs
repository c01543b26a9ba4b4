//! The Lifeboat repository format and storage.
//!
//! A repository is an independent, content-addressed, compressed and (optionally) encrypted
//! object store holding VM disk backups. Its byte-level format is specified in `FORMAT.md`
//! next to this crate; this crate is the reference implementation.
//!
//! # Main types
//!
//! - [`Repository`]: an open repository. [`Repository::init`] creates one, [`Repository::open`]
//!   unlocks one with a [`Secret`] (passphrase or [`KeyFile`]). It turns chunks into
//!   [`SealedChunk`]s (pure CPU work: hash, compress, encrypt) and stores and loads chunks,
//!   [`DiskIndex`]es and snapshot [`Manifest`]s, verifying everything it reads.
//! - Typed ids: [`ChunkId`], [`IndexId`], [`SnapshotId`], [`KeySlotId`] (32 bytes, hex).
//! - [`DiskIndex`]: the map from a disk's fixed-size blocks to chunks (`None` = zeros).
//! - [`Manifest`] with its [`DiskEntry`]s: one snapshot of a VM or image. A snapshot exists
//!   iff its manifest exists, and the manifest is written last.
//! - [`backend::Backend`]: the small object-store trait (conditional put, get, exists, list,
//!   delete) with [`backend::LocalBackend`], [`backend::MemoryBackend`] and the fault-injecting
//!   [`backend::FaultyBackend`].
//! - [`BootTestResult`]: the outcome of booting a snapshot in a sandbox (verdict, RTO, checks,
//!   evidence), stored next to the snapshot by [`Repository::store_boot_test`].
//! - [`Error`] with its [`ErrorKind`].
//!
//! Format code (ids, keys, sealing, index, manifest and boot-test encoding) does no I/O; only
//! [`backend`] and [`Repository`]'s storage methods do (`repository/`, and the boot-test
//! storage methods in `boottest_store.rs`).
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use repo_format::backend::MemoryBackend;
//! use repo_format::{Encryption, InitOptions, KdfParams, Repository, Secret};
//!
//! # fn main() -> Result<(), repo_format::Error> {
//! let backend = Arc::new(MemoryBackend::new());
//! let secret = Secret::Password("correct horse".into());
//! let kdf = KdfParams::new(8, 1, 1); // cheap for the example; use KdfParams::default()
//! let repo = Repository::init(
//!     backend.clone(),
//!     InitOptions::new(Encryption::Encrypted { secret: secret.clone(), kdf }),
//! )?;
//! let sealed = repo.seal_chunk(b"some disk data");
//! repo.store_chunk(&sealed)?;
//!
//! let repo = Repository::open(backend, Some(&secret))?;
//! assert_eq!(repo.load_chunk(&sealed.id)?, b"some disk data");
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
// Tests may unwrap: a panic there is a test failure with a backtrace.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod backend;
mod boottest;
mod boottest_store;
mod config;
mod crypto;
mod error;
mod framed;
mod id;
mod index;
pub mod magic;
mod manifest;
mod object;
mod repository;

pub use backend::{Backend, FaultyBackend, LocalBackend, MemoryBackend};
pub use boottest::{BootTestResult, CheckKind, CheckResult, Verdict};
pub use config::{validate_chunk_size, validate_frame_size, Cipher, Config, EncryptionScheme};
pub use crypto::{KdfParams, KeyFile, KeySlotKind, Secret};
pub use error::{BoxError, Error, ErrorKind, Result};
pub use framed::{FramedChunk, UpdatedChunk};
pub use id::{BootTestId, ChunkId, IndexId, KeySlotId, SnapshotId};
pub use index::{DiskIndex, IndexObject, IndexRoot, PAGE_ENTRIES};
pub use manifest::{BackupMode, DiskEntry, Manifest, SnapshotKind};
pub use repository::{
    ChunkBuffers, ChunkHash, Encryption, IndexPage, IndexPages, IndexWriter, InitOptions,
    KeySlotInfo, Repository, SealedChunk, DEFAULT_CHUNK_SIZE, DEFAULT_FRAME_SIZE,
    DEFAULT_ZSTD_LEVEL, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE,
};

/// True when every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(16);
    let body_zero = chunks.by_ref().all(|c| {
        let mut w = [0u8; 16];
        w.copy_from_slice(c);
        u128::from_ne_bytes(w) == 0
    });
    body_zero && chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests;
