//! Chunks: hashing, sealing and opening them (no I/O), and storing and loading them.

use super::{chunk_key, object_read_error, ChunkBuffers, ChunkHash, Repository, SealedChunk};
use crate::error::{Error, ErrorKind, Result};
use crate::id::ChunkId;
use crate::magic;
use crate::object;

impl Repository {
    // ---- pure CPU work ----

    /// The id of a chunk with this plaintext. No I/O.
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        ChunkId::from_bytes(object::object_hash(self.keys.as_ref(), data))
    }

    pub(super) fn check_chunk_len(&self, len: usize) -> Result<()> {
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
    pub(super) fn opener(&self, key: &str) -> Result<crate::framed::Opener<'_>> {
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
    pub(super) fn deltas(&self) -> bool {
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
    pub(super) fn read_base(
        &self,
        base: &[u8; 32],
        key: &str,
        buf: &mut Vec<u8>,
    ) -> Result<String> {
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
        self.list_ids(magic::PREFIX_CHUNKS)
    }

    /// The stored chunks whose id starts with a byte in `first` (one listing per byte: a part
    /// of a large repository at a time), sorted.
    pub fn list_chunks_in(&self, first: std::ops::RangeInclusive<u8>) -> Result<Vec<ChunkId>> {
        let mut ids: Vec<ChunkId> = Vec::new();
        for b in first {
            let part: Vec<ChunkId> = self.list_ids(&format!("{}{b:02x}/", magic::PREFIX_CHUNKS))?;
            ids.extend(part.into_iter().filter(|id| id.as_bytes()[0] == b));
        }
        Ok(ids)
    }
}
