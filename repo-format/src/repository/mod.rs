//! The repository: config, key slots and typed object access over a [`Backend`].

use std::sync::Arc;

use crate::backend::Backend;
use crate::config::{validate_chunk_size, Cipher, Config, EncryptionScheme};
use crate::crypto::{random_bytes, KdfParams, KeySlot, KeySlotKind, Keys, Secret};
use crate::error::{Error, ErrorKind, Result};
use crate::id::{ChunkId, IndexId, KeySlotId, SnapshotId};
use crate::index::DiskIndex;
use crate::magic;
use crate::manifest::Manifest;
use crate::object;

/// Default chunk size: 1 MiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Smallest chunk size: 64 KiB (QEMU's dirty-bitmap granularity).
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// Largest chunk size: 16 MiB.
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Default zstd level of new repositories: 1. On the 64 KiB frames Lifeboat compresses, level 1
/// costs about a quarter less CPU than zstd's own default, 3, for about 2 % more stored data
/// (2 GiB mixed disk, docs/BENCHMARKS.md); a backup agent shares the host's cores with its VMs.
/// Proxmox Backup Server compresses its chunks at level 1 too. The level is the repository's
/// (`repo init --zstd-level`); readers do not depend on it.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
/// Default frame size of new repositories: 64 KiB, QEMU's default dirty-bitmap granularity,
/// so that an incremental backup reads and seals only the 64 KiB frames a guest changed.
pub const DEFAULT_FRAME_SIZE: u32 = 64 << 10;

/// Whether and how to encrypt a new repository.
#[derive(Debug, Clone)]
pub enum Encryption {
    /// Encrypt; the first key slot opens with `secret`.
    Encrypted {
        /// Passphrase or key file for the first key slot.
        secret: Secret,
        /// Argon2id parameters for a passphrase slot (ignored for key files).
        kdf: KdfParams,
    },
    /// No encryption (ids are plain BLAKE3, objects are only compressed).
    None,
}

/// Options of [`Repository::init`].
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Encryption.
    pub encryption: Encryption,
    /// Chunk size: a power of two between 64 KiB and 16 MiB.
    pub chunk_size: u32,
    /// zstd compression level.
    pub zstd_level: i32,
    /// Frame size of chunk objects (`None`: unframed, a version-1 repository). A frame size
    /// not smaller than the chunk size means unframed too.
    pub frame_size: Option<u32>,
    /// The object cipher of an encrypted repository (ignored with [`Encryption::None`]).
    pub cipher: Cipher,
}

impl InitOptions {
    /// Default chunk size and compression with the given encryption.
    pub fn new(encryption: Encryption) -> Self {
        InitOptions {
            encryption,
            chunk_size: DEFAULT_CHUNK_SIZE,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            frame_size: Some(DEFAULT_FRAME_SIZE),
            cipher: Cipher::preferred(),
        }
    }
}

/// A chunk's id, with the chaining values of its frames when it is to be sealed framed (from
/// [`Repository::hash_chunk`], for [`Repository::try_seal_hashed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkHash {
    /// The chunk id.
    pub id: ChunkId,
    cvs: Vec<[u8; 32]>,
}

/// A chunk ready to store: its id, sealed bytes and plaintext length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedChunk {
    /// The chunk id.
    pub id: ChunkId,
    /// The sealed object bytes (header, nonce, ciphertext).
    pub bytes: Vec<u8>,
    /// Length of the plaintext chunk.
    pub plain_len: usize,
}

/// Buffers reused by [`Repository::load_chunk_into`] from one chunk to the next (one set per
/// worker thread).
#[derive(Debug, Default)]
pub struct ChunkBuffers {
    sealed: Vec<u8>,
    /// A delta object's base.
    base: Vec<u8>,
    plain: Vec<u8>,
}

/// Public description of a key slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlotInfo {
    /// Slot id.
    pub id: KeySlotId,
    /// Password or key file.
    pub kind: KeySlotKind,
    /// When the slot was created.
    pub created: jiff::Timestamp,
    /// Host that created it.
    pub hostname: String,
    /// User label.
    pub label: String,
}

