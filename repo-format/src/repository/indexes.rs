//! Disk indexes: storing them whole or in pages, opening them, and loading a page at a time.
//!
//! A disk of up to [`PAGE_ENTRIES`] chunks has one index object, as before pages existed; a
//! larger one is written as pages plus a root (`FORMAT.md` 1.7a). Readers take both, and a
//! whole index of any size written by an earlier version.

use std::sync::Arc;

use super::{index_key, Repository};
use crate::error::{Error, Result};
use crate::id::{ChunkId, IndexId};
use crate::index::{DiskIndex, IndexObject, IndexRoot, PAGE_ENTRIES};
use crate::magic;
use crate::object;

/// A disk's index as opened: held whole in memory (one object), or the root of a paged index
/// whose pages are loaded one at a time ([`Repository::load_index_page`]).
#[derive(Debug, Clone)]
pub struct IndexPages {
    id: IndexId,
    chunk_size: u32,
    disk_size: u64,
    layout: Layout,
}

#[derive(Debug, Clone)]
enum Layout {
    Whole(Arc<DiskIndex>),
    Paged(IndexRoot),
}

/// What holds one page of an index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexPage {
    /// Every entry of the page is zero; no object.
    Zero,
    /// This index object holds exactly the page's entries.
    Object(IndexId),
}

impl IndexPages {
    /// The id the index was opened by.
    pub fn id(&self) -> IndexId {
        self.id
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Virtual size of the disk in bytes.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Entries of the whole disk (stored or zero).
    pub fn len(&self) -> u64 {
        self.disk_size.div_ceil(u64::from(self.chunk_size))
    }

    /// Whether the disk has no entries (size 0).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries per page: a whole index is one page (of at least [`PAGE_ENTRIES`]).
    pub fn page_entries(&self) -> u64 {
        match &self.layout {
            Layout::Whole(_) => self.len().max(PAGE_ENTRIES),
            Layout::Paged(root) => root.page_entries(),
        }
    }

    /// Number of pages (0 for an empty disk).
    pub fn page_count(&self) -> u64 {
        self.len().div_ceil(self.page_entries())
    }

    /// Page `k`'s entries: (first entry, number of entries).
    pub fn page_span(&self, k: u64) -> (u64, u64) {
        IndexRoot::page_span(self.len(), self.page_entries(), k)
    }

    /// What holds page `k` (`None` beyond the last page).
    pub fn page(&self, k: u64) -> Option<IndexPage> {
        match &self.layout {
            Layout::Whole(_) => (k < self.page_count()).then_some(IndexPage::Object(self.id)),
            Layout::Paged(root) => {
                let page = *root.pages().get(usize::try_from(k).ok()?)?;
                Some(page.map_or(IndexPage::Zero, IndexPage::Object))
            }
        }
    }
}

impl Repository {
    /// Every stored index id, pages included (keys under `indexes/` that are not index names are
    /// skipped).
    pub fn list_indexes(&self) -> Result<Vec<IndexId>> {
        self.list_ids(magic::PREFIX_INDEXES)
    }

    /// Seals and stores a disk index; returns its id (storing an existing index is a no-op).
    /// An index of more than [`PAGE_ENTRIES`] entries is stored in pages of that many.
    pub fn store_index(&self, index: &DiskIndex) -> Result<IndexId> {
        if index.len() <= PAGE_ENTRIES {
            return self.store_index_plain(&index.encode()?);
        }
        self.store_index_paged(index, PAGE_ENTRIES)
    }

    /// Stores `index` in pages of `page_entries` entries (a power of two from 2^10; the writer
    /// uses [`PAGE_ENTRIES`], tests smaller pages) and returns the id of its root.
    pub fn store_index_paged(&self, index: &DiskIndex, page_entries: u64) -> Result<IndexId> {
        let count = IndexRoot::page_count(index.chunk_size, index.disk_size, page_entries)?;
        let mut pages = Vec::new();
        for k in 0..count {
            let (first, n) = IndexRoot::page_span(index.len(), page_entries, k);
            let page = index.slice(first, n)?;
            pages.push(self.store_index_page(&page)?);
        }
        let root = IndexRoot::new(index.chunk_size, index.disk_size, page_entries, pages)?;
        self.store_index_plain(&root.encode())
    }

