//! End-to-end: framed chunk objects (FORMAT.md 1.6a). An incremental backup of scattered 64 KiB
//! writes into a repository with frames reads exactly the dirty frames over NBD (an unframed
//! repository reads whole chunks for the same writes); a frame zeroed later turns its chunk into
//! a zero entry without any read; every snapshot restores to its own content; `verify
//! --read-data` opens every frame; and the repository config says version 3 with its frame size.
//! The new versions are delta objects (FORMAT.md 1.6b) that store only the dirty frames and
//! take the others from their base; a missing base is reported, never silently built upon.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::*;

const SIZE_MIB: u64 = 128;
const FRAME: u64 = 64 * 1024;

/// 64 KiB-aligned writes into chunks that hold data: random data (64M..80M) and the file system.
fn writes() -> Vec<String> {
    let mut offs: Vec<u64> = (66..74).map(|m| m * MIB + 3 * FRAME).collect();
    offs.extend([10, 20, 30, 40].map(|m| m * MIB + 5 * FRAME));
    offs.iter()
        .enumerate()
        .map(|(i, o)| format!("write -P {} {o} {FRAME}", 0x21 + i))
        .collect()
}

/// A mixed image backed up full (its content then copied to `v0`), rewritten by [`writes`],
/// and backed up again.
fn backup_with_writes(env: &Env, img: &Path, v0: &Path) -> (Backup, Backup) {
    mixed_image(SIZE_MIB, "qcow2", img);
    let full = env.backup(img, "f", "vda");
    assert_eq!(full.mode, "full");
    sparse_copy(img, v0);
    let cmds = writes();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(img, "qcow2", &cmds);
    let inc = env.backup(img, "f", "vda");
    assert_eq!(inc.mode, "incremental", "{inc:?}");
    (full, inc)
}

#[test]
fn framed_incremental_reads_only_dirty_frames_and_restores() {
    let env = Env::with_repo();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.repo.join("config")).unwrap()).unwrap();
    assert_eq!(config["version"], 3, "{config}");
    assert_eq!(config["frame_size"], FRAME, "{config}");

    let img = env.path("f.qcow2");
    let v0 = env.path("v0.qcow2");
    let (full, inc) = backup_with_writes(&env, &img, &v0);
    let n = writes().len() as u64;
    assert_eq!(
        inc.bytes_read,
        n * FRAME,
        "an incremental of {n} aligned 64 KiB writes must read exactly those frames: {inc:?}"
    );
    assert_eq!(inc.chunks_new, n, "{inc:?}");
    // Each new version stores its one dirty frame and a table, not the chunk's other frames.
    assert!(
        inc.bytes_new < n * (FRAME + 2048),
        "{} bytes stored for {n} dirty frames: {inc:?}",
        inc.bytes_new
    );
    let deltas = delta_objects(&env);
    assert_eq!(deltas.len() as u64, n, "{deltas:?}");
    let v1 = env.path("v1.qcow2");
    sparse_copy(&img, &v1);

    // A chunk with one frame of data in a hole (its parent entry is zero: read whole, which is
    // just that frame), then that frame zeroed: the chunk becomes a zero entry, nothing read.
    qemu_io(
        &img,
        "qcow2",
        &[&format!("write -P 0x77 {} {FRAME}", 100 * MIB + 7 * FRAME)],
    );
    let b2 = env.backup(&img, "f", "vda");
    assert_eq!(b2.bytes_read, FRAME, "{b2:?}");
    let v2 = env.path("v2.qcow2");
    sparse_copy(&img, &v2);
    qemu_io(
        &img,
        "qcow2",
        &[&format!("write -z {} {FRAME}", 100 * MIB + 7 * FRAME)],
    );
    let b3 = env.backup(&img, "f", "vda");
    assert_eq!(b3.mode, "incremental", "{b3:?}");
    assert_eq!(b3.bytes_read, 0, "{b3:?}");
    assert_eq!(b3.chunks_new, 0, "{b3:?}");

    for (snap, expected) in [(&full, &v0), (&inc, &v1), (&b2, &v2), (&b3, &img)] {
        let out = env.path(&format!("out-{}", &snap.snapshot[..8]));
        env.restore(&snap.snapshot, &out, &["--format", "raw"]);
        assert_identical(expected, &out.join("vda.raw"));
    }
    let v = env.json(&["verify", "--read-data"]);
    assert_eq!(v["problems"].as_array().map(Vec::len), Some(0), "{v}");
}

/// The chunk objects of `env`'s repository that are delta objects (version byte 3).
fn delta_objects(env: &Env) -> Vec<std::path::PathBuf> {
    files_under(&env.repo.join("chunks"))
        .into_iter()
        .filter(|p| std::fs::read(p).unwrap().get(4) == Some(&3))
        .collect()
}

