//! Extents and range sets (pure, no I/O).
//!
//! [`BlockStatus`] is one descriptor reported by an NBD metadata context; [`RangeSet`] is
//! a sorted set of byte ranges used to decide which parts of a disk to read.

/// One block status descriptor from a single metadata context: `length` bytes starting at
/// `offset` carry the context-specific `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockStatus {
    /// Absolute byte offset in the export.
    pub offset: u64,
    /// Length in bytes (never zero when produced by this crate).
    pub length: u64,
    /// Context-specific status flags.
    pub flags: u32,
}

impl BlockStatus {
    /// `base:allocation`: the range is not allocated (a hole).
    pub const STATE_HOLE: u32 = 1;
    /// `base:allocation`: the range reads as zeroes.
    pub const STATE_ZERO: u32 = 2;
    /// `qemu:dirty-bitmap:*`: the range is dirty (changed since the bitmap was created).
    pub const STATE_DIRTY: u32 = 1;

    /// Exclusive end offset (saturating).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }
}

/// A set of byte ranges `[start, end)`, kept sorted, non-overlapping and merged
/// (adjacent ranges are joined, empty ranges never stored).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: Vec<(u64, u64)>,
}

impl RangeSet {
    /// The empty set.
    pub fn new() -> Self {
        RangeSet::default()
    }

    /// Builds a set from arbitrary (possibly overlapping, unsorted, empty) ranges.
    /// Ranges with `end <= start` are ignored.
    pub fn from_ranges<I: IntoIterator<Item = (u64, u64)>>(ranges: I) -> Self {
        let mut v: Vec<(u64, u64)> = ranges.into_iter().filter(|(s, e)| s < e).collect();
        v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
        for (s, e) in v {
            match out.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => out.push((s, e)),
            }
        }
        RangeSet { ranges: out }
    }

    /// Adds `[start, end)`; does nothing if `end <= start`.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        // First range whose end >= start (may merge), last range whose start <= end.
        let lo = self.ranges.partition_point(|r| r.1 < start);
        let hi = self.ranges.partition_point(|r| r.0 <= end);
        if lo >= hi {
            self.ranges.insert(lo, (start, end));
        } else {
            let s = start.min(self.ranges[lo].0);
            let e = end.max(self.ranges[hi - 1].1);
            self.ranges.splice(lo..hi, std::iter::once((s, e)));
        }
    }

    /// Ranges in either set.
    pub fn union(&self, other: &RangeSet) -> RangeSet {
        RangeSet::from_ranges(self.ranges.iter().chain(other.ranges.iter()).copied())
    }

    /// Ranges in both sets.
    pub fn intersect(&self, other: &RangeSet) -> RangeSet {
        let (mut i, mut j) = (0, 0);
        let mut out = Vec::new();
        while let (Some(&(a0, a1)), Some(&(b0, b1))) = (self.ranges.get(i), other.ranges.get(j)) {
            let s = a0.max(b0);
            let e = a1.min(b1);
            if s < e {
                out.push((s, e));
            }
            if a1 < b1 {
                i += 1;
            } else {
                j += 1;
            }
        }
        RangeSet { ranges: out }
    }

    /// Ranges in `self` but not in `other`.
    pub fn subtract(&self, other: &RangeSet) -> RangeSet {
        let mut out = Vec::new();
        let mut j = 0;
        for &(s, e) in &self.ranges {
            let mut cur = s;
            while let Some(&(b0, b1)) = other.ranges.get(j) {
                if b1 <= cur {
                    j += 1;
                    continue;
                }
                if b0 >= e {
                    break;
                }
                if b0 > cur {
                    out.push((cur, b0));
                }
                cur = cur.max(b1);
                if b1 >= e {
                    break;
                }
                j += 1;
            }
            if cur < e {
                out.push((cur, e));
            }
        }
        RangeSet { ranges: out }
    }

    /// Sum of the lengths of all ranges.
    pub fn total_len(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    /// True if the set holds no range.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// True if `[start, end)` is entirely inside one range of the set (an empty range is
    /// always contained).
    pub fn contains_range(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return true;
        }
        let i = self.ranges.partition_point(|r| r.1 <= start);
        matches!(self.ranges.get(i), Some(&(s, e)) if s <= start && end <= e)
    }

    /// True if `[start, end)` overlaps any range of the set.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return false;
        }
        let i = self.ranges.partition_point(|r| r.1 <= start);
        matches!(self.ranges.get(i), Some(&(s, _)) if s < end)
    }

    /// The ranges, ascending, as `(start, end)` pairs.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().copied()
    }

    /// Every index `i` such that chunk `[i * chunk_size, (i + 1) * chunk_size)` overlaps
    /// a range of the set, ascending and deduplicated. Yields nothing if `chunk_size` is 0.
    pub fn chunks_touched(&self, chunk_size: u64) -> impl Iterator<Item = u64> + '_ {
        let mut next_min = 0u64;
        self.ranges
            .iter()
            .filter(move |_| chunk_size > 0)
            .flat_map(move |&(s, e)| {
                let first = s / chunk_size;
                let last = (e - 1) / chunk_size;
                let first = first.max(next_min);
                next_min = last.saturating_add(1);
                // Empty when an earlier range already yielded `last`: no duplicates.
                first..=last
            })
    }
}