    /// Stores one page of a paged index; `None` (nothing stored) when all its entries are zero.
    fn store_index_page(&self, page: &DiskIndex) -> Result<Option<IndexId>> {
        if page.stored().is_empty() {
            return Ok(None);
        }
        self.store_index_plain(&page.encode()?).map(Some)
    }

    pub(crate) fn store_index_plain(&self, plain: &[u8]) -> Result<IndexId> {
        let id = IndexId::from_bytes(object::object_hash(self.keys.as_ref(), plain));
        let sealed = object::seal(
            self.keys.as_ref(),
            magic::KIND_INDEX,
            id.as_bytes(),
            plain,
            self.config.zstd_level,
        )?;
        self.backend.put_if_absent(&index_key(&id), &sealed)?;
        Ok(id)
    }

    /// Loads, verifies and decodes the index object `id`, which may hold an index of up to
    /// `entries` entries (the decompression limit follows: the whole index of a fully allocated
    /// disk outgrows the limit of other metadata objects).
    fn load_index_object(
        &self,
        id: &IndexId,
        chunk_size: u32,
        disk_size: u64,
    ) -> Result<IndexObject> {
        let key = index_key(id);
        let limit = DiskIndex::max_encoded_len(chunk_size, disk_size)
            .map_err(|e| e.wrap(format!("cannot load index {key}")))?
            .max(magic::MAX_METADATA_OBJECT);
        let bytes = self.get_object(&key, "index")?;
        let plain = object::open(
            self.keys.as_ref(),
            magic::KIND_INDEX,
            id.as_bytes(),
            bytes,
            limit,
            &key,
        )?;
        IndexObject::decode(&plain).map_err(|e| e.wrap(format!("object {key} is corrupt")))
    }

    /// Opens the index of a disk of `disk_size` bytes in chunks of `chunk_size`, as its manifest
    /// entry says: a whole index is loaded, a paged one's root only. An index of another disk
    /// size or chunk size is refused as corrupt.
    pub fn open_index(&self, id: &IndexId, disk_size: u64, chunk_size: u32) -> Result<IndexPages> {
        let (cs, ds, layout) = match self.load_index_object(id, chunk_size, disk_size)? {
            IndexObject::Whole(index) => (
                index.chunk_size,
                index.disk_size,
                Layout::Whole(Arc::new(index)),
            ),
            IndexObject::Root(root) => (root.chunk_size(), root.disk_size(), Layout::Paged(root)),
        };
        if ds != disk_size || cs != chunk_size {
            return Err(Error::corrupt(format!(
                "object {} is the index of a disk of {ds} bytes in chunks of {cs}, where its \
                 snapshot has {disk_size} bytes in chunks of {chunk_size}",
                index_key(id)
            )));
        }
        Ok(IndexPages {
            id: *id,
            chunk_size,
            disk_size,
            layout,
        })
    }

    /// Page `k` of `index` (its entries numbered from 0; see [`IndexPages::page_span`]).
    pub fn load_index_page(&self, index: &IndexPages, k: u64) -> Result<Arc<DiskIndex>> {
        if k >= index.page_count() {
            return Err(Error::invalid(format!(
                "page {k} is beyond the {} pages of index {}",
                index.page_count(),
                index.id
            )));
        }
        if let Layout::Whole(whole) = &index.layout {
            return Ok(whole.clone());
        }
        let (first, count) = index.page_span(k);
        self.load_index_range(index, first, count).map(Arc::new)
    }

