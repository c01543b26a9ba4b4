//! Per-disk index: which chunk holds each `chunk_size` block of a disk.
//!
//! A disk of up to [`PAGE_ENTRIES`] chunks has one index object ([`DiskIndex`]); a larger one is
//! cut into pages of [`PAGE_ENTRIES`] entries, each an index object of its own, listed by a root
//! ([`IndexRoot`]), so that a backup, a restore or an NBD export holds a page at a time and not
//! the whole disk's index (an unchanged page is also not written again by the next backup).
//!
//! Pure code: no I/O. The byte layout is documented in `FORMAT.md` ("Disk index").

mod root;

pub use root::{IndexObject, IndexRoot};

use crate::error::{Error, ErrorKind, Result};
use crate::id::ChunkId;
use crate::magic;

/// Entries per page of the indexes this version writes: a page of 1 MiB chunks covers 64 GiB of
/// disk and costs at most 2.6 MiB decoded (40 bytes per stored entry), 2.1 MiB encoded.
pub const PAGE_ENTRIES: u64 = 1 << 16;

/// Length of the fixed index header.
const HEADER_LEN: usize = 4 + 1 + 3 + 4 + 8 + 8;

/// The map of a disk onto chunks.
///
/// Entry `i` covers bytes `[i * chunk_size, min((i + 1) * chunk_size, disk_size))`; the last
/// chunk of a disk whose size is not a multiple of `chunk_size` is short. An entry is either a
/// stored chunk or zero (the block is all zeros and no chunk is stored for it).
///
/// In memory only the stored entries are kept, sorted by position: the index of a sparse
/// terabyte disk costs what its data costs (40 bytes per stored chunk), not 33 bytes per chunk of
/// the virtual size, so that memory follows the data a disk holds and not its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskIndex {
    /// Chunk size in bytes (non-zero).
    pub chunk_size: u32,
    /// Virtual size of the disk in bytes.
    pub disk_size: u64,
    /// The stored entries: (entry number, chunk), strictly increasing entry numbers, each below
    /// [`DiskIndex::len`]. Every entry not listed is zero.
    stored: Vec<(u64, ChunkId)>,
}

impl DiskIndex {
    /// Largest number of entries accepted (2^28: 16 TiB at 64 KiB chunks, 256 TiB at 1 MiB),
    /// so that a forged index cannot declare an absurd disk.
    pub const MAX_ENTRIES: u64 = 1 << 28;

    /// An index of an all-zero disk (every entry zero).
    pub fn new_sparse(chunk_size: u32, disk_size: u64) -> Result<DiskIndex> {
        let n = Self::entry_count(chunk_size, disk_size)?;
        if n > Self::MAX_ENTRIES {
            return Err(Error::invalid(format!(
                "disk of {disk_size} bytes has too many chunks of {chunk_size} bytes"
            )));
        }
        Ok(DiskIndex {
            chunk_size,
            disk_size,
            stored: Vec::new(),
        })
    }

    /// An index from one entry per chunk (`None` = zero); fails unless there are exactly
    /// `ceil(disk_size / chunk_size)` entries.
    pub fn from_entries(
        chunk_size: u32,
        disk_size: u64,
        entries: impl IntoIterator<Item = Option<ChunkId>>,
    ) -> Result<DiskIndex> {
        let mut idx = Self::new_sparse(chunk_size, disk_size)?;
        let mut n: u64 = 0;
        for e in entries {
            if let Some(id) = e {
                idx.stored.push((n, id));
            }
            n += 1;
        }
        if n != idx.len() {
            return Err(Error::invalid(format!(
                "{n} entries given, but a disk of {disk_size} bytes in chunks of {chunk_size} \
                 needs {}",
                idx.len()
            )));
        }
        Ok(idx)
    }

    /// An index from its stored entries ((entry number, chunk), strictly increasing entry
    /// numbers below `ceil(disk_size / chunk_size)`); fails where [`DiskIndex::validate`] fails.
    pub fn from_stored(
        chunk_size: u32,
        disk_size: u64,
        stored: Vec<(u64, ChunkId)>,
    ) -> Result<DiskIndex> {
        let idx = DiskIndex {
            chunk_size,
            disk_size,
            stored,
        };
        idx.validate()?;
        Ok(idx)
    }

