//! Paged disk indexes (FORMAT.md 1.7a): storing, opening, loading pages and ranges, writing page
//! by page against a parent, and refusing what does not fit.

use super::*;

/// A chunk id made from a number.
fn cid(n: u64) -> ChunkId {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&n.to_le_bytes());
    b[8] = 0xa5;
    ChunkId::from_bytes(b)
}

/// An index of `entries` entries of 512 bytes (the last one short) with the entries `stored`.
fn index_of(entries: u64, stored: impl IntoIterator<Item = u64>) -> DiskIndex {
    let size = entries * 512 - 100;
    let updates = stored.into_iter().map(|i| (i, Some(cid(i)))).collect();
    DiskIndex::new_sparse(512, size)
        .unwrap()
        .with_updates(updates)
        .unwrap()
}

fn index_keys(mem: &MemoryBackend) -> usize {
    mem.keys()
        .iter()
        .filter(|k| k.starts_with("indexes/"))
        .count()
}

#[test]
fn a_paged_index_loads_back_whole_by_page_and_by_range() {
    let (mem, repo) = mem_repo(true);
    // Ten pages of 1024 entries, the last one short; pages 1, 4 and 8 hold nothing.
    let entries = 9 * 1024 + 300;
    let stored = (0..entries).filter(|i| ![1, 4, 8].contains(&(i / 1024)) && i % 3 != 1);
    let index = index_of(entries, stored);
    let id = repo.store_index_paged(&index, 1024).unwrap();
    // Seven stored pages and the root.
    assert_eq!(index_keys(&mem), 8);
    assert_eq!(repo.load_index(&id, index.disk_size, 512).unwrap(), index);

    let pages = repo.open_index(&id, index.disk_size, 512).unwrap();
    assert_eq!(
        (pages.page_count(), pages.page_entries(), pages.len()),
        (10, 1024, entries)
    );
    for k in 0..10 {
        let (first, count) = pages.page_span(k);
        assert_eq!((first, count), (k * 1024, if k == 9 { 300 } else { 1024 }));
        assert_eq!(
            pages.page(k).unwrap() == IndexPage::Zero,
            [1, 4, 8].contains(&k),
            "page {k}"
        );
        assert_eq!(
            *repo.load_index_page(&pages, k).unwrap(),
            index.slice(first, count).unwrap()
        );
    }
    assert_eq!(pages.page(10), None);
    assert!(repo.load_index_page(&pages, 10).is_err());
    for (first, count) in [
        (0, 1),
        (1000, 2100),
        (1023, 2),
        (5000, 4216),
        (9515, 1),
        (0, entries),
    ] {
        assert_eq!(
            repo.load_index_range(&pages, first, count).unwrap(),
            index.slice(first, count).unwrap(),
            "{first}+{count}"
        );
    }
    assert!(repo.load_index_range(&pages, entries - 1, 2).is_err());
}

#[test]
fn store_index_pages_only_what_outgrows_a_page() {
    let (mem, repo) = mem_repo(false);
    let small = index_of(PAGE_ENTRIES, [0, PAGE_ENTRIES - 1]);
    let id = repo.store_index(&small).unwrap();
    assert_eq!(index_keys(&mem), 1);
    let opened = repo.open_index(&id, small.disk_size, 512).unwrap();
    assert_eq!(
        (opened.page_count(), opened.page(0)),
        (1, Some(IndexPage::Object(id)))
    );

    let large = index_of(2 * PAGE_ENTRIES + 1, [5, 2 * PAGE_ENTRIES]);
    let id = repo.store_index(&large).unwrap();
    assert_eq!(index_keys(&mem), 1 + 3);
    let opened = repo.open_index(&id, large.disk_size, 512).unwrap();
    assert_eq!(opened.page_count(), 3);
    assert_eq!(opened.page(1), Some(IndexPage::Zero));
    assert_eq!(repo.load_index(&id, large.disk_size, 512).unwrap(), large);
}

