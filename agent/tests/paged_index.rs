//! End-to-end: a disk whose index outgrows one page (64 Ki chunks: 4 GiB at this test's 64 KiB
//! chunks) is backed up a page at a time into pages and a root (FORMAT.md 1.7a). An incremental
//! writes only the pages its dirty blocks fall in; both snapshots restore natively, through
//! `qemu-img convert` from Lifeboat's NBD server (which loads pages on demand) and as raw; `verify`
//! reads a page two snapshots share once and reports both when it is lost.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use repo_format::IndexPage;

const GIB: u64 = 1 << 30;

fn index_objects(env: &Env) -> usize {
    files_under(&env.repo.join("indexes")).len()
}

fn restore_and_compare(env: &Env, snapshot: &str, expected: &Path, tag: &str) {
    let out = env.path(&format!("out-{tag}"));
    env.restore(snapshot, &out, &[]);
    let q = out.join("vda.qcow2");
    assert_identical(expected, &q);
    assert_qcow2_clean(&q);
    assert!(
        !written_natively(&q),
        "restored through qemu-img convert from Lifeboat's NBD export"
    );
    let out_raw = env.path(&format!("out-{tag}-raw"));
    env.restore(snapshot, &out_raw, &["--format", "raw"]);
    assert_identical(expected, &out_raw.join("vda.raw"));
}

#[test]
fn a_disk_of_several_index_pages_backs_up_page_by_page_and_restores() {
    let env = Env::new();
    env.ok(&["repo", "init", "--chunk-size", "64K"]);
    // 10 GiB: pages of 4 GiB, 4 GiB and 2 GiB. Clusters of 128 KiB, larger than a chunk: the
    // qcow2 restore goes through qemu-img convert reading Lifeboat's NBD export.
    let img = env.path("big.qcow2");
    let size = (10 * GIB).to_string();
    let args = ["create", "-q", "-f", "qcow2", "-o", "cluster_size=131072"];
    tool(
        "qemu-img",
        &[&args[..], &[img.to_str().unwrap(), &size]].concat(),
    );
    qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 0x11 0 1M",
            // Across the edge of pages 0 and 1.
            "write -P 0x22 4095M 2M",
            "write -P 0x33 9G 192k",
            // The disk's last MiB, in the short last page.
            "write -P 0x44 10239M 1M",
        ],
    );
    let full = env.backup(&img, "big", "vda");
    assert_eq!(full.mode, "full");
    // What is written, the 192 KiB rounded up to whole 128 KiB clusters.
    assert_eq!(full.bytes_read, (4 << 20) + (256 << 10), "{full:?}");
    // Three pages and the root.
    assert_eq!(index_objects(&env), 4);
    let v0 = env.path("v0.qcow2");
    sparse_copy(&img, &v0);

    // Dirty blocks in page 2 only: one new page and one new root; pages 0 and 1 are shared.
    qemu_io(
        &img,
        "qcow2",
        &["write -P 0x55 9G 64k", "write -z 10239M 1M"],
    );
    let inc = env.backup(&img, "big", "vda");
    assert_eq!(inc.mode, "incremental", "{inc:?}");
    assert!(
        inc.dirty_bytes.unwrap() >= (1 << 20) + (64 << 10),
        "{inc:?}"
    );
    // The zeroed MiB reads as unallocated zeros: only the rewritten cluster is read.
    assert!(inc.bytes_read <= 128 << 10, "{inc:?}");
    assert_eq!(index_objects(&env), 6);

    restore_and_compare(&env, &full.snapshot, &v0, "full");
    restore_and_compare(&env, &inc.snapshot, &img, "inc");
    let v = env.json(&["verify", "--read-data"]);
    assert_eq!(
        (v["ok"].as_bool(), v["indexes"].as_u64()),
        (Some(true), Some(2)),
        "{v}"
    );

    // Lose page 0, which both snapshots share: verify names both, restore fails cleanly.
    let page0 = page_file(&env, &inc.snapshot, 0);
    assert_eq!(page0, page_file(&env, &full.snapshot, 0));
    assert_ne!(
        page_file(&env, &inc.snapshot, 2),
        page_file(&env, &full.snapshot, 2)
    );
    std::fs::remove_file(&page0).unwrap();
    let r = env.run(&["verify", "--json"]);
    assert_eq!(r.code, 6, "{r:#?}");
    let v = r.json();
    assert_eq!(v["problems"].as_array().unwrap().len(), 2, "{v}");
    let out = env.path("out-lost");
    let r = env.run(&["restore", &inc.snapshot, "--to", out.to_str().unwrap()]);
    assert_ne!(r.code, 0, "{r:#?}");
    assert!(r.stderr.contains("index"), "{}", r.stderr);
    assert!(
        !out.join("vda.qcow2").exists(),
        "no half-written image is left"
    );
}

/// The file of the object that holds page `k` of disk vda's index in `snapshot`.
fn page_file(env: &Env, snapshot: &str, k: u64) -> PathBuf {
    let repo = env.open_repo();
    let manifest = repo
        .load_snapshot(&repo.resolve(snapshot).unwrap())
        .unwrap();
    let d = &manifest.disks[0];
    let index = repo
        .open_index(&d.index, d.virtual_size, d.chunk_size)
        .unwrap();
    let Some(IndexPage::Object(id)) = index.page(k) else {
        panic!("page {k} of {snapshot} is not stored: {index:?}")
    };
    let hex = id.to_hex();
    env.repo.join("indexes").join(&hex[..2]).join(hex)
}
