//! End-to-end: back up qcow2 and raw images with mixed content (files, random, duplicates, zeros,
//! holes) with the real `lifeboat` binary over real qemu-nbd, restore them in both formats, and
//! check them with `qemu-img compare`; dedup of a second backup; incremental backups through the
//! qcow2 persistent dirty bitmap read only the dirty extents (asserted on `bytes_read`), with
//! discards and zero writes, and every older snapshot still restores to its own content.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

const SIZE_MIB: u64 = 128;

/// Allocation of a restored image should be close to the source's: no more than the source plus
/// a little metadata (restore never writes zero chunks, so it may be less: explicit zeros).
fn assert_sparse(restored: u64, source: u64, what: &str) {
    assert!(
        restored <= source + source / 20 + 4 * MIB,
        "{what}: restored image allocates {restored} bytes, source {source}"
    );
    assert!(
        restored >= source / 2,
        "{what}: restored image allocates only {restored} bytes, source {source}"
    );
}

#[test]
fn qcow2_round_trip_keeps_options_and_sparseness_and_dedups_second_backup() {
    let env = Env::with_repo();
    // A non-default cluster size, to see that restore keeps it.
    let mixed = env.path("mixed.qcow2");
    mixed_image(SIZE_MIB, "qcow2", &mixed);
    let src = env.path("src.qcow2");
    convert_to_qcow2(&mixed, &src, "cluster_size=131072,compat=1.1");

    let b1 = env.backup(&src, "vm1", "vda");
    assert_eq!(b1.mode, "full");
    assert!(b1.bytes_read > 30 * MIB && b1.bytes_new > 0 && b1.chunks_new > 0);

    let out = env.path("out");
    env.restore("vm1@latest", &out, &[]);
    let restored = out.join("vda.qcow2");
    assert_identical(&src, &restored);
    assert_qcow2_clean(&restored);
    assert!(written_natively(&restored));
    let info = image_info(&restored);
    let src_info = image_info(&src);
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["cluster-size"], 131072, "{info}");
    assert_eq!(info["format-specific"]["data"]["compat"], "1.1", "{info}");
    assert_sparse(
        info["actual-size"].as_u64().unwrap(),
        src_info["actual-size"].as_u64().unwrap(),
        "qcow2",
    );

    // The same snapshot as raw.
    let out_raw = env.path("out-raw");
    env.restore(&b1.snapshot[..12], &out_raw, &["--format", "raw"]);
    let raw = out_raw.join("vda.raw");
    assert_eq!(image_info(&raw)["format"], "raw");
    assert_identical(&src, &raw);
    assert_sparse(
        allocated(&raw),
        src_info["actual-size"].as_u64().unwrap(),
        "qcow2 as raw",
    );

    // Unchanged image, second backup: incremental through the bitmap, nothing read or stored.
    let b2 = env.backup(&src, "vm1", "vda");
    assert_eq!(b2.mode, "incremental");
    assert_eq!(
        (b2.bytes_read, b2.bytes_new, b2.chunks_new),
        (0, 0, 0),
        "{b2:?}"
    );
    assert_eq!(b2.dirty_bytes, Some(0));
    // ... and the forced full backup stores nothing new either (dedup).
    let b3 = env.json(&[
        "backup-image",
        src.to_str().unwrap(),
        "--name",
        "vm1",
        "--disk",
        "vda",
        "--full",
    ]);
    assert_eq!(b3["mode"], "full");
    assert_eq!(b3["disks"][0]["bytes_new"], 0, "{b3}");
    assert_eq!(b3["disks"][0]["chunks_new"], 0, "{b3}");
    let out2 = env.path("out2");
    env.restore("vm1@latest", &out2, &[]);
    assert_identical(&src, &out2.join("vda.qcow2"));
    let v = env.json(&["verify", "--read-data"]);
    assert_eq!(v["ok"], true, "{v}");
}

