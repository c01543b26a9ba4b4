//! End-to-end: error paths of the image commands (exit codes as documented in the README, one
//! clear `error:` line, no panic, no partial output), key slots and unencrypted repositories,
//! snapshot references, and interruption by SIGINT during a backup and a restore.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// A small qcow2 image with a little data.
fn small_image(env: &Env, name: &str, pattern: u8) -> std::path::PathBuf {
    let img = env.path(name);
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"],
    );
    qemu_io(
        &img,
        "qcow2",
        &[&format!("write -P {pattern} 1M 1M"), "write -P 9 6M 4k"],
    );
    img
}

#[test]
fn repository_and_key_errors() {
    let env = Env::with_repo();
    let img = small_image(&env, "a.qcow2", 1);
    env.backup(&img, "a", "vda");

    // Wrong passphrase.
    let mut wrong = Env::new();
    wrong.repo = env.repo.clone();
    wrong.password = Some("not the passphrase".into());
    wrong.run(&["snapshots"]).assert_fails(4, "");
    let r = wrong.run(&[
        "restore",
        "a@latest",
        "--to",
        env.path("w").to_str().unwrap(),
    ]);
    r.assert_fails(4, "");
    assert_empty_dir(&env.path("w"));
    assert!(
        !env.path("w").exists(),
        "restore created the target before opening the repo"
    );

    // No passphrase for an encrypted repository.
    wrong.password = None;
    wrong.run(&["snapshots"]).assert_fails(4, "");
    wrong
        .run(&["backup-image", img.to_str().unwrap(), "--name", "a"])
        .assert_fails(4, "");

    // Missing repository directory; a directory that is not a repository; an empty one.
    let mut other = Env::new();
    other.repo = env.path("nope");
    other.run(&["snapshots"]).assert_fails(3, "");
    other.run(&["verify"]).assert_fails(3, "");
    other.repo = env.path("not-a-repo");
    std::fs::create_dir_all(&other.repo).unwrap();
    std::fs::write(other.repo.join("config"), b"{\"hello\": 1}").unwrap();
    other.run(&["snapshots"]).assert_fails(3, "");
    other.repo = env.path("empty");
    std::fs::create_dir_all(&other.repo).unwrap();
    other
        .run(&["backup-image", img.to_str().unwrap(), "--name", "x"])
        .assert_fails(3, "");
    assert!(files_under(&other.repo).is_empty());
    // No repository at all.
    let r = Env::new()
        .cmd(&["snapshots"])
        .env_remove("LIFEBOAT_REPO")
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2));

    // Key file slot: generate, add, open with --key-file and without any passphrase.
    let key = env.path("lifeboat.key");
    env.ok(&["repo", "generate-key-file", key.to_str().unwrap()]);
    env.ok(&["repo", "add-key", "--new-key-file", key.to_str().unwrap()]);
    let mut by_key = Env::new();
    by_key.repo = env.repo.clone();
    by_key.password = None;
    let snaps = by_key.json(&["snapshots", "--key-file", key.to_str().unwrap()]);
    assert_eq!(snaps.as_array().unwrap().len(), 1);
    // Another key file does not open it.
    let key2 = env.path("other.key");
    env.ok(&["repo", "generate-key-file", key2.to_str().unwrap()]);
    by_key
        .run(&["snapshots", "--key-file", key2.to_str().unwrap()])
        .assert_fails(4, "");
    // Refuses to overwrite a key file.
    env.run(&["repo", "generate-key-file", key.to_str().unwrap()])
        .assert_fails(2, "");
}

/// Both object ciphers: `repo init --cipher` records the scheme in the config, says so, and a
/// backup (full, then incremental) restores bit for bit and verifies with its data read.
#[test]
fn each_cipher_backs_up_restores_and_verifies() {
    for (arg, scheme, label) in [
        ("aegis256", "aegis256-blake3", "AEGIS-256"),
        (
            "xchacha20poly1305",
            "xchacha20poly1305-blake3",
            "XChaCha20-Poly1305",
        ),
    ] {
        let env = Env::new();
        let r = env.ok(&["repo", "init", "--cipher", arg]);
        assert!(r.stdout.contains(label), "{r:?}");
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(env.repo.join("config")).unwrap()).unwrap();
        assert_eq!(config["encryption"], scheme);
        let img = small_image(&env, "c.qcow2", 5);
        env.backup(&img, "c", "vda");
        qemu_io(&img, "qcow2", &["write -P 0x5a 1M 64k"]);
        env.backup(&img, "c", "vda");
        let out = env.path("out");
        env.restore("c@latest", &out, &[]);
        assert_identical(&img, &out.join("vda.qcow2"));
        let v = env.json(&["verify", "--read-data"]);
        assert_eq!(v["ok"], true, "{v}");
    }
    let env = Env::new();
    env.run(&["repo", "init", "--cipher", "rot13"])
        .assert_fails(2, "");
}

