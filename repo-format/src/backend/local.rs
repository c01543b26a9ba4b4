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

/// Directory (under the root) holding files being written.
const TMP_DIR: &str = "tmp";

/// How a put makes its object file: an unnamed `O_TMPFILE` file linked with `AT_EMPTY_PATH`
/// (needs `CAP_DAC_READ_SEARCH` on most kernels), one linked through `/proc/self/fd/N`, or a
/// named temporary file under [`TMP_DIR`]. Learnt on first use; only ever moves down the list.
const LINK_EMPTY_PATH: u8 = 0;
const LINK_PROC_FD: u8 = 1;
const NAMED_TEMP: u8 = 2;

/// Chunk objects at least this long are written with direct I/O (see [`write_object`]).
const DIRECT_MIN_LEN: usize = 64 * 1024;
/// Offset, length and memory alignment of a direct write: the largest logical block size in
/// common use, so it satisfies every device and filesystem that takes `O_DIRECT` at all.
const DIRECT_ALIGN: usize = 4096;

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

/// Writes `data` into the new, empty file `f`. With `direct` (the backend's flag, still set),
/// an object of at least [`DIRECT_MIN_LEN`] bytes is written with `O_DIRECT` for its
/// [`DIRECT_ALIGN`]-aligned bulk (copied into an aligned buffer) and buffered for the tail:
/// a backup's chunk objects are written once and read only by a later restore or verify, so
/// they should neither evict the host's page cache nor cost the page-cache copy and its
/// writeback. Where the filesystem refuses direct I/O (`EINVAL`: tmpfs, some FUSE or network
/// filesystems, an alignment it does not take), the flag is cleared and the whole object is
/// written buffered, as every later one. Durability is the caller's fsync either way.
fn write_object(f: &fs::File, data: &[u8], direct: Option<&AtomicBool>) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt as _;
    let bulk = data.len() / DIRECT_ALIGN * DIRECT_ALIGN;
    let mut written = 0;
    if let Some(flag) = direct.filter(|_| data.len() >= DIRECT_MIN_LEN) {
        match write_direct(f, &data[..bulk]) {
            Ok(()) => written = bulk,
            Err(e) if e.raw_os_error() == Some(Errno::INVAL.raw_os_error()) => {
                flag.store(false, Ordering::Relaxed);
            }
            Err(e) => return Err(e),
        }
    }
    f.write_all_at(&data[written..], written as u64)
}