impl<'a> IntoIterator for &'a RangeSet {
    type Item = (u64, u64);
    type IntoIter = std::iter::Copied<std::slice::Iter<'a, (u64, u64)>>;
    fn into_iter(self) -> Self::IntoIter {
        self.ranges.iter().copied()
    }
}

/// Ranges of a `base:allocation` map that must be read: extents without
/// [`BlockStatus::STATE_ZERO`] (holes that read as zeroes, and zero extents, are skipped;
/// a HOLE without ZERO has undefined content and is read).
pub fn data_ranges(extents: &[BlockStatus]) -> RangeSet {
    RangeSet::from_ranges(
        extents
            .iter()
            .filter(|e| e.flags & BlockStatus::STATE_ZERO == 0)
            .map(|e| (e.offset, e.end())),
    )
}

/// Ranges of a dirty-bitmap map marked [`BlockStatus::STATE_DIRTY`].
pub fn dirty_ranges(extents: &[BlockStatus]) -> RangeSet {
    RangeSet::from_ranges(
        extents
            .iter()
            .filter(|e| e.flags & BlockStatus::STATE_DIRTY != 0)
            .map(|e| (e.offset, e.end())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const N: u64 = 256;

    fn model(ranges: &[(u64, u64)]) -> Vec<bool> {
        let mut m = vec![false; N as usize];
        for &(s, e) in ranges {
            for i in s..e.min(N) {
                m[i as usize] = true;
            }
        }
        m
    }

    fn set_model(s: &RangeSet) -> Vec<bool> {
        model(&s.iter().collect::<Vec<_>>())
    }

    fn invariant(s: &RangeSet) {
        let v: Vec<_> = s.iter().collect();
        for r in &v {
            assert!(r.0 < r.1);
        }
        for w in v.windows(2) {
            assert!(w[0].1 < w[1].0, "not merged/sorted: {v:?}");
        }
    }

    fn ranges() -> impl Strategy<Value = Vec<(u64, u64)>> {
        prop::collection::vec((0..N, 0..N), 0..12)
    }

    proptest! {
        #[test]
        fn from_ranges_matches_model(r in ranges()) {
            let s = RangeSet::from_ranges(r.clone());
            invariant(&s);
            prop_assert_eq!(set_model(&s), model(&r));
            prop_assert_eq!(s.total_len(), model(&r).iter().filter(|b| **b).count() as u64);
        }

        #[test]
        fn insert_matches_model(r in ranges()) {
            let mut s = RangeSet::new();
            for &(a, b) in &r { s.insert(a, b); invariant(&s); }
            prop_assert_eq!(s, RangeSet::from_ranges(r));
        }

        #[test]
        fn set_ops_match_model(a in ranges(), b in ranges()) {
            let (sa, sb) = (RangeSet::from_ranges(a.clone()), RangeSet::from_ranges(b.clone()));
            let (ma, mb) = (model(&a), model(&b));
            let u = sa.union(&sb); invariant(&u);
            let i = sa.intersect(&sb); invariant(&i);
            let d = sa.subtract(&sb); invariant(&d);
            for k in 0..N as usize {
                prop_assert_eq!(set_model(&u)[k], ma[k] || mb[k]);
                prop_assert_eq!(set_model(&i)[k], ma[k] && mb[k]);
                prop_assert_eq!(set_model(&d)[k], ma[k] && !mb[k]);
            }
        }

        #[test]
        fn chunks_touched_matches_model(r in ranges(), cs in 1u64..40) {
            let s = RangeSet::from_ranges(r.clone());
            let m = model(&r);
            let expect: Vec<u64> = (0..N.div_ceil(cs))
                .filter(|c| (c * cs..((c + 1) * cs).min(N)).any(|i| m[i as usize]))
                .collect();
            prop_assert_eq!(s.chunks_touched(cs).collect::<Vec<_>>(), expect);
        }

        #[test]
        fn contains_and_overlaps_match_model(r in ranges(), q in (0..N, 0..N)) {
            let s = RangeSet::from_ranges(r.clone());
            let m = model(&r);
            let (a, b) = q;
            prop_assert_eq!(s.contains_range(a, b), (a..b).all(|i| m[i as usize]));
            prop_assert_eq!(s.overlaps(a, b), (a..b).any(|i| m[i as usize]));
        }
    }

    #[test]
    fn data_and_dirty_ranges() {
        let ext = [
            BlockStatus {
                offset: 0,
                length: 10,
                flags: 0,
            },
            BlockStatus {
                offset: 10,
                length: 10,
                flags: 3,
            },
            BlockStatus {
                offset: 20,
                length: 10,
                flags: 2,
            },
            BlockStatus {
                offset: 30,
                length: 10,
                flags: 1,
            },
        ];
        assert_eq!(
            data_ranges(&ext).iter().collect::<Vec<_>>(),
            vec![(0, 10), (30, 40)]
        );
        assert_eq!(
            dirty_ranges(&ext).iter().collect::<Vec<_>>(),
            vec![(10, 20), (30, 40)]
        );
        assert_eq!(RangeSet::new().chunks_touched(0).count(), 0);
        let big = RangeSet::from_ranges([(u64::MAX - 10, u64::MAX)]);
        assert_eq!(big.chunks_touched(1 << 20).count(), 1);
    }
}
