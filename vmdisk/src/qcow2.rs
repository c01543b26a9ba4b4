//! A fresh qcow2 image whose allocated data is known before anything is written: its layout and
//! the bytes of its metadata. Pure: no I/O; the caller writes the metadata pieces and the data
//! (byte by byte in docs/FORMAT.md, "qcow2 images written by restore").
//!
//! Data is allocated in *units* (a restore's chunks): unit `i` covers the guest bytes
//! `[i * unit, min((i + 1) * unit, size))`. The allocated units, in ascending order, get
//! consecutive host ranges after the metadata, so the `r`-th allocated unit starts at
//! [`Layout::unit_offset`]`(r)` and its bytes lie there in guest order. The image is
//!
//! ```text
//! header | L1 table | refcount table | refcount blocks | L2 tables | data
//! ```
//!
//! every cluster up to the end of the data referenced exactly once (refcount 1, so every L1
//! and L2 entry carries the COPIED flag), no backing file, no snapshots, no compression, no
//! encryption, no header extensions. Clusters of an allocated unit that hold only zeros stay
//! allocated; the caller may leave them as holes of the host file (they read as zeros).

use crate::error::{Error, ErrorKind, Result};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// L1/L2 entry flag: the cluster's refcount is exactly one.
const COPIED: u64 = 1 << 63;
/// QEMU's limit on the L1 table (`QCOW_MAX_L1_SIZE`).
const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table (`QCOW_MAX_REFTABLE_SIZE`).
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Host offsets are bits 9-55 of an L1/L2 entry.
const MAX_HOST_BYTES: u64 = 1 << 56;
/// `refcount_order` 4: 16-bit refcounts (the only width a version 2 image has).
const REFCOUNT_BYTES: u64 = 2;

/// The qcow2 version: `compat=0.10` (2) or `compat=1.1` (3, QEMU's default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Version 2 (`compat=0.10`): 72-byte header.
    V2,
    /// Version 3 (`compat=1.1`): 104-byte header, no feature bits set.
    V3,
}

impl Version {
    /// The version for a `qemu-img create -o compat=` value; `None` for one this module does
    /// not write.
    pub fn from_compat(compat: &str) -> Option<Version> {
        match compat {
            "0.10" => Some(Version::V2),
            "1.1" | "v3" => Some(Version::V3),
            _ => None,
        }
    }

    fn header_len(self) -> usize {
        match self {
            Version::V2 => 72,
            Version::V3 => 104,
        }
    }
}

/// Where everything of an image lies (byte offsets in the image file).
#[derive(Debug, Clone)]
pub struct Layout<I> {
    units: I,
    version: Version,
    cluster_bits: u32,
    size: u64,
    unit: u64,
    l1_entries: u64,
    l1_offset: u64,
    rt_offset: u64,
    rt_clusters: u64,
    rb_offset: u64,
    rb_count: u64,
    l2_offset: u64,
    data_offset: u64,
    total_clusters: u64,
}

impl<I: Iterator<Item = u64> + Clone> Layout<I> {
    /// The layout of an image of `size` guest bytes with clusters of `cluster_size` bytes whose
    /// allocated data is the units `units` (ascending unit indices) of `unit` bytes each.
    ///
    /// [`ErrorKind::Unsupported`] when these parameters are not written by this module (a
    /// cluster size that is not a power of two from 512 B to 2 MiB, a unit that is not a
    /// multiple of it, a size that is not a multiple of 512 bytes, tables beyond QEMU's
    /// limits); [`ErrorKind::InvalidArgument`] when
    /// `units` is not strictly ascending or names a unit beyond the end of the disk.
    pub fn new(
        version: Version,
        cluster_size: u64,
        size: u64,
        unit: u64,
        units: I,
    ) -> Result<Self> {
        let unsupported = |what: String| Error::new(ErrorKind::Unsupported, what);
        if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
            return Err(unsupported(format!(
                "cluster size {cluster_size} is not a power of two from 512 B to 2 MiB"
            )));
        }
        if size % 512 != 0 {
            // QEMU counts a qcow2 image's size in 512-byte sectors.
            return Err(unsupported(format!(
                "disk size {size} is not a multiple of 512 bytes"
            )));
        }
        if unit == 0 || unit % cluster_size != 0 {
            return Err(unsupported(format!(
                "unit {unit} is not a multiple of the cluster size {cluster_size}"
            )));
        }
        let cs = cluster_size;
        let cluster_bits = cs.trailing_zeros();
        let guest_clusters = size.div_ceil(cs);
        let l2_entries = cs / 8;
        let l1_entries = guest_clusters.div_ceil(l2_entries);
        if l1_entries * 8 > MAX_L1_BYTES {
            return Err(unsupported(format!(
                "a {size}-byte disk needs an L1 table beyond QEMU's limit at {cs}-byte clusters"
            )));
        }

