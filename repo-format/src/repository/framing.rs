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
    /// table is authenticated and decrypted, the frames stay sealed. `Ok(None)` when the chunk
    /// is stored unframed (version 1) or the repository has no frames.
    pub fn load_chunk_frames(&self, id: &ChunkId) -> Result<Option<crate::FramedChunk>> {
        let Some(fs) = self.config.frame_size else {
            return Ok(None);
        };
        let key = chunk_key(id);
        let bytes = self.get_object(&key, "chunk")?;
        crate::framed::parse_parent(
            self.keys.as_ref(),
            id.as_bytes(),
            bytes,
            fs as usize,
            self.chunk_limit(),
            &key,
        )
    }

    /// The chunk `parent` with the frames in `changed` (frame number, its new plaintext of
    /// frame-size bytes) replaced, sealed: only the changed frames are hashed, compressed and
    /// encrypted; the others are copied still sealed. Returns the new chunk (same id as sealing
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
