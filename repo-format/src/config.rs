//! The repository `config` object (JSON, written once at init).
//!
//! Pure code: no I/O.

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::magic;

/// Encryption scheme of a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EncryptionScheme {
    /// XChaCha20-Poly1305 objects, keyed BLAKE3 ids, Argon2id / key-file key slots.
    #[serde(rename = "xchacha20poly1305-blake3")]
    XChaCha20Poly1305Blake3,
    /// AEGIS-256 objects, otherwise as [`EncryptionScheme::XChaCha20Poly1305Blake3`].
    #[serde(rename = "aegis256-blake3")]
    Aegis256Blake3,
    /// No encryption; ids are plain BLAKE3.
    #[serde(rename = "none")]
    None,
}

impl EncryptionScheme {
    /// The object cipher of an encrypted scheme; `None` for [`EncryptionScheme::None`].
    pub fn cipher(self) -> Option<Cipher> {
        match self {
            EncryptionScheme::XChaCha20Poly1305Blake3 => Some(Cipher::XChaCha20Poly1305),
            EncryptionScheme::Aegis256Blake3 => Some(Cipher::Aegis256),
            EncryptionScheme::None => None,
        }
    }
}

/// The authenticated cipher of an encrypted repository's objects (key slots always use
/// XChaCha20-Poly1305). Both take a random 192-bit nonce and give a 128-bit tag, so objects
/// have the same layout with either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cipher {
    /// XChaCha20-Poly1305: fast everywhere in software, about 1 GB/s per core on x86-64.
    XChaCha20Poly1305,
    /// AEGIS-256 (draft-irtf-cfrg-aegis-aead): several times faster where the CPU has AES
    /// instructions (x86-64 AES-NI, ARMv8 crypto extensions), slow without them.
    Aegis256,
}

impl Cipher {
    /// AEGIS-256 where this CPU has AES instructions, else XChaCha20-Poly1305.
    pub fn preferred() -> Cipher {
        if cpu_has_aes() {
            Cipher::Aegis256
        } else {
            Cipher::XChaCha20Poly1305
        }
    }

