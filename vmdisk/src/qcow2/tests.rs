//! The layout checked by a small qcow2 reader written from the specification: header fields,
//! every guest cluster's mapping through L1 and L2, and the refcount of every cluster.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;

use super::*;

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// Reads what `Layout::metadata` wrote the way QEMU would, and checks it against the expected
/// mapping: `units` (ascending) of `unit` bytes, the `r`-th at `unit_offset(r)`.
fn check(version: Version, cs: u64, size: u64, unit: u64, units: &[u64]) {
    let layout = Layout::new(version, cs, size, unit, units.iter().copied()).unwrap();
    let file_len = layout.file_len();
    let mut clusters: HashMap<u64, Vec<u8>> = HashMap::new();
    for (off, bytes) in layout.metadata() {
        assert_eq!(off % cs, 0, "piece at {off} is not cluster-aligned");
        assert_eq!(bytes.len() as u64, cs);
        assert!(off + cs <= file_len);
        assert!(
            clusters.insert(off, bytes).is_none(),
            "cluster {off} written twice"
        );
    }
    let zero = vec![0u8; cs as usize];
    let read = |off: u64| clusters.get(&(off - off % cs)).unwrap_or(&zero);

    let h = read(0);
    assert_eq!(be32(h, 0), MAGIC);
    assert_eq!(be32(h, 4), if version == Version::V2 { 2 } else { 3 });
    assert_eq!(be64(h, 8), 0, "backing file");
    assert_eq!(1u64 << be32(h, 20), cs);
    assert_eq!(be64(h, 24), size);
    assert_eq!(be32(h, 32), 0, "encryption");
    assert_eq!(be32(h, 60), 0, "snapshots");
    let ext_at = if version == Version::V3 {
        assert_eq!(be64(h, 72), 0, "incompatible features");
        assert_eq!(be64(h, 80), 0);
        assert_eq!(be64(h, 88), 0);
        assert_eq!(be32(h, 96), 4, "refcount order");
        let hl = be32(h, 100) as usize;
        assert!(hl >= 104 && hl % 8 == 0);
        hl
    } else {
        72
    };
    assert_eq!(be64(h, ext_at), 0, "header extensions end at once");

    let l2e = cs / 8;
    let l1_size = u64::from(be32(h, 36));
    let l1_off = be64(h, 40);
    let guest_clusters = size.div_ceil(cs);
    assert_eq!(l1_size, guest_clusters.div_ceil(l2e));
    let mut refs: BTreeMap<u64, u32> = BTreeMap::new();
    let mut note = |off: u64| {
        assert_eq!(off % cs, 0);
        *refs.entry(off / cs).or_default() += 1;
    };
    note(0);
    for k in 0..(l1_size * 8).div_ceil(cs) {
        note(l1_off + k * cs);
    }
    // Every guest cluster through L1 and L2.
    let expected: HashMap<u64, u64> = units
        .iter()
        .enumerate()
        .flat_map(|(r, &i)| {
            let first = i * (unit / cs);
            let end = (first + unit / cs).min(guest_clusters);
            let base = layout.unit_offset(r as u64);
            (first..end).map(move |g| (g, base + (g - first) * cs))
        })
        .collect();
    let mut seen_l2 = std::collections::HashSet::new();
    for g in 0..guest_clusters {
        let t = g / l2e;
        let l1e = be64(read(l1_off + t * 8), ((l1_off + t * 8) % cs) as usize);
        let host = if l1e == 0 {
            None
        } else {
            assert_eq!(l1e & COPIED, COPIED, "L1 entry without COPIED");
            let l2 = l1e & !COPIED;
            assert_eq!(l2 & !(MAX_HOST_BYTES - 1), 0);
            if seen_l2.insert(l2) {
                note(l2);
            }
            let e = be64(
                read(l2 + (g % l2e) * 8),
                ((l2 + (g % l2e) * 8) % cs) as usize,
            );
            (e != 0).then(|| {
                assert_eq!(e & COPIED, COPIED, "L2 entry without COPIED");
                assert_eq!(e & 1, 0, "zero flag");
                let host = e & !COPIED;
                note(host);
                host
            })
        };
        assert_eq!(host, expected.get(&g).copied(), "guest cluster {g}");
    }
    // Refcount table and blocks: refcount 1 for exactly the referenced clusters.
    let rt_off = be64(h, 48);
    let rt_clusters = u64::from(be32(h, 56));
    for k in 0..rt_clusters {
        note(rt_off + k * cs);
    }
    let per_block = cs / 2;
    let total = file_len / cs;
    let mut counted = BTreeMap::new();
    for k in 0..rt_clusters * l2e {
        let at = rt_off + k * 8;
        let b = be64(read(at), (at % cs) as usize);
        if b == 0 {
            continue;
        }
        note(b);
        for j in 0..per_block {
            let at = b + j * 2;
            let c = read(at);
            let v = u16::from_be_bytes([c[(at % cs) as usize], c[(at % cs) as usize + 1]]);
            if v != 0 {
                counted.insert(k * per_block + j, u32::from(v));
            }
        }
    }
    assert_eq!(counted, refs, "refcounts against references");
    assert!(refs.values().all(|&n| n == 1), "a cluster referenced twice");
    assert_eq!(
        refs.len() as u64,
        total,
        "the file has unreferenced clusters"
    );
    assert_eq!(refs.keys().last().copied(), Some(total - 1));
}