#[test]
fn qcow2_restore_keeps_compat_0_10_and_small_clusters() {
    let env = Env::with_repo();
    let src = env.path("old.qcow2");
    let mixed = env.path("mixed.raw");
    mixed_image(64, "raw", &mixed);
    convert_to_qcow2(&mixed, &src, "cluster_size=4096,compat=0.10");
    env.backup(&src, "old", "vda");
    let out = env.path("out");
    env.restore("old@latest", &out, &[]);
    let restored = out.join("vda.qcow2");
    assert_identical(&src, &restored);
    assert_qcow2_clean(&restored);
    assert!(written_natively(&restored));
    let info = image_info(&restored);
    assert_eq!(info["cluster-size"], 4096, "{info}");
    assert_eq!(info["format-specific"]["data"]["compat"], "0.10", "{info}");
    assert_sparse(
        info["actual-size"].as_u64().unwrap(),
        image_info(&src)["actual-size"].as_u64().unwrap(),
        "compat 0.10",
    );
}

#[test]
fn raw_round_trip_in_both_formats_and_second_backup_stores_nothing() {
    let env = Env::with_repo();
    let src = env.path("disk.raw");
    mixed_image(SIZE_MIB, "raw", &src);

    let b1 = env.backup(&src, "vm2", "vdb");
    assert_eq!(b1.mode, "full");
    assert!(b1.chunks_new > 0);

    let out = env.path("out");
    env.restore("vm2@latest", &out, &[]);
    let raw = out.join("vdb.raw");
    // The restore leaves none of its image in the page cache (pipeline::writeback; tmpfs
    // pages cannot be dropped).
    if tool("stat", &["-f", "-c", "%T", out.to_str().unwrap()]).trim() != "tmpfs" {
        let cached = tool(
            "fincore",
            &[
                "--bytes",
                "--noheadings",
                "--output",
                "RES",
                raw.to_str().unwrap(),
            ],
        );
        let cached: u64 = cached.trim().parse().unwrap();
        assert!(
            cached < 4 * MIB,
            "{cached} bytes of the restored image still cached"
        );
    }
    assert_identical(&src, &raw);
    assert_sparse(allocated(&raw), allocated(&src), "raw");

    let out_q = env.path("out-q");
    env.restore("vm2@latest", &out_q, &["--format", "qcow2"]);
    let q = out_q.join("vdb.qcow2");
    let info = image_info(&q);
    assert_eq!(info["format"], "qcow2");
    assert_identical(&src, &q);
    assert_qcow2_clean(&q);
    assert!(written_natively(&q));
    assert_sparse(
        info["actual-size"].as_u64().unwrap(),
        allocated(&src),
        "raw as qcow2",
    );

    // Raw: no change tracking, so full again; every chunk is already stored.
    let b2 = env.backup(&src, "vm2", "vdb");
    assert_eq!(b2.mode, "full");
    assert!(b2.bytes_read > 0);
    assert_eq!((b2.bytes_new, b2.chunks_new), (0, 0), "{b2:?}");
    let snaps = env.json(&["snapshots", "vm2"]);
    assert_eq!(snaps.as_array().unwrap().len(), 2);
}

#[test]
fn qcow2_with_clusters_larger_than_a_chunk_restores_through_qemu_img() {
    let env = Env::with_repo();
    let mixed = env.path("mixed.qcow2");
    mixed_image(SIZE_MIB, "qcow2", &mixed);
    let src = env.path("big.qcow2");
    convert_to_qcow2(&mixed, &src, "cluster_size=2097152");
    env.backup(&src, "big", "vda");
    let out = env.path("out");
    env.restore("big@latest", &out, &[]);
    let restored = out.join("vda.qcow2");
    assert_identical(&src, &restored);
    assert_qcow2_clean(&restored);
    // 2 MiB clusters, 1 MiB chunks: not a layout Lifeboat writes, so qemu-img convert did.
    assert!(!written_natively(&restored));
    assert_eq!(image_info(&restored)["cluster-size"], 2097152);
}