    /// The config `encryption` scheme of a repository sealed with this cipher.
    pub fn scheme(self) -> EncryptionScheme {
        match self {
            Cipher::XChaCha20Poly1305 => EncryptionScheme::XChaCha20Poly1305Blake3,
            Cipher::Aegis256 => EncryptionScheme::Aegis256Blake3,
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_aes() -> bool {
    std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("sse4.1")
}

#[cfg(target_arch = "aarch64")]
fn cpu_has_aes() -> bool {
    std::arch::is_aarch64_feature_detected!("aes")
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn cpu_has_aes() -> bool {
    false
}

/// The decoded repository config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Always `"lifeboat-repo"`.
    pub format: String,
    /// Repository format version: 1 (unframed), 2 (framed chunk objects) or 3 (framed and
    /// delta chunk objects).
    pub version: u32,
    /// Random repository id (32 hex digits).
    pub id: String,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Encryption scheme.
    pub encryption: EncryptionScheme,
    /// Compression algorithm (`"zstd"`).
    pub compression: String,
    /// zstd level used when writing.
    pub zstd_level: i32,
    /// Frame size of framed chunk objects (versions 2 and 3; see FORMAT.md, "Framed chunk
    /// objects"). `None` in a version-1 repository: every chunk object is unframed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame_size: Option<u32>,
    /// Hex keyed-BLAKE3 MAC of the canonical config without this field (encrypted only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// Checks a chunk size: a power of two, a multiple of 64 KiB, at most 16 MiB.
pub fn validate_chunk_size(chunk_size: u32) -> Result<()> {
    if !chunk_size.is_power_of_two()
        || !(crate::MIN_CHUNK_SIZE..=crate::MAX_CHUNK_SIZE).contains(&chunk_size)
    {
        return Err(Error::invalid(format!(
            "chunk size {chunk_size} is not a power of two between 64 KiB and 16 MiB"
        )));
    }
    Ok(())
}

/// Checks a frame size: a power of two, at least 64 KiB, smaller than the chunk size.
pub fn validate_frame_size(frame_size: u32, chunk_size: u32) -> Result<()> {
    if !frame_size.is_power_of_two()
        || frame_size < crate::MIN_CHUNK_SIZE
        || frame_size >= chunk_size
    {
        return Err(Error::invalid(format!(
            "frame size {frame_size} is not a power of two from 64 KiB up to half the chunk \
             size {chunk_size}"
        )));
    }
    Ok(())
}

impl Config {
    /// Parses the stored config. Returns the config and the canonical bytes the MAC covers.
    pub(crate) fn parse(bytes: &[u8]) -> Result<(Config, Vec<u8>)> {
        let not_repo = |why: &str| {
            Error::new(
                ErrorKind::NotARepository,
                format!("not a lifeboat repository: config {why}"),
            )
        };
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|_| not_repo("is not JSON"))?;
        let Some(obj) = value.as_object() else {
            return Err(not_repo("is not a JSON object"));
        };
        if obj.get("format").and_then(|f| f.as_str()) != Some(magic::CONFIG_FORMAT) {
            return Err(not_repo("has a foreign format"));
        }
        match obj.get("version").and_then(|v| v.as_u64()) {
            Some(v)
                if v == u64::from(magic::CONFIG_VERSION)
                    || v == u64::from(magic::CONFIG_VERSION_FRAMED)
                    || v == u64::from(magic::CONFIG_VERSION_DELTA) => {}
            Some(v) => {
                let why = format!("repository format version {v} is not supported");
                return Err(Error::new(
                    ErrorKind::UnsupportedVersion,
                    format!("{why} (this build reads 1, 2 and 3)"),
                ));
            }
            None => return Err(Error::corrupt("config has no valid version")),
        }
        if let Some(e) = obj.get("encryption").and_then(|e| e.as_str()) {
            if ![
                magic::ENCRYPTION_NONE,
                magic::ENCRYPTION_XCHACHA_BLAKE3,
                magic::ENCRYPTION_AEGIS256_BLAKE3,
            ]
            .contains(&e)
            {
                return Err(Error::new(
                    ErrorKind::UnsupportedVersion,
                    format!("repository uses unsupported encryption {e:?}"),
                ));
            }
        }
        if let Some(c) = obj.get("compression").and_then(|c| c.as_str()) {
            if c != magic::COMPRESSION_ZSTD {
                return Err(Error::new(
                    ErrorKind::UnsupportedVersion,
                    format!("repository uses unsupported compression {c:?}"),
                ));
            }
        }
        let config: Config = serde_json::from_value(value.clone())
            .map_err(|e| Error::with_source(ErrorKind::Corrupt, "config is malformed", e))?;
        validate_chunk_size(config.chunk_size).map_err(|e| {
            Error::with_source(ErrorKind::Corrupt, "config is corrupt: bad chunk size", e)
        })?;
        match (config.version, config.frame_size) {
            (magic::CONFIG_VERSION, None) => {}
            (magic::CONFIG_VERSION_FRAMED | magic::CONFIG_VERSION_DELTA, Some(f)) => {
                validate_frame_size(f, config.chunk_size).map_err(|e| {
                    Error::with_source(ErrorKind::Corrupt, "config is corrupt: bad frame size", e)
                })?
            }
            _ => {
                return Err(Error::corrupt(
                    "config is corrupt: frame_size must be present exactly in versions 2 and 3",
                ))
            }
        }
        if config.encryption != EncryptionScheme::None && config.mac.is_none() {
            return Err(Error::corrupt(
                "config of an encrypted repository has no mac",
            ));
        }
        let mut value = value;
        if let Some(obj) = value.as_object_mut() {
            obj.remove("mac");
        }
        Ok((config, canonical_json(&value)))
    }

    /// The canonical JSON of this config without `mac`.
    pub(crate) fn canonical_without_mac(&self) -> Result<Vec<u8>> {
        let mut c = self.clone();
        c.mac = None;
        let value = serde_json::to_value(&c).map_err(|e| {
            Error::with_source(ErrorKind::InvalidArgument, "cannot encode config", e)
        })?;
        Ok(canonical_json(&value))
    }
}

/// Canonical JSON: compact, object keys sorted by their UTF-8 bytes, recursively; strings and
/// numbers as serde_json writes them.
pub(crate) fn canonical_json(v: &serde_json::Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(&Value::String(k.clone()), out);
                out.push(b':');
                if let Some(val) = map.get(k) {
                    write_canonical(val, out);
                }
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => out.extend_from_slice(scalar.to_string().as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_sorts_keys() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{"b":1,"a":{"d":[1,"x"],"c":null}}"#).unwrap();
        assert_eq!(canonical_json(&v), br#"{"a":{"c":null,"d":[1,"x"]},"b":1}"#);
    }

    #[test]
    fn foreign_configs() {
        for bad in [&b"not json"[..], b"[]", br#"{"format":"restic"}"#] {
            assert_eq!(
                Config::parse(bad).unwrap_err().kind(),
                ErrorKind::NotARepository
            );
        }
        let v4 = br#"{"format":"lifeboat-repo","version":4}"#;
        assert_eq!(
            Config::parse(v4).unwrap_err().kind(),
            ErrorKind::UnsupportedVersion
        );
    }

    #[test]
    fn frame_size_only_in_versions_2_and_3() {
        let cfg = |version: u32, frame: &str| {
            format!(
                r#"{{"format":"lifeboat-repo","version":{version},"id":"00","chunk_size":1048576,
                "encryption":"none","compression":"zstd","zstd_level":3{frame}}}"#
            )
        };
        Config::parse(cfg(1, "").as_bytes()).unwrap();
        let (c, _) = Config::parse(cfg(2, r#","frame_size":65536"#).as_bytes()).unwrap();
        assert_eq!(c.frame_size, Some(65536));
        let (c, _) = Config::parse(cfg(3, r#","frame_size":262144"#).as_bytes()).unwrap();
        assert_eq!((c.version, c.frame_size), (3, Some(262144)));
        for bad in [
            cfg(3, ""),
            cfg(3, r#","frame_size":1048576"#),
            cfg(1, r#","frame_size":65536"#),
            cfg(2, ""),
            cfg(2, r#","frame_size":1048576"#),
            cfg(2, r#","frame_size":4096"#),
            cfg(2, r#","frame_size":100000"#),
        ] {
            assert_eq!(
                Config::parse(bad.as_bytes()).unwrap_err().kind(),
                ErrorKind::Corrupt,
                "{bad}"
            );
        }
    }
}
