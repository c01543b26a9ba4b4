//! The root of a paged disk index: the disk's shape and, per page, the index object that holds
//! the page's entries. Layout: `FORMAT.md` 1.7a.

use super::{push_header, read_header, DiskIndex, HEADER_LEN};
#[cfg(any(test, doc))]
use crate::error::ErrorKind;
use crate::error::{Error, Result};
use crate::id::IndexId;
use crate::magic;

/// Smallest page a root may declare (entries).
const MIN_PAGE_ENTRIES: u64 = 1 << 10;

/// Length of the root header: the index header, page size and page count.
const ROOT_HEADER_LEN: usize = HEADER_LEN + 4 + 4;

/// A disk index stored in pages.
///
/// Page `k` holds entries `[k * page_entries, min((k + 1) * page_entries, entry_count))`; it is
/// either an index object of its own (a [`DiskIndex`] of the bytes it covers, entries numbered
/// from 0) or `None` when all of its entries are zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexRoot {
    chunk_size: u32,
    disk_size: u64,
    page_entries: u64,
    pages: Vec<Option<IndexId>>,
}

impl IndexRoot {
    /// A root of a disk of `disk_size` bytes in chunks of `chunk_size`, in pages of
    /// `page_entries` entries (a power of two from 2^10 to 2^28), the pages `pages`. Fails unless
    /// there is exactly one page per `page_entries` entries of the disk.
    pub fn new(
        chunk_size: u32,
        disk_size: u64,
        page_entries: u64,
        pages: Vec<Option<IndexId>>,
    ) -> Result<IndexRoot> {
        let want = Self::page_count(chunk_size, disk_size, page_entries)?;
        if pages.len() as u64 != want {
            return Err(Error::invalid(format!(
                "{} pages given, but a disk of {disk_size} bytes in chunks of {chunk_size} has \
                 {want} pages of {page_entries} entries",
                pages.len()
            )));
        }
        Ok(IndexRoot {
            chunk_size,
            disk_size,
            page_entries,
            pages,
        })
    }

    /// How many pages of `page_entries` entries a disk of `disk_size` bytes in chunks of
    /// `chunk_size` has. Fails on a page size that is not a power of two from 2^10 to 2^28,
    /// and where [`DiskIndex::new_sparse`] fails.
    pub fn page_count(chunk_size: u32, disk_size: u64, page_entries: u64) -> Result<u64> {
        if !page_entries.is_power_of_two()
            || !(MIN_PAGE_ENTRIES..=DiskIndex::MAX_ENTRIES).contains(&page_entries)
        {
            return Err(Error::invalid(format!(
                "index pages of {page_entries} entries: not a power of two from \
                 {MIN_PAGE_ENTRIES} to {}",
                DiskIndex::MAX_ENTRIES
            )));
        }
        let entries = DiskIndex::new_sparse(chunk_size, disk_size)?.len();
        Ok(entries.div_ceil(page_entries))
    }

    /// Page `k` of an index of `entries` entries in pages of `page_entries`: (first entry,
    /// number of entries); the last page may be short, a page beyond the last is empty.
    pub fn page_span(entries: u64, page_entries: u64, k: u64) -> (u64, u64) {
        let first = k.saturating_mul(page_entries).min(entries);
        (first, page_entries.min(entries - first))
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Virtual size of the disk in bytes.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Entries per page (the last page may have fewer).
    pub fn page_entries(&self) -> u64 {
        self.page_entries
    }

    /// The pages, in order (`None`: all zero).
    pub fn pages(&self) -> &[Option<IndexId>] {
        &self.pages
    }

    /// The plaintext encoding (before sealing).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ROOT_HEADER_LEN + self.pages.len() * 33);
        push_header(
            &mut out,
            magic::INDEX_ROOT_VERSION,
            self.chunk_size,
            self.disk_size,
        );
        // Both fit: page_entries ≤ 2^28, and at most 2^28 / 2^10 pages.
        out.extend_from_slice(&(self.page_entries as u32).to_le_bytes());
        out.extend_from_slice(&(self.pages.len() as u32).to_le_bytes());
        for page in &self.pages {
            match page {
                None => out.push(magic::INDEX_PAGE_ZERO),
                Some(id) => {
                    out.push(magic::INDEX_PAGE_STORED);
                    out.extend_from_slice(id.as_bytes());
                }
            }
        }
        out
    }

