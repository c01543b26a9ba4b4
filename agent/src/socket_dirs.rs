//! The directories under `/run/lifeboat/instant` that hold the NBD sockets QEMU reads an
//! instant restore's or a boot test's disks through (one directory per storage directory), and
//! the sweep of what killed or failed runs left there.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the NBD sockets of instant restores and boot tests live, one directory per storage
/// directory.
pub const ROOT: &str = "/run/lifeboat/instant";

/// Sockets and directories younger than this are never swept (they may belong to a run that is
/// starting: between `bind` and `listen` a socket refuses connections too).
pub const SWEEP_MIN_AGE: Duration = Duration::from_secs(60);

/// The socket directory of the instant restore or boot test whose storage is `storage_dir`.
pub fn for_storage(storage_dir: &Path) -> PathBuf {
    let h = fnv1a_hex(storage_dir.to_string_lossy().as_bytes());
    PathBuf::from(ROOT).join(&h[..16])
}

/// Removes what killed or failed instant restores and boot tests left under `root`: socket
/// files nobody listens on (a connection is refused) and then directories left empty, each at
/// least `min_age` old ([`SWEEP_MIN_AGE`]). A running run's sockets accept connections and stay;
/// `--resume` recreates the directory and socket it needs. Best effort: returns what it removed.
pub fn sweep_stale(root: &Path, min_age: Duration) -> Vec<PathBuf> {
    use std::os::unix::fs::FileTypeExt as _;
    let old = |p: &Path| {
        std::fs::symlink_metadata(p)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= min_age)
    };
    let mut removed = Vec::new();
    let Ok(dirs) = std::fs::read_dir(root) else {
        return removed;
    };
    for dir in dirs.flatten() {
        let dir = dir.path();
        if !dir.is_dir() {
            continue;
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let p = e.path();
                let is_socket = e.file_type().is_ok_and(|t| t.is_socket());
                if is_socket
                    && old(&p)
                    && matches!(
                        std::os::unix::net::UnixStream::connect(&p),
                        Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused
                    )
                    && std::fs::remove_file(&p).is_ok()
                {
                    removed.push(p);
                }
            }
        }
        // Fails (and keeps it) unless empty.
        if old(&dir) && std::fs::remove_dir(&dir).is_ok() {
            removed.push(dir);
        }
    }
    removed
}

fn fnv1a_hex(b: &[u8]) -> String {
    // A stable, short directory name: FNV-1a is enough here (not security relevant).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in b {
        h ^= u64::from(*x);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sweep_removes_only_dead_sockets_and_empty_directories() {
        let root = tempfile::tempdir().unwrap();
        let empty = root.path().join("empty");
        let dead = root.path().join("dead");
        let live = root.path().join("live");
        for d in [&empty, &dead, &live] {
            std::fs::create_dir(d).unwrap();
        }
        // A socket whose listener is gone (a killed run) and one that still listens.
        drop(std::os::unix::net::UnixListener::bind(dead.join("vda.sock")).unwrap());
        let _listening = std::os::unix::net::UnixListener::bind(live.join("vda.sock")).unwrap();
        std::fs::write(live.join("not-a-socket"), b"x").unwrap();

        // Too young: nothing goes.
        assert!(sweep_stale(root.path(), Duration::from_secs(3600)).is_empty());
        assert!(empty.exists() && dead.join("vda.sock").exists());

        let mut removed = sweep_stale(root.path(), Duration::ZERO);
        removed.sort();
        let mut want = vec![dead.join("vda.sock"), dead.clone(), empty.clone()];
        want.sort();
        assert_eq!(removed, want);
        assert!(live.join("vda.sock").exists() && live.join("not-a-socket").exists());
        // A missing root is fine.
        assert!(sweep_stale(&root.path().join("nope"), Duration::ZERO).is_empty());
    }
}