    /// Entries `[first, first + count)` of `index` as an index of their own (numbered from 0),
    /// loading the pages that hold them.
    pub fn load_index_range(
        &self,
        index: &IndexPages,
        first: u64,
        count: u64,
    ) -> Result<DiskIndex> {
        let root = match &index.layout {
            Layout::Whole(whole) => return whole.slice(first, count),
            Layout::Paged(root) => root,
        };
        if first.checked_add(count).is_none_or(|end| end > index.len()) {
            return Err(Error::invalid(format!(
                "entries {first}..+{count} are beyond the {} entries of index {}",
                index.len(),
                index.id
            )));
        }
        let (cs, p) = (index.chunk_size, root.page_entries());
        let mut stored: Vec<(u64, ChunkId)> = Vec::new();
        let end = first + count;
        let mut k = first / p;
        while k * p < end {
            let (page_first, page_len) = index.page_span(k);
            if let Some(page_id) = index.page(k).and_then(|pg| match pg {
                IndexPage::Object(id) => Some(id),
                IndexPage::Zero => None,
            }) {
                let bytes = DiskIndex::span_bytes(cs, index.disk_size, page_first, page_len);
                let page = match self.load_index_object(&page_id, cs, bytes)? {
                    IndexObject::Whole(page)
                        if page.chunk_size == cs && page.disk_size == bytes =>
                    {
                        page
                    }
                    _ => {
                        return Err(Error::corrupt(format!(
                            "object {} is not page {k} of index {} (a disk of {bytes} bytes in \
                             chunks of {cs})",
                            index_key(&page_id),
                            index.id
                        )))
                    }
                };
                stored.extend(
                    page.stored()
                        .iter()
                        .map(|&(n, id)| (n + page_first, id))
                        .filter(|&(n, _)| (first..end).contains(&n))
                        .map(|(n, id)| (n - first, id)),
                );
            }
            k += 1;
        }
        DiskIndex::from_stored(
            cs,
            DiskIndex::span_bytes(cs, index.disk_size, first, count),
            stored,
        )
    }

    /// Loads and verifies the whole index of a disk of `disk_size` bytes in chunks of
    /// `chunk_size` (every page of a paged one), as its manifest entry says; see
    /// [`Repository::open_index`]. Its memory follows the disk's stored chunks: to hold a page at
    /// a time, open the index and load its pages.
    pub fn load_index(&self, id: &IndexId, disk_size: u64, chunk_size: u32) -> Result<DiskIndex> {
        let index = self.open_index(id, disk_size, chunk_size)?;
        match index.layout {
            Layout::Whole(whole) => Ok(Arc::unwrap_or_clone(whole)),
            Layout::Paged(_) => self.load_index_range(&index, 0, index.len()),
        }
    }

    /// A writer of the index of a disk of `disk_size` bytes in chunks of `chunk_size` whose
    /// entries are those of `base` (the parent snapshot's index of the disk, of the same shape)
    /// or zero, with updates applied page by page.
    pub fn index_writer(
        &self,
        chunk_size: u32,
        disk_size: u64,
        base: Option<Arc<IndexPages>>,
    ) -> Result<IndexWriter> {
        let page_count = IndexRoot::page_count(chunk_size, disk_size, PAGE_ENTRIES)?;
        if let Some(b) = &base {
            if b.chunk_size != chunk_size || b.disk_size != disk_size {
                return Err(Error::invalid(format!(
                    "the base index {} is of a disk of {} bytes in chunks of {}, not {disk_size} \
                     in chunks of {chunk_size}",
                    b.id, b.disk_size, b.chunk_size
                )));
            }
        }
        Ok(IndexWriter {
            chunk_size,
            disk_size,
            base,
            page_count,
            pages: Vec::new(),
            loaded: None,
        })
    }
}

/// Writes a disk's index a page at a time, in order ([`Repository::index_writer`]): memory holds
/// one page, and a page the updates leave as the base's is not written again.
#[derive(Debug)]
pub struct IndexWriter {
    chunk_size: u32,
    disk_size: u64,
    base: Option<Arc<IndexPages>>,
    page_count: u64,
    pages: Vec<Option<IndexId>>,
    /// The base's entries of a page, loaded by [`IndexWriter::base_page`].
    loaded: Option<(u64, Arc<DiskIndex>)>,
}

impl IndexWriter {
    /// Entries per page.
    pub fn page_entries(&self) -> u64 {
        PAGE_ENTRIES
    }

