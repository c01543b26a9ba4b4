//! The instant-restore NBD server ([`RepoSource`] behind [`vmdisk::nbd::Server`], lazily loaded
//! index as instant-restore uses it) checked against independent NBD clients, without libvirt:
//! - `nbdinfo --map` (libnbd, `base:allocation`) equals the snapshot's zero/data layout taken
//!   from its index;
//! - `nbdcopy` of the export equals a full `lifeboat restore --format raw` byte for byte;
//! - `qemu-img compare` of the export with the source image finds them identical.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::*;
use lifeboat::pipeline::serve::RepoSource;
use serde_json::Value;
use vmdisk::nbd::{BlockSource, Server, ServerOptions};

/// (offset, length, is_zero) runs, merged.
fn merge(runs: impl IntoIterator<Item = (u64, u64, bool)>) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for (o, l, z) in runs {
        match out.last_mut() {
            Some((lo, ll, lz)) if *lz == z && *lo + *ll == o => *ll += l,
            _ => out.push((o, l, z)),
        }
    }
    out
}

#[test]
fn served_snapshot_matches_nbdinfo_nbdcopy_and_qemu_img_compare() {
    for t in ["nbdinfo", "nbdcopy"] {
        tool("sh", &["-c", &format!("command -v {t} || (echo '{t} missing: run scripts/install-deps.sh' >&2; exit 1)")]);
    }
    let env = Env::new();
    // Small chunks so the layout has many runs.
    env.ok(&["repo", "init", "--chunk-size", "256K"]);
    let src = env.path("src.raw");
    mixed_image(64, "raw", &src);
    let b = env.backup(&src, "vm1", "vda");

    // Open the repository and the snapshot as instant-restore does.
    let repo = env.open_repo();
    let id = repo.resolve(&b.snapshot).unwrap();
    let manifest = repo.load_snapshot(&id).unwrap();
    let entry = manifest.disks.iter().find(|d| d.name == "vda").unwrap();
    let index = repo
        .load_index(&entry.index, entry.virtual_size, entry.chunk_size)
        .unwrap();
    let source = Arc::new(RepoSource::lazy(repo.clone(), entry, 64));
    assert_eq!(source.size(), entry.virtual_size);
    assert!(source.index_state().is_none(), "lazy: nothing loaded yet");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let sock = env.path("vda.sock");
    let (stop, rx) = tokio::sync::watch::channel(false);
    let mut exports: HashMap<String, Arc<dyn BlockSource>> = HashMap::new();
    exports.insert("vda".into(), source.clone());
    let server = Arc::new(Server::new(exports, ServerOptions::default()));
    let listener = {
        let _rt = rt.enter();
        Server::bind_unix(&sock).unwrap()
    };
    let task = rt.spawn(server.serve(listener, Some(sock.clone()), rx));
    let uri = format!("nbd+unix:///vda?socket={}", sock.display());

    // 1. nbdinfo --map equals the index layout (a chunk is a hole iff the index has no chunk).
    let map: Value = serde_json::from_str(&tool("nbdinfo", &["--map", "--json", &uri])).unwrap();
    let got = merge(map.as_array().unwrap().iter().map(|e| {
        let t = e["type"].as_u64().unwrap();
        (
            e["offset"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            t & 2 != 0, // NBD_STATE_ZERO
        )
    }));
    let cs = u64::from(index.chunk_size);
    let want = merge((0..index.len()).map(|i| {
        let off = i * cs;
        (off, cs.min(index.disk_size - off), index.get(i).is_none())
    }));
    assert_eq!(
        got, want,
        "nbdinfo --map differs from the snapshot's layout"
    );
    assert!(
        want.iter().any(|r| r.2) && want.iter().any(|r| !r.2),
        "the test image should have both holes and data: {want:?}"
    );
    for e in map.as_array().unwrap() {
        let t = e["type"].as_u64().unwrap();
        assert!(t == 0 || t == 3, "hole must be HOLE|ZERO, data 0: {e}");
    }

    // 2. nbdcopy of the export equals a full raw restore.
    let copied = env.path("copied.raw");
    tool("nbdcopy", &[&uri, copied.to_str().unwrap()]);
    let out = env.path("full");
    env.restore(&b.snapshot, &out, &["--format", "raw"]);
    let full = std::fs::read(out.join("vda.raw")).unwrap();
    let got = std::fs::read(&copied).unwrap();
    assert_eq!(got.len(), full.len());
    assert!(
        got == full,
        "nbdcopy of the export differs from a full restore"
    );

    // 3. qemu-img compare with the source image.
    tool(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &uri,
            src.to_str().unwrap(),
        ],
    );
    assert_eq!(source.failures().0, 0);

    let _ = stop.send(true);
    rt.block_on(task).unwrap();
}
