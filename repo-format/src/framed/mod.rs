//! Framed chunk objects (object version 2): a chunk sealed as independent frames.
//!
//! A chunk of `n × frame_size` bytes (`n` a power of two, at least 2) is cut into frames of
//! `frame_size` bytes. Each frame is compressed and encrypted on its own, its AEAD bound to the
//! frame's BLAKE3 *chaining value* (the interior hash of its subtree at its position in the
//! chunk), and the chunk id — the ordinary keyed BLAKE3 of the whole chunk — is the root of
//! those chaining values. An incremental backup that finds a few dirty frames in a chunk therefore
//! reads, hashes, compresses and encrypts only those frames and copies the others, still sealed,
//! from the parent chunk's object, and the new chunk gets the same id a full read would give it.
//!
//! A *delta* object (object version 3) is a framed object that stores only some of its frames and
//! takes the others from a *base* object (a version-2 framed object named in its header): the
//! new version of a chunk with one dirty frame then costs one sealed frame and a table, not a
//! copy of every unchanged frame. The base is always a version-2 object (depth one).
//!
//! Pure code: no I/O. The byte layout is in `FORMAT.md` (1.6a, "Framed chunk objects", and
//! 1.6b, "Delta chunk objects").
//!
//! The layout constants, frame tables, hashing and the types shared with the repository are
//! here; `seal.rs` seals objects and `open.rs` parses and opens them.

mod open;
mod seal;

use blake3::hazmat::{
    merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

use crate::crypto::Keys;
use crate::error::{Error, Result};
use crate::magic;

pub(crate) use open::{head_len, open_into, parse_parent, parse_parent_head};
pub(crate) use seal::{seal, seal_update};

/// Bytes of the fixed part of a framed object: the 8-byte object header, frame size, count.
const FIXED_LEN: usize = magic::OBJECT_HEADER_LEN + 8;
/// Bytes of the fixed part of a delta object: that of a framed object, then the base's id.
const DELTA_FIXED_LEN: usize = FIXED_LEN + 32;
/// Bytes of a chunk object's head that tell whether it is a delta object, and on which base.
pub(crate) const DELTA_HEAD_LEN: usize = DELTA_FIXED_LEN;
/// Bytes of one table entry: flags, sealed length, chaining value.
const ENTRY_LEN: usize = 1 + 4 + 32;

/// One frame's entry in an object's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameEntry {
    /// [`magic::FRAME_FLAG_ZSTD`], [`magic::FRAME_FLAG_ZERO`], [`magic::FRAME_FLAG_BASE`].
    flags: u8,
    /// Bytes of the sealed frame in the object (0 for a zero frame or a base reference).
    sealed_len: u32,
    /// The frame's chaining value.
    cv: ChainingValue,
}

impl FrameEntry {
    /// Whether the frame's bytes are in this object (neither zero nor taken from the base).
    fn stored(&self) -> bool {
        self.flags & (magic::FRAME_FLAG_ZERO | magic::FRAME_FLAG_BASE) == 0
    }
}

/// A chunk's frames as a parent for [`crate::Repository::seal_chunk_update`]: the decrypted table and
/// the sealed object.
#[derive(Debug, Clone)]
pub struct FramedChunk {
    id: [u8; 32],
    frame_size: usize,
    /// The base object's id, for a delta object.
    base: Option<[u8; 32]>,
    entries: Vec<FrameEntry>,
    /// Start of each frame in `sealed`.
    starts: Vec<usize>,
    sealed: Vec<u8>,
    /// The base object's frames, when an update is to rewrite the chunk whole.
    base_chunk: Option<Box<FramedChunk>>,
}

impl FramedChunk {
    /// Number of frames.
    pub fn frame_count(&self) -> usize {
        self.entries.len()
    }

    /// Frame size in bytes.
    pub fn frame_size(&self) -> usize {
        self.frame_size
    }

    /// The id of the base object, for a delta object.
    pub(crate) fn base_id(&self) -> Option<[u8; 32]> {
        self.base
    }

    /// Frames an update of this chunk that changes the frames `touched` would store itself
    /// as a delta object (at most: a changed frame that turns out zero stores nothing): the
    /// changed frames, and this object's own stored frames when it is a delta object.
    fn stored_after(&self, touched: impl Fn(usize) -> bool) -> usize {
        self.entries
            .iter()
            .enumerate()
            .filter(|(i, e)| touched(*i) || (self.base.is_some() && e.stored()))
            .count()
    }

    /// Whether an update changing the frames `touched` rewrites the chunk whole, and so
    /// needs the frames of this delta object's base ([`FramedChunk::attach_base`]): when the
    /// delta would store more than half of its frames itself.
    pub(crate) fn wants_base(&self, touched: &[usize]) -> bool {
        self.base.is_some() && self.stored_after(|i| touched.contains(&i)) > self.entries.len() / 2
    }

    /// Attaches the frames of this delta object's base, read by the caller, checking that
    /// they are the base this object names and that every frame it takes from it is there.
    pub(crate) fn attach_base(&mut self, base: FramedChunk, name: &str) -> Result<()> {
        check_base(
            self.base,
            &self.entries,
            base.id,
            base.base,
            &base.entries,
            name,
        )?;
        self.base_chunk = Some(Box::new(base));
        Ok(())
    }
}

