//! A backend storing each object as a read-only file under a root directory.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{validate_key, validate_prefix, Backend};
use crate::error::{Error, ErrorKind, Result};

/// Directory (under the root) holding files being written.
const TMP_DIR: &str = "tmp";

/// Keys whose directory entries become durable at [`Backend::flush`] rather than at each put:
/// objects that only a later, flushed-before-commit manifest makes reachable.
const DEFERRED_PREFIXES: [&str; 2] = ["chunks/", "indexes/"];

/// Objects as files: key `a/b/c` is the file `<root>/a/b/c`.
///
/// A put writes `<root>/tmp/<random>`, fsyncs it, makes it read-only, hard-links it to the final
/// path (which fails if the object exists: no overwrite, no rename) and removes the temporary
/// name. Readers therefore see either no object or the whole object (its data is durable before
/// its name exists), and concurrent writers of the same key never clobber each other.
/// Directories are created on demand.
///
/// For chunks and indexes (keys under `chunks/` and `indexes/`, the bulk of a backup, only ever
/// reachable through a snapshot manifest) the new directory entries (the object's name, new
/// directories) become durable at the next [`Backend::flush`], which fsyncs each directory that
/// changed since the previous flush once, instead of once per object: a backup storing
/// thousands of chunks pays one fsync per chunk plus one per chunk directory, not two per
/// chunk. An existing chunk or index that `exists` or `put_if_absent` finds (perhaps written by
/// another process that has not flushed yet) has its directory synced at the next flush too, so
/// a snapshot that deduplicates against it never commits before it is durable. Every other
/// object (manifests, config, key slots, ...) is durable when its put returns, as before. See
/// FORMAT.md, "Local backend".
#[derive(Debug, Clone)]
pub struct LocalBackend {
    root: PathBuf,
    /// Directories with entries added since the last flush (shared by clones).
    unsynced_dirs: Arc<Mutex<BTreeSet<PathBuf>>>,
}

impl LocalBackend {
    /// A backend rooted at `root` (created on the first write if missing).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalBackend {
            root: root.into(),
            unsynced_dirs: Arc::default(),
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    fn create_dirs(&self, dir: &Path, defer_sync: bool) -> Result<()> {
        if dir.is_dir() {
            return Ok(());
        }
        fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("cannot create directory {}", dir.display()), e))?;
        // Make the new directory entries durable, up to the root (now or at the next flush).
        let mut d = dir;
        while let Some(parent) = d.parent() {
            if defer_sync {
                self.mark_unsynced(parent);
            } else {
                sync_dir(parent)?;
            }
            if parent == self.root || !parent.starts_with(&self.root) {
                break;
            }
            d = parent;
        }
        Ok(())
    }

    /// An existing chunk or index that a caller may now refer to: it may have been written by
    /// another process that has not flushed yet, so its directory is synced at our next flush.
    fn found(&self, key: &str, path: &Path) {
        if DEFERRED_PREFIXES.iter().any(|p| key.starts_with(p)) {
            if let Some(parent) = path.parent() {
                self.mark_unsynced(parent);
            }
        }
    }

    fn mark_unsynced(&self, dir: &Path) {
        let mut set = self
            .unsynced_dirs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !set.contains(dir) {
            set.insert(dir.to_path_buf());
        }
    }

    fn write_temp(&self, data: &[u8]) -> Result<PathBuf> {
        let tmp_dir = self.root.join(TMP_DIR);
        self.create_dirs(&tmp_dir, true)?;
        let mut rnd = [0u8; 16];
        crate::crypto::random_bytes(&mut rnd)?;
        let tmp = tmp_dir.join(hex::encode(rnd));
        let ctx = || format!("cannot write temporary file {}", tmp.display());
        let result = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            let mut perms = f.metadata()?.permissions();
            perms.set_readonly(true);
            f.set_permissions(perms)?;
            Ok(())
        })();
        if let Err(e) = result {
            // Best effort: a leftover temporary file is garbage, never an object.
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(ctx(), e));
        }
        Ok(tmp)
    }
}

