//! Keys: master key, derived subkeys, key-encryption keys (Argon2id / key file) and key slots.
//!
//! Pure code: no I/O. Randomness comes from `getrandom`.

use std::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, AeadInPlace, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

use crate::config::Cipher;
use crate::error::{Error, ErrorKind, Result};
use crate::magic;

/// Fills `buf` with random bytes from the operating system.
pub(crate) fn random_bytes(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| {
        Error::with_source(
            ErrorKind::Io,
            "cannot read random bytes from the operating system",
            std::io::Error::other(e.to_string()),
        )
    })
}

/// Argon2id cost parameters used to turn a passphrase into a key-encryption key.
///
/// The defaults (64 MiB, 3 passes, 1 lane) are the ones to use for real repositories; tests
/// may use cheap parameters (e.g. `KdfParams::new(8, 1, 1)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// Memory cost in KiB.
    pub m_cost: u32,
    /// Number of passes.
    pub t_cost: u32,
    /// Degree of parallelism (lanes).
    pub p_cost: u32,
}

impl KdfParams {
    /// Largest memory cost accepted from a key slot (4 GiB), so a forged slot cannot make
    /// `open` allocate without bound.
    pub const MAX_M_COST: u32 = 4 * 1024 * 1024;
    /// Largest pass count accepted from a key slot.
    pub const MAX_T_COST: u32 = 64;
    /// Largest parallelism accepted from a key slot.
    pub const MAX_P_COST: u32 = 64;

    /// Parameters with the given costs (validated when used).
    pub const fn new(m_cost: u32, t_cost: u32, p_cost: u32) -> Self {
        KdfParams {
            m_cost,
            t_cost,
            p_cost,
        }
    }

    fn argon2(&self) -> Result<argon2::Argon2<'static>> {
        if self.m_cost > Self::MAX_M_COST
            || self.t_cost > Self::MAX_T_COST
            || self.p_cost > Self::MAX_P_COST
        {
            return Err(Error::invalid(format!(
                "Argon2 parameters out of range (m={} KiB, t={}, p={})",
                self.m_cost, self.t_cost, self.p_cost
            )));
        }
        let params =
            argon2::Params::new(self.m_cost, self.t_cost, self.p_cost, Some(32)).map_err(|e| {
                Error::with_source(
                    ErrorKind::InvalidArgument,
                    format!(
                        "invalid Argon2 parameters (m={} KiB, t={}, p={})",
                        self.m_cost, self.t_cost, self.p_cost
                    ),
                    std::io::Error::other(e.to_string()),
                )
            })?;
        Ok(argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            params,
        ))
    }
}

impl Default for KdfParams {
    fn default() -> Self {
        KdfParams::new(65536, 3, 1)
    }
}

/// A key file: at least 32 secret random bytes, stored as text (a header line and base64).
#[derive(Clone, PartialEq, Eq)]
pub struct KeyFile {
    secret: Vec<u8>,
}

impl fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyFile(<redacted>)")
    }
}

impl KeyFile {
    /// Minimum number of secret bytes in a key file.
    pub const MIN_SECRET_LEN: usize = 32;

    /// Generates a new key file (32 random bytes) and returns its text content, ready to be
    /// written to a file (see [`KeyFile::to_text`] for the format).
    ///
    /// # Panics
    ///
    /// If the operating system cannot provide random bytes; use [`KeyFile::try_generate`] to
    /// get that as an error.
    pub fn generate() -> String {
        match Self::try_generate() {
            Ok(kf) => kf.to_text(),
            Err(e) => panic!("cannot generate a key file: {e}"),
        }
    }

    /// Generates a new key file with 32 random bytes.
    pub fn try_generate() -> Result<KeyFile> {
        let mut secret = vec![0u8; 32];
        random_bytes(&mut secret)?;
        Ok(KeyFile { secret })
    }

