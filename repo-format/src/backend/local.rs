//! A backend storing each object as a read-only file under a root directory.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use rustix::fs::{AtFlags, Mode, OFlags, CWD};
use rustix::io::Errno;

use super::{validate_key, validate_prefix, Backend};
use crate::error::{Error, ErrorKind, Result};
use direct::write_object;

mod direct;

/// Directory (under the root) holding files being written.
const TMP_DIR: &str = "tmp";

/// How a put makes its object file: an unnamed `O_TMPFILE` file linked with `AT_EMPTY_PATH`
/// (needs `CAP_DAC_READ_SEARCH` on most kernels), one linked through `/proc/self/fd/N`, or a
/// named temporary file under [`TMP_DIR`]. Learnt on first use; only ever moves down the list.
const LINK_EMPTY_PATH: u8 = 0;
const LINK_PROC_FD: u8 = 1;
const NAMED_TEMP: u8 = 2;

/// Keys whose directory entries become durable at [`Backend::flush`] rather than at each put:
/// objects that only a later, flushed-before-commit manifest makes reachable.
const DEFERRED_PREFIXES: [&str; 2] = ["chunks/", "indexes/"];

/// Objects as files: key `a/b/c` is the file `<root>/a/b/c`.
///
/// A put writes the data to an unnamed file (`O_TMPFILE`, mode 0444) in the object's directory,
/// fsyncs it and links it to the final path with `linkat` (which fails if the object exists: no
/// overwrite, no rename). Where the filesystem refuses `O_TMPFILE`, it writes `<root>/tmp/<random>`
/// instead, fsyncs it, makes it read-only, hard-links it to the final path and removes the
/// temporary name. Readers therefore see either no object or the whole object (its data is
/// durable before its name exists), and concurrent writers of the same key never clobber each
/// other. Directories are created on demand.
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
    /// [`LINK_EMPTY_PATH`], [`LINK_PROC_FD`] or [`NAMED_TEMP`] (shared by clones).
    write_mode: Arc<AtomicU8>,
    /// Whether chunk objects are written with direct I/O: until the filesystem refuses it
    /// (shared by clones).
    direct: Arc<AtomicBool>,
}

