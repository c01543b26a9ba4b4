//! Sealed objects: header, optional zstd compression, optional XChaCha20-Poly1305 encryption.
//!
//! Pure code: no I/O.

use std::cell::RefCell;
use std::io::Read as _;

use crate::crypto::{random_bytes, Keys};
use crate::error::{Error, ErrorKind, Result};
use crate::magic;

/// The id of an object's plaintext: keyed BLAKE3 when encrypted, plain BLAKE3 otherwise.
pub(crate) fn object_hash(keys: Option<&Keys>, plain: &[u8]) -> [u8; 32] {
    match keys {
        Some(k) => k.hash(plain),
        None => *blake3::hash(plain).as_bytes(),
    }
}

fn aad(header: &[u8; magic::OBJECT_HEADER_LEN], id: &[u8; 32]) -> [u8; 40] {
    let mut aad = [0u8; 40];
    aad[..8].copy_from_slice(header);
    aad[8..].copy_from_slice(id);
    aad
}

thread_local! {
    /// One zstd compression context per thread (and level), reused across objects: creating a
    /// context per 1 MiB chunk allocated (and page-faulted in) several MiB of tables each time.
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    /// One zstd decompression context per thread, for the same reason.
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// Appends the zstd compression of `plain` at `level` to `out` if it is smaller than `plain`;
/// returns whether it did (on `false`, `out` is unchanged).
pub(crate) fn compress_append(plain: &[u8], level: i32, out: &mut Vec<u8>) -> bool {
    let start = out.len();
    let written = COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = zstd::bulk::Compressor::new(level).ok().map(|c| (level, c));
        }
        let (_, c) = slot.as_mut()?;
        let mut cursor = std::io::Cursor::new(&mut *out);
        cursor.set_position(start as u64);
        c.compress_to_buffer(plain, &mut cursor).ok()
    });
    match written {
        Some(n) if n < plain.len() && out.len() == start + n => true,
        _ => {
            out.truncate(start);
            false
        }
    }
}

/// Seals `plain` (whose id is `id`) as an object of `kind`.
///
/// One allocation: the payload is compressed straight into the output buffer (after the header
/// and nonce) and encrypted there in place.
pub(crate) fn seal(
    keys: Option<&Keys>,
    kind: u8,
    id: &[u8; 32],
    plain: &[u8],
    zstd_level: i32,
) -> Result<Vec<u8>> {
    let m = magic::OBJECT_MAGIC;
    let mut header = [m[0], m[1], m[2], m[3], magic::OBJECT_VERSION, kind, 0, 0];
    let nonce_len = if keys.is_some() { magic::NONCE_LEN } else { 0 };
    let start = magic::OBJECT_HEADER_LEN + nonce_len;
    let bound = zstd::zstd_safe::compress_bound(plain.len()).max(plain.len());
    let mut out = Vec::with_capacity(start + bound + magic::TAG_LEN);
    out.extend_from_slice(&header);
    out.resize(start, 0);
    let mut flags = 0u8;
    if compress_append(plain, zstd_level, &mut out) {
        flags |= magic::FLAG_ZSTD;
    } else {
        out.extend_from_slice(plain);
    }
    if keys.is_some() {
        flags |= magic::FLAG_ENCRYPTED;
    }
    header[6] = flags;
    if let Some(h) = out.get_mut(..magic::OBJECT_HEADER_LEN) {
        h.copy_from_slice(&header);
    }
    if let Some(k) = keys {
        let mut nonce = [0u8; magic::NONCE_LEN];
        random_bytes(&mut nonce)?;
        if let Some(n) = out.get_mut(magic::OBJECT_HEADER_LEN..start) {
            n.copy_from_slice(&nonce);
        }
        let payload = out
            .get_mut(start..)
            .ok_or_else(|| Error::invalid("object buffer too short"))?;
        let tag = k
            .cipher()
            .seal_in_place(&nonce, &aad(&header, id), payload)?;
        out.extend_from_slice(&tag);
    }
    Ok(out)
}

