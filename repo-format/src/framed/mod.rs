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

use blake3::hazmat::{
    merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

use crate::crypto::{random_bytes, Keys};
use crate::error::{Error, Result};
use crate::magic;
use crate::object::{compress_append, decompress_exact};

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

/// A frame to place in a new object.
enum Source<'a> {
    /// Copied sealed from a parent object.
    Reuse(FrameEntry, &'a [u8]),
    /// Sealed afresh from its plaintext.
    New(ChainingValue, &'a [u8]),
    /// Taken from the base object (a delta object's frame with this chaining value).
    Base(ChainingValue),
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

/// The fixed part of an object: a framed object's, or with `base` a delta object's.
fn fixed_header(encrypted: bool, frame_size: u32, n: u32, base: Option<&[u8; 32]>) -> Vec<u8> {
    let m = magic::OBJECT_MAGIC;
    let flags = if encrypted { magic::FLAG_ENCRYPTED } else { 0 };
    let version = match base {
        Some(_) => magic::OBJECT_VERSION_DELTA,
        None => magic::OBJECT_VERSION_FRAMED,
    };
    let mut h = Vec::with_capacity(DELTA_FIXED_LEN);
    h.extend_from_slice(&[m[0], m[1], m[2], m[3], version, magic::KIND_CHUNK, flags, 0]);
    h.extend_from_slice(&frame_size.to_le_bytes());
    h.extend_from_slice(&n.to_le_bytes());
    if let Some(b) = base {
        h.extend_from_slice(b);
    }
    h
}

fn too_large() -> Error {
    Error::invalid("frame too large to seal")
}

/// Builds the object of chunk `id` from its frames, in order: a delta object on `base` when
/// some of them are [`Source::Base`], else a framed object.
fn assemble(
    keys: Option<&Keys>,
    id: &[u8; 32],
    frame_size: usize,
    base: Option<&[u8; 32]>,
    frames: &[Source<'_>],
    zstd_level: i32,
) -> Result<Vec<u8>> {
    let fs32 = u32::try_from(frame_size).map_err(|_| too_large())?;
    let n32 = u32::try_from(frames.len()).map_err(|_| too_large())?;
    let overhead = if keys.is_some() {
        magic::NONCE_LEN + magic::TAG_LEN
    } else {
        0
    };
    let table_len = frames.len() * ENTRY_LEN + overhead;
    let refers = frames.iter().any(|f| matches!(f, Source::Base(_)));
    let base = if refers {
        Some(base.ok_or_else(|| Error::invalid("a frame taken from a base without one"))?)
    } else {
        None
    };
    let fixed = fixed_header(keys.is_some(), fs32, n32, base);
    let table_start = fixed.len();
    let mut out = Vec::with_capacity(table_start + table_len + frames.len() * (frame_size / 2));
    out.extend_from_slice(&fixed);
    out.resize(table_start + table_len, 0);
    let mut entries = Vec::with_capacity(frames.len());
    for f in frames {
        let start = out.len();
        let entry = match f {
            Source::Base(cv) => FrameEntry {
                flags: magic::FRAME_FLAG_BASE,
                sealed_len: 0,
                cv: *cv,
            },
            Source::Reuse(e, bytes) => {
                out.extend_from_slice(bytes);
                *e
            }
            Source::New(cv, plain) => {
                let mut flags = 0u8;
                if crate::is_zero(plain) {
                    flags |= magic::FRAME_FLAG_ZERO;
                } else {
                    out.resize(start + if keys.is_some() { magic::NONCE_LEN } else { 0 }, 0);
                    let body = out.len();
                    if compress_append(plain, zstd_level, &mut out) {
                        flags |= magic::FRAME_FLAG_ZSTD;
                    } else {
                        out.extend_from_slice(plain);
                    }
                    if let Some(k) = keys {
                        let mut nonce = [0u8; magic::NONCE_LEN];
                        random_bytes(&mut nonce)?;
                        out[start..body].copy_from_slice(&nonce);
                        let tag = k.cipher().seal_in_place(
                            &nonce,
                            &frame_aad(fs32, flags, cv),
                            &mut out[body..],
                        )?;
                        out.extend_from_slice(&tag);
                    }
                }
                FrameEntry {
                    flags,
                    sealed_len: u32::try_from(out.len() - start).map_err(|_| too_large())?,
                    cv: *cv,
                }
            }
        };
        entries.push(entry);
    }
    // The table, now that every frame's length is known.
    let mut table = Vec::with_capacity(table_len);
    if keys.is_some() {
        let mut nonce = [0u8; magic::NONCE_LEN];
        random_bytes(&mut nonce)?;
        table.extend_from_slice(&nonce);
    }
    let body = table.len();
    for e in &entries {
        table.push(e.flags);
        table.extend_from_slice(&e.sealed_len.to_le_bytes());
        table.extend_from_slice(&e.cv);
    }
    if let Some(k) = keys {
        let mut nonce = [0u8; magic::NONCE_LEN];
        nonce.copy_from_slice(&table[..magic::NONCE_LEN]);
        let tag = k
            .cipher()
            .seal_in_place(&nonce, &table_aad(&fixed, id), &mut table[body..])?;
        table.extend_from_slice(&tag);
    }
    out[table_start..table_start + table_len].copy_from_slice(&table);
    Ok(out)
}

/// Seals `data` (exactly `cvs.len() × frame_size` bytes, `cvs` its frames' chaining values,
/// `id` their root) as a framed object.
pub(crate) fn seal(
    keys: Option<&Keys>,
    id: &[u8; 32],
    data: &[u8],
    cvs: &[ChainingValue],
    frame_size: usize,
    zstd_level: i32,
) -> Result<Vec<u8>> {
    if frames_for(data.len(), frame_size) != Some(cvs.len()) {
        return Err(Error::invalid("chunk does not divide into its frames"));
    }
    let frames: Vec<Source<'_>> = data
        .chunks(frame_size)
        .zip(cvs)
        .map(|(f, cv)| Source::New(*cv, f))
        .collect();
    assemble(keys, id, frame_size, None, &frames, zstd_level)
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

/// A framed or delta object's authenticated table.
struct Parsed {
    /// The base object's id, for a delta object.
    base: Option<[u8; 32]>,
    entries: Vec<FrameEntry>,
    /// Start of each frame in the object (of the next frame for one stored elsewhere).
    starts: Vec<usize>,
}

/// Checks the fixed part and decrypts the table of a framed object (or, when `deltas`, of a
/// delta object) in place.
fn parse(o: Opener<'_>, id: &[u8; 32], sealed: &mut [u8], name: &str) -> Result<Parsed> {
    let size = sealed.len();
    parse_sized(o, id, sealed, size, name)
}

/// [`parse`] of an object of `size` bytes of which `sealed` holds the first ones, at least its
/// whole frame table (all of it, for [`parse`]): the frames' lengths are checked against
/// `size`, the table is authenticated and decrypted in place.
fn parse_sized(
    o: Opener<'_>,
    id: &[u8; 32],
    sealed: &mut [u8],
    size: usize,
    name: &str,
) -> Result<Parsed> {
    let (keys, frame_size, limit, deltas) = (o.keys, o.frame_size, o.limit, o.deltas);
    let corrupt = |why: &str| Error::corrupt(format!("object {name} is corrupt: {why}"));
    if sealed.len() > size {
        return Err(Error::invalid("an object's head longer than the object"));
    }
    let Some(fixed) = sealed.first_chunk::<FIXED_LEN>().copied() else {
        return Err(corrupt("truncated header"));
    };
    if fixed[..4] != magic::OBJECT_MAGIC {
        return Err(corrupt("bad magic"));
    }
    if fixed[5] != magic::KIND_CHUNK {
        return Err(corrupt("not a chunk object"));
    }
    let delta = match fixed[4] {
        magic::OBJECT_VERSION_FRAMED => false,
        magic::OBJECT_VERSION_DELTA if deltas => true,
        magic::OBJECT_VERSION_DELTA => {
            return Err(corrupt(
                "a delta chunk object in a repository whose version has none",
            ))
        }
        _ => return Err(corrupt("not a framed chunk object")),
    };
    let fixed_len = if delta { DELTA_FIXED_LEN } else { FIXED_LEN };
    if sealed.len() < fixed_len {
        return Err(corrupt("truncated header"));
    }
    let base = if delta { base_of(sealed) } else { None };
    let flags = fixed[6];
    if flags & !magic::FLAG_ENCRYPTED != 0 || fixed[7] != 0 {
        return Err(corrupt("unknown flags or non-zero reserved byte"));
    }
    if (flags & magic::FLAG_ENCRYPTED != 0) != keys.is_some() {
        return Err(corrupt("its encryption does not match the repository's"));
    }
    let fs = u32::from_le_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]) as usize;
    let n = u32::from_le_bytes([fixed[12], fixed[13], fixed[14], fixed[15]]) as usize;
    if fs != frame_size {
        return Err(corrupt(&format!(
            "frame size {fs} is not the repository's {frame_size}"
        )));
    }
    match n.checked_mul(fs) {
        Some(len) if len <= limit && frames_for(len, fs) == Some(n) => {}
        _ => return Err(corrupt(&format!("bad frame count {n}"))),
    }
    let overhead = if keys.is_some() {
        magic::NONCE_LEN + magic::TAG_LEN
    } else {
        0
    };
    let table_end = fixed_len + n * ENTRY_LEN + overhead;
    if sealed.len() < table_end {
        return Err(corrupt("truncated frame table"));
    }
    let auth_failed = || corrupt("authentication failed (tampered, truncated or misnamed)");
    let plain_start = if let Some(k) = keys {
        let aad = table_aad(&sealed[..fixed_len], id);
        let (head, tag) = sealed[..table_end].split_at_mut(table_end - magic::TAG_LEN);
        let (_, rest) = head.split_at_mut(fixed_len);
        let (nonce, table) = rest.split_at_mut(magic::NONCE_LEN);
        let nonce: &[u8; magic::NONCE_LEN] = (&*nonce).try_into().map_err(|_| auth_failed())?;
        let tag: &[u8; magic::TAG_LEN] = (&*tag).try_into().map_err(|_| auth_failed())?;
        if !k.cipher().open_in_place(nonce, &aad, table, tag) {
            return Err(auth_failed());
        }
        fixed_len + magic::NONCE_LEN
    } else {
        fixed_len
    };
    let mut entries = Vec::with_capacity(n);
    let mut starts = Vec::with_capacity(n);
    let mut pos = table_end;
    for raw in sealed[plain_start..plain_start + n * ENTRY_LEN].chunks_exact(ENTRY_LEN) {
        let flags = raw[0];
        let sealed_len = u32::from_le_bytes([raw[1], raw[2], raw[3], raw[4]]);
        let mut cv = [0u8; 32];
        cv.copy_from_slice(&raw[5..]);
        let zero = flags & magic::FRAME_FLAG_ZERO != 0;
        let in_base = flags & magic::FRAME_FLAG_BASE != 0;
        let known = magic::FRAME_FLAG_ZSTD
            | magic::FRAME_FLAG_ZERO
            | if delta { magic::FRAME_FLAG_BASE } else { 0 };
        if flags & !known != 0
            || (zero && (sealed_len != 0 || flags != magic::FRAME_FLAG_ZERO))
            || (in_base && (sealed_len != 0 || flags != magic::FRAME_FLAG_BASE))
            || (!zero && !in_base && (sealed_len as usize) < overhead)
        {
            return Err(corrupt("bad frame table entry"));
        }
        starts.push(pos);
        pos = pos
            .checked_add(sealed_len as usize)
            .filter(|p| *p <= size)
            .ok_or_else(|| corrupt("truncated frames"))?;
        entries.push(FrameEntry {
            flags,
            sealed_len,
            cv,
        });
    }
    if pos != size {
        return Err(corrupt("trailing bytes after the last frame"));
    }
    Ok(Parsed {
        base,
        entries,
        starts,
    })
}

/// Opens frame `entry` at `sealed[start..]` in place into `out` (exactly `frame_size` bytes).
fn open_frame(
    keys: Option<&Keys>,
    entry: &FrameEntry,
    sealed: &mut [u8],
    frame_size: usize,
    out: &mut [u8],
    name: &str,
) -> Result<()> {
    let corrupt = |why: &str| Error::corrupt(format!("object {name} is corrupt: {why}"));
    if entry.flags & magic::FRAME_FLAG_ZERO != 0 {
        out.fill(0);
        return Ok(());
    }
    let payload: &[u8] = if let Some(k) = keys {
        let auth_failed = || corrupt("frame authentication failed (tampered or moved)");
        let end = sealed.len() - magic::TAG_LEN;
        let (head, tag) = sealed.split_at_mut(end);
        let (nonce, ct) = head.split_at_mut(magic::NONCE_LEN);
        let nonce: &[u8; magic::NONCE_LEN] = (&*nonce).try_into().map_err(|_| auth_failed())?;
        let tag: &[u8; magic::TAG_LEN] = (&*tag).try_into().map_err(|_| auth_failed())?;
        let aad = frame_aad(frame_size as u32, entry.flags, &entry.cv);
        if !k.cipher().open_in_place(nonce, &aad, ct, tag) {
            return Err(auth_failed());
        }
        &sealed[magic::NONCE_LEN..end]
    } else {
        sealed
    };
    if entry.flags & magic::FRAME_FLAG_ZSTD != 0 {
        decompress_exact(payload, out).map_err(|e| {
            Error::with_source(
                crate::ErrorKind::Corrupt,
                format!("object {name} is corrupt: cannot decompress a frame"),
                e,
            )
        })
    } else if payload.len() == out.len() {
        out.copy_from_slice(payload);
        Ok(())
    } else {
        Err(corrupt("stored frame of the wrong length"))
    }
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

/// Opens a framed or delta chunk object: authenticates the table and every frame (a delta
/// object's frames taken from `base`, whose table is authenticated under the base's id),
/// decompresses into `out` (replaced, capacity reused) and checks the whole plaintext against
/// `id`. Decrypts in `sealed` (and `base`). Every failure is [`crate::ErrorKind::Corrupt`]
/// naming the object at fault.
pub(crate) fn open_into(
    o: Opener<'_>,
    id: &[u8; 32],
    sealed: &mut [u8],
    base: Option<BaseObject<'_>>,
    name: &str,
    out: &mut Vec<u8>,
) -> Result<()> {
    let (keys, frame_size) = (o.keys, o.frame_size);
    let p = parse(o, id, sealed, name)?;
    let mut based = match (p.base, base) {
        (None, _) => None,
        (Some(_), None) => {
            return Err(Error::corrupt(format!(
                "object {name} is corrupt: a delta object opened without its base"
            )))
        }
        (Some(want), Some(b)) => {
            let bp = parse(o, &want, b.sealed, b.name)?;
            check_base(p.base, &p.entries, want, bp.base, &bp.entries, name)?;
            Some((bp, b))
        }
    };
    // No clear(): every frame below overwrites its whole range or fails, so a reused buffer
    // keeps its old bytes instead of being zeroed first (a memset of every chunk was 3.5 % of
    // `verify --read-data`). On failure `out` holds garbage, never returned as data.
    out.resize(p.entries.len() * frame_size, 0);
    for (i, (e, s)) in p.entries.iter().zip(&p.starts).enumerate() {
        let dst = &mut out[i * frame_size..(i + 1) * frame_size];
        match based.as_mut() {
            Some((bp, b)) if e.flags == magic::FRAME_FLAG_BASE => {
                let (be, bs) = (&bp.entries[i], bp.starts[i]);
                let frame = &mut b.sealed[bs..bs + be.sealed_len as usize];
                open_frame(keys, be, frame, frame_size, dst, b.name)?;
            }
            _ => {
                let frame = &mut sealed[*s..*s + e.sealed_len as usize];
                open_frame(keys, e, frame, frame_size, dst, name)?;
            }
        }
    }
    if crate::object::object_hash(keys, out) != *id {
        return Err(Error::corrupt(format!(
            "object {name} is corrupt: content does not match its id"
        )));
    }
    Ok(())
}

/// Reads the frame table of chunk `id`'s sealed object, to use it as the parent of
/// [`seal_update`] (or, through [`FramedChunk::attach_base`], as the base of a delta parent).
/// `Ok(None)` for an unframed (version 1) object.
pub(crate) fn parse_parent(
    o: Opener<'_>,
    id: &[u8; 32],
    sealed: Vec<u8>,
    name: &str,
) -> Result<Option<FramedChunk>> {
    let size = sealed.len();
    parent_from(o, id, sealed, size, name)
}

/// A parent from the first bytes of its object of `size` bytes (all of them for
/// [`parse_parent`]). Only the table is decrypted (in place); the frames stay sealed, to be
/// copied as they are.
fn parent_from(
    o: Opener<'_>,
    id: &[u8; 32],
    mut sealed: Vec<u8>,
    size: usize,
    name: &str,
) -> Result<Option<FramedChunk>> {
    if !is_framed(&sealed) {
        return Ok(None);
    }
    let p = parse_sized(o, id, &mut sealed, size, name)?;
    Ok(Some(FramedChunk {
        id: *id,
        frame_size: o.frame_size,
        base: p.base,
        entries: p.entries,
        starts: p.starts,
        sealed,
        base_chunk: None,
    }))
}

/// How many bytes of a framed (version-2) object of at most `frames` frames hold its header and
/// frame table: what [`parse_parent_head`] needs.
pub(crate) fn head_len(encrypted: bool, frames: usize) -> usize {
    let overhead = if encrypted {
        magic::NONCE_LEN + magic::TAG_LEN
    } else {
        0
    };
    FIXED_LEN + frames * ENTRY_LEN + overhead
}

/// [`parse_parent`] from the head of the object only (`head`: its first bytes, at least the
/// header and frame table; `size`: the whole object's length): a parent without its frames,
/// enough for an update that becomes a delta object on it (every unchanged frame is then
/// taken from it by reference). `Ok(None)` for an unframed object; a delta object is refused
/// (an update copies its stored frames: read it whole).
pub(crate) fn parse_parent_head(
    o: Opener<'_>,
    id: &[u8; 32],
    head: Vec<u8>,
    size: usize,
    name: &str,
) -> Result<Option<FramedChunk>> {
    if is_framed(&head) && base_of(&head).is_some() {
        return Err(Error::invalid(
            "a delta object's head cannot be a parent by itself",
        ));
    }
    parent_from(o, id, head, size, name)
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

/// The sealed bytes of frame `i` of `c`; an error when `c` was read without its frames
/// ([`parse_parent_head`]) and the frame is not empty.
fn sealed_frame(c: &FramedChunk, i: usize) -> Result<&[u8]> {
    let len = c.entries[i].sealed_len as usize;
    if len == 0 {
        return Ok(&[]);
    }
    let s = c.starts[i];
    c.sealed
        .get(s..s + len)
        .ok_or_else(|| Error::invalid("a frame of a parent read without its frames"))
}

/// The chunk `parent` with the frames in `changed` (frame number, new plaintext of
/// `frame_size` bytes) replaced: hashes, compresses and encrypts only the changed frames.
///
/// With `deltas`, the result is a delta object whose base is the parent (or, for a delta
/// parent, the parent's base): the parent's own stored frames are copied sealed, and every
/// other unchanged frame refers to the base. When such a delta would store more than half its
/// frames itself, the chunk is rewritten whole as a framed object instead, copying every
/// unchanged frame sealed (from the parent, and from its base when one is attached; without
/// it the update stays a delta). Without `deltas`, always a framed object (a delta parent
/// then needs its base attached). Frames of a parent must be authentic for this to be sound:
/// the new id covers their chaining values, and restore re-hashes everything it opens.
pub(crate) fn seal_update(
    keys: Option<&Keys>,
    parent: &FramedChunk,
    changed: &[(usize, &[u8])],
    zstd_level: i32,
    deltas: bool,
) -> Result<UpdatedChunk> {
    let fs = parent.frame_size;
    let n = parent.entries.len();
    let mut new: Vec<Option<(ChainingValue, &[u8])>> = vec![None; n];
    for (i, plain) in changed {
        if plain.len() != fs || *i >= new.len() {
            return Err(Error::invalid(
                "changed frame out of range or of the wrong size",
            ));
        }
        new[*i] = Some((frame_cv(keys, plain, *i, fs), plain));
    }
    let stored = parent.stored_after(|i| new[i].is_some_and(|(_, p)| !crate::is_zero(p)));
    let base_chunk = parent.base_chunk.as_deref();
    let whole = match (parent.base.is_some(), base_chunk) {
        (false, _) | (true, Some(_)) => !deltas || stored > n / 2,
        (true, None) if deltas => false,
        (true, None) => {
            return Err(Error::invalid(
                "a delta parent rewritten whole needs its base attached",
            ))
        }
    };
    let mut cvs = Vec::with_capacity(n);
    let mut all_zero = true;
    let mut frames = Vec::with_capacity(n);
    for (i, slot) in new.iter().enumerate() {
        if let Some((cv, plain)) = slot {
            cvs.push(*cv);
            all_zero &= crate::is_zero(plain);
            frames.push(Source::New(*cv, plain));
            continue;
        }
        let e = parent.entries[i];
        cvs.push(e.cv);
        all_zero &= e.flags & magic::FRAME_FLAG_ZERO != 0;
        let in_base = e.flags == magic::FRAME_FLAG_BASE;
        frames.push(match (whole, in_base, base_chunk) {
            // A frame of the base, copied from it.
            (true, true, Some(b)) => Source::Reuse(b.entries[i], sealed_frame(b, i)?),
            (true, true, None) => return Err(Error::invalid("a base frame without its base")),
            (false, true, _) => Source::Base(e.cv),
            // A frame the base holds when the parent is the base.
            (false, false, _) if parent.base.is_none() && e.stored() => Source::Base(e.cv),
            // Zero frames, and frames stored in the parent itself.
            _ => Source::Reuse(e, sealed_frame(parent, i)?),
        });
    }
    let id = merge_root(keys, &cvs);
    let base = parent.base.unwrap_or(parent.id);
    let sealed = assemble(keys, &id, fs, Some(&base), &frames, zstd_level)?;
    Ok(UpdatedChunk {
        id,
        sealed,
        all_zero,
    })
}

#[cfg(test)]
mod tests;