/// Checks that a base object (its id, whether it is itself a delta object, its table) is the
/// one a delta object (its base id `want`, its table `entries`) names: a framed object of that
/// id, with as many frames, holding every frame the delta takes from it with the same chaining
/// value.
fn check_base(
    want: Option<[u8; 32]>,
    entries: &[FrameEntry],
    base_id: [u8; 32],
    base_base: Option<[u8; 32]>,
    base_entries: &[FrameEntry],
    name: &str,
) -> Result<()> {
    let corrupt = |why: &str| Error::corrupt(format!("object {name} is corrupt: {why}"));
    if want != Some(base_id) {
        return Err(corrupt("its base is not the object it names"));
    }
    if base_base.is_some() {
        return Err(corrupt("its base is itself a delta object"));
    }
    if base_entries.len() != entries.len() {
        return Err(corrupt("its base has a different frame count"));
    }
    for (i, (e, b)) in entries.iter().zip(base_entries).enumerate() {
        if e.flags == magic::FRAME_FLAG_BASE && e.cv != b.cv {
            return Err(corrupt(&format!(
                "frame {i} is not the frame of its base it refers to"
            )));
        }
    }
    Ok(())
}

/// The BLAKE3 mode of this repository's ids.
fn mode(keys: Option<&Keys>) -> Mode<'_> {
    match keys {
        Some(k) => Mode::KeyedHash(k.id_key()),
        None => Mode::Hash,
    }
}

/// Whether a chunk of `len` bytes is sealed framed with frames of `frame_size`.
pub(crate) fn frames_for(len: usize, frame_size: usize) -> Option<usize> {
    if frame_size == 0 || len <= frame_size || len % frame_size != 0 {
        return None;
    }
    let n = len / frame_size;
    n.is_power_of_two().then_some(n)
}

/// The chaining value of frame `index` (its bytes `frame`) of a chunk cut into `frame_size`.
pub(crate) fn frame_cv(
    keys: Option<&Keys>,
    frame: &[u8],
    index: usize,
    frame_size: usize,
) -> ChainingValue {
    let mut h = match keys {
        Some(k) => blake3::Hasher::new_keyed(k.id_key()),
        None => blake3::Hasher::new(),
    };
    h.set_input_offset((index as u64).saturating_mul(frame_size as u64));
    h.update(frame);
    h.finalize_non_root()
}

/// The root (the chunk id) of `cvs`, the chaining values of a power-of-two number (≥ 2) of
/// equal frames: the same value as hashing the whole chunk at once.
pub(crate) fn merge_root(keys: Option<&Keys>, cvs: &[ChainingValue]) -> [u8; 32] {
    let mut level: Vec<ChainingValue> = cvs.to_vec();
    while level.len() > 2 {
        level = level
            .chunks_exact(2)
            .map(|p| merge_subtrees_non_root(&p[0], &p[1], mode(keys)))
            .collect();
    }
    match level.as_slice() {
        [l, r] => *merge_subtrees_root(l, r, mode(keys)).as_bytes(),
        // Not reached for the frame counts `frames_for` allows.
        _ => [0; 32],
    }
}

/// Chaining values of every frame of `data` (cut into `frame_size`).
pub(crate) fn frame_cvs(keys: Option<&Keys>, data: &[u8], frame_size: usize) -> Vec<ChainingValue> {
    data.chunks(frame_size)
        .enumerate()
        .map(|(i, f)| frame_cv(keys, f, i, frame_size))
        .collect()
}

fn frame_aad(frame_size: u32, flags: u8, cv: &ChainingValue) -> [u8; 41] {
    let mut aad = [0u8; 41];
    aad[..4].copy_from_slice(&magic::FRAME_AAD_MAGIC);
    aad[4..8].copy_from_slice(&frame_size.to_le_bytes());
    aad[8] = flags;
    aad[9..].copy_from_slice(cv);
    aad
}

/// The AAD of a table: the object's fixed part (16 bytes, 48 for a delta object), then the
/// chunk id.
fn table_aad(fixed: &[u8], id: &[u8; 32]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(fixed.len() + 32);
    aad.extend_from_slice(fixed);
    aad.extend_from_slice(id);
    aad
}

/// Whether a sealed object is a framed or delta chunk object (by its version byte).
pub(crate) fn is_framed(sealed: &[u8]) -> bool {
    matches!(
        sealed.get(4),
        Some(&magic::OBJECT_VERSION_FRAMED | &magic::OBJECT_VERSION_DELTA)
    )
}

/// The id of the base object a delta object names in its header (not yet authenticated: the
/// table's AAD covers it, so opening fails if it was altered). `None` for any other object.
pub(crate) fn base_of(sealed: &[u8]) -> Option<[u8; 32]> {
    if sealed.get(4) != Some(&magic::OBJECT_VERSION_DELTA) {
        return None;
    }
    sealed.get(FIXED_LEN..DELTA_FIXED_LEN)?.try_into().ok()
}

/// How to read chunk objects: the repository's keys, frame size, chunk size limit and whether
/// it may hold delta objects.
#[derive(Clone, Copy)]
pub(crate) struct Opener<'a> {
    pub keys: Option<&'a Keys>,
    pub frame_size: usize,
    pub limit: usize,
    pub deltas: bool,
}

/// A delta object's base, as read by the caller: its sealed bytes and its name.
pub(crate) struct BaseObject<'a> {
    pub sealed: &'a mut [u8],
    pub name: &'a str,
}

/// What a frame update made (internal to [`crate::Repository::seal_chunk_update`]).
#[derive(Debug)]
pub struct UpdatedChunk {
    /// Id of the new chunk.
    pub id: [u8; 32],
    /// Its sealed object.
    pub sealed: Vec<u8>,
    /// Whether every frame of the new chunk is zero.
    pub all_zero: bool,
}

#[cfg(test)]
mod tests;