/// Checks a sealed object's header against `kind` and the repository's encryption and, when
/// encrypted, authenticates and decrypts its payload in place (no second buffer). Returns the
/// payload's byte range in `sealed` and whether it is zstd-compressed. Every failure is
/// [`ErrorKind::Corrupt`] naming the object `name`.
fn unseal_in_place(
    keys: Option<&Keys>,
    kind: u8,
    id: &[u8; 32],
    sealed: &mut [u8],
    name: &str,
) -> Result<(std::ops::Range<usize>, bool)> {
    let corrupt = |why: &str| Error::corrupt(format!("object {name} is corrupt: {why}"));
    let Some(header) = sealed
        .first_chunk::<{ magic::OBJECT_HEADER_LEN }>()
        .copied()
    else {
        return Err(corrupt("truncated header"));
    };
    if header[..4] != magic::OBJECT_MAGIC {
        return Err(corrupt("bad magic"));
    }
    // A new object version comes with a new repository version, so in a version-1
    // repository any other value is damage.
    if header[4] != magic::OBJECT_VERSION {
        return Err(corrupt(&format!("unknown object version {}", header[4])));
    }
    if header[5] != kind {
        return Err(corrupt(&format!(
            "object kind {} where {} was expected",
            header[5], kind
        )));
    }
    let flags = header[6];
    if flags & !(magic::FLAG_ZSTD | magic::FLAG_ENCRYPTED) != 0 || header[7] != 0 {
        return Err(corrupt("unknown flags or non-zero reserved byte"));
    }
    let encrypted = flags & magic::FLAG_ENCRYPTED != 0;
    if encrypted != keys.is_some() {
        return Err(corrupt(if encrypted {
            "encrypted object in an unencrypted repository"
        } else {
            "unencrypted object in an encrypted repository"
        }));
    }
    let compressed = flags & magic::FLAG_ZSTD != 0;
    let body = magic::OBJECT_HEADER_LEN;
    let Some(k) = keys else {
        return Ok((body..sealed.len(), compressed));
    };
    let start = body + magic::NONCE_LEN;
    let Some(nonce) = sealed
        .get(body..start)
        .and_then(|n| <[u8; magic::NONCE_LEN]>::try_from(n).ok())
    else {
        return Err(corrupt("truncated nonce"));
    };
    let auth_failed = || corrupt("authentication failed (tampered, truncated or misnamed)");
    let Some(end) = sealed
        .len()
        .checked_sub(magic::TAG_LEN)
        .filter(|e| *e >= start)
    else {
        return Err(auth_failed());
    };
    let (rest, tag) = sealed.split_at_mut(end);
    let ct = rest.get_mut(start..).ok_or_else(auth_failed)?;
    let tag: &[u8; magic::TAG_LEN] = (&*tag).try_into().map_err(|_| auth_failed())?;
    if !k.cipher().open_in_place(&nonce, &aad(&header, id), ct, tag) {
        return Err(auth_failed());
    }
    Ok((start..end, compressed))
}

/// Opens a sealed object: checks the header against `kind` and the repository's encryption,
/// authenticates, decompresses (refusing more than `limit` bytes) and re-hashes against `id`.
/// `name` names the object in errors. Every failure is [`ErrorKind::Corrupt`].
///
/// Decrypts in `sealed` itself; an uncompressed payload is returned in that same buffer.
pub(crate) fn open(
    keys: Option<&Keys>,
    kind: u8,
    id: &[u8; 32],
    mut sealed: Vec<u8>,
    limit: usize,
    name: &str,
) -> Result<Vec<u8>> {
    let (payload, compressed) = unseal_in_place(keys, kind, id, &mut sealed, name)?;
    let plain = if compressed {
        let mut out = Vec::new();
        decompress_into(sealed.get(payload).unwrap_or_default(), limit, &mut out)
            .map_err(|e| cannot_decompress(name, e))?;
        out
    } else {
        if payload.len() > limit {
            return Err(Error::corrupt(format!(
                "object {name} is corrupt: larger than the size limit"
            )));
        }
        sealed.truncate(payload.end);
        sealed.drain(..payload.start);
        sealed
    };
    check_id(keys, id, &plain, name)?;
    Ok(plain)
}

/// Like [`open`], but into caller-owned buffers reused from one object to the next: decrypts in
/// `sealed`, decompresses into `scratch` (whose capacity is kept), and returns the plaintext,
/// which lies in one of the two.
pub(crate) fn open_into<'a>(
    keys: Option<&Keys>,
    kind: u8,
    id: &[u8; 32],
    sealed: &'a mut [u8],
    limit: usize,
    name: &str,
    scratch: &'a mut Vec<u8>,
) -> Result<&'a [u8]> {
    let (payload, compressed) = unseal_in_place(keys, kind, id, sealed, name)?;
    let payload: &'a [u8] = sealed.get(payload).unwrap_or_default();
    let plain: &'a [u8] = if compressed {
        decompress_into(payload, limit, scratch).map_err(|e| cannot_decompress(name, e))?;
        scratch
    } else {
        if payload.len() > limit {
            return Err(Error::corrupt(format!(
                "object {name} is corrupt: larger than the size limit"
            )));
        }
        payload
    };
    check_id(keys, id, plain, name)?;
    Ok(plain)
}

