//! The framed-chunk half of [`Repository`]'s chunk API (FORMAT.md 1.6a): hashing a chunk with
//! its frames' chaining values, sealing it framed, and sealing a new version of a framed chunk
//! from its changed frames.

use super::{chunk_key, ChunkHash, Repository, SealedChunk};
use crate::error::{Error, Result};
use crate::id::ChunkId;
use crate::magic;
use crate::object;

impl Repository {
    /// The id of a chunk with this plaintext and, when it is to be sealed framed, its frames'
    /// chaining values (one hashing pass either way). No I/O.
    pub fn hash_chunk(&self, data: &[u8]) -> ChunkHash {
        match self.framing(data.len()) {
            Some(fs) => {
                let cvs = crate::framed::frame_cvs(self.keys.as_ref(), data, fs);
                let id = ChunkId::from_bytes(crate::framed::merge_root(self.keys.as_ref(), &cvs));
                ChunkHash { id, cvs }
            }
            None => ChunkHash {
                id: self.chunk_id(data),
                cvs: Vec::new(),
            },
        }
    }

    /// Compresses and encrypts a chunk hashed by [`Repository::hash_chunk`] (`hash` must come
    /// from `data`): framed when the repository has frames and the chunk divides into them.
    /// Errors as [`Repository::try_seal_chunk`].
    pub fn try_seal_hashed(&self, hash: &ChunkHash, data: &[u8]) -> Result<SealedChunk> {
        self.check_chunk_len(data.len())?;
        let bytes = match self.framing(data.len()) {
            Some(fs) if hash.cvs.len() * fs == data.len() => crate::framed::seal(
                self.keys.as_ref(),
                hash.id.as_bytes(),
                data,
                &hash.cvs,
                fs,
                self.config.zstd_level,
            )?,
            Some(_) => {
                return Err(Error::invalid(
                    "chunk hash was computed without the frames this repository seals",
                ))
            }
            None => object::seal(
                self.keys.as_ref(),
                magic::KIND_CHUNK,
                hash.id.as_bytes(),
                data,
                self.config.zstd_level,
            )?,
        };
        Ok(SealedChunk {
            id: hash.id,
            bytes,
            plain_len: data.len(),
        })
    }

    /// Reads the sealed object of chunk `id` for [`Repository::seal_chunk_update`]: the frame
    /// table is authenticated and decrypted, the frames stay sealed. In a repository with delta
    /// objects, a framed object of which `touched` changes at most half the frames is read only
    /// up to the end of its table (the update becomes a delta object on it and needs none of its
    /// frames). When the object is a delta object (FORMAT.md 1.6b) and an update changing the
    /// frames `touched` would rewrite it whole, its base object is read too; otherwise the base
    /// is only checked to exist.
    /// `Ok(None)` when the chunk is stored unframed
    /// (version 1) or the repository has no frames.
    pub fn load_chunk_frames(
        &self,
        id: &ChunkId,
        touched: &[usize],
    ) -> Result<Option<crate::FramedChunk>> {
        if self.config.frame_size.is_none() {
            return Ok(None);
        }
        let key = chunk_key(id);
        let o = self.opener(&key)?;
        let mut whole = None;
        if self.deltas() {
            // The update of a framed parent that changes at most half its frames is a delta
            // object on it, which takes every unchanged frame by reference: the parent's header
            // and frame table are all it needs, not its (up to chunk-sized) frames.
            let head_len = crate::framed::head_len(o.keys.is_some(), o.limit / o.frame_size);
            let (head, size) = self
                .backend
                .get_head(&key, head_len)
                .map_err(|e| super::object_read_error(e, &key, "chunk"))?;
            let size = usize::try_from(size).unwrap_or(usize::MAX);
            if head.len() == size {
                whole = Some(head);
            } else if crate::framed::is_framed(&head) && crate::framed::base_of(&head).is_none() {
                let parent = crate::framed::parse_parent_head(o, id.as_bytes(), head, size, &key)?;
                if let Some(p) = parent.filter(|p| touched.len() <= p.frame_count() / 2) {
                    return Ok(Some(p));
                }
            }
        }
        let bytes = match whole {
            Some(b) => b,
            None => self.get_object(&key, "chunk")?,
        };
        let Some(mut parent) = crate::framed::parse_parent(o, id.as_bytes(), bytes, &key)? else {
            return Ok(None);
        };
        if let Some(base) = parent.base_id().filter(|_| parent.wants_base(touched)) {
            let mut buf = Vec::new();
            let base_key = self.read_base(&base, &key, &mut buf)?;
            let framed = crate::framed::parse_parent(o, &base, buf, &base_key)?;
            let framed = framed.ok_or_else(|| {
                Error::corrupt(format!(
                    "object {key} is corrupt: its base {base_key} is not a framed object"
                ))
            })?;
            parent.attach_base(framed, &key)?;
        } else if let Some(base) = parent.base_id() {
            // The new version will refer to the same base: it must still be there (a delta on
            // a missing base would only fail at restore). The caller then reads the chunk whole.
            let base_key = chunk_key(&ChunkId::from_bytes(base));
            if !self.backend.exists(&base_key)? {
                return Err(Error::corrupt(format!(
                    "object {key} is corrupt: its base object {base_key} is missing"
                )));
            }
        }
        Ok(Some(parent))
    }

    /// The chunk `parent` with the frames in `changed` (frame number, its new plaintext of
    /// frame-size bytes) replaced, sealed: only the changed frames are hashed, compressed and
    /// encrypted. In a version-3 repository the result is a delta object (FORMAT.md 1.6b) that
    /// takes the unchanged frames from a base object, unless it would store more than half of
    /// its frames itself; otherwise, and always in a version-2 repository, the unchanged frames
    /// are copied still sealed into a framed object. Returns the new chunk (same id as sealing
    /// the whole new plaintext) and whether it is all zero (then it need not be stored). No I/O.
    pub fn seal_chunk_update(
        &self,
        parent: &crate::FramedChunk,
        changed: &[(usize, &[u8])],
    ) -> Result<(SealedChunk, bool)> {
        let up = crate::framed::seal_update(
            self.keys.as_ref(),
            parent,
            changed,
            self.config.zstd_level,
            self.deltas(),
        )?;
        Ok((
            SealedChunk {
                id: ChunkId::from_bytes(up.id),
                bytes: up.sealed,
                plain_len: parent.frame_count() * parent.frame_size(),
            },
            up.all_zero,
        ))
    }
}