    /// The bytes of a disk of `disk_size` bytes that entries `[first, first + count)` cover in
    /// chunks of `chunk_size` (the disk's last entry may be short; entries beyond the disk cover
    /// nothing).
    pub fn span_bytes(chunk_size: u32, disk_size: u64, first: u64, count: u64) -> u64 {
        let cs = u64::from(chunk_size);
        let start = first.saturating_mul(cs).min(disk_size);
        let end = first
            .saturating_add(count)
            .saturating_mul(cs)
            .min(disk_size);
        end - start
    }

    /// Entries `[first, first + count)` as an index of their own (numbered from 0, covering the
    /// bytes of those entries). Fails unless the range lies within this index.
    pub fn slice(&self, first: u64, count: u64) -> Result<DiskIndex> {
        if first.checked_add(count).is_none_or(|end| end > self.len()) {
            return Err(Error::invalid(format!(
                "entries {first}..+{count} are beyond the {} entries of this index",
                self.len()
            )));
        }
        let lo = self.stored.partition_point(|&(n, _)| n < first);
        let hi = self.stored.partition_point(|&(n, _)| n < first + count);
        let stored = self.stored[lo..hi]
            .iter()
            .map(|&(n, id)| (n - first, id))
            .collect();
        Ok(DiskIndex {
            chunk_size: self.chunk_size,
            disk_size: Self::span_bytes(self.chunk_size, self.disk_size, first, count),
            stored,
        })
    }

    /// `ceil(disk_size / chunk_size)`; `chunk_size` must be non-zero.
    pub fn entry_count(chunk_size: u32, disk_size: u64) -> Result<u64> {
        if chunk_size == 0 {
            return Err(Error::invalid("chunk size must not be zero"));
        }
        Ok(disk_size.div_ceil(u64::from(chunk_size)))
    }