#[test]
fn unencrypted_repository_works_and_says_so() {
    let mut env = Env::new();
    env.password = None;
    let j = env.json(&["repo", "init", "--encryption", "none"]);
    assert_eq!(j["encrypted"], false, "{j}");
    let text = env.run(&["repo", "init", "--encryption", "none"]);
    assert_ne!(text.code, 0, "init over an existing repository must fail");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.repo.join("config")).unwrap()).unwrap();
    assert_eq!(config["encryption"], "none");
    let img = small_image(&env, "u.qcow2", 3);
    env.backup(&img, "u", "vda");
    for chunk in files_under(&env.repo.join("chunks")) {
        let b = std::fs::read(&chunk).unwrap();
        assert_eq!(&b[..4], b"LBOB");
        assert_eq!(b[6] & 2, 0, "chunk {chunk:?} is marked encrypted");
    }
    let out = env.path("out");
    env.restore("u@latest", &out, &[]);
    assert_identical(&img, &out.join("vda.qcow2"));
    // Text output of init says it is unencrypted.
    let mut env2 = Env::new();
    env2.password = None;
    let r = env2.ok(&["repo", "init", "--encryption", "none"]);
    assert!(r.stdout.contains("UNENCRYPTED"), "{r:?}");
}

#[test]
fn source_target_and_snapshot_errors() {
    let env = Env::with_repo();
    let img = small_image(&env, "s.qcow2", 5);

    // Missing image; image that is not qcow2/raw.
    env.run(&[
        "backup-image",
        env.path("missing.qcow2").to_str().unwrap(),
        "--name",
        "s",
    ])
    .assert_fails(7, "missing.qcow2");
    let vmdk = env.path("disk.vmdk");
    tool(
        "qemu-img",
        &["create", "-q", "-f", "vmdk", vmdk.to_str().unwrap(), "8M"],
    );
    env.run(&["backup-image", vmdk.to_str().unwrap(), "--name", "s"])
        .assert_fails(7, "vmdk");
    assert!(files_under(&env.repo.join("snapshots")).is_empty());

    // Snapshot references: id prefix, NAME@latest, NAME@time between two snapshots.
    let b1 = env.backup(&img, "s", "vda");
    let v1 = env.path("v1.qcow2");
    sparse_copy(&img, &v1);
    std::thread::sleep(Duration::from_millis(1100));
    let between = jiff::Timestamp::now();
    std::thread::sleep(Duration::from_millis(1100));
    qemu_io(&img, "qcow2", &["write -P 6 2M 64k"]);
    let b2 = env.backup(&img, "s", "vda");
    let resolve = |reference: &str| -> String {
        let to = env.path(&format!("r-{}", reference.replace([':', '@'], "_")));
        let j = env.restore(reference, &to, &[]);
        j["snapshot"].as_str().unwrap().to_string()
    };
    assert_eq!(resolve("s@latest"), b2.snapshot);
    let sec = jiff::Timestamp::from_second(between.as_second()).unwrap();
    assert_eq!(resolve(&format!("s@{sec}")), b1.snapshot);
    assert_identical(
        &v1,
        &env.path(&format!("r-s_{}", sec.to_string().replace(':', "_")))
            .join("vda.qcow2"),
    );
    assert_eq!(resolve(&b1.snapshot[..6]), b1.snapshot);
    assert_eq!(resolve(&b2.snapshot.to_uppercase()[..8]), b2.snapshot);

    // Unknown snapshot, name, time before the first, ambiguous prefix.
    let to = env.path("nothing");
    for reference in ["abcdef12", "nosuch@latest", "s@2001-01-01T00:00:00Z"] {
        let r = env.run(&["restore", reference, "--to", to.to_str().unwrap()]);
        r.assert_fails(5, "");
        assert!(!to.exists());
    }
    env.run(&["restore", "xyz", "--to", to.to_str().unwrap()])
        .assert_fails(2, "");
    // Two snapshot names that share a prefix: plant a second name (a copy of a manifest).
    let snaps = env.repo.join("snapshots");
    let prefix = &b1.snapshot[..6];
    let twin = format!("{prefix}{}", "0".repeat(58));
    std::fs::copy(snaps.join(&b1.snapshot), snaps.join(&twin)).unwrap();
    env.run(&["restore", prefix, "--to", to.to_str().unwrap()])
        .assert_fails(5, "ambiguous");
    std::fs::remove_file(snaps.join(&twin)).unwrap();

    // Restore target exists without --force: refused, the file untouched; with --force replaced.
    let out = env.path("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("vda.qcow2"), b"precious").unwrap();
    env.run(&["restore", "s@latest", "--to", out.to_str().unwrap()])
        .assert_fails(8, "--force");
    assert_eq!(std::fs::read(out.join("vda.qcow2")).unwrap(), b"precious");
    assert_eq!(files_under(&out).len(), 1);
    env.restore("s@latest", &out, &["--force"]);
    assert_identical(&img, &out.join("vda.qcow2"));

    // A disk the snapshot does not have.
    let out2 = env.path("out2");
    env.run(&[
        "restore",
        "s@latest",
        "--to",
        out2.to_str().unwrap(),
        "--disk",
        "vdz",
    ])
    .assert_fails(2, "vdz");
    assert_empty_dir(&out2);
}

/// Wait until `cond` or panic after `secs`.
fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigint(pid: u32) {
    tool("kill", &["-INT", &pid.to_string()]);
}

fn assert_no_qemu_nbd_for(path: &Path) {
    // Give the kernel a moment to reap.
    let needle = path.to_str().unwrap();
    wait_for(5, "qemu-nbd to exit", || {
        processes_mentioning(needle)
            .iter()
            .all(|(_, c)| !c.contains("qemu-nbd"))
    });
}

#[test]
fn sigint_stops_backup_and_restore_cleanly() {
    let env = Env::with_repo();
    let raw = env.path("random.raw");
    random_raw(&raw, 160);
    let img = env.path("big.qcow2");
    convert_to_qcow2(&raw, &img, "");
    std::fs::remove_file(&raw).unwrap();

    // Backup: interrupt once chunks are being stored.
    let child = env
        .cmd(&[
            "backup-image",
            img.to_str().unwrap(),
            "--name",
            "big",
            "--disk",
            "vda",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let chunks = env.repo.join("chunks");
    wait_for(60, "the first stored chunk", || {
        !files_under(&chunks).is_empty()
    });
    sigint(child.id());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("interrupted by SIGINT") && !stderr.contains("panicked"),
        "{stderr}"
    );
    assert!(
        files_under(&env.repo.join("snapshots")).is_empty(),
        "a manifest was committed"
    );
    assert!(
        files_under(&env.repo.join("tmp")).is_empty(),
        "temporary objects left"
    );
    assert_no_qemu_nbd_for(&img);
    let j = env.json(&["snapshots"]);
    assert_eq!(j.as_array().unwrap().len(), 0);

    // The next backup works (and cleans up the interrupted run's bitmap).
    let b = env.backup(&img, "big", "vda");
    assert_eq!(b.mode, "full");
    let info = image_info(&img);
    let bitmaps = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(bitmaps.len(), 1, "stale bitmaps left: {bitmaps:?}");

    // Restore: interrupt once the hidden partial file is being written. The restore's chunk
    // delay hook keeps the 160 chunks in transfer for ≈ 1 s (8 at a time), so that a fast
    // machine does not finish before the signal.
    let to = env.path("restore");
    let child = env
        .cmd(&["restore", "big@latest", "--to", to.to_str().unwrap()])
        .env("LIFEBOAT_TEST_RESTORE_CHUNK_DELAY_MS", "50")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut partial = None;
    wait_for(60, "the partial restore file", || {
        partial = files_under(&to).into_iter().find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.contains("lifeboat-partial"))
        });
        partial
            .as_ref()
            .is_some_and(|p| std::fs::metadata(p).map(|m| m.len() > 0).unwrap_or(false))
    });
    std::thread::sleep(Duration::from_millis(300));
    sigint(child.id());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_empty_dir(&to);
    assert_no_qemu_nbd_for(partial.as_ref().unwrap());
}