/// An open repository. `Send + Sync`; share it with `Arc`.
///
/// The pure methods ([`Repository::chunk_id`], [`Repository::seal_chunk`],
/// [`Repository::open_chunk`]) do no I/O and can run on a CPU thread pool; the others call the
/// backend.
#[derive(Debug)]
pub struct Repository {
    backend: Arc<dyn Backend>,
    config: Config,
    keys: Option<Keys>,
}

mod framing;

fn chunk_key(id: &ChunkId) -> String {
    let h = id.to_hex();
    format!("{}{}/{}", magic::PREFIX_CHUNKS, &h[..2], h)
}

fn index_key(id: &IndexId) -> String {
    let h = id.to_hex();
    format!("{}{}/{}", magic::PREFIX_INDEXES, &h[..2], h)
}

fn snapshot_key(id: &SnapshotId) -> String {
    format!("{}{}", magic::PREFIX_SNAPSHOTS, id.to_hex())
}

fn key_slot_key(id: &KeySlotId) -> String {
    format!("{}{}", magic::PREFIX_KEYS, id.to_hex())
}

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

    /// The config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The chunk size.
    pub fn chunk_size(&self) -> u32 {
        self.config.chunk_size
    }

    /// The frame size of chunk objects, `None` when chunks are sealed unframed.
    pub fn frame_size(&self) -> Option<u32> {
        self.config.frame_size
    }

    /// The frame size as a `usize`, when a chunk of `len` bytes is sealed framed.
    fn framing(&self, len: usize) -> Option<usize> {
        let fs = self.config.frame_size? as usize;
        crate::framed::frames_for(len, fs).map(|_| fs)
    }

    /// Whether objects are encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.keys.is_some()
    }

    /// The random repository id (32 hex digits).
    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The object keys (none when unencrypted), for sealing other object kinds in this crate.
    pub(crate) fn keys(&self) -> Option<&Keys> {
        self.keys.as_ref()
    }

    /// Reads an object, mapping a missing one to [`ErrorKind::NotFound`] naming it.
    pub(crate) fn get_named(&self, key: &str, what: &str) -> Result<Vec<u8>> {
        self.get_object(key, what)
    }

    // ---- pure CPU work ----

    /// The id of a chunk with this plaintext. No I/O.
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        ChunkId::from_bytes(object::object_hash(self.keys.as_ref(), data))
    }

    fn check_chunk_len(&self, len: usize) -> Result<()> {
        if len > self.chunk_limit() {
            return Err(Error::invalid(format!(
                "chunk of {len} bytes exceeds the chunk size {}",
                self.config.chunk_size
            )));
        }
        Ok(())
    }

    /// Hashes, compresses and encrypts a chunk. No I/O.
    ///
    /// # Panics
    ///
    /// If `data` is longer than the chunk size (a caller bug: such a chunk could never be
    /// opened) or the operating system cannot provide random bytes for the nonce. Use
    /// [`Repository::try_seal_chunk`] to get these as errors.
    pub fn seal_chunk(&self, data: &[u8]) -> SealedChunk {
        match self.try_seal_chunk(data) {
            Ok(sealed) => sealed,
            Err(e) => panic!("cannot seal chunk: {e}"),
        }
    }

    /// Like [`Repository::seal_chunk`], but returns [`ErrorKind::InvalidArgument`] for a chunk
    /// longer than the chunk size and [`ErrorKind::Io`] if no random nonce is available.
    pub fn try_seal_chunk(&self, data: &[u8]) -> Result<SealedChunk> {
        self.check_chunk_len(data.len())?;
        let hash = self.hash_chunk(data);
        self.try_seal_hashed(&hash, data)
    }

    /// Like [`Repository::seal_chunk`] for a caller that already computed the chunk's id with
    /// [`Repository::chunk_id`] (to look it up before sealing): saves hashing the chunk twice.
    ///
    /// The caller guarantees `id == self.chunk_id(data)`; an object sealed under another id
    /// can never be opened ([`Repository::open_chunk`] re-hashes and reports it corrupt).
    ///
    /// # Panics
    ///
    /// Like [`Repository::seal_chunk`]; use [`Repository::try_seal_chunk_with_id`] to get errors.
    pub fn seal_chunk_with_id(&self, id: &ChunkId, data: &[u8]) -> SealedChunk {
        match self.try_seal_chunk_with_id(id, data) {
            Ok(sealed) => sealed,
            Err(e) => panic!("cannot seal chunk: {e}"),
        }
    }

    /// Like [`Repository::seal_chunk_with_id`], with errors as [`Repository::try_seal_chunk`].
    ///
    /// In a repository with frames, the frames' chaining values are computed here (a second
    /// hashing pass): use [`Repository::hash_chunk`] and [`Repository::try_seal_hashed`] to hash
    /// once.
    pub fn try_seal_chunk_with_id(&self, id: &ChunkId, data: &[u8]) -> Result<SealedChunk> {
        self.check_chunk_len(data.len())?;
        debug_assert!(
            *id == self.chunk_id(data),
            "try_seal_chunk_with_id: id does not match the data"
        );
        let hash = match self.framing(data.len()) {
            Some(_) => self.hash_chunk(data),
            None => ChunkHash {
                id: *id,
                cvs: Vec::new(),
            },
        };
        self.try_seal_hashed(&hash, data)
    }

    /// Verifies, decrypts and decompresses a sealed chunk and checks it hashes to `id`. No I/O.
    /// Any mismatch is [`ErrorKind::Corrupt`]. A delta object (FORMAT.md 1.6b) needs its base,
    /// which this cannot read: [`ErrorKind::InvalidArgument`] (use [`Repository::load_chunk`]).
    pub fn open_chunk(&self, id: &ChunkId, bytes: &[u8]) -> Result<Vec<u8>> {
        self.open_chunk_vec(id, bytes.to_vec(), &chunk_key(id))
    }

    fn open_chunk_vec(&self, id: &ChunkId, mut bytes: Vec<u8>, key: &str) -> Result<Vec<u8>> {
        if crate::framed::base_of(&bytes).is_some() {
            return Err(Error::invalid(format!(
                "chunk {key} is a delta object: it opens only with its base (load_chunk)"
            )));
        }
        if crate::framed::is_framed(&bytes) {
            let mut out = Vec::new();
            self.open_framed(id, &mut bytes, None, key, &mut out)?;
            return Ok(out);
        }
        object::open(
            self.keys.as_ref(),
            magic::KIND_CHUNK,
            id.as_bytes(),
            bytes,
            self.chunk_limit(),
            key,
        )
    }

    /// How framed objects of this repository are read; an error for a repository without
    /// frames, where `key` (a framed object) is corrupt.
    fn opener(&self, key: &str) -> Result<crate::framed::Opener<'_>> {
        let Some(fs) = self.config.frame_size else {
            return Err(Error::corrupt(format!(
                "object {key} is corrupt: a framed chunk in a repository without frames"
            )));
        };
        Ok(crate::framed::Opener {
            keys: self.keys.as_ref(),
            frame_size: fs as usize,
            limit: self.chunk_limit(),
            deltas: self.deltas(),
        })
    }

    /// Whether this repository's chunk objects may be delta objects (version 3).
    fn deltas(&self) -> bool {
        self.config.version == magic::CONFIG_VERSION_DELTA
    }

    fn open_framed(
        &self,
        id: &ChunkId,
        sealed: &mut [u8],
        base: Option<crate::framed::BaseObject<'_>>,
        key: &str,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        crate::framed::open_into(self.opener(key)?, id.as_bytes(), sealed, base, key, out)
    }

    /// Reads into `buf` the base object a delta object (`key`) names, or says why it cannot:
    /// a missing or unreadable base makes the delta object corrupt. Returns the base's key.
    fn read_base(&self, base: &[u8; 32], key: &str, buf: &mut Vec<u8>) -> Result<String> {
        let base_key = chunk_key(&ChunkId::from_bytes(*base));
        self.backend.get_into(&base_key, buf).map_err(|e| {
            Error::with_source(
                ErrorKind::Corrupt,
                format!("object {key} is corrupt: cannot read its base object {base_key}"),
                e,
            )
        })?;
        Ok(base_key)
    }

    fn chunk_limit(&self) -> usize {
        usize::try_from(self.config.chunk_size).unwrap_or(usize::MAX)
    }

    // ---- I/O ----

    /// Stores a sealed chunk; `false` if it was already stored.
    pub fn store_chunk(&self, chunk: &SealedChunk) -> Result<bool> {
        self.backend
            .put_if_absent(&chunk_key(&chunk.id), &chunk.bytes)
    }

    /// The base object a stored chunk's object depends on: `Some` for a delta object (FORMAT.md
    /// 1.6b), read from its header without authenticating it (opening the chunk does that).
    /// `None` for any other object, and in a repository without delta objects (nothing read).
    pub fn chunk_base(&self, id: &ChunkId) -> Result<Option<ChunkId>> {
        if !self.deltas() {
            return Ok(None);
        }
        let key = chunk_key(id);
        let (head, _) = self
            .backend
            .get_head(&key, crate::framed::DELTA_HEAD_LEN)
            .map_err(|e| object_read_error(e, &key, "chunk"))?;
        Ok(crate::framed::base_of(&head).map(ChunkId::from_bytes))
    }

    /// Whether a chunk is stored.
    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool> {
        self.backend.exists(&chunk_key(id))
    }

    /// Loads and verifies a chunk.
    pub fn load_chunk(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let key = chunk_key(id);
        let bytes = self.get_object(&key, "chunk")?;
        if crate::framed::base_of(&bytes).is_none() {
            return self.open_chunk_vec(id, bytes, &key);
        }
        let mut bufs = ChunkBuffers {
            sealed: bytes,
            ..ChunkBuffers::default()
        };
        self.open_loaded(id, &key, &mut bufs)?;
        Ok(bufs.plain)
    }

    /// Like [`Repository::load_chunk`], into buffers the caller reuses from one chunk to the
    /// next (no allocation or first-touch page faults once they have grown to a chunk): the
    /// object is read into `bufs`, decrypted in place and decompressed into its second buffer.
    /// Returns the verified plaintext, borrowed from `bufs`.
    pub fn load_chunk_into<'a>(
        &self,
        id: &ChunkId,
        bufs: &'a mut ChunkBuffers,
    ) -> Result<&'a [u8]> {
        let key = chunk_key(id);
        self.backend
            .get_into(&key, &mut bufs.sealed)
            .map_err(|e| object_read_error(e, &key, "chunk"))?;
        self.open_loaded(id, &key, bufs)
    }

    /// Opens the chunk object read into `bufs.sealed` (a delta object's base read into
    /// `bufs.base`); returns the plaintext, in `bufs.plain` or, for an unframed object,
    /// possibly in `bufs.sealed`.
    fn open_loaded<'a>(
        &self,
        id: &ChunkId,
        key: &str,
        bufs: &'a mut ChunkBuffers,
    ) -> Result<&'a [u8]> {
        if let Some(base) = crate::framed::base_of(&bufs.sealed) {
            let base_key = self.read_base(&base, key, &mut bufs.base)?;
            let base = crate::framed::BaseObject {
                sealed: &mut bufs.base,
                name: &base_key,
            };
            self.open_framed(id, &mut bufs.sealed, Some(base), key, &mut bufs.plain)?;
            return Ok(&bufs.plain);
        }
        if crate::framed::is_framed(&bufs.sealed) {
            self.open_framed(id, &mut bufs.sealed, None, key, &mut bufs.plain)?;
            return Ok(&bufs.plain);
        }
        object::open_into(
            self.keys.as_ref(),
            magic::KIND_CHUNK,
            id.as_bytes(),
            &mut bufs.sealed,
            self.chunk_limit(),
            key,
            &mut bufs.plain,
        )
    }

    /// Every stored chunk id (keys under `chunks/` that are not chunk names are skipped).
    pub fn list_chunks(&self) -> Result<Vec<ChunkId>> {
        let mut ids: Vec<ChunkId> = self
            .backend
            .list(magic::PREFIX_CHUNKS)?
            .iter()
            .filter_map(|k| k.rsplit('/').next().and_then(|n| n.parse().ok()))
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Every stored index id (keys under `indexes/` that are not index names are skipped).
    pub fn list_indexes(&self) -> Result<Vec<IndexId>> {
        let mut ids: Vec<IndexId> = self
            .backend
            .list(magic::PREFIX_INDEXES)?
            .iter()
            .filter_map(|k| k.rsplit('/').next().and_then(|n| n.parse().ok()))
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Seals and stores a disk index; returns its id (storing an existing index is a no-op).
    pub fn store_index(&self, index: &DiskIndex) -> Result<IndexId> {
        let plain = index.encode()?;
        let id = IndexId::from_bytes(object::object_hash(self.keys.as_ref(), &plain));
        let sealed = object::seal(
            self.keys.as_ref(),
            magic::KIND_INDEX,
            id.as_bytes(),
            &plain,
            self.config.zstd_level,
        )?;
        self.backend.put_if_absent(&index_key(&id), &sealed)?;
        Ok(id)
    }

    /// Loads and verifies a disk index.
    pub fn load_index(&self, id: &IndexId) -> Result<DiskIndex> {
        let key = index_key(id);
        let bytes = self.get_object(&key, "index")?;
        let plain = object::open(
            self.keys.as_ref(),
            magic::KIND_INDEX,
            id.as_bytes(),
            bytes,
            magic::MAX_METADATA_OBJECT,
            &key,
        )?;
        DiskIndex::decode(&plain).map_err(|e| e.wrap(format!("object {key} is corrupt")))
    }

    /// Commits a snapshot by writing its manifest, which must come after every chunk and index
    /// it references. Checks that the disks' indexes exist, makes everything stored so far
    /// durable ([`Backend::flush`]) before writing the manifest, and the manifest durable before
    /// returning. Returns the snapshot id.
    pub fn commit_snapshot(&self, manifest: &Manifest) -> Result<SnapshotId> {
        for disk in &manifest.disks {
            if !self.backend.exists(&index_key(&disk.index))? {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "cannot commit snapshot of {}: index {} of disk {} is not stored",
                        manifest.name, disk.index, disk.name
                    ),
                ));
            }
        }
        let plain = manifest.encode()?;
        let id = SnapshotId::from_bytes(object::object_hash(self.keys.as_ref(), &plain));
        let sealed = object::seal(
            self.keys.as_ref(),
            magic::KIND_MANIFEST,
            id.as_bytes(),
            &plain,
            self.config.zstd_level,
        )?;
        // Chunks and indexes first: a committed snapshot never refers to a lost object.
        self.backend.flush()?;
        self.backend.put_if_absent(&snapshot_key(&id), &sealed)?;
        self.backend.flush()?;
        Ok(id)
    }

    /// Loads and verifies a snapshot manifest.
    pub fn load_snapshot(&self, id: &SnapshotId) -> Result<Manifest> {
        let key = snapshot_key(id);
        let bytes = self.get_object(&key, "snapshot")?;
        let plain = object::open(
            self.keys.as_ref(),
            magic::KIND_MANIFEST,
            id.as_bytes(),
            bytes,
            magic::MAX_METADATA_OBJECT,
            &key,
        )?;
        Manifest::decode(&plain).map_err(|e| e.wrap(format!("object {key} is corrupt")))
    }

    /// Every snapshot id (without loading manifests), sorted by id.
    pub fn list_snapshot_ids(&self) -> Result<Vec<SnapshotId>> {
        let mut ids = Vec::new();
        for key in self.backend.list(magic::PREFIX_SNAPSHOTS)? {
            let name = key.strip_prefix(magic::PREFIX_SNAPSHOTS).unwrap_or(&key);
            let id: SnapshotId = name.parse().map_err(|e: Error| {
                Error::with_source(
                    ErrorKind::Corrupt,
                    format!("object {key} has an invalid snapshot name"),
                    e,
                )
            })?;
            ids.push(id);
        }
        ids.sort_unstable();
        Ok(ids)
    }

    /// Every snapshot with its manifest, sorted by time (then id). A manifest that does not
    /// verify is an error naming it.
    pub fn list_snapshots(&self) -> Result<Vec<(SnapshotId, Manifest)>> {
        let mut out = Vec::new();
        for id in self.list_snapshot_ids()? {
            out.push((id, self.load_snapshot(&id)?));
        }
        out.sort_by_key(|a| (a.1.time, a.0));
        Ok(out)
    }

    /// Resolves a snapshot reference:
    /// - a unique hex prefix of a snapshot id (at least 4 digits);
    /// - `NAME@latest`: the latest snapshot of `NAME`;
    /// - `NAME@TIME`: the latest snapshot of `NAME` at or before `TIME`, an RFC 3339 timestamp
    ///   (`2024-05-01T10:00:00Z`), a civil date-time taken as UTC (`2024-05-01T10:00:00`) or a
    ///   date (`2024-05-01`, meaning the end of that day, UTC).
    pub fn resolve(&self, reference: &str) -> Result<SnapshotId> {
        if let Some((name, when)) = reference.rsplit_once('@') {
            return self.resolve_by_name(name, when);
        }
        let prefix = reference.to_ascii_lowercase();
        if prefix.len() < 4 || prefix.len() > 64 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::invalid(format!(
                "invalid snapshot reference {reference:?}: expected an id prefix of 4 to 64 hex \
                 digits, NAME@latest or NAME@TIME"
            )));
        }
        let matches: Vec<SnapshotId> = self
            .list_snapshot_ids()?
            .into_iter()
            .filter(|id| id.to_hex().starts_with(&prefix))
            .collect();
        match matches.as_slice() {
            [] => Err(Error::new(
                ErrorKind::NotFound,
                format!("no snapshot id starts with {reference}"),
            )),
            [one] => Ok(*one),
            more => Err(Error::new(
                ErrorKind::Ambiguous,
                format!(
                    "snapshot id prefix {reference} matches {} snapshots; use more digits",
                    more.len()
                ),
            )),
        }
    }

    fn resolve_by_name(&self, name: &str, when: &str) -> Result<SnapshotId> {
        if name.is_empty() {
            return Err(Error::invalid(
                "snapshot reference has an empty name before `@`",
            ));
        }
        let limit = if when == "latest" {
            None
        } else {
            Some(parse_time(when)?)
        };
        let found = self
            .list_snapshots()?
            .into_iter()
            .rfind(|(_, m)| m.name == name && limit.is_none_or(|t| m.time <= t));
        found.map(|(id, _)| id).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                match limit {
                    None => format!("no snapshot of {name}"),
                    Some(t) => format!("no snapshot of {name} at or before {t}"),
                },
            )
        })
    }

    fn get_object(&self, key: &str, what: &str) -> Result<Vec<u8>> {
        self.backend
            .get(key)
            .map_err(|e| object_read_error(e, key, what))
    }
}