    /// The largest encoding ([`DiskIndex::encode`]) of an index of a disk of `disk_size` bytes in
    /// chunks of `chunk_size`: every entry a stored chunk (33 bytes; a run of zero entries takes
    /// at most 11 bytes however long). The limit a reader gives the decompression of such an
    /// index. Fails where [`DiskIndex::entry_count`] fails or the disk has too many chunks.
    pub fn max_encoded_len(chunk_size: u32, disk_size: u64) -> Result<usize> {
        let n = Self::entry_count(chunk_size, disk_size)?;
        if n > Self::MAX_ENTRIES {
            return Err(Error::invalid(format!(
                "a disk of {disk_size} bytes has too many chunks of {chunk_size}"
            )));
        }
        usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(1 + 32))
            .and_then(|b| b.checked_add(HEADER_LEN))
            .ok_or_else(|| Error::invalid("index too large for this machine"))
    }

    /// Number of entries (chunks covering the disk, stored or zero).
    pub fn len(&self) -> u64 {
        if self.chunk_size == 0 {
            return 0;
        }
        self.disk_size.div_ceil(u64::from(self.chunk_size))
    }

    /// Whether the disk has no entries at all (size 0).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The chunk stored for entry `i`; `None` if the entry is zero or beyond the disk.
    pub fn get(&self, i: u64) -> Option<ChunkId> {
        self.stored
            .binary_search_by_key(&i, |&(n, _)| n)
            .ok()
            .map(|k| self.stored[k].1)
    }

    /// The stored entries, (entry number, chunk), by increasing entry number.
    pub fn stored(&self) -> &[(u64, ChunkId)] {
        &self.stored
    }

    /// Sets entry `i` (`None` = zero). Fails if `i` is beyond the disk. O(stored entries) when
    /// it adds or removes an entry: to change many, use [`DiskIndex::with_updates`].
    pub fn set(&mut self, i: u64, entry: Option<ChunkId>) -> Result<()> {
        if i >= self.len() {
            return Err(Error::invalid(format!(
                "entry {i} is beyond the {} entries of this index",
                self.len()
            )));
        }
        match (self.stored.binary_search_by_key(&i, |&(n, _)| n), entry) {
            (Ok(k), Some(id)) => self.stored[k].1 = id,
            (Ok(k), None) => {
                self.stored.remove(k);
            }
            (Err(k), Some(id)) => self.stored.insert(k, (i, id)),
            (Err(_), None) => {}
        }
        Ok(())
    }

    /// This index with `updates` applied ((entry number, `None` = zero), any order; a later
    /// update of the same entry wins), in one merge. Fails if an entry is beyond the disk.
    pub fn with_updates(&self, mut updates: Vec<(u64, Option<ChunkId>)>) -> Result<DiskIndex> {
        let len = self.len();
        if let Some(&(i, _)) = updates.iter().find(|(i, _)| *i >= len) {
            return Err(Error::invalid(format!(
                "entry {i} is beyond the {len} entries of this index"
            )));
        }
        // Stable sort, then keep the last update of each entry, in place (a full backup of a
        // large disk has an update per chunk: no second list of them).
        updates.sort_by_key(|&(i, _)| i);
        updates.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                *kept = *later;
            }
            same
        });
        let mut stored = Vec::with_capacity(self.stored.len() + updates.len());
        let mut old = self.stored.iter().copied().peekable();
        for (i, entry) in updates {
            while let Some(&(n, id)) = old.peek() {
                if n >= i {
                    break;
                }
                stored.push((n, id));
                old.next();
            }
            if old.peek().is_some_and(|&(n, _)| n == i) {
                old.next();
            }
            if let Some(id) = entry {
                stored.push((i, id));
            }
        }
        stored.extend(old);
        Ok(DiskIndex {
            chunk_size: self.chunk_size,
            disk_size: self.disk_size,
            stored,
        })
    }

    /// Checks that the sizes are sane and every stored entry lies on the disk, in order.
    pub fn validate(&self) -> Result<()> {
        let n = Self::entry_count(self.chunk_size, self.disk_size)?;
        if n > Self::MAX_ENTRIES {
            return Err(Error::invalid(format!(
                "a disk of {} bytes has too many chunks of {}",
                self.disk_size, self.chunk_size
            )));
        }
        if self.stored.windows(2).any(|w| w[0].0 >= w[1].0)
            || self.stored.last().is_some_and(|&(i, _)| i >= n)
        {
            return Err(Error::invalid(format!(
                "index entries are out of order or beyond the {n} entries of a disk of {} bytes \
                 in chunks of {}",
                self.disk_size, self.chunk_size
            )));
        }
        Ok(())
    }

    /// The plaintext encoding (before sealing). Fails if [`DiskIndex::validate`] fails.
    pub fn encode(&self) -> Result<Vec<u8>> {
        self.validate()?;
        let mut out = Vec::with_capacity(HEADER_LEN + 16);
        push_header(
            &mut out,
            magic::INDEX_VERSION,
            self.chunk_size,
            self.disk_size,
        );
        let count = self.len();
        out.reserve(self.stored.len() * 33);
        let mut next: u64 = 0; // first entry not yet encoded
        for &(i, id) in &self.stored {
            if i > next {
                push_zero_run(&mut out, i - next);
            }
            out.push(magic::INDEX_TAG_CHUNK);
            out.extend_from_slice(id.as_bytes());
            next = i + 1;
        }
        if count > next {
            push_zero_run(&mut out, count - next);
        }
        Ok(out)
    }

    /// Decodes the plaintext encoding. Rejects truncation, trailing bytes, unknown tags, empty
    /// or overlong zero runs and counts that do not add up ([`ErrorKind::Corrupt`]), and other
    /// versions ([`ErrorKind::UnsupportedVersion`]). Never panics.
    pub fn decode(bytes: &[u8]) -> Result<DiskIndex> {
        let corrupt = |why: &str| Error::corrupt(format!("disk index is malformed: {why}"));
        let (chunk_size, disk_size, count, mut rest) =
            read_header(bytes, magic::INDEX_VERSION, "disk index")?;
        let mut stored: Vec<(u64, ChunkId)> = Vec::new();
        let mut total: u64 = 0;
        while let Some((&tag, after)) = rest.split_first() {
            match tag {
                magic::INDEX_TAG_ZERO_RUN => {
                    let (n, after) = read_leb128(after).ok_or_else(|| corrupt("bad zero run"))?;
                    if n == 0 {
                        return Err(corrupt("empty zero run"));
                    }
                    total = total
                        .checked_add(n)
                        .filter(|t| *t <= count)
                        .ok_or_else(|| corrupt("more entries than declared"))?;
                    rest = after;
                }
                magic::INDEX_TAG_CHUNK => {
                    let Some((id, after)) = after.split_first_chunk::<32>() else {
                        return Err(corrupt("truncated chunk id"));
                    };
                    if total >= count {
                        return Err(corrupt("more entries than declared"));
                    }
                    stored.push((total, ChunkId::from_bytes(*id)));
                    total += 1;
                    rest = after;
                }
                other => return Err(corrupt(&format!("unknown record tag {other:#04x}"))),
            }
        }
        if total != count {
            return Err(corrupt("fewer entries than declared"));
        }
        Ok(DiskIndex {
            chunk_size,
            disk_size,
            stored,
        })
    }

    /// Distinct stored chunks referenced by this index, sorted.
    pub fn chunk_ids(&self) -> Vec<ChunkId> {
        let mut ids: Vec<ChunkId> = self.stored.iter().map(|&(_, id)| id).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// The header of a whole index and of a root (FORMAT.md 1.7, 1.7a): magic, `version`, reserved,
/// chunk size, disk size, entry count.
fn push_header(out: &mut Vec<u8>, version: u8, chunk_size: u32, disk_size: u64) {
    out.extend_from_slice(&magic::INDEX_MAGIC);
    out.push(version);
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&chunk_size.to_le_bytes());
    out.extend_from_slice(&disk_size.to_le_bytes());
    let count = disk_size.div_ceil(u64::from(chunk_size.max(1)));
    out.extend_from_slice(&count.to_le_bytes());
}

