//! End-to-end: damage stored objects (chunk, index, manifest: flipped bytes at several offsets,
//! truncation, deletion) and check that `verify` (with and without `--read-data`) and `restore`
//! detect it: exit code 6, the damaged object and the affected snapshot named, and nothing left at
//! the restore target.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// A repository with one snapshot of a small qcow2 image holding a few distinct chunks.
struct Fixture {
    env: Env,
    snapshot: String,
}

fn fixture() -> Fixture {
    let env = Env::with_repo();
    let img = env.path("small.qcow2");
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "16M"],
    );
    qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 3M 1M",
            "write -P 0x33 8M 100k",
            "write -P 0x44 15M 1M",
        ],
    );
    let b = env.backup(&img, "small", "vda");
    let v = env.json(&["verify", "--read-data"]);
    assert_eq!(v["ok"], true, "{v}");
    Fixture {
        env,
        snapshot: b.snapshot,
    }
}

impl Fixture {
    fn objects(&self, kind: &str) -> Vec<PathBuf> {
        files_under(&self.env.repo.join(kind))
    }

    fn one(&self, kind: &str) -> PathBuf {
        let v = self.objects(kind);
        assert_eq!(v.len(), 1, "{kind}: {v:?}");
        v.into_iter().next().unwrap()
    }

    /// `verify [--read-data] --json`: exit code and the JSON report.
    fn verify(&self, read_data: bool) -> (i32, serde_json::Value, Run) {
        let mut args = vec!["verify", "--json"];
        if read_data {
            args.push("--read-data");
        }
        let r = self.env.run(&args);
        let j = r.json();
        (r.code, j, r)
    }

    /// Verify must report `object` (by its id) and the snapshot.
    fn assert_verify_catches(&self, read_data: bool, object: &Path) {
        let (code, j, r) = self.verify(read_data);
        assert_eq!(
            code, 6,
            "verify (read_data={read_data}) did not fail: {r:#?}"
        );
        let report = j.to_string();
        let id = object.file_name().unwrap().to_str().unwrap();
        assert!(report.contains(id), "report does not name {id}: {report}");
        assert!(
            report.contains(&self.snapshot),
            "report does not name snapshot {}: {report}",
            self.snapshot
        );
        assert!(r.stderr.contains("verify found"), "{r:#?}");
    }

    /// Restore (by the given reference, in both formats) must fail with 6 and leave nothing.
    fn assert_restore_fails(&self, reference: &str, tag: &str) {
        for fmt in ["qcow2", "raw"] {
            let to = self.env.path(&format!("restore-{tag}-{fmt}"));
            let r = self.env.run(&[
                "restore",
                reference,
                "--to",
                to.to_str().unwrap(),
                "--format",
                fmt,
            ]);
            r.assert_fails(6, "");
            assert_empty_dir(&to);
        }
    }

    fn assert_healthy(&self) {
        let (code, j, _) = self.verify(true);
        assert_eq!((code, &j["ok"]), (0, &serde_json::json!(true)), "{j}");
    }
}

/// Byte offsets to damage in a sealed object: magic, version, kind, flags, reserved, nonce,
/// ciphertext, tag.
fn offsets(len: usize) -> Vec<i64> {
    let mut v = vec![0, 4, 5, 6, 7, 8, 31, 32, (len / 2) as i64, -17, -1];
    v.dedup();
    v
}

#[test]
fn corrupt_chunk_is_found_by_verify_read_data_and_restore() {
    let f = fixture();
    let chunks = f.objects("chunks");
    assert!(chunks.len() >= 4, "{chunks:?}");
    let chunk = chunks[chunks.len() / 2].clone();
    let len = std::fs::metadata(&chunk).unwrap().len() as usize;
    for (i, off) in offsets(len).into_iter().enumerate() {
        flip_byte(&chunk, off);
        f.assert_verify_catches(true, &chunk);
        if i % 4 == 0 {
            f.assert_restore_fails("small@latest", &format!("chunk{i}"));
        }
        flip_byte(&chunk, off);
    }
    // Without --read-data, verify only checks that chunks exist: a damaged chunk passes.
    flip_byte(&chunk, (len / 3) as i64);
    let (code, _, r) = f.verify(false);
    assert_eq!(code, 0, "{r:#?}");
    flip_byte(&chunk, (len / 3) as i64);

    // Truncated.
    let bytes = std::fs::read(&chunk).unwrap();
    rewrite(&chunk, &bytes[..bytes.len() / 2]);
    f.assert_verify_catches(true, &chunk);
    f.assert_restore_fails(&f.snapshot[..8], "trunc");
    rewrite(&chunk, &bytes);
    f.assert_healthy();
}