    /// Builds a key file from raw secret bytes (at least 32).
    pub fn from_secret(secret: Vec<u8>) -> Result<KeyFile> {
        if secret.len() < Self::MIN_SECRET_LEN {
            return Err(Error::invalid(format!(
                "key file secret has {} bytes; at least {} are required",
                secret.len(),
                Self::MIN_SECRET_LEN
            )));
        }
        Ok(KeyFile { secret })
    }

    /// The text content of the key file:
    /// `"# lifeboat key file v1\n<base64 of the secret>\n"`.
    pub fn to_text(&self) -> String {
        format!("{}\n{}\n", magic::KEYFILE_HEADER, B64.encode(&self.secret))
    }

    /// Parses the text written by [`KeyFile::to_text`]. Lines starting with `#` and blank lines
    /// are ignored, the remaining lines are concatenated and base64-decoded.
    pub fn parse(text: &str) -> Result<KeyFile> {
        if !text.trim_start().starts_with(magic::KEYFILE_HEADER) {
            return Err(Error::invalid(format!(
                "not a lifeboat key file (expected first line {:?})",
                magic::KEYFILE_HEADER
            )));
        }
        let body: String = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        let secret = B64.decode(body.as_bytes()).map_err(|e| {
            Error::with_source(
                ErrorKind::InvalidArgument,
                "key file is not valid base64",
                e,
            )
        })?;
        KeyFile::from_secret(secret)
    }

    fn kek(&self) -> [u8; 32] {
        blake3::derive_key(magic::CONTEXT_KEYFILE, &self.secret)
    }
}

/// What opens a key slot: a passphrase or a key file.
#[derive(Clone)]
pub enum Secret {
    /// A passphrase, stretched with Argon2id.
    Password(String),
    /// A key file.
    KeyFile(KeyFile),
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Password(_) => f.write_str("Secret::Password(<redacted>)"),
            Secret::KeyFile(_) => f.write_str("Secret::KeyFile(<redacted>)"),
        }
    }
}

/// The kind of a key slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeySlotKind {
    /// Opened with a passphrase (Argon2id).
    Password,
    /// Opened with a key file.
    Keyfile,
}

/// `kdf` member of a password key slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct KdfJson {
    pub algorithm: String,
    pub m_cost: u32,
    pub t_cost: u32,
    pub p_cost: u32,
    pub salt: String,
}

/// The JSON of a `keys/<id>` object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct KeySlot {
    pub version: u32,
    pub kind: KeySlotKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kdf: Option<KdfJson>,
    pub nonce: String,
    pub wrapped_key: String,
    pub created: jiff::Timestamp,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub label: String,
}

/// The AEAD that seals a repository's objects (config `encryption`): XChaCha20-Poly1305 or
/// AEGIS-256, both with the stored 24-byte nonce and a 16-byte tag (FORMAT.md, "Encryption").
#[derive(Clone)]
pub(crate) enum ObjectCipher {
    XChaCha20Poly1305(XChaCha20Poly1305),
    /// The AEGIS-256 key.
    Aegis256([u8; 32]),
}

/// AEGIS-256's 32-byte nonce: the stored 24 bytes, then 8 zero bytes.
fn aegis_nonce(nonce: &[u8; magic::NONCE_LEN]) -> aegis::aegis256::Nonce {
    let mut n = [0u8; 32];
    n[..magic::NONCE_LEN].copy_from_slice(nonce);
    n
}

