//! Whole-index encoding, decoding, updates and slices.

use super::*;
use proptest::prelude::*;

#[test]
fn sparse_terabyte_is_tiny() {
    let idx = DiskIndex::new_sparse(1 << 20, 1 << 40).unwrap();
    let enc = idx.encode().unwrap();
    assert!(enc.len() < HEADER_LEN + 8, "{}", enc.len());
    assert_eq!(DiskIndex::decode(&enc).unwrap(), idx);
}

#[test]
fn empty_disk() {
    let idx = DiskIndex::new_sparse(65536, 0).unwrap();
    let enc = idx.encode().unwrap();
    assert_eq!(enc.len(), HEADER_LEN);
    assert_eq!(DiskIndex::decode(&enc).unwrap(), idx);
}

#[test]
fn rejects_bad_input() {
    let mut idx = DiskIndex::new_sparse(65536, 65536 * 3 + 1).unwrap();
    idx.set(1, Some(ChunkId::from_bytes([1; 32]))).unwrap();
    let enc = idx.encode().unwrap();
    for cut in 0..enc.len() {
        assert!(DiskIndex::decode(&enc[..cut]).is_err(), "cut {cut}");
    }
    let mut trailing = enc.clone();
    trailing.push(0);
    assert!(DiskIndex::decode(&trailing).is_err());
    let mut bad_tag = enc.clone();
    bad_tag[HEADER_LEN] = 7;
    assert!(DiskIndex::decode(&bad_tag).is_err());
    let mut bad_version = enc.clone();
    bad_version[4] = 2;
    assert_eq!(
        DiskIndex::decode(&bad_version).unwrap_err().kind(),
        ErrorKind::UnsupportedVersion
    );
    // entry count that does not match sizes
    let mut bad_count = enc.clone();
    bad_count[20] = 9;
    assert!(DiskIndex::decode(&bad_count).is_err());
    assert!(idx.set(4, Some(ChunkId::from_bytes([1; 32]))).is_err());
    idx.stored.push((4, ChunkId::from_bytes([2; 32])));
    assert!(idx.encode().is_err());
    idx.stored = vec![
        (2, ChunkId::from_bytes([2; 32])),
        (1, ChunkId::from_bytes([1; 32])),
    ];
    assert!(idx.encode().is_err());
}

#[test]
fn leb128_edges() {
    for n in [1u64, 127, 128, 300, u32::MAX as u64, u64::MAX] {
        let mut v = Vec::new();
        push_zero_run(&mut v, n);
        assert_eq!(read_leb128(&v[1..]), Some((n, &[][..])));
    }
    assert_eq!(read_leb128(&[0x80, 0x00]), None);
    assert_eq!(read_leb128(&[0xff; 11]), None);
    assert_eq!(read_leb128(&[0x80]), None);
}

fn arb_index() -> impl Strategy<Value = DiskIndex> {
    (
        prop::sample::select(vec![512u32, 4096, 65536, 1 << 20]),
        prop::collection::vec(prop::option::weighted(0.4, any::<[u8; 32]>()), 0..200),
        0u32..512,
    )
        .prop_map(|(cs, entries, tail)| {
            let n = entries.len() as u64;
            let disk_size = if n == 0 {
                0
            } else {
                (n - 1) * u64::from(cs) + u64::from(tail % cs) + 1
            };
            DiskIndex::from_entries(
                cs,
                disk_size,
                entries.into_iter().map(|e| e.map(ChunkId::from_bytes)),
            )
            .unwrap()
        })
}

/// Every entry, zero ones included (the old in-memory form), for checking against.
fn dense(idx: &DiskIndex) -> Vec<Option<ChunkId>> {
    (0..idx.len()).map(|i| idx.get(i)).collect()
}

proptest! {
    #[test]
    fn round_trip(idx in arb_index()) {
        let enc = idx.encode().unwrap();
        prop_assert_eq!(DiskIndex::decode(&enc).unwrap(), idx);
    }

    #[test]
    fn updates_match_dense_assignment(
        idx in arb_index(),
        ups in prop::collection::vec((any::<u64>(), prop::option::of(any::<u8>())), 0..60),
    ) {
        let len = idx.len();
        prop_assume!(len > 0);
        let ups: Vec<(u64, Option<ChunkId>)> = ups
            .into_iter()
            .map(|(i, e)| (i % len, e.map(|b| ChunkId::from_bytes([b; 32]))))
            .collect();
        let mut want = dense(&idx);
        let mut one_by_one = idx.clone();
        for &(i, e) in &ups {
            want[i as usize] = e;
            one_by_one.set(i, e).unwrap();
        }
        let merged = idx.with_updates(ups).unwrap();
        prop_assert!(merged.validate().is_ok());
        prop_assert_eq!(dense(&merged), want.clone());
        prop_assert_eq!(&one_by_one, &merged);
        let back = DiskIndex::from_entries(idx.chunk_size, idx.disk_size, want).unwrap();
        prop_assert_eq!(back, merged);
    }

    #[test]
    fn a_slice_is_its_range_of_entries(idx in arb_index(), a in any::<u64>(), b in any::<u64>()) {
        let len = idx.len();
        let first = a % (len + 1);
        let count = b % (len - first + 1);
        let slice = idx.slice(first, count).unwrap();
        prop_assert!(slice.validate().is_ok());
        prop_assert_eq!(slice.len(), count);
        let want: Vec<_> = dense(&idx)[first as usize..(first + count) as usize].to_vec();
        prop_assert_eq!(dense(&slice), want);
        let end = (first * u64::from(idx.chunk_size) + slice.disk_size).min(idx.disk_size);
        prop_assert_eq!(end, ((first + count) * u64::from(idx.chunk_size)).min(idx.disk_size));
        prop_assert!(idx.slice(first, len - first + 1).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = DiskIndex::decode(&bytes);
    }

    #[test]
    fn mutated_encodings_never_panic(idx in arb_index(), pos in any::<usize>(), val in any::<u8>()) {
        let mut enc = idx.encode().unwrap();
        let p = pos % enc.len();
        enc[p] = val;
        if let Ok(d) = DiskIndex::decode(&enc) {
            prop_assert!(d.validate().is_ok());
        }
    }
}