#[test]
fn deleted_chunk_is_found_by_verify_and_restore() {
    let f = fixture();
    let chunk = f.objects("chunks").pop().unwrap();
    std::fs::remove_file(&chunk).unwrap();
    f.assert_verify_catches(false, &chunk);
    f.assert_verify_catches(true, &chunk);
    f.assert_restore_fails("small@latest", "deleted");
}

#[test]
fn corrupt_index_is_found_by_verify_and_restore() {
    let f = fixture();
    let index = f.one("indexes");
    let len = std::fs::metadata(&index).unwrap().len() as usize;
    for (i, off) in offsets(len).into_iter().enumerate() {
        flip_byte(&index, off);
        f.assert_verify_catches(false, &index);
        if i % 3 == 0 {
            f.assert_verify_catches(true, &index);
            f.assert_restore_fails("small@latest", &format!("index{i}"));
        }
        flip_byte(&index, off);
    }
    let bytes = std::fs::read(&index).unwrap();
    rewrite(&index, &bytes[..bytes.len() - 1]);
    f.assert_verify_catches(false, &index);
    f.assert_restore_fails("small@latest", "trunc");
    std::fs::remove_file(&index).unwrap();
    f.assert_verify_catches(false, &index);
    f.assert_restore_fails("small@latest", "deleted");
}

#[test]
fn corrupt_manifest_is_found_by_verify_and_restore() {
    let f = fixture();
    let manifest = f.one("snapshots");
    assert!(manifest.ends_with(&f.snapshot));
    let len = std::fs::metadata(&manifest).unwrap().len() as usize;
    for (i, off) in offsets(len).into_iter().enumerate() {
        flip_byte(&manifest, off);
        f.assert_verify_catches(false, &manifest);
        if i % 3 == 0 {
            f.assert_verify_catches(true, &manifest);
            f.assert_restore_fails(&f.snapshot[..10], &format!("manifest{i}"));
            f.assert_restore_fails("small@latest", &format!("manifest-name{i}"));
        }
        flip_byte(&manifest, off);
    }
    let bytes = std::fs::read(&manifest).unwrap();
    rewrite(&manifest, &bytes[..bytes.len() - 1]);
    f.assert_verify_catches(false, &manifest);
    f.assert_restore_fails(&f.snapshot, "trunc");
    rewrite(&manifest, &bytes);
    f.assert_healthy();
}

#[test]
fn failed_qcow2_restore_with_force_names_the_chunk_and_keeps_the_existing_target() {
    let f = fixture();
    let out = f.env.path("out");
    f.env.restore("small@latest", &out, &[]);
    let target = out.join("vda.qcow2");
    let good = std::fs::read(&target).unwrap();
    let out_s = out.to_str().unwrap().to_string();
    // Each stored chunk in turn (they lie at different offsets, so some fail after qemu-img
    // has written others): the restore fails with 6 naming the chunk, leaves no partial file
    // or helper process, and the existing target is untouched.
    for chunk in f.objects("chunks") {
        let id = chunk.file_name().unwrap().to_str().unwrap().to_string();
        flip_byte(&chunk, -1);
        f.env
            .run(&["restore", "small@latest", "--to", &out_s, "--force"])
            .assert_fails(6, &id);
        flip_byte(&chunk, -1);
        assert_eq!(files_under(&out), vec![target.clone()], "{id}");
        assert_eq!(std::fs::read(&target).unwrap(), good, "{id}");
        assert!(
            processes_mentioning(&out_s).is_empty(),
            "{:?}",
            processes_mentioning(&out_s)
        );
    }
    f.env.restore("small@latest", &out, &["--force"]);
    assert_identical(&f.env.path("small.qcow2"), &target);
    tool("qemu-img", &["check", "-q", target.to_str().unwrap()]);
}
