//! Parsing and opening framed and delta chunk objects, and reading them as update parents.

#[cfg(doc)] // for the intra-doc link to `seal_update`
use super::seal_update;
use super::{
    base_of, check_base, frame_aad, frames_for, is_framed, table_aad, BaseObject, FrameEntry,
    FramedChunk, Opener, DELTA_FIXED_LEN, ENTRY_LEN, FIXED_LEN,
};
use crate::crypto::Keys;
use crate::error::{Error, Result};
use crate::magic;
use crate::object::decompress_exact;

/// A framed or delta object's authenticated table.
pub(super) struct Parsed {
    /// The base object's id, for a delta object.
    base: Option<[u8; 32]>,
    pub(super) entries: Vec<FrameEntry>,
    /// Start of each frame in the object (of the next frame for one stored elsewhere).
    pub(super) starts: Vec<usize>,
}

/// Checks the fixed part and decrypts the table of a framed object (or, when `deltas`, of a
/// delta object) in place.
pub(super) fn parse(o: Opener<'_>, id: &[u8; 32], sealed: &mut [u8], name: &str) -> Result<Parsed> {
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