fn cannot_decompress(name: &str, e: std::io::Error) -> Error {
    Error::with_source(
        ErrorKind::Corrupt,
        format!("object {name} is corrupt: cannot decompress"),
        e,
    )
}

fn check_id(keys: Option<&Keys>, id: &[u8; 32], plain: &[u8], name: &str) -> Result<()> {
    if object_hash(keys, plain) != *id {
        return Err(Error::corrupt(format!(
            "object {name} is corrupt: content does not match its id"
        )));
    }
    Ok(())
}

/// Decompresses `data` into exactly `out.len()` bytes: fewer, more or a malformed frame is an
/// error.
pub(crate) fn decompress_exact(data: &[u8], out: &mut [u8]) -> std::io::Result<()> {
    let n = DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = zstd::bulk::Decompressor::new().ok();
        }
        match slot.as_mut() {
            Some(d) => d.decompress_to_buffer(data, &mut *out),
            None => Err(std::io::Error::other("no zstd decompression context")),
        }
    })?;
    if n != out.len() {
        return Err(std::io::Error::other(format!(
            "a frame decompressed to {n} bytes instead of {}",
            out.len()
        )));
    }
    Ok(())
}

/// Decompresses `data` into `out` (cleared first; its capacity is reused), refusing more than
/// `limit` bytes.
fn decompress_into(data: &[u8], limit: usize, out: &mut Vec<u8>) -> std::io::Result<()> {
    out.clear();
    // Fast path: a single frame that declares its size (what `seal` writes) decompresses in one
    // call into the buffer; a declared size over the limit is refused before any allocation.
    // Anything else takes the streaming path, which never reads past the limit.
    if let Ok(Some(declared)) = zstd::zstd_safe::get_frame_content_size(data) {
        let declared = usize::try_from(declared).unwrap_or(usize::MAX);
        if declared > limit {
            return Err(std::io::Error::other(format!(
                "decompressed size exceeds the limit of {limit} bytes"
            )));
        }
        out.reserve(declared);
        let ok = DECOMPRESSOR.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = zstd::bulk::Decompressor::new().ok();
            }
            slot.as_mut()
                .is_some_and(|d| d.decompress_to_buffer(data, &mut *out).is_ok())
        });
        if ok && out.len() == declared {
            return Ok(());
        }
        out.clear();
    }
    let decoder = zstd::stream::read::Decoder::with_buffer(data)?;
    let max = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    decoder.take(max).read_to_end(out)?;
    if out.len() > limit {
        return Err(std::io::Error::other(format!(
            "decompressed size exceeds the limit of {limit} bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::from_master([7; 32])
    }

    #[test]
    fn round_trip_both_modes() {
        let data = b"hello hello hello hello hello hello hello hello".repeat(10);
        for k in [None, Some(keys())] {
            let id = object_hash(k.as_ref(), &data);
            let sealed = seal(k.as_ref(), magic::KIND_CHUNK, &id, &data, 3).unwrap();
            assert_eq!(sealed[6] & magic::FLAG_ZSTD, magic::FLAG_ZSTD);
            let got = open(
                k.as_ref(),
                magic::KIND_CHUNK,
                &id,
                sealed.clone(),
                1 << 20,
                "x",
            )
            .unwrap();
            assert_eq!(got, data);
            let e = open(k.as_ref(), magic::KIND_INDEX, &id, sealed, 1 << 20, "x").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt);
        }
    }

    #[test]
    fn incompressible_stored_raw() {
        let mut data = vec![0u8; 4096];
        random_bytes(&mut data).unwrap();
        let id = object_hash(None, &data);
        let sealed = seal(None, magic::KIND_CHUNK, &id, &data, 3).unwrap();
        assert_eq!(sealed[6], 0);
        assert_eq!(&sealed[8..], &data[..]);
    }

    #[test]
    fn zstd_bomb_refused() {
        let data = vec![0u8; 8 << 20];
        for k in [None, Some(keys())] {
            let id = object_hash(k.as_ref(), &data);
            let sealed = seal(k.as_ref(), magic::KIND_CHUNK, &id, &data, 3).unwrap();
            assert!(sealed.len() < 4096);
            let e = open(k.as_ref(), magic::KIND_CHUNK, &id, sealed, 1 << 20, "x").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt);
        }
    }
}