impl ObjectCipher {
    /// Encrypts `buf` in place; returns the tag. Fails only for a message too large for the
    /// algorithm (XChaCha20: 256 GiB).
    pub fn seal_in_place(
        &self,
        nonce: &[u8; magic::NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; magic::TAG_LEN]> {
        match self {
            ObjectCipher::XChaCha20Poly1305(c) => c
                .encrypt_in_place_detached(XNonce::from_slice(nonce), aad, buf)
                .map(Into::into)
                .map_err(|_| Error::invalid("object too large to encrypt")),
            ObjectCipher::Aegis256(key) => Ok(
                aegis::aegis256::Aegis256::<{ magic::TAG_LEN }>::new(key, &aegis_nonce(nonce))
                    .encrypt_in_place(buf, aad),
            ),
        }
    }

    /// Authenticates and decrypts `buf` in place; `false` when authentication fails (the
    /// contents of `buf` are then unspecified).
    #[must_use]
    pub fn open_in_place(
        &self,
        nonce: &[u8; magic::NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; magic::TAG_LEN],
    ) -> bool {
        match self {
            ObjectCipher::XChaCha20Poly1305(c) => c
                .decrypt_in_place_detached(XNonce::from_slice(nonce), aad, buf, tag.into())
                .is_ok(),
            ObjectCipher::Aegis256(key) => {
                aegis::aegis256::Aegis256::<{ magic::TAG_LEN }>::new(key, &aegis_nonce(nonce))
                    .decrypt_in_place(buf, tag, aad)
                    .is_ok()
            }
        }
    }
}

/// The repository master key (32 random bytes) and the subkeys derived from it.
#[derive(Clone)]
pub(crate) struct Keys {
    master: [u8; 32],
    id_key: [u8; 32],
    mac_key: [u8; 32],
    cipher: ObjectCipher,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Keys(<redacted>)")
    }
}

impl Keys {
    pub fn generate() -> Result<Keys> {
        let mut master = [0u8; 32];
        random_bytes(&mut master)?;
        Ok(Keys::from_master(master))
    }

    /// The keys of `master` with the XChaCha20-Poly1305 object cipher (see [`Keys::for_cipher`]).
    pub fn from_master(master: [u8; 32]) -> Keys {
        let enc = blake3::derive_key(magic::CONTEXT_OBJECT_ENCRYPTION, &master);
        Keys {
            master,
            id_key: blake3::derive_key(magic::CONTEXT_CHUNK_ID, &master),
            mac_key: blake3::derive_key(magic::CONTEXT_CONFIG_MAC, &master),
            cipher: ObjectCipher::XChaCha20Poly1305(XChaCha20Poly1305::new(&enc.into())),
        }
    }

    /// The same keys with the object cipher `cipher` (its key derived from the master key).
    pub fn for_cipher(self, cipher: Cipher) -> Keys {
        let cipher = match cipher {
            Cipher::XChaCha20Poly1305 => return Keys::from_master(self.master),
            Cipher::Aegis256 => ObjectCipher::Aegis256(blake3::derive_key(
                magic::CONTEXT_OBJECT_ENCRYPTION_AEGIS256,
                &self.master,
            )),
        };
        Keys { cipher, ..self }
    }

    /// Keyed BLAKE3 with the id key.
    pub fn hash(&self, data: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.id_key, data).as_bytes()
    }

    /// The key of keyed-BLAKE3 object ids (for hashing chunks frame by frame).
    pub fn id_key(&self) -> &[u8; 32] {
        &self.id_key
    }

    pub fn mac(&self, data: &[u8]) -> blake3::Hash {
        blake3::keyed_hash(&self.mac_key, data)
    }

    pub fn cipher(&self) -> &ObjectCipher {
        &self.cipher
    }

    /// Wraps the master key into a new key slot.
    pub fn wrap(
        &self,
        secret: &Secret,
        kdf: KdfParams,
        hostname: &str,
        label: &str,
    ) -> Result<KeySlot> {
        let (kind, kdf_json, kek) = match secret {
            Secret::Password(pw) => {
                let mut salt = [0u8; 16];
                random_bytes(&mut salt)?;
                let kek = password_kek(pw, &salt, kdf)?;
                let json = KdfJson {
                    algorithm: "argon2id".to_owned(),
                    m_cost: kdf.m_cost,
                    t_cost: kdf.t_cost,
                    p_cost: kdf.p_cost,
                    salt: B64.encode(salt),
                };
                (KeySlotKind::Password, Some(json), kek)
            }
            Secret::KeyFile(kf) => (KeySlotKind::Keyfile, None, kf.kek()),
        };
        let mut nonce = [0u8; magic::NONCE_LEN];
        random_bytes(&mut nonce)?;
        let wrapped = XChaCha20Poly1305::new(&kek.into())
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &self.master,
                    aad: b"",
                },
            )
            .map_err(|_| Error::invalid("cannot wrap the master key"))?;
        Ok(KeySlot {
            version: magic::KEY_SLOT_VERSION,
            kind,
            kdf: kdf_json,
            nonce: B64.encode(nonce),
            wrapped_key: B64.encode(wrapped),
            created: jiff::Timestamp::now(),
            hostname: hostname.to_owned(),
            label: label.to_owned(),
        })
    }
}