/// Writes `data` (a multiple of [`DIRECT_ALIGN`] bytes) at offset 0 of `f` with `O_DIRECT`,
/// then switches `f` back to buffered I/O.
fn write_direct(f: &fs::File, data: &[u8]) -> std::io::Result<()> {
    // One allocation per object from the process's heap (freed buffers are reused); the
    // data starts at its first aligned byte.
    let mut buf: Vec<u8> = Vec::with_capacity(data.len() + DIRECT_ALIGN);
    let pad = buf.as_ptr().align_offset(DIRECT_ALIGN);
    buf.resize(pad, 0);
    buf.extend_from_slice(data);
    let aligned = &buf[pad..];
    let flags = rustix::fs::fcntl_getfl(f)?;
    rustix::fs::fcntl_setfl(f, flags | OFlags::DIRECT)?;
    let mut done = 0;
    let result = loop {
        if done == aligned.len() {
            break Ok(());
        }
        match rustix::io::pwrite(f, &aligned[done..], done as u64) {
            // A short direct write ends on a block boundary; 0 would loop for ever.
            Ok(0) => break Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(e) => break Err(e.into()),
        }
    };
    rustix::fs::fcntl_setfl(f, flags)?;
    result
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
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};

    /// Every way a put can make its file: each test runs with all of them.
    const MODES: [u8; 3] = [LINK_EMPTY_PATH, LINK_PROC_FD, NAMED_TEMP];

    fn backend(root: impl Into<PathBuf>, mode: u8) -> LocalBackend {
        let b = LocalBackend::new(root);
        b.write_mode.store(mode, Ordering::Relaxed);
        b
    }

    #[test]
    fn all_modes() {
        for mode in MODES {
            put_get_list_delete(mode);
            chunk_dir_entries_synced_at_flush(mode);
            concurrent_puts_of_same_key(mode);
        }
    }

    /// A flush syncs every pending directory (here in parallel: 40 chunk directories); one that
    /// cannot be synced fails the flush and keeps its level and the levels above it pending, so
    /// that the next flush syncs them.
    #[test]
    fn failed_flush_keeps_what_is_not_known_durable() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        for i in 0..40u8 {
            let key = format!("chunks/{i:02x}/{i:02x}00");
            assert!(b.put_if_absent(&key, &[i]).unwrap());
        }
        let chunks = dir.path().join("chunks");
        assert_eq!(b.unsynced_dirs.lock().unwrap().len(), 42); // 40 + chunks/ + the root
                                                               // A directory that vanished before the flush cannot be synced.
        fs::remove_file(chunks.join("07/0700")).unwrap();
        fs::remove_dir(chunks.join("07")).unwrap();
        let e = b.flush().unwrap_err();
        assert!(e.to_string().contains("chunks/07"), "{e}");
        let pending = b.unsynced_dirs.lock().unwrap().clone();
        assert_eq!(pending.len(), 42, "{pending:?}");
        assert!(pending.contains(&chunks) && pending.contains(dir.path()));
        fs::create_dir(chunks.join("07")).unwrap();
        b.flush().unwrap();
        assert!(b.unsynced_dirs.lock().unwrap().is_empty());
        for i in (0..40u8).filter(|i| *i != 7) {
            assert_eq!(b.get(&format!("chunks/{i:02x}/{i:02x}00")).unwrap(), [i]);
        }
    }

    /// This machine's filesystems (ext4, tmpfs) support O_TMPFILE, and the tests run as a user
    /// who may or may not link with AT_EMPTY_PATH: the anonymous path must stay in use.
    #[test]
    fn anonymous_files_used_where_supported() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        assert!(b.put_if_absent("chunks/ab/abcd", b"one").unwrap());
        assert_ne!(b.write_mode.load(Ordering::Relaxed), NAMED_TEMP);
        assert!(!dir.path().join(TMP_DIR).exists());
    }

    /// Chunk objects around the alignment and size limits of direct writes read back exactly;
    /// on ext4 or xfs (which take `O_DIRECT`) the backend keeps writing direct.
    #[test]
    fn direct_writes_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        let sizes = [
            0,
            1,
            DIRECT_ALIGN - 1,
            DIRECT_ALIGN,
            DIRECT_MIN_LEN - 1,
            DIRECT_MIN_LEN,
            DIRECT_MIN_LEN + 1,
            (1 << 20) + 123,
            3 << 20,
        ];
        for (n, len) in sizes.into_iter().enumerate() {
            // A pattern that differs in every block, so a misplaced block shows.
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
            for key in [
                format!("chunks/{n:02x}/{n:02x}ff"),
                format!("snapshots/s{n}"),
            ] {
                assert!(b.put_if_absent(&key, &data).unwrap(), "{key}");
                assert_eq!(b.get(&key).unwrap(), data, "{key}, {len} bytes");
            }
        }
        let fs_type = rustix::fs::statfs(dir.path()).unwrap().f_type;
        // EXT4_SUPER_MAGIC, XFS_SUPER_MAGIC
        if [0xEF53, 0x5846_5342].contains(&(fs_type as i64)) {
            assert!(
                b.writes_direct(),
                "direct I/O given up on fs type {fs_type:#x}"
            );
        }
    }

    /// A file that refuses `O_DIRECT` (here a character device) gets the whole object through
    /// buffered writes, and the backend stops trying.
    #[test]
    fn a_refused_direct_write_falls_back() {
        let f = fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap();
        let flag = AtomicBool::new(true);
        write_object(&f, &vec![5u8; DIRECT_MIN_LEN * 2 + 17], Some(&flag)).unwrap();
        assert!(!flag.load(Ordering::Relaxed));
    }

    #[test]
    fn head_of_an_object_and_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        assert!(b.put_if_absent("chunks/ab/abcd", b"hello world").unwrap());
        assert_eq!(
            b.get_head("chunks/ab/abcd", 5).unwrap(),
            (b"hello".to_vec(), 11)
        );
        assert_eq!(
            b.get_head("chunks/ab/abcd", 100).unwrap(),
            (b"hello world".to_vec(), 11)
        );
        let e = b.get_head("chunks/ab/abce", 5).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }

    fn put_get_list_delete(mode: u8) {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path().join("repo"), mode);
        assert!(b.put_if_absent("chunks/ab/abcd", b"one").unwrap());
        // The path under test was really taken (AT_EMPTY_PATH may be refused to non-root).
        let used = b.write_mode.load(Ordering::Relaxed);
        assert!(
            used == mode || (mode == LINK_EMPTY_PATH && used == LINK_PROC_FD),
            "{mode} -> {used}"
        );
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

    fn chunk_dir_entries_synced_at_flush(mode: u8) {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path(), mode);
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

    fn concurrent_puts_of_same_key(mode: u8) {
        let dir = tempfile::tempdir().unwrap();
        let b = Arc::new(backend(dir.path(), mode));
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
        let tmp: Vec<_> = fs::read_dir(dir.path().join(TMP_DIR))
            .map(Iterator::collect)
            .unwrap_or_default();
        assert!(tmp.is_empty(), "temporary files left: {tmp:?}");
    }
}
