//! Sealing framed and delta chunk objects: a whole chunk, or a new version from changed frames.

use blake3::hazmat::ChainingValue;

#[cfg(doc)] // for the intra-doc link to `parse_parent_head`
use super::parse_parent_head;
use super::{
    frame_aad, frame_cv, frames_for, merge_root, table_aad, FrameEntry, FramedChunk, UpdatedChunk,
    DELTA_FIXED_LEN, ENTRY_LEN,
};
use crate::crypto::{random_bytes, Keys};
use crate::error::{Error, Result};
use crate::magic;
use crate::object::compress_append;

/// A frame to place in a new object.
enum Source<'a> {
    /// Copied sealed from a parent object.
    Reuse(FrameEntry, &'a [u8]),
    /// Sealed afresh from its plaintext.
    New(ChainingValue, &'a [u8]),
    /// Taken from the base object (a delta object's frame with this chaining value).
    Base(ChainingValue),
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