fn password_kek(password: &str, salt: &[u8], kdf: KdfParams) -> Result<[u8; 32]> {
    let mut out = [0u8; 32];
    kdf.argon2()?
        .hash_password_into(password.as_bytes(), salt, &mut out)
        .map_err(|e| {
            Error::with_source(
                ErrorKind::InvalidArgument,
                "Argon2id key derivation failed",
                std::io::Error::other(e.to_string()),
            )
        })?;
    Ok(out)
}

impl KeySlot {
    /// Parses and checks a key slot's JSON. `name` names the slot in errors.
    pub fn parse(bytes: &[u8], name: &str) -> Result<KeySlot> {
        let slot: KeySlot = serde_json::from_slice(bytes).map_err(|e| {
            Error::with_source(
                ErrorKind::Corrupt,
                format!("key slot {name} is not valid JSON"),
                e,
            )
        })?;
        if slot.version != magic::KEY_SLOT_VERSION {
            return Err(Error::new(
                ErrorKind::UnsupportedVersion,
                format!("key slot {name} has unsupported version {}", slot.version),
            ));
        }
        Ok(slot)
    }

    /// Tries to unwrap the master key with `secret`. `Ok(None)`: the secret does not open this
    /// slot (wrong passphrase, wrong key file, or a slot of the other kind).
    pub fn unwrap_key(&self, secret: &Secret, name: &str) -> Result<Option<Keys>> {
        let kek = match (secret, self.kind) {
            (Secret::Password(pw), KeySlotKind::Password) => {
                let Some(kdf) = &self.kdf else {
                    return Err(Error::corrupt(format!(
                        "password key slot {name} has no kdf parameters"
                    )));
                };
                if kdf.algorithm != "argon2id" {
                    return Err(Error::new(
                        ErrorKind::UnsupportedVersion,
                        format!("key slot {name} uses unknown kdf {:?}", kdf.algorithm),
                    ));
                }
                let salt = decode_b64(&kdf.salt, name, "salt")?;
                let params = KdfParams::new(kdf.m_cost, kdf.t_cost, kdf.p_cost);
                password_kek(pw, &salt, params).map_err(|e| {
                    Error::with_source(
                        ErrorKind::Corrupt,
                        format!("key slot {name} has unusable kdf parameters"),
                        e,
                    )
                })?
            }
            (Secret::KeyFile(kf), KeySlotKind::Keyfile) => kf.kek(),
            _ => return Ok(None),
        };
        let nonce = decode_b64(&self.nonce, name, "nonce")?;
        if nonce.len() != magic::NONCE_LEN {
            return Err(Error::corrupt(format!(
                "key slot {name} has a nonce of {} bytes",
                nonce.len()
            )));
        }
        let wrapped = decode_b64(&self.wrapped_key, name, "wrapped_key")?;
        let Ok(master) = XChaCha20Poly1305::new(&kek.into()).decrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: &wrapped,
                aad: b"",
            },
        ) else {
            return Ok(None);
        };
        let master: [u8; 32] = master.as_slice().try_into().map_err(|_| {
            Error::corrupt(format!(
                "key slot {name} holds a master key of {} bytes",
                master.len()
            ))
        })?;
        Ok(Some(Keys::from_master(master)))
    }
}

fn decode_b64(s: &str, name: &str, field: &str) -> Result<Vec<u8>> {
    B64.decode(s.as_bytes()).map_err(|e| {
        Error::with_source(
            ErrorKind::Corrupt,
            format!("key slot {name}: field {field} is not valid base64"),
            e,
        )
    })
}

#[cfg(test)]
mod tests;