/// Write `len` bytes of pattern `pat` at `off` (unaligned offsets welcome).
fn write_cmd(pat: u8, off: u64, len: u64) -> String {
    format!("write -P {pat} {off} {len}")
}

#[test]
fn incremental_reads_only_dirty_extents_and_older_snapshots_keep_their_content() {
    let env = Env::with_repo();
    let img = env.path("inc.qcow2");
    mixed_image(SIZE_MIB, "qcow2", &img);
    let chunk = MIB;

    let b0 = env.backup(&img, "inc", "vda");
    assert_eq!(b0.mode, "full");
    let v0 = env.path("v0.qcow2");
    sparse_copy(&img, &v0);

    // N bytes in three places: inside the file system, over random data (unaligned, crossing a
    // chunk boundary), and into a hole.
    let writes = [
        (0x5a, 5 * MIB + 12_345, 3 * MIB),
        (0x6b, 70 * MIB - 100_000, MIB),
        (0x7c, 100 * MIB + 64 * 1024, 512 * 1024),
    ];
    let cmds: Vec<String> = writes.iter().map(|&(p, o, l)| write_cmd(p, o, l)).collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&img, "qcow2", &cmds);
    let n: u64 = writes.iter().map(|w| w.2).sum();

    let b1 = env.backup(&img, "inc", "vda");
    assert_eq!(b1.mode, "incremental", "{b1:?}");
    let max = n + 2 * chunk * writes.len() as u64;
    assert!(
        b1.bytes_read >= n && b1.bytes_read <= max,
        "incremental read {} bytes for {n} bytes written (allowed {n}..={max})",
        b1.bytes_read
    );
    eprintln!(
        "incremental: wrote {n} bytes in {} places, dirty {:?}, read {}, stored {} in {} chunks",
        writes.len(),
        b1.dirty_bytes,
        b1.bytes_read,
        b1.bytes_new,
        b1.chunks_new
    );
    assert!(b1.dirty_bytes.unwrap() >= n);
    assert!(b1.chunks_new >= 3 && b1.chunks_new <= 3 + 2 * 3, "{b1:?}");
    let v1 = env.path("v1.qcow2");
    sparse_copy(&img, &v1);

    // Discard and zero parts of the random area.
    qemu_io(
        &img,
        "qcow2",
        &["discard 72M 2M", "write -z 66M 1M", "write -P 0x11 0 4096"],
    );
    let b2 = env.backup(&img, "inc", "vda");
    assert_eq!(b2.mode, "incremental", "{b2:?}");
    assert!(
        b2.bytes_read <= 4096 + 2 * chunk,
        "discard/zero should not need reads beyond the written block: {b2:?}"
    );
    let v2 = env.path("v2.qcow2");
    sparse_copy(&img, &v2);

    // Every snapshot restores to the image as it was at that backup.
    for (snap, expected) in [(&b0, &v0), (&b1, &v1), (&b2, &v2)] {
        let out = env.path(&format!("out-{}", &snap.snapshot[..8]));
        env.restore(&snap.snapshot, &out, &[]);
        assert_identical(expected, &out.join("vda.qcow2"));
    }
    // The discarded and zeroed ranges read as zeros in the restored latest snapshot.
    let latest = env
        .path(&format!("out-{}", &b2.snapshot[..8]))
        .join("vda.qcow2");
    qemu_io(&latest, "qcow2", &["read -P 0 72M 2M", "read -P 0 66M 1M"]);
    // ... and not in the one before.
    let before = env
        .path(&format!("out-{}", &b1.snapshot[..8]))
        .join("vda.qcow2");
    for range in ["72M 2M", "66M 1M"] {
        let o = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", &format!("read -P 0 {range}")])
            .arg(&before)
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("Pattern verification failed"),
            "{range} should hold data before the discard / zero write"
        );
    }
}
