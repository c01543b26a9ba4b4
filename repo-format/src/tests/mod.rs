//! Repository-level tests: what `Repository` promises, over memory, local and faulty backends.
//!
//! The shared helpers are here; the tests are grouped by topic in the submodules.

mod chunks;
mod corruption;
mod delta;
mod indexes;
mod keys;
mod snapshots;

use std::sync::Arc;

use crate::backend::{Backend, MemoryBackend};
use crate::*;

const CHEAP: KdfParams = KdfParams::new(8, 1, 1);
const CHUNK: u32 = 64 * 1024;

fn password(p: &str) -> Secret {
    Secret::Password(p.to_owned())
}

fn init(backend: Arc<dyn Backend>, encrypted: bool) -> Repository {
    Repository::init(backend, options(encrypted, CHUNK)).unwrap()
}

/// Init options with a cheap KDF, chunks of `chunk` bytes and the default frames.
fn options(encrypted: bool, chunk: u32) -> InitOptions {
    let encryption = if encrypted {
        Encryption::Encrypted {
            secret: password("pw"),
            kdf: CHEAP,
        }
    } else {
        Encryption::None
    };
    let mut opts = InitOptions::new(encryption);
    opts.chunk_size = chunk;
    opts
}

fn mem_repo(encrypted: bool) -> (Arc<MemoryBackend>, Repository) {
    let mem = Arc::new(MemoryBackend::new());
    let repo = init(mem.clone(), encrypted);
    (mem, repo)
}

fn chunk_data(seed: u8) -> Vec<u8> {
    (0..CHUNK as usize)
        .map(|i| (i as u8 / 16).wrapping_mul(seed) ^ seed)
        .collect()
}

fn time(s: &str) -> jiff::Timestamp {
    s.parse().unwrap()
}

/// Stores one disk of two data chunks and one zero chunk, then commits a snapshot.
fn backup(repo: &Repository, name: &str, at: &str, seed: u8) -> SnapshotId {
    let mut index = DiskIndex::new_sparse(CHUNK, 3 * u64::from(CHUNK) - 100).unwrap();
    for (i, s) in [(0, seed), (2, seed.wrapping_add(1))] {
        let mut data = chunk_data(s);
        if i == 2 {
            data.truncate(CHUNK as usize - 100);
        }
        let sealed = repo.try_seal_chunk(&data).unwrap();
        repo.store_chunk(&sealed).unwrap();
        index.set(i, Some(sealed.id)).unwrap();
    }
    let index_id = repo.store_index(&index).unwrap();
    let mut m = Manifest::new(name, SnapshotKind::Vm, "host", time(at));
    m.disks.push(DiskEntry {
        name: "vda".into(),
        virtual_size: index.disk_size,
        format: "raw".into(),
        chunk_size: CHUNK,
        index: index_id,
        source: None,
        qemu_img_info: None,
        create_options: Default::default(),
        backup_mode: BackupMode::Full,
        bytes_read: 0,
        bytes_new: 0,
        chunks_new: 2,
        cbt: None,
    });
    repo.commit_snapshot(&m).unwrap()
}

/// Reads a snapshot back and rebuilds its disk.
fn restore(repo: &Repository, id: &SnapshotId) -> Vec<u8> {
    let m = repo.load_snapshot(id).unwrap();
    let index = repo
        .load_index(
            &m.disks[0].index,
            m.disks[0].virtual_size,
            m.disks[0].chunk_size,
        )
        .unwrap();
    let mut disk = Vec::new();
    for i in 0..index.len() {
        let len = (index.disk_size - i * u64::from(CHUNK)).min(u64::from(CHUNK));
        match &index.get(i) {
            Some(c) => disk.extend(repo.load_chunk(c).unwrap()),
            None => disk.resize(disk.len() + len as usize, 0),
        }
    }
    disk
}

fn flip(bytes: &[u8], pos: usize, xor: u8) -> Vec<u8> {
    let mut b = bytes.to_vec();
    let p = pos % b.len();
    b[p] ^= xor;
    b
}
