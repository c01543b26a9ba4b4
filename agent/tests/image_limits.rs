//! End-to-end: a backup's limits on its load on the host (`--limit-read`, `--cpus`) with the
//! real `lifeboat` binary over real qemu-nbd: the read limit paces the whole transfer, neither
//! limit changes what is stored, and a limit that makes no sense is a usage error.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn limit_read_paces_the_transfer_and_keeps_the_data() {
    let env = Env::with_repo();
    let src = env.path("random.raw");
    random_raw(&src, 24);

    let started = Instant::now();
    let j = env.backup_json(&src, "paced", "vda", &["--limit-read", "8M/s"]);
    let elapsed = started.elapsed();
    let read = j["disks"][0]["bytes_read"].as_u64().unwrap();
    assert_eq!(read, 24 * MIB, "{j}");
    assert_eq!(
        j["limits"]["read_bytes_per_s"].as_u64(),
        Some(8 * MIB),
        "{j}"
    );
    assert!(j["limits"]["cpus"].is_null(), "{j}");
    // Every request but the first waits for its turn on the 8 MiB/s clock; requests are at most
    // one 1 MiB chunk, so the last one starts no earlier than (24 - 1) MiB / 8 MiB/s.
    let floor = Duration::from_secs_f64((read - MIB) as f64 / (8 * MIB) as f64);
    assert!(
        elapsed >= floor,
        "24 MiB read at a limit of 8 MiB/s in {elapsed:?} (at least {floor:?} expected)"
    );

    let out = env.path("out");
    env.restore("paced@latest", &out, &["--format", "raw"]);
    assert_identical(&src, &out.join("vda.raw"));
}

#[test]
fn cpus_limit_stores_the_same_chunks() {
    let env = Env::with_repo();
    let src = env.path("mixed.qcow2");
    mixed_image(64, "qcow2", &src);

    let limited = env.backup_json(&src, "one-core", "vda", &["--no-track", "--cpus", "1"]);
    assert!(
        limited["disks"][0]["chunks_new"].as_u64().unwrap() > 0,
        "{limited}"
    );
    assert_eq!(limited["limits"]["cpus"].as_u64(), Some(1), "{limited}");
    let out = env.path("out");
    env.restore("one-core@latest", &out, &[]);
    assert_identical(&src, &out.join("vda.qcow2"));

    // The same image without the limit: every chunk is already there.
    let free = env.backup_json(&src, "all-cores", "vda", &["--no-track"]);
    assert_eq!(free["disks"][0]["chunks_new"].as_u64(), Some(0), "{free}");
}

#[test]
fn senseless_limits_are_usage_errors() {
    let env = Env::with_repo();
    let src = env.path("small.raw");
    random_raw(&src, 1);
    let file = src.to_str().unwrap();
    let base = ["backup-image", file, "--name", "x"];
    for (flag, value, needle) in [
        ("--limit-read", "0", "never finish"),
        ("--limit-read", "0M/s", "never finish"),
        ("--limit-read", "5M/h", "unknown size unit"),
        ("--cpus", "0", "--cpus"),
        ("--cpus", "many", "--cpus"),
    ] {
        let mut args = base.to_vec();
        args.extend([flag, value]);
        env.run(&args).assert_fails(2, needle);
    }
    // Nothing was backed up.
    let list = env.json(&["snapshots"]);
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
}