#[test]
fn the_writer_writes_pages_in_order_and_only_changed_ones() {
    let (mem, repo) = mem_repo(true);
    let entries = 3 * PAGE_ENTRIES + 10;
    let size = entries * 512 - 100;
    let p = PAGE_ENTRIES;

    // Full: pages 0 and 3 get chunks, 1 and 2 stay zero (never written).
    let mut w = repo.index_writer(512, size, None).unwrap();
    assert_eq!((w.page_count(), w.page_span(3)), (4, (3 * p, 10)));
    w.write_page(&repo, vec![(0, Some(cid(0))), (7, Some(cid(7)))])
        .unwrap();
    assert!(
        w.write_page(&repo, vec![(0, Some(cid(0)))]).is_err(),
        "entry outside page 1"
    );
    let full = w.finish(&repo).unwrap();
    // The update outside page 1 was refused before anything was written: page 1 stayed zero.
    let want = index_of(entries, []).with_updates(vec![(0, Some(cid(0))), (7, Some(cid(7)))]);
    assert_eq!(repo.load_index(&full, size, 512).unwrap(), want.unwrap());
    assert_eq!(index_keys(&mem), 2);

    // Incremental: page 1 gets a chunk, page 0 is rewritten with the same entries, page 0's
    // base is looked at first (as the backup does before reading the page's chunks).
    let base = Arc::new(repo.open_index(&full, size, 512).unwrap());
    let mut w = repo.index_writer(512, size, Some(base.clone())).unwrap();
    let page0 = w.base_page(&repo).unwrap();
    assert_eq!(page0.get(7), Some(cid(7)));
    w.write_page(&repo, vec![(7, Some(cid(7)))]).unwrap();
    w.write_page(&repo, vec![(p + 1, Some(cid(p + 1)))])
        .unwrap();
    let inc = w.finish(&repo).unwrap();
    // One new page, one new root; page 0 is the parent's object.
    assert_eq!(index_keys(&mem), 4);
    let opened = repo.open_index(&inc, size, 512).unwrap();
    assert_eq!(opened.page(0), base.page(0));
    assert!(matches!(opened.page(1), Some(IndexPage::Object(_))));
    let mut want = repo.load_index(&full, size, 512).unwrap();
    want.set(p + 1, Some(cid(p + 1))).unwrap();
    assert_eq!(repo.load_index(&inc, size, 512).unwrap(), want);

    // Zeroing the only chunk of page 1 makes it a zero page again.
    let base = Arc::new(opened);
    let mut w = repo.index_writer(512, size, Some(base)).unwrap();
    w.write_page(&repo, Vec::new()).unwrap();
    w.write_page(&repo, vec![(p + 1, None)]).unwrap();
    let back = w.finish(&repo).unwrap();
    assert_eq!(back, full, "same entries, same pages, same root");

    // A base of another shape is refused.
    let other = Arc::new(repo.open_index(&full, size, 512).unwrap());
    assert!(repo
        .index_writer(512, size - 512, Some(other.clone()))
        .is_err());
    assert!(repo.index_writer(1024, size, Some(other)).is_err());
}

#[test]
fn a_disk_of_one_page_gets_the_same_whole_index_as_before() {
    let (_, repo) = mem_repo(true);
    for entries in [0, 1, 500, PAGE_ENTRIES] {
        let size = (entries * 512).saturating_sub(7);
        let mut w = repo.index_writer(512, size, None).unwrap();
        if entries > 0 {
            w.write_page(&repo, vec![(entries - 1, Some(cid(1)))])
                .unwrap();
        }
        let id = w.finish(&repo).unwrap();
        let mut want = DiskIndex::new_sparse(512, size).unwrap();
        if entries > 0 {
            want.set(entries - 1, Some(cid(1))).unwrap();
        }
        assert_eq!(id, repo.store_index(&want).unwrap(), "{entries} entries");
        // The next backup with no change keeps that id.
        let base = Arc::new(repo.open_index(&id, size, 512).unwrap());
        assert_eq!(
            repo.index_writer(512, size, Some(base))
                .unwrap()
                .finish(&repo)
                .unwrap(),
            id
        );
    }
}

#[test]
fn a_whole_index_of_an_earlier_version_is_read_and_paged_by_the_next_backup() {
    let (_, repo) = mem_repo(false);
    let entries = 2 * PAGE_ENTRIES + 5;
    let old = index_of(entries, (0..entries).step_by(1000));
    // Written whole, as versions without pages did.
    let id = repo.store_index_plain(&old.encode().unwrap()).unwrap();
    let opened = Arc::new(repo.open_index(&id, old.disk_size, 512).unwrap());
    assert_eq!((opened.page_count(), opened.page_entries()), (1, entries));
    assert_eq!(
        repo.load_index_range(&opened, 70_000, 100).unwrap(),
        old.slice(70_000, 100).unwrap()
    );
    let mut w = repo.index_writer(512, old.disk_size, Some(opened)).unwrap();
    w.write_page(&repo, vec![(3, Some(cid(3)))]).unwrap();
    let new = w.finish(&repo).unwrap();
    let mut want = old.clone();
    want.set(3, Some(cid(3))).unwrap();
    let pages = repo.open_index(&new, old.disk_size, 512).unwrap();
    assert_eq!(pages.page_count(), 3);
    assert_eq!(repo.load_index(&new, old.disk_size, 512).unwrap(), want);
}