#[test]
fn default_layout_of_a_small_disk() {
    // 64 KiB clusters, 1 MiB units, 10 MiB + 5 KiB disk: units 0, 3 and the partial last one.
    check(Version::V3, 65536, (10 << 20) + 5120, 1 << 20, &[0, 3, 10]);
    check(Version::V2, 65536, (10 << 20) + 5120, 1 << 20, &[0, 3, 10]);
    let l = Layout::new(Version::V3, 65536, 10 << 20, 1 << 20, [0u64, 3].into_iter()).unwrap();
    // header, L1, refcount table, one refcount block, one L2 table, then the data.
    assert_eq!(l.unit_offset(0), 5 * 65536);
    assert_eq!(l.unit_offset(1), 5 * 65536 + (1 << 20));
    assert_eq!(l.file_len(), 5 * 65536 + (2 << 20));
}

#[test]
fn empty_and_unallocated_disks() {
    check(Version::V3, 65536, 0, 1 << 20, &[]);
    check(Version::V3, 65536, 1 << 30, 1 << 20, &[]);
    check(Version::V2, 512, 4096, 4096, &[]);
}

#[test]
fn small_clusters_span_many_tables() {
    // 512-byte clusters: an L2 table covers 32 KiB, a 1 MiB unit 32 tables.
    check(Version::V3, 512, 3 << 20, 1 << 20, &[0, 2]);
    // 2 MiB clusters, 2 MiB units.
    check(Version::V3, 2 << 20, (5 << 20) + 512, 2 << 20, &[1, 2]);
}

#[test]
fn refuses_what_it_does_not_write_and_bad_units() {
    let k = |r: Result<Layout<std::vec::IntoIter<u64>>>| r.unwrap_err().kind();
    let l = |cs: u64, unit: u64, units: Vec<u64>| {
        Layout::new(Version::V3, cs, 8 << 20, unit, units.into_iter())
    };
    assert_eq!(k(l(3000, 1 << 20, vec![])), ErrorKind::Unsupported);
    assert_eq!(k(l(256, 1 << 20, vec![])), ErrorKind::Unsupported);
    assert_eq!(k(l(4 << 20, 4 << 20, vec![])), ErrorKind::Unsupported);
    assert_eq!(k(l(2 << 20, 1 << 20, vec![])), ErrorKind::Unsupported);
    assert_eq!(k(l(65536, 1 << 20, vec![2, 1])), ErrorKind::InvalidArgument);
    assert_eq!(k(l(65536, 1 << 20, vec![1, 1])), ErrorKind::InvalidArgument);
    assert_eq!(k(l(65536, 1 << 20, vec![8])), ErrorKind::InvalidArgument);
    let odd = Layout::new(Version::V3, 65536, 1000, 1 << 20, std::iter::empty());
    assert_eq!(odd.unwrap_err().kind(), ErrorKind::Unsupported);
    // An L1 table beyond 32 MiB: 512-byte clusters, 2^52 bytes.
    let huge = Layout::new(Version::V3, 512, 1 << 52, 1 << 20, std::iter::empty());
    assert_eq!(huge.unwrap_err().kind(), ErrorKind::Unsupported);
    assert_eq!(Version::from_compat("0.10"), Some(Version::V2));
    assert_eq!(Version::from_compat("1.1"), Some(Version::V3));
    assert_eq!(Version::from_compat("2"), None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]
    #[test]
    fn any_layout_reads_back(
        cluster_bits in 9u32..=21,
        unit_shift in 0u32..4,
        size_units in 0u64..40,
        tail in 0u64..3,
        pick in proptest::collection::vec(any::<bool>(), 40),
        v2 in any::<bool>(),
    ) {
        let cs = 1u64 << cluster_bits;
        // Units of 64 KiB to 2 MiB, at least one cluster.
        let unit = (1u64 << (16 + unit_shift)).max(cs);
        // At most 2048 guest clusters (the reader checks every one).
        let size_units = size_units.min(2048 * cs / unit);
        let size = size_units * unit + tail * 512 * ((cs / 512) * 3 / 2).max(1);
        let n = size.div_ceil(unit);
        let units: Vec<u64> = (0..n).filter(|&i| pick[i as usize % pick.len()]).collect();
        check(if v2 { Version::V2 } else { Version::V3 }, cs, size, unit, &units);
    }
}