fn object_read_error(e: Error, key: &str, what: &str) -> Error {
    let kind = e.kind();
    let msg = if kind == ErrorKind::NotFound {
        format!("{what} {key} not found")
    } else {
        format!("cannot read {what} {key}")
    };
    Error::with_source(kind, msg, e)
}

fn parse_time(s: &str) -> Result<jiff::Timestamp> {
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        return Ok(t);
    }
    if let Ok(dt) = s.parse::<jiff::civil::DateTime>() {
        if s.contains('T') || s.contains(' ') {
            if let Ok(z) = dt.to_zoned(jiff::tz::TimeZone::UTC) {
                return Ok(z.timestamp());
            }
        }
    }
    if let Ok(d) = s.parse::<jiff::civil::Date>() {
        let end = d
            .tomorrow()
            .ok()
            .and_then(|t| t.to_zoned(jiff::tz::TimeZone::UTC).ok())
            .and_then(|z| {
                z.timestamp()
                    .checked_sub(jiff::SignedDuration::from_nanos(1))
                    .ok()
            });
        if let Some(t) = end {
            return Ok(t);
        }
    }
    Err(Error::invalid(format!(
        "invalid time {s:?}: expected `latest`, an RFC 3339 timestamp or a date (YYYY-MM-DD)"
    )))
}
