//! Sealed objects: header, optional zstd compression, optional XChaCha20-Poly1305 encryption.
//!
//! Pure code: no I/O.

use std::io::Read as _;

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::XNonce;

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

/// Seals `plain` (whose id is `id`) as an object of `kind`.
pub(crate) fn seal(
    keys: Option<&Keys>,
    kind: u8,
    id: &[u8; 32],
    plain: &[u8],
    zstd_level: i32,
) -> Result<Vec<u8>> {
    let compressed = zstd::bulk::compress(plain, zstd_level)
        .ok()
        .filter(|c| c.len() < plain.len());
    let mut flags = 0u8;
    if compressed.is_some() {
        flags |= magic::FLAG_ZSTD;
    }
    if keys.is_some() {
        flags |= magic::FLAG_ENCRYPTED;
    }
    let payload: &[u8] = compressed.as_deref().unwrap_or(plain);
    let m = magic::OBJECT_MAGIC;
    let header = [
        m[0],
        m[1],
        m[2],
        m[3],
        magic::OBJECT_VERSION,
        kind,
        flags,
        0,
    ];
    let mut out = Vec::with_capacity(
        magic::OBJECT_HEADER_LEN + magic::NONCE_LEN + payload.len() + magic::TAG_LEN,
    );
    out.extend_from_slice(&header);
    match keys {
        Some(k) => {
            let mut nonce = [0u8; magic::NONCE_LEN];
            random_bytes(&mut nonce)?;
            let ct = k
                .cipher()
                .encrypt(
                    XNonce::from_slice(&nonce),
                    Payload {
                        msg: payload,
                        aad: &aad(&header, id),
                    },
                )
                .map_err(|_| Error::invalid("object too large to encrypt"))?;
            out.extend_from_slice(&nonce);
            out.extend_from_slice(&ct);
        }
        None => out.extend_from_slice(payload),
    }
    Ok(out)
}

/// Opens a sealed object: checks the header against `kind` and the repository's encryption,
/// authenticates, decompresses (refusing more than `limit` bytes) and re-hashes against `id`.
/// `name` names the object in errors. Every failure is [`ErrorKind::Corrupt`].
pub(crate) fn open(
    keys: Option<&Keys>,
    kind: u8,
    id: &[u8; 32],
    bytes: &[u8],
    limit: usize,
    name: &str,
) -> Result<Vec<u8>> {
    let corrupt = |why: &str| Error::corrupt(format!("object {name} is corrupt: {why}"));
    let Some((header, body)) = bytes.split_first_chunk::<{ magic::OBJECT_HEADER_LEN }>() else {
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
    let decrypted;
    let payload: &[u8] = match keys {
        Some(k) => {
            let Some((nonce, ct)) = body.split_first_chunk::<{ magic::NONCE_LEN }>() else {
                return Err(corrupt("truncated nonce"));
            };
            decrypted = k
                .cipher()
                .decrypt(
                    XNonce::from_slice(nonce),
                    Payload {
                        msg: ct,
                        aad: &aad(header, id),
                    },
                )
                .map_err(|_| corrupt("authentication failed (tampered, truncated or misnamed)"))?;
            &decrypted
        }
        None => body,
    };
    let plain = if flags & magic::FLAG_ZSTD != 0 {
        decompress(payload, limit).map_err(|e| {
            Error::with_source(
                ErrorKind::Corrupt,
                format!("object {name} is corrupt: cannot decompress"),
                e,
            )
        })?
    } else {
        if payload.len() > limit {
            return Err(corrupt("larger than the size limit"));
        }
        payload.to_vec()
    };
    if object_hash(keys, &plain) != *id {
        return Err(corrupt("content does not match its id"));
    }
    Ok(plain)
}

fn decompress(data: &[u8], limit: usize) -> std::io::Result<Vec<u8>> {
    // Fast path: a single frame that declares its size (what `seal` writes) decompresses in one
    // call into an exactly sized buffer; a declared size over the limit is refused before any
    // allocation. Anything else takes the streaming path, which never reads past the limit.
    if let Ok(Some(declared)) = zstd::zstd_safe::get_frame_content_size(data) {
        let declared = usize::try_from(declared).unwrap_or(usize::MAX);
        if declared > limit {
            return Err(std::io::Error::other(format!(
                "decompressed size exceeds the limit of {limit} bytes"
            )));
        }
        let mut out = Vec::with_capacity(declared);
        if zstd::bulk::Decompressor::new()
            .and_then(|mut d| d.decompress_to_buffer(data, &mut out))
            .is_ok()
            && out.len() == declared
        {
            return Ok(out);
        }
    }
    let decoder = zstd::stream::read::Decoder::with_buffer(data)?;
    let mut out = Vec::new();
    let max = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    decoder.take(max).read_to_end(&mut out)?;
    if out.len() > limit {
        return Err(std::io::Error::other(format!(
            "decompressed size exceeds the limit of {limit} bytes"
        )));
    }
    Ok(out)
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
            let got = open(k.as_ref(), magic::KIND_CHUNK, &id, &sealed, 1 << 20, "x").unwrap();
            assert_eq!(got, data);
            let e = open(k.as_ref(), magic::KIND_INDEX, &id, &sealed, 1 << 20, "x").unwrap_err();
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
            let e = open(k.as_ref(), magic::KIND_CHUNK, &id, &sealed, 1 << 20, "x").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt);
        }
    }
}