impl LocalBackend {
    /// A backend rooted at `root` (created on the first write if missing).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalBackend {
            root: root.into(),
            unsynced_dirs: Arc::default(),
            write_mode: Arc::new(AtomicU8::new(LINK_EMPTY_PATH)),
            direct: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Whether chunk objects are still written with direct I/O (the filesystem has not refused
    /// it).
    #[cfg(test)]
    fn writes_direct(&self) -> bool {
        self.direct.load(Ordering::Relaxed)
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

    /// Stores `data` at `path` (in the existing directory `dir`) unless something is there:
    /// `Ok(true)` if linked, `Ok(false)` if the name existed.
    fn store_new(&self, key: &str, dir: &Path, path: &Path, data: &[u8]) -> Result<bool> {
        if self.write_mode.load(Ordering::Relaxed) != NAMED_TEMP {
            if let Some(linked) = self.store_anonymous(key, dir, path, data)? {
                return Ok(linked);
            }
        }
        let tmp = self.write_temp(data)?;
        let linked = fs::hard_link(&tmp, path);
        // Best effort: the object (if linked) is complete either way.
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(Error::io(format!("cannot store object {key}"), e)),
        }
    }

    /// [`Self::store_new`] through an unnamed file: `None` when this filesystem or process
    /// cannot (the caller falls back to a named temporary file, and so do later puts).
    fn store_anonymous(
        &self,
        key: &str,
        dir: &Path,
        path: &Path,
        data: &[u8],
    ) -> Result<Option<bool>> {
        let ctx = || format!("cannot write a new file in {}", dir.display());
        let fd = match rustix::fs::open(
            dir,
            OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o444),
        ) {
            Ok(fd) => fd,
            // No O_TMPFILE in this filesystem (EOPNOTSUPP) or kernel (EISDIR, EINVAL).
            Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => {
                self.write_mode.store(NAMED_TEMP, Ordering::Relaxed);
                return Ok(None);
            }
            Err(e) => return Err(Error::io(ctx(), e.into())),
        };
        let f = fs::File::from(fd);
        let direct = key.starts_with("chunks/") && self.direct.load(Ordering::Relaxed);
        write_object(&f, data, direct.then_some(&*self.direct))
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io(ctx(), e))?;
        let mut result = Err(Errno::NOENT);
        if self.write_mode.load(Ordering::Relaxed) == LINK_EMPTY_PATH {
            result = rustix::fs::linkat(&f, "", CWD, path, AtFlags::EMPTY_PATH);
            if let Err(Errno::PERM | Errno::NOENT) = result {
                // Without CAP_DAC_READ_SEARCH the kernel refuses AT_EMPTY_PATH (ENOENT, or
                // EPERM on older kernels); a missing target directory is caught below.
                self.write_mode.store(LINK_PROC_FD, Ordering::Relaxed);
            }
        }
        if self.write_mode.load(Ordering::Relaxed) == LINK_PROC_FD {
            use std::os::fd::AsRawFd as _;
            let proc_path = format!("/proc/self/fd/{}", f.as_raw_fd());
            result = rustix::fs::linkat(CWD, &proc_path, CWD, path, AtFlags::SYMLINK_FOLLOW);
            if let Err(Errno::NOENT) = result {
                if !Path::new("/proc/self/fd").is_dir() {
                    self.write_mode.store(NAMED_TEMP, Ordering::Relaxed);
                    return Ok(None);
                }
            }
        }
        match result {
            Ok(()) => Ok(Some(true)),
            Err(Errno::EXIST) => Ok(Some(false)),
            Err(e) => Err(Error::io(format!("cannot store object {key}"), e.into())),
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

/// Threads that fsync the directories of one [`Backend::flush`] level.
const SYNC_THREADS: usize = 8;

/// Fsyncs `dirs`, in parallel when there are several; the first error if any failed.
fn sync_dirs(dirs: &[PathBuf]) -> Result<()> {
    if dirs.len() <= 1 {
        return dirs.iter().try_for_each(|d| sync_dir(d));
    }
    let per_thread = dirs.len().div_ceil(SYNC_THREADS);
    std::thread::scope(|s| {
        let workers: Vec<_> = dirs
            .chunks(per_thread)
            .map(|part| s.spawn(move || part.iter().try_for_each(|d| sync_dir(d))))
            .collect();
        let mut result = Ok(());
        for w in workers {
            let r = w.join().unwrap_or_else(|_| {
                Err(Error::new(
                    ErrorKind::Io,
                    "a thread syncing directories panicked",
                ))
            });
            if result.is_ok() {
                result = r;
            }
        }
        result
    })
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
        if self.store_new(key, parent, &path, data)? {
            if defer_sync {
                self.mark_unsynced(parent);
            } else {
                sync_dir(parent)?;
            }
            Ok(true)
        } else {
            self.found(key, &path);
            Ok(false)
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

    fn get_head(&self, key: &str, len: usize) -> Result<(Vec<u8>, u64)> {
        use std::io::Read as _;
        let path = self.path(key)?;
        let f = fs::File::open(&path).map_err(|e| read_error(key, e))?;
        let size = f.metadata().map_err(|e| read_error(key, e))?.len();
        let mut buf = Vec::with_capacity(len.min(usize::try_from(size).unwrap_or(len)));
        f.take(len as u64)
            .read_to_end(&mut buf)
            .map_err(|e| read_error(key, e))?;
        Ok((buf, size))
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
        // Directories of one depth are independent: they are synced in parallel (a backup
        // touches up to 256 chunk directories; concurrent flushes are merged by the block
        // layer instead of waiting for each other).
        let mut by_depth: BTreeMap<usize, Vec<PathBuf>> = BTreeMap::new();
        for d in dirs {
            by_depth.entry(d.components().count()).or_default().push(d);
        }
        let levels: Vec<Vec<PathBuf>> = by_depth.into_values().rev().collect();
        for (n, level) in levels.iter().enumerate() {
            if let Err(e) = sync_dirs(level) {
                // Keep what is not yet known to be durable for the next flush.
                let mut set = self
                    .unsynced_dirs
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                set.extend(levels[n..].iter().flatten().cloned());
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
mod tests;