        // Check the units and count their data clusters, then count the L2 tables they touch.
        let unit_count = size.div_ceil(unit);
        let mut data_clusters = 0u64;
        let mut prev: Option<u64> = None;
        for i in units.clone() {
            if prev.is_some_and(|p| i <= p) || i >= unit_count {
                return Err(Error::invalid(format!(
                    "allocated unit {i} is out of order or beyond the disk's {unit_count} units"
                )));
            }
            prev = Some(i);
            let (first, end) = unit_clusters(i, unit / cs, guest_clusters);
            data_clusters += end - first;
        }
        let l2_tables =
            touched_tables(units.clone(), unit / cs, guest_clusters, l2_entries).count() as u64;

        // An empty disk has no L1 table (offset 0), as `qemu-img create` makes it.
        let l1_clusters = (l1_entries * 8).div_ceil(cs);
        let fixed = 1 + l1_clusters + l2_tables + data_clusters;
        // The refcount structures cover themselves: grow them until they do.
        let (mut rb_count, mut rt_clusters) = (0u64, 0u64);
        loop {
            let total = fixed + rb_count + rt_clusters;
            let rb = total.div_ceil(cs / REFCOUNT_BYTES);
            let rt = (rb * 8).div_ceil(cs).max(1);
            if (rb, rt) == (rb_count, rt_clusters) {
                break;
            }
            (rb_count, rt_clusters) = (rb, rt);
        }
        if rt_clusters * cs > MAX_REFTABLE_BYTES {
            return Err(unsupported(format!(
                "a refcount table of {rt_clusters} clusters is beyond QEMU's limit"
            )));
        }
        let total_clusters = fixed + rb_count + rt_clusters;
        if total_clusters
            .checked_mul(cs)
            .is_none_or(|b| b > MAX_HOST_BYTES)
        {
            return Err(unsupported(format!(
                "an image of {total_clusters} clusters of {cs} bytes is too large"
            )));
        }
        let l1_offset = if l1_clusters == 0 { 0 } else { cs };
        let rt_offset = cs + l1_clusters * cs;
        let rb_offset = rt_offset + rt_clusters * cs;
        let l2_offset = rb_offset + rb_count * cs;
        let data_offset = l2_offset + l2_tables * cs;
        Ok(Layout {
            units,
            version,
            cluster_bits,
            size,
            unit,
            l1_entries,
            l1_offset,
            rt_offset,
            rt_clusters,
            rb_offset,
            rb_count,
            l2_offset,
            data_offset,
            total_clusters,
        })
    }

    /// The host offset of the `rank`-th allocated unit (0 for the first, in ascending order).
    pub fn unit_offset(&self, rank: u64) -> u64 {
        self.data_offset + rank * self.unit
    }

    /// The length of the image file: every cluster, the last data cluster whole.
    pub fn file_len(&self) -> u64 {
        self.total_clusters << self.cluster_bits
    }

    /// The metadata, cluster by cluster: `(offset, bytes)` pieces of one cluster each, to be
    /// written into a file of [`file_len`](Self::file_len) bytes that reads as zeros
    /// elsewhere. Pieces that would be all zero (unused table clusters) are left out. Memory:
    /// one cluster at a time.
    pub fn metadata(&self) -> impl Iterator<Item = (u64, Vec<u8>)> + '_ {
        let cs = self.cluster_size();
        std::iter::once((0, self.header()))
            .chain(self.l1_table())
            .chain((0..self.rt_clusters).filter_map(move |k| {
                let first = k * (cs / 8);
                let n = self.rb_count.saturating_sub(first).min(cs / 8);
                if n == 0 {
                    return None;
                }
                let mut b = vec![0u8; cs as usize];
                for (e, blk) in b.chunks_exact_mut(8).zip(first..first + n) {
                    e.copy_from_slice(&(self.rb_offset + blk * cs).to_be_bytes());
                }
                Some((self.rt_offset + k * cs, b))
            }))
            .chain((0..self.rb_count).map(move |k| {
                let per = cs / REFCOUNT_BYTES;
                let n = self.total_clusters.saturating_sub(k * per).min(per);
                let mut b = vec![0u8; cs as usize];
                for e in b.chunks_exact_mut(2).take(n as usize) {
                    e.copy_from_slice(&1u16.to_be_bytes());
                }
                (self.rb_offset + k * cs, b)
            }))
            .chain(self.l2_tables())
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Every allocated guest cluster with its host offset, ascending.
    fn mappings(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let cs = self.cluster_size();
        let per_unit = self.unit / cs;
        let guest_clusters = self.size.div_ceil(cs);
        self.units.clone().zip(0u64..).flat_map(move |(i, rank)| {
            let (first, end) = unit_clusters(i, per_unit, guest_clusters);
            let base = self.unit_offset(rank);
            (first..end).map(move |g| (g, base + (g - first) * cs))
        })
    }

    fn header(&self) -> Vec<u8> {
        let mut h = vec![0u8; self.cluster_size() as usize];
        let mut put = |at: usize, v: &[u8]| h[at..at + v.len()].copy_from_slice(v);
        put(0, &MAGIC.to_be_bytes());
        let version: u32 = match self.version {
            Version::V2 => 2,
            Version::V3 => 3,
        };
        put(4, &version.to_be_bytes());
        // 8: backing file offset, 16: its length: none.
        put(20, &self.cluster_bits.to_be_bytes());
        put(24, &self.size.to_be_bytes());
        // 32: crypt method: none.
        put(36, &(self.l1_entries as u32).to_be_bytes());
        put(40, &self.l1_offset.to_be_bytes());
        put(48, &self.rt_offset.to_be_bytes());
        put(56, &(self.rt_clusters as u32).to_be_bytes());
        // 60: snapshots, 64: their offset: none.
        if self.version == Version::V3 {
            // 72, 80, 88: incompatible, compatible and autoclear features: none.
            put(96, &4u32.to_be_bytes());
            put(100, &(self.version.header_len() as u32).to_be_bytes());
        }
        // The header extensions start at header_len: the end marker (type 0, length 0) is
        // the zeros already there.
        h
    }

    /// The L1 table, cluster by cluster (clusters without an entry left out): entry `t` of
    /// the `r`-th L2 table that exists points at `l2_offset + r * cs`.
    fn l1_table(&self) -> impl Iterator<Item = (u64, Vec<u8>)> + '_ {
        let cs = self.cluster_size();
        let per_cluster = cs / 8;
        let guest_clusters = self.size.div_ceil(cs);
        let tables = touched_tables(
            self.units.clone(),
            self.unit / cs,
            guest_clusters,
            per_cluster,
        )
        .zip(0u64..)
        .map(move |(t, rank)| (t, (self.l2_offset + rank * cs) | COPIED));
        table_clusters(tables, cs).map(move |(k, b)| (self.l1_offset + k * cs, b))
    }

    fn l2_tables(&self) -> impl Iterator<Item = (u64, Vec<u8>)> + '_ {
        let cs = self.cluster_size();
        let maps = self.mappings().map(|(g, host)| (g, host | COPIED));
        // The L2 tables that exist, in order: the `r`-th at `l2_offset + r * cs`.
        table_clusters(maps, cs)
            .zip(0u64..)
            .map(move |((_, b), rank)| (self.l2_offset + rank * cs, b))
    }
}