/// Reads the header [`push_header`] writes, of `version` (`what` names the object in errors):
/// (chunk size, disk size, entry count, the bytes after it). Rejects a short header, bad magic,
/// non-zero reserved bytes, a zero chunk size, an entry count that does not match the sizes or
/// exceeds [`DiskIndex::MAX_ENTRIES`] ([`ErrorKind::Corrupt`]) and another version
/// ([`ErrorKind::UnsupportedVersion`]).
fn read_header<'a>(bytes: &'a [u8], version: u8, what: &str) -> Result<(u32, u64, u64, &'a [u8])> {
    let corrupt = |why: &str| Error::corrupt(format!("{what} is malformed: {why}"));
    let Some((header, rest)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        return Err(corrupt("truncated header"));
    };
    if header[..4] != magic::INDEX_MAGIC {
        return Err(corrupt("bad magic"));
    }
    if header[4] != version {
        return Err(Error::new(
            ErrorKind::UnsupportedVersion,
            format!("{what} version {} is not supported", header[4]),
        ));
    }
    if header[5..8] != [0, 0, 0] {
        return Err(corrupt("non-zero reserved bytes"));
    }
    let chunk_size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    let mut b8 = [0u8; 8];
    b8.copy_from_slice(&header[12..20]);
    let disk_size = u64::from_le_bytes(b8);
    b8.copy_from_slice(&header[20..28]);
    let count = u64::from_le_bytes(b8);
    if chunk_size == 0 {
        return Err(corrupt("chunk size is zero"));
    }
    if count != disk_size.div_ceil(u64::from(chunk_size)) {
        return Err(corrupt("entry count does not match disk and chunk sizes"));
    }
    if count > DiskIndex::MAX_ENTRIES {
        return Err(corrupt("too many entries"));
    }
    Ok((chunk_size, disk_size, count, rest))
}

fn push_zero_run(out: &mut Vec<u8>, mut n: u64) {
    out.push(magic::INDEX_TAG_ZERO_RUN);
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Reads an unsigned LEB128 u64; `None` on truncation, overflow or a non-minimal encoding.
fn read_leb128(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut value: u64 = 0;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        let shift = 7 * i as u32;
        let low = u64::from(b & 0x7f);
        if shift == 63 && low > 1 {
            return None;
        }
        value |= low << shift;
        if b & 0x80 == 0 {
            if i > 0 && b == 0 {
                return None; // non-minimal: trailing zero group
            }
            return Some((value, bytes.get(i + 1..)?));
        }
    }
    None
}

#[cfg(test)]
mod tests;