    /// Number of pages of the disk.
    pub fn page_count(&self) -> u64 {
        self.page_count
    }

    /// The page [`IndexWriter::write_page`] writes next.
    pub fn next_page(&self) -> u64 {
        self.pages.len() as u64
    }

    /// Page `k`'s entries: (first entry, number of entries).
    pub fn page_span(&self, k: u64) -> (u64, u64) {
        let len = self.disk_size.div_ceil(u64::from(self.chunk_size));
        IndexRoot::page_span(len, PAGE_ENTRIES, k)
    }

    /// The base's entries of the next page (all zero without a base), numbered from the page's
    /// first entry. [`IndexWriter::write_page`] then applies its updates to them without
    /// loading them again.
    pub fn base_page(&mut self, repo: &Repository) -> Result<Arc<DiskIndex>> {
        let k = self.next_page();
        if let Some((n, page)) = &self.loaded {
            if *n == k {
                return Ok(page.clone());
            }
        }
        let (first, count) = self.page_span(k);
        let page = Arc::new(match &self.base {
            Some(b) => repo.load_index_range(b, first, count)?,
            None => DiskIndex::new_sparse(
                self.chunk_size,
                DiskIndex::span_bytes(self.chunk_size, self.disk_size, first, count),
            )?,
        });
        self.loaded = Some((k, page.clone()));
        Ok(page)
    }

    /// Writes the next page: the base's entries of it (zero without a base) with `updates`
    /// ((entry number of the disk, `None` = zero), any order, a later update of an entry wins)
    /// applied. Fails on an update outside the page and after the last page.
    pub fn write_page(
        &mut self,
        repo: &Repository,
        updates: Vec<(u64, Option<ChunkId>)>,
    ) -> Result<()> {
        let k = self.next_page();
        if k >= self.page_count {
            return Err(Error::invalid(format!(
                "the index has {} pages: no page {k}",
                self.page_count
            )));
        }
        let (first, count) = self.page_span(k);
        if let Some(&(i, _)) = updates
            .iter()
            .find(|(i, _)| !(first..first + count).contains(i))
        {
            return Err(Error::invalid(format!(
                "entry {i} is not in page {k} (entries {first}..+{count})"
            )));
        }
        let single = self.page_count == 1;
        // The base's object for exactly this page, when it is paged like this one.
        let base_page = self
            .base
            .as_ref()
            .filter(|b| b.page_entries() == PAGE_ENTRIES || (single && b.page_count() == 1))
            .and_then(|b| b.page(k));
        if updates.is_empty() {
            match base_page {
                Some(IndexPage::Object(id)) => {
                    self.pages.push(Some(id));
                    return Ok(());
                }
                Some(IndexPage::Zero) if !single => {
                    self.pages.push(None);
                    return Ok(());
                }
                _ => {}
            }
        }
        let old = self.base_page(repo)?;
        self.loaded = None;
        let local = updates.into_iter().map(|(i, e)| (i - first, e)).collect();
        let new = old.with_updates(local)?;
        let id = match base_page {
            Some(IndexPage::Object(id)) if new == *old => Some(id),
            _ if single => Some(repo.store_index_plain(&new.encode()?)?),
            _ => repo.store_index_page(&new)?,
        };
        self.pages.push(id);
        Ok(())
    }

    /// Writes the pages not written yet (the base's, or zero) and the root; returns the id of
    /// the disk's index: the root's, or for a disk of one page that page's.
    pub fn finish(mut self, repo: &Repository) -> Result<IndexId> {
        while self.next_page() < self.page_count {
            self.write_page(repo, Vec::new())?;
        }
        match self.pages.as_slice() {
            [] => repo.store_index(&DiskIndex::new_sparse(self.chunk_size, self.disk_size)?),
            [Some(id)] => Ok(*id),
            _ => {
                let root =
                    IndexRoot::new(self.chunk_size, self.disk_size, PAGE_ENTRIES, self.pages)?;
                repo.store_index_plain(&root.encode())
            }
        }
    }
}
