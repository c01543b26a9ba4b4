//! Creating and opening a repository, and its key slots.

use std::sync::Arc;

use super::{key_slot_key, Encryption, InitOptions, KeySlotInfo, Repository};
use crate::backend::Backend;
use crate::config::{validate_chunk_size, Config, EncryptionScheme};
use crate::crypto::{random_bytes, KdfParams, KeySlot, Keys, Secret};
use crate::error::{Error, ErrorKind, Result};
use crate::id::KeySlotId;
use crate::magic;

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

impl Repository {
    /// Creates a repository on an empty backend: writes the first key slot (if encrypted) and
    /// then the config. Fails with [`ErrorKind::AlreadyExists`] if a config exists.
    pub fn init(backend: Arc<dyn Backend>, opts: InitOptions) -> Result<Repository> {
        validate_chunk_size(opts.chunk_size)?;
        let frame_size = opts.frame_size.filter(|f| *f < opts.chunk_size);
        if let Some(f) = frame_size {
            crate::config::validate_frame_size(f, opts.chunk_size)?;
        }
        if !(zstd::compression_level_range()).contains(&opts.zstd_level) {
            return Err(Error::invalid(format!(
                "zstd level {} is out of range",
                opts.zstd_level
            )));
        }
        if backend.exists(magic::KEY_CONFIG)? {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                "a repository already exists here",
            ));
        }
        let mut rid = [0u8; 16];
        random_bytes(&mut rid)?;
        let (keys, scheme) = match &opts.encryption {
            Encryption::Encrypted { .. } => (
                Some(Keys::generate()?.for_cipher(opts.cipher)),
                opts.cipher.scheme(),
            ),
            Encryption::None => (None, EncryptionScheme::None),
        };
        let mut config = Config {
            format: magic::CONFIG_FORMAT.to_owned(),
            version: if frame_size.is_some() {
                magic::CONFIG_VERSION_DELTA
            } else {
                magic::CONFIG_VERSION
            },
            id: hex::encode(rid),
            chunk_size: opts.chunk_size,
            encryption: scheme,
            compression: magic::COMPRESSION_ZSTD.to_owned(),
            zstd_level: opts.zstd_level,
            frame_size,
            mac: None,
        };
        if let Some(k) = &keys {
            config.mac = Some(k.mac(&config.canonical_without_mac()?).to_hex().to_string());
        }
        let repo = Repository {
            backend,
            config,
            keys,
        };
        let first_slot = match &opts.encryption {
            Encryption::Encrypted { secret, kdf } => {
                Some(repo.add_key(secret, *kdf, "initial key")?)
            }
            Encryption::None => None,
        };
        let json = serde_json::to_vec_pretty(&repo.config).map_err(|e| {
            Error::with_source(ErrorKind::InvalidArgument, "cannot encode config", e)
        })?;
        if !repo.backend.put_if_absent(magic::KEY_CONFIG, &json)? {
            if let Some(slot) = first_slot {
                // Best effort: an orphan slot is harmless (its key fails the config MAC).
                let _ = repo.backend.delete(&key_slot_key(&slot));
            }
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                "a repository was initialised here concurrently",
            ));
        }
        repo.backend.flush()?;
        Ok(repo)
    }

    /// Opens a repository. An encrypted repository needs a `secret` that opens one of its key
    /// slots ([`ErrorKind::WrongKey`] otherwise); the config MAC is then verified.
    pub fn open(backend: Arc<dyn Backend>, secret: Option<&Secret>) -> Result<Repository> {
        let bytes = match backend.get(magic::KEY_CONFIG) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Error::with_source(
                    ErrorKind::NotARepository,
                    "not a lifeboat repository: no config",
                    e,
                ))
            }
            Err(e) => return Err(e.wrap("cannot read the repository config")),
        };
        let (config, canonical) = Config::parse(&bytes)?;
        let keys = match config.encryption.cipher() {
            None => None,
            Some(cipher) => {
                let Some(secret) = secret else {
                    return Err(Error::new(
                        ErrorKind::WrongKey,
                        "the repository is encrypted: a passphrase or key file is required",
                    ));
                };
                let expected = config
                    .mac
                    .as_deref()
                    // Exactly the lower-case hex the writer produces: no alternative spellings.
                    .filter(|m| m.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
                    .and_then(|m| hex::decode(m).ok())
                    .and_then(|m| <[u8; 32]>::try_from(m).ok())
                    .map(blake3::Hash::from_bytes);
                let keys = Self::unlock(backend.as_ref(), secret, |k| {
                    expected.is_some_and(|m| k.mac(&canonical) == m)
                })?;
                Some(keys.for_cipher(cipher))
            }
        };
        Ok(Repository {
            backend,
            config,
            keys,
        })
    }

    /// Finds a key slot that opens with `secret` and yields a master key under which the config
    /// MAC verifies (`config_ok`). A slot that opens but fails the MAC (e.g. an orphan left by a
    /// lost `init` race) is passed over; if only such slots open, the config is corrupt.
    fn unlock(
        backend: &dyn Backend,
        secret: &Secret,
        config_ok: impl Fn(&Keys) -> bool,
    ) -> Result<Keys> {
        let mut slots = backend.list(magic::PREFIX_KEYS)?;
        slots.sort();
        let mut skipped = 0usize;
        let mut bad_mac = 0usize;
        for key in &slots {
            let parsed = backend
                .get(key)
                .and_then(|b| KeySlot::parse(&b, key))
                .and_then(|s| s.unwrap_key(secret, key));
            match parsed {
                Ok(Some(keys)) if config_ok(&keys) => return Ok(keys),
                Ok(Some(_)) => bad_mac += 1,
                Ok(None) => {}
                // A damaged or newer slot must not lock the user out of the other slots.
                Err(_) => skipped += 1,
            }
        }
        if bad_mac > 0 {
            return Err(Error::corrupt(
                "object config is corrupt: its MAC does not verify under the unlocked key \
                 (tampered config)",
            ));
        }
        let mut msg = format!(
            "no key slot opens with the given {} ({} slot(s) tried",
            match secret {
                Secret::Password(_) => "passphrase",
                Secret::KeyFile(_) => "key file",
            },
            slots.len()
        );
        if skipped > 0 {
            msg.push_str(&format!(", {skipped} unreadable"));
        }
        msg.push(')');
        Err(Error::new(ErrorKind::WrongKey, msg))
    }

    /// Adds a key slot opening this repository with `secret`.
    pub fn add_key(&self, secret: &Secret, kdf: KdfParams, label: &str) -> Result<KeySlotId> {
        let Some(keys) = &self.keys else {
            return Err(Error::invalid(
                "the repository is not encrypted: it has no keys",
            ));
        };
        let slot = keys.wrap(secret, kdf, &hostname(), label)?;
        let json = serde_json::to_vec_pretty(&slot).map_err(|e| {
            Error::with_source(ErrorKind::InvalidArgument, "cannot encode key slot", e)
        })?;
        let mut raw = [0u8; 32];
        random_bytes(&mut raw)?;
        let id = KeySlotId::from_bytes(raw);
        if !self.backend.put_if_absent(&key_slot_key(&id), &json)? {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("key slot {id} already exists"),
            ));
        }
        self.backend.flush()?;
        Ok(id)
    }

    /// The key slots, sorted by creation time. Unreadable slots are an error naming them.
    pub fn list_keys(&self) -> Result<Vec<KeySlotInfo>> {
        let mut out = Vec::new();
        for key in self.backend.list(magic::PREFIX_KEYS)? {
            let name = key.strip_prefix(magic::PREFIX_KEYS).unwrap_or(&key);
            let id: KeySlotId = name
                .parse()
                .map_err(|e: Error| e.wrap(format!("key slot {key} has an invalid name")))?;
            let slot = KeySlot::parse(&self.backend.get(&key)?, &key)?;
            out.push(KeySlotInfo {
                id,
                kind: slot.kind,
                created: slot.created,
                hostname: slot.hostname,
                label: slot.label,
            });
        }
        out.sort_by_key(|a| (a.created, a.id));
        Ok(out)
    }

    /// Removes a key slot. Refuses to remove the last one.
    pub fn remove_key(&self, id: &KeySlotId) -> Result<()> {
        let key = key_slot_key(id);
        if !self.backend.exists(&key)? {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("key slot {id} not found"),
            ));
        }
        if self.backend.list(magic::PREFIX_KEYS)?.len() <= 1 {
            return Err(Error::invalid(format!(
                "key slot {id} is the last one: removing it would make the repository unreadable"
            )));
        }
        self.backend.delete(&key)
    }
}