    /// Decodes the plaintext encoding. Rejects truncation, trailing bytes, unknown tags and
    /// sizes or counts that do not add up ([`ErrorKind::Corrupt`]), and other versions
    /// ([`ErrorKind::UnsupportedVersion`]). Never panics.
    pub fn decode(bytes: &[u8]) -> Result<IndexRoot> {
        let corrupt = |why: &str| Error::corrupt(format!("disk index root is malformed: {why}"));
        let (chunk_size, disk_size, _, rest) =
            read_header(bytes, magic::INDEX_ROOT_VERSION, "disk index root")?;
        let Some((pages_header, mut rest)) = rest.split_first_chunk::<8>() else {
            return Err(corrupt("truncated header"));
        };
        let [a, b, c, d, e, f, g, h] = *pages_header;
        let page_entries = u64::from(u32::from_le_bytes([a, b, c, d]));
        let page_count = u64::from(u32::from_le_bytes([e, f, g, h]));
        let want = Self::page_count(chunk_size, disk_size, page_entries)
            .map_err(|e| corrupt(&e.to_string()))?;
        if page_count != want {
            return Err(corrupt("page count does not match the entry count"));
        }
        let mut pages = Vec::with_capacity(want as usize);
        while let Some((&tag, after)) = rest.split_first() {
            if pages.len() as u64 == want {
                return Err(corrupt("more pages than declared"));
            }
            match tag {
                magic::INDEX_PAGE_ZERO => {
                    pages.push(None);
                    rest = after;
                }
                magic::INDEX_PAGE_STORED => {
                    let Some((id, after)) = after.split_first_chunk::<32>() else {
                        return Err(corrupt("truncated page id"));
                    };
                    pages.push(Some(IndexId::from_bytes(*id)));
                    rest = after;
                }
                other => return Err(corrupt(&format!("unknown page tag {other:#04x}"))),
            }
        }
        if pages.len() as u64 != want {
            return Err(corrupt("fewer pages than declared"));
        }
        Ok(IndexRoot {
            chunk_size,
            disk_size,
            page_entries,
            pages,
        })
    }
}

/// An index object's plaintext: a whole index (which is also the form of one page) or the root
/// of a paged one, told apart by the version byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexObject {
    /// Version 1: every entry of the disk (or of a page).
    Whole(DiskIndex),
    /// Version 2: the pages.
    Root(IndexRoot),
}

impl IndexObject {
    /// Decodes either form ([`DiskIndex::decode`], [`IndexRoot::decode`]).
    pub fn decode(bytes: &[u8]) -> Result<IndexObject> {
        match bytes.get(4) {
            Some(&magic::INDEX_ROOT_VERSION) if bytes.starts_with(&magic::INDEX_MAGIC) => {
                IndexRoot::decode(bytes).map(IndexObject::Root)
            }
            _ => DiskIndex::decode(bytes).map(IndexObject::Whole),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(b: u8) -> Option<IndexId> {
        Some(IndexId::from_bytes([b; 32]))
    }

    #[test]
    fn round_trip_and_layout() {
        // 2^20 + 1 entries of 512 bytes, pages of 2^18: five pages, the last of one entry.
        let disk = (512 << 20) + 100;
        let root =
            IndexRoot::new(512, disk, 1 << 18, vec![id(1), None, id(2), None, id(3)]).unwrap();
        let enc = root.encode();
        assert_eq!(enc.len(), ROOT_HEADER_LEN + 3 * 33 + 2);
        assert_eq!(&enc[..5], b"LBIX\x02");
        assert_eq!(enc[28..36], [0, 0, 4, 0, 5, 0, 0, 0]);
        assert_eq!(IndexRoot::decode(&enc).unwrap(), root);
        assert_eq!(IndexObject::decode(&enc).unwrap(), IndexObject::Root(root));
        let whole = DiskIndex::new_sparse(512, disk).unwrap();
        assert_eq!(
            IndexObject::decode(&whole.encode().unwrap()).unwrap(),
            IndexObject::Whole(whole)
        );
    }

    #[test]
    fn rejects_bad_shapes_and_input() {
        assert!(IndexRoot::new(512, 512 << 10, 1 << 10, vec![None]).is_ok());
        assert!(IndexRoot::new(512, 512 << 10, 1 << 10, vec![None, None]).is_err());
        assert!(IndexRoot::new(512, 512 << 10, 1000, vec![None]).is_err());
        assert!(IndexRoot::new(512, 512 << 10, 1 << 9, vec![None, None]).is_err());
        assert!(IndexRoot::new(0, 512 << 10, 1 << 10, vec![]).is_err());
        let root = IndexRoot::new(512, (512 << 11) + 1, 1 << 10, vec![id(7), None, id(9)]).unwrap();
        let enc = root.encode();
        for cut in 0..enc.len() {
            assert!(IndexRoot::decode(&enc[..cut]).is_err(), "cut {cut}");
        }
        let mut trailing = enc.clone();
        trailing.push(0);
        assert!(IndexRoot::decode(&trailing).is_err());
        let mut bad_tag = enc.clone();
        bad_tag[ROOT_HEADER_LEN] = 2;
        assert!(IndexRoot::decode(&bad_tag).is_err());
        let mut bad_count = enc.clone();
        bad_count[32] = 4;
        assert!(IndexRoot::decode(&bad_count).is_err());
        let mut bad_page = enc.clone();
        bad_page[29] = 3; // 0x0300 entries: not a power of two
        assert!(IndexRoot::decode(&bad_page).is_err());
        let mut v1 = enc;
        v1[4] = 1;
        assert_eq!(
            IndexRoot::decode(&v1).unwrap_err().kind(),
            ErrorKind::UnsupportedVersion
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = IndexObject::decode(&bytes);
            let mut b = bytes;
            if b.len() > 5 {
                b[..5].copy_from_slice(b"LBIX\x02");
            }
            let _ = IndexObject::decode(&b);
        }
    }
}