#[test]
fn a_missing_base_fails_restore_and_verify_and_is_not_built_upon() {
    let env = Env::with_repo();
    let img = env.path("m.qcow2");
    let (full, inc) = backup_with_writes(&env, &img, &env.path("v0.qcow2"));
    let deltas = delta_objects(&env);
    assert!(!deltas.is_empty());
    // Remove the base of one delta object (named in bytes 16..48 of its header): the largest,
    // a chunk of the disk's random area, which no other position of the disk duplicates.
    let base_path = |base: &str| env.repo.join("chunks").join(&base[..2]).join(base);
    let base = deltas
        .iter()
        .map(|p| hex(&std::fs::read(p).unwrap()[16..48]))
        .max_by_key(|b| std::fs::metadata(base_path(b)).unwrap().len())
        .unwrap();
    std::fs::remove_file(base_path(&base)).unwrap();
    let (o1, o2) = (env.path("o1"), env.path("o2"));
    env.run(&[
        "restore",
        &inc.snapshot,
        "--to",
        o1.to_str().unwrap(),
        "--format",
        "raw",
    ])
    .assert_fails(6, "base object");
    env.run(&[
        "restore",
        &full.snapshot,
        "--to",
        o2.to_str().unwrap(),
        "--format",
        "raw",
    ])
    .assert_fails(6, "not found");
    env.run(&["verify", "--read-data"])
        .assert_fails(6, "problem");
    // The next incremental writes into every chunk again: the one whose base is gone is read
    // whole, and no new version refers to the missing object. (The snapshot may still not
    // restore: the mixed disk's duplicate chunks can reference the deleted object elsewhere.)
    let before = files_under(&env.repo.join("chunks"));
    let cmds: Vec<String> = writes().iter().map(|w| w.replace("-P ", "-P 1")).collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&img, "qcow2", &cmds);
    let next = env.backup(&img, "f", "vda");
    assert_eq!(next.mode, "incremental", "{next:?}");
    assert!(next.bytes_read > writes().len() as u64 * FRAME, "{next:?}");
    let new: Vec<_> = delta_objects(&env)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert!(!new.is_empty());
    for p in new {
        let d = std::fs::read(&p).unwrap();
        assert_ne!(hex(&d[16..48]), base, "{p:?} refers to the deleted base");
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn unframed_repository_reads_whole_chunks_and_stays_version_1() {
    let env = Env::new();
    env.ok(&["repo", "init", "--frame-size", "0"]);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.repo.join("config")).unwrap()).unwrap();
    assert_eq!(config["version"], 1, "{config}");
    assert!(config.get("frame_size").is_none(), "{config}");
    let img = env.path("u.qcow2");
    let (_, inc) = backup_with_writes(&env, &img, &env.path("v0.qcow2"));
    // The 8 writes into the random area each make a whole (fully allocated) 1 MiB chunk dirty.
    assert!(inc.bytes_read >= 8 * MIB, "{inc:?}");
    let out = env.path("out");
    env.restore("f@latest", &out, &["--format", "raw"]);
    assert_identical(&img, &out.join("vda.raw"));
}

#[test]
fn bad_frame_sizes_are_usage_errors() {
    for (args, needle) in [
        (&["repo", "init", "--frame-size", "4K"][..], "frame size"),
        (&["repo", "init", "--frame-size", "100K"][..], "frame size"),
        (&["repo", "init", "--frame-size", "lots"][..], "not a size"),
    ] {
        let env = Env::new();
        env.run(args).assert_fails(2, needle);
        assert!(
            !env.repo.join("config").exists(),
            "{args:?} left a repository"
        );
    }
    // A frame not smaller than the chunk means unframed.
    let env = Env::new();
    env.ok(&["repo", "init", "--chunk-size", "64K", "--frame-size", "64K"]);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.repo.join("config")).unwrap()).unwrap();
    assert_eq!(config["version"], 1, "{config}");
}

#[test]
fn damaged_parent_chunks_make_the_incremental_read_whole_chunks_not_fail() {
    let env = Env::with_repo();
    let img = env.path("d.qcow2");
    mixed_image(SIZE_MIB, "qcow2", &img);
    env.backup(&img, "f", "vda");
    // Damage every stored chunk's frame table (byte 20 lies in it, or in a v1 object's nonce).
    let chunks = files_under(&env.repo.join("chunks"));
    assert!(!chunks.is_empty());
    for c in &chunks {
        flip_byte(c, 20);
    }
    let cmds = writes();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&img, "qcow2", &cmds);
    let inc = env.backup(&img, "f", "vda");
    assert_eq!(inc.mode, "incremental", "{inc:?}");
    // The dirty chunks of the random area were read whole, and stored anew.
    assert!(inc.bytes_read >= 8 * MIB, "{inc:?}");
    assert!(inc.chunks_new >= 8, "{inc:?}");
    // The damage itself is what verify reports.
    env.run(&["verify", "--read-data"])
        .assert_fails(6, "problem");
}
