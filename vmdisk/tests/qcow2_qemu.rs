//! qcow2 images laid out by `vmdisk::qcow2` and written the way a restore writes them, checked
//! by real QEMU: `qemu-img check` (no corruption, no leak), `qemu-img compare` against the same
//! bytes as a raw image, and `qemu-img info`. Missing tools fail the test (never skip).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use vmdisk::qcow2::{Layout, Version};

fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is not installed: run scripts/install-deps.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Deterministic bytes: unit `i` filled from a small generator, with one all-zero cluster-sized
/// hole in the middle of every unit (left as a hole of the host file, as restores do).
fn unit_bytes(i: u64, len: usize, hole: usize) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mid = len / 2 / hole * hole;
    if len >= 3 * hole {
        v[mid..mid + hole].fill(0);
    }
    v
}

/// Writes `units` of a `size`-byte disk as qcow2 (at `cs`-byte clusters, `unit`-byte units) and
/// as raw, then has qemu-img check and compare them.
fn roundtrip(dir: &Path, version: Version, cs: u64, size: u64, unit: u64, units: &[u64]) {
    let q = dir.join(format!("t-{cs}-{size}-{unit}-{}.qcow2", units.len()));
    let r = q.with_extension("raw");
    let layout = Layout::new(version, cs, size, unit, units.iter().copied()).unwrap();
    let qf = File::create(&q).unwrap();
    qf.set_len(layout.file_len()).unwrap();
    for (off, bytes) in layout.metadata() {
        qf.write_all_at(&bytes, off).unwrap();
    }
    let rf = File::create(&r).unwrap();
    rf.set_len(size).unwrap();
    for (rank, &i) in units.iter().enumerate() {
        let start = i * unit;
        let len = (size - start).min(unit) as usize;
        let data = unit_bytes(i, len, cs as usize);
        let host = layout.unit_offset(rank as u64);
        for (k, piece) in data.chunks(cs as usize).enumerate() {
            if piece.iter().any(|&b| b != 0) {
                let at = k as u64 * cs;
                qf.write_all_at(piece, host + at).unwrap();
                rf.write_all_at(piece, start + at).unwrap();
            }
        }
    }
    drop((qf, rf));
    let qs = q.to_str().unwrap();
    let (ok, out) = qemu_img(&["check", "-f", "qcow2", qs]);
    assert!(ok, "qemu-img check {qs}: {out}");
    assert!(
        out.contains("No errors were found"),
        "qemu-img check {qs}: {out}"
    );
    let (ok, out) = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        r.to_str().unwrap(),
        qs,
    ]);
    assert!(ok, "qemu-img compare {qs}: {out}");
    let (ok, info) = qemu_img(&["info", "--output=json", "-f", "qcow2", qs]);
    assert!(ok, "{info}");
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"].as_u64(), Some(size));
    assert_eq!(info["cluster-size"].as_u64(), Some(cs));
    let compat = info["format-specific"]["data"]["compat"].as_str();
    assert_eq!(
        compat,
        Some(if version == Version::V2 {
            "0.10"
        } else {
            "1.1"
        })
    );
    if size < 4096 {
        return;
    }
    // QEMU writes into it (into an allocated cluster, or a new one past the data) and it stays
    // consistent.
    let (ok, out) = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 7 0 4096", "-c", "flush", qs])
        .output()
        .map(|o| {
            (
                o.status.success(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
        .expect("qemu-io is not installed: run scripts/install-deps.sh");
    assert!(ok, "qemu-io {qs}: {out}");
    let (ok, out) = qemu_img(&["check", "-f", "qcow2", qs]);
    assert!(
        ok && out.contains("No errors were found"),
        "after a write {qs}: {out}"
    );
}

#[test]
fn qemu_accepts_the_images() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mib = 1u64 << 20;
    // The restore default: 64 KiB clusters, 1 MiB chunks, an unaligned disk end.
    roundtrip(
        d,
        Version::V3,
        65536,
        40 * mib + 12800,
        mib,
        &[0, 1, 2, 7, 20, 39, 40],
    );
    roundtrip(d, Version::V2, 65536, 40 * mib + 12800, mib, &[0, 5, 40]);
    // More than one L2 table (512 MiB each at 64 KiB clusters) and refcount block.
    roundtrip(
        d,
        Version::V3,
        65536,
        3 << 30,
        mib,
        &[0, 511, 512, 1024, 2047, 3071],
    );
    // Small and large clusters.
    roundtrip(d, Version::V3, 512, 3 * mib + 1536, mib, &[0, 2, 3]);
    roundtrip(d, Version::V3, 4096, 9 * mib, 4 * mib, &[1, 2]);
    roundtrip(d, Version::V3, 2 * mib, 9 * mib, 2 * mib, &[0, 4]);
    // Nothing allocated; an empty disk.
    roundtrip(d, Version::V3, 65536, 5 * mib, mib, &[]);
    roundtrip(d, Version::V3, 65536, 0, mib, &[]);
}