#[test]
fn pages_that_do_not_fit_their_root_are_corrupt() {
    let (mem, repo) = mem_repo(true);
    let entries = 4 * 1024;
    let index = index_of(entries, 0..entries);
    let size = index.disk_size;
    // A root whose page 1 is an index object of another shape.
    let page = |k: u64| {
        repo.store_index(&index.slice(k * 1024, 1024).unwrap())
            .unwrap()
    };
    let wrong_shape = repo.store_index(&index.slice(0, 1000).unwrap()).unwrap();
    let root = IndexRoot::new(
        512,
        size,
        1024,
        vec![Some(page(0)), Some(wrong_shape), None, None],
    );
    let id = repo.store_index_plain(&root.unwrap().encode()).unwrap();
    let opened = repo.open_index(&id, size, 512).unwrap();
    assert!(repo.load_index_page(&opened, 0).is_ok());
    let e = repo.load_index_page(&opened, 1).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("not page 1"), "{e}");

    // A root as a page of another root: corrupt. A missing page: not found, naming it.
    let nested = IndexRoot::new(512, 1024 * 512, 1024, vec![Some(id)]).unwrap();
    let nested = repo.store_index_plain(&nested.encode()).unwrap();
    let opened = repo.open_index(&nested, 1024 * 512, 512).unwrap();
    assert_eq!(
        repo.load_index_page(&opened, 0).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    let good = repo.store_index_paged(&index, 1024).unwrap();
    let opened = repo.open_index(&good, size, 512).unwrap();
    let Some(IndexPage::Object(p3)) = opened.page(3) else {
        panic!("page 3 is stored")
    };
    let key = mem
        .keys()
        .into_iter()
        .find(|k| k.ends_with(&p3.to_hex()))
        .unwrap();
    mem.remove(&key);
    let e = repo.load_index_page(&opened, 3).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    // The root is refused as the index of another disk.
    assert_eq!(
        repo.open_index(&good, size + 512, 512).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]

    /// Whatever the base (none, whole as earlier versions wrote it, or paged) and however the
    /// updates fall across pages, the writer's index is the base with the updates merged, and
    /// the same updates give the same index id.
    #[test]
    fn the_writer_is_one_merge_of_the_updates(
        small in proptest::prelude::any::<bool>(),
        extra in 0u64..2 * PAGE_ENTRIES,
        base_kind in 0u8..3,
        base_updates in proptest::collection::vec((proptest::prelude::any::<u64>(), proptest::option::of(1u64..1000)), 0..40),
        updates in proptest::collection::vec((proptest::prelude::any::<u64>(), proptest::option::of(1u64..1000)), 0..40),
        peek in proptest::prelude::any::<bool>(),
    ) {
        let (_, repo) = mem_repo(false);
        let entries = if small { 1 + extra % 1000 } else { PAGE_ENTRIES + extra };
        let size = entries * 512 - 7;
        let to_ids = |ups: &[(u64, Option<u64>)]| -> Vec<(u64, Option<ChunkId>)> {
            ups.iter().map(|&(i, e)| (i % entries, e.map(cid))).collect()
        };
        let base = DiskIndex::new_sparse(512, size)
            .unwrap()
            .with_updates(to_ids(&base_updates))
            .unwrap();
        let base_pages = match base_kind {
            0 => None,
            1 => {
                let id = repo.store_index_plain(&base.encode().unwrap()).unwrap();
                Some(Arc::new(repo.open_index(&id, size, 512).unwrap()))
            }
            _ => {
                let id = repo.store_index(&base).unwrap();
                Some(Arc::new(repo.open_index(&id, size, 512).unwrap()))
            }
        };
        let start = if base_pages.is_some() { base.clone() } else { DiskIndex::new_sparse(512, size).unwrap() };
        let ups = to_ids(&updates);
        let write = |ups: &[(u64, Option<ChunkId>)]| {
            let mut w = repo.index_writer(512, size, base_pages.clone()).unwrap();
            for k in 0..w.page_count() {
                let (first, count) = w.page_span(k);
                let page: Vec<_> =
                    ups.iter().copied().filter(|(i, _)| (first..first + count).contains(i)).collect();
                if k % 2 == 1 && ups.iter().all(|&(i, _)| i < first) {
                    break; // no update from here on: the rest is left to finish
                }
                if peek {
                    let b = w.base_page(&repo).unwrap();
                    proptest::prop_assert_eq!(&*b, &start.slice(first, count).unwrap());
                }
                w.write_page(&repo, page).unwrap();
            }
            Ok(w.finish(&repo).unwrap())
        };
        let id = write(&ups)?;
        proptest::prop_assert_eq!(
            repo.load_index(&id, size, 512).unwrap(),
            start.with_updates(ups.clone()).unwrap()
        );
        proptest::prop_assert_eq!(write(&ups)?, id);
    }
}