fn read_error(key: &str, e: std::io::Error) -> Error {
    let kind = e.kind();
    let err = Error::io(format!("cannot read object {key}"), e);
    if kind == std::io::ErrorKind::NotFound {
        Error::with_source(ErrorKind::NotFound, format!("object {key} not found"), err)
    } else {
        err
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("cannot fsync directory {}", dir.display()), e))
}

impl Backend for LocalBackend {
    fn put_if_absent(&self, key: &str, data: &[u8]) -> Result<bool> {
        let path = self.path(key)?;
        if path.exists() {
            self.found(key, &path);
            return Ok(false);
        }
        let parent = path
            .parent()
            .ok_or_else(|| Error::invalid(format!("invalid object key {key:?}")))?;
        let defer_sync = DEFERRED_PREFIXES.iter().any(|p| key.starts_with(p));
        self.create_dirs(parent, defer_sync)?;
        let tmp = self.write_temp(data)?;
        let linked = fs::hard_link(&tmp, &path);
        // Best effort: the object (if linked) is complete either way.
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                if defer_sync {
                    self.mark_unsynced(parent);
                } else {
                    sync_dir(parent)?;
                }
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                self.found(key, &path);
                Ok(false)
            }
            Err(e) => Err(Error::io(format!("cannot store object {key}"), e)),
        }
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let path = self.path(key)?;
        fs::read(&path).map_err(|e| read_error(key, e))
    }

    fn get_into(&self, key: &str, buf: &mut Vec<u8>) -> Result<()> {
        use std::io::Read as _;
        let path = self.path(key)?;
        buf.clear();
        let mut f = fs::File::open(&path).map_err(|e| read_error(key, e))?;
        // One read of the whole object when the buffer is large enough (the size is a hint:
        // read_to_end reads until EOF whatever it says).
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        buf.reserve(usize::try_from(len).unwrap_or(0).saturating_add(1));
        f.read_to_end(buf).map_err(|e| read_error(key, e))?;
        Ok(())
    }

    fn exists(&self, key: &str) -> Result<bool> {
        let path = self.path(key)?;
        match fs::symlink_metadata(&path) {
            Ok(_) => {
                self.found(key, &path);
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(format!("cannot stat object {key}"), e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        validate_prefix(prefix)?;
        // Walk the deepest directory the prefix names completely, then filter.
        let dir_part = prefix.rfind('/').map_or("", |i| &prefix[..i]);
        let start = if dir_part.is_empty() {
            self.root.clone()
        } else {
            self.root.join(dir_part)
        };
        let mut out = Vec::new();
        let mut stack = vec![(start, dir_part.to_owned())];
        while let Some((dir, key_prefix)) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(format!("cannot list {}", dir.display()), e)),
            };
            for entry in entries {
                let entry =
                    entry.map_err(|e| Error::io(format!("cannot list {}", dir.display()), e))?;
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                    continue; // not a key we could have written
                };
                let key = if key_prefix.is_empty() {
                    name
                } else {
                    format!("{key_prefix}/{name}")
                };
                if key == TMP_DIR {
                    continue;
                }
                let ft = entry
                    .file_type()
                    .map_err(|e| Error::io(format!("cannot stat {}", entry.path().display()), e))?;
                if ft.is_dir() {
                    if key.starts_with(prefix) || prefix.starts_with(&format!("{key}/")) {
                        stack.push((entry.path(), key));
                    }
                } else if key.starts_with(prefix) {
                    out.push(key);
                }
            }
        }
        Ok(out)
    }

    fn flush(&self) -> Result<()> {
        let dirs = std::mem::take(
            &mut *self
                .unsynced_dirs
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        // Deepest first, so that a directory's own entry (in its parent) is synced after it.
        for (n, dir) in dirs.iter().rev().enumerate() {
            if let Err(e) = sync_dir(dir) {
                // Keep what is not yet known to be durable for the next flush.
                let mut set = self
                    .unsynced_dirs
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                set.extend(dirs.iter().rev().skip(n).cloned());
                return Err(e);
            }
        }
        Ok(())
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => {
                if let Some(parent) = path.parent() {
                    sync_dir(parent)?;
                }
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("cannot delete object {key}"), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};

    #[test]
    fn put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path().join("repo"));
        assert!(b.put_if_absent("chunks/ab/abcd", b"one").unwrap());
        assert!(!b.put_if_absent("chunks/ab/abcd", b"two").unwrap());
        assert_eq!(b.get("chunks/ab/abcd").unwrap(), b"one");
        assert!(b.put_if_absent("config", b"c").unwrap());
        assert!(b.put_if_absent("snapshots/ff", b"s").unwrap());
        assert!(b.exists("config").unwrap());
        assert!(!b.exists("nope").unwrap());
        assert_eq!(b.get("nope").unwrap_err().kind(), ErrorKind::NotFound);
        let mut all = b.list("").unwrap();
        all.sort();
        assert_eq!(all, ["chunks/ab/abcd", "config", "snapshots/ff"]);
        assert_eq!(b.list("chunks/").unwrap(), ["chunks/ab/abcd"]);
        assert_eq!(b.list("chunks/ab/ab").unwrap(), ["chunks/ab/abcd"]);
        assert_eq!(b.list("snap").unwrap(), ["snapshots/ff"]);
        assert!(b.list("keys/").unwrap().is_empty());
        let meta = fs::metadata(dir.path().join("repo/chunks/ab/abcd")).unwrap();
        assert!(meta.permissions().readonly());
        b.delete("chunks/ab/abcd").unwrap();
        b.delete("chunks/ab/abcd").unwrap();
        assert!(!b.exists("chunks/ab/abcd").unwrap());
        assert!(b.get("../x").is_err());
        assert!(b.put_if_absent("/abs", b"").is_err());
        assert!(b.put_if_absent("tmp/x", b"").is_err());
    }

    #[test]
    fn chunk_dir_entries_synced_at_flush() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        assert!(b.put_if_absent("chunks/ab/abcd", b"one").unwrap());
        assert!(b.put_if_absent("snapshots/ff", b"s").unwrap());
        let pending = b.unsynced_dirs.lock().unwrap().clone();
        assert!(
            pending.contains(&dir.path().join("chunks/ab")),
            "{pending:?}"
        );
        assert!(
            !pending.contains(&dir.path().join("snapshots")),
            "{pending:?}"
        );
        b.flush().unwrap();
        assert!(b.unsynced_dirs.lock().unwrap().is_empty());
        assert_eq!(b.get("chunks/ab/abcd").unwrap(), b"one");
    }

    #[test]
    fn concurrent_puts_of_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let b = Arc::new(LocalBackend::new(dir.path()));
        for round in 0..20 {
            let key = format!("chunks/00/k{round}");
            let barrier = Arc::new(Barrier::new(2));
            let handles: Vec<_> = (0..2u8)
                .map(|t| {
                    let (b, barrier, key) = (b.clone(), barrier.clone(), key.clone());
                    std::thread::spawn(move || {
                        let data = vec![t; 100_000];
                        barrier.wait();
                        (t, b.put_if_absent(&key, &data).unwrap())
                    })
                })
                .collect();
            let results: Vec<(u8, bool)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            let winners: Vec<u8> = results.iter().filter(|r| r.1).map(|r| r.0).collect();
            assert_eq!(winners.len(), 1, "{results:?}");
            assert_eq!(b.get(&key).unwrap(), vec![winners[0]; 100_000]);
        }
        let tmp: Vec<_> = fs::read_dir(dir.path().join(TMP_DIR)).unwrap().collect();
        assert!(tmp.is_empty(), "temporary files left: {tmp:?}");
    }
}