/// Packs table entries `(slot, value)` (slots ascending) into clusters of `cs` bytes, `cs / 8`
/// big-endian entries each, the other slots zero: `(k, cluster)` for each cluster `k` of the
/// table that holds an entry, in order.
fn table_clusters(
    entries: impl Iterator<Item = (u64, u64)>,
    cs: u64,
) -> impl Iterator<Item = (u64, Vec<u8>)> {
    let per_cluster = cs / 8;
    let mut entries = entries.peekable();
    std::iter::from_fn(move || {
        let &(s0, _) = entries.peek()?;
        let k = s0 / per_cluster;
        let mut b = vec![0u8; cs as usize];
        while let Some(&(slot, value)) = entries.peek() {
            if slot / per_cluster != k {
                break;
            }
            let at = ((slot % per_cluster) * 8) as usize;
            b[at..at + 8].copy_from_slice(&value.to_be_bytes());
            entries.next();
        }
        Some((k, b))
    })
}

/// The L2 tables (indices into the L1 table, ascending, each once) that the clusters of
/// `units` fall into (`per_unit` clusters each, `guest_clusters` on the disk, `l2_entries` per
/// table).
fn touched_tables(
    units: impl Iterator<Item = u64>,
    per_unit: u64,
    guest_clusters: u64,
    l2_entries: u64,
) -> impl Iterator<Item = u64> {
    let mut next = 0u64;
    units.flat_map(move |i| {
        let (first, end) = unit_clusters(i, per_unit, guest_clusters);
        let t0 = (first / l2_entries).max(next);
        let t1 = (end - 1) / l2_entries;
        next = t1 + 1;
        t0..=t1
    })
}

/// The guest clusters `[first, end)` of unit `i` (`per_unit` clusters each; the disk has
/// `guest_clusters`).
fn unit_clusters(i: u64, per_unit: u64, guest_clusters: u64) -> (u64, u64) {
    let first = i * per_unit;
    (first, (first + per_unit).min(guest_clusters))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests;
