//! Storage backends: a small object-store trait and its implementations.
//!
//! Keys are `/`-separated relative paths such as `chunks/ab/ab12…`. The trait asks only for
//! what an S3 bucket with Object Lock offers: conditional create, get, head, list, delete. There
//! is no rename and no overwrite, and the hot path of a backup needs no listing.

mod faulty;
mod local;
mod memory;

pub use faulty::FaultyBackend;
pub use local::LocalBackend;
pub use memory::MemoryBackend;

use crate::error::{Error, Result};

/// An object store. Implementations must be safe to share between threads.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Stores `data` under `key` unless the key exists. Returns `true` if this call wrote the
    /// object, `false` if it already existed (the existing object is left untouched).
    ///
    /// Atomic: a reader never sees a partial object. Two concurrent writers of the same key are
    /// harmless: one writes, the other gets `false`.
    fn put_if_absent(&self, key: &str, data: &[u8]) -> Result<bool>;

    /// Reads an object; [`crate::ErrorKind::NotFound`] if it does not exist.
    fn get(&self, key: &str) -> Result<Vec<u8>>;

    /// Reads an object into `buf` (replacing its contents, reusing its capacity), for callers
    /// that read many objects in a row. Errors as [`Backend::get`]. The default calls `get`.
    fn get_into(&self, key: &str, buf: &mut Vec<u8>) -> Result<()> {
        *buf = self.get(key)?;
        Ok(())
    }

    /// The first `len` bytes of an object (all of it when shorter) and the object's whole
    /// size, for readers that need only a header. Errors as [`Backend::get`]. The default reads
    /// the whole object.
    fn get_head(&self, key: &str, len: usize) -> Result<(Vec<u8>, u64)> {
        let mut v = self.get(key)?;
        let size = v.len() as u64;
        v.truncate(len);
        Ok((v, size))
    }

    /// Whether an object exists.
    fn exists(&self, key: &str) -> Result<bool>;

    /// Every key starting with `prefix` (e.g. `"snapshots/"`), in no particular order.
    fn list(&self, prefix: &str) -> Result<Vec<String>>;

    /// Deletes an object. Deleting a missing object succeeds (idempotent, like S3).
    fn delete(&self, key: &str) -> Result<()>;

    /// Makes every object stored so far by this backend durable (survives a crash or power
    /// loss). A put is atomic when it returns, but may become durable only here: callers flush
    /// before writing an object that refers to earlier ones (the repository flushes before
    /// committing a snapshot, and after writing a key slot or the config). The default does
    /// nothing, for stores whose puts are durable on return.
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// Validates an object key: non-empty relative `/`-separated path of non-empty components
/// made of ASCII letters, digits, `-`, `_` and `.`, with no `.` or `..` component and not under
/// the reserved `tmp/`.
pub fn validate_key(key: &str) -> Result<()> {
    validate_path(key, false)
}

/// Validates a listing prefix: like a key, but may be empty or end with `/`.
pub fn validate_prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty() {
        return Ok(());
    }
    validate_path(prefix.strip_suffix('/').unwrap_or(prefix), true)
}

fn validate_path(key: &str, is_prefix: bool) -> Result<()> {
    let what = if is_prefix { "prefix" } else { "key" };
    let bad = |why: &str| Error::invalid(format!("invalid object {what} {key:?}: {why}"));
    if key.is_empty() {
        return Err(bad("empty"));
    }
    for (i, comp) in key.split('/').enumerate() {
        if comp.is_empty() {
            return Err(bad("empty path component or absolute path"));
        }
        if comp == "." || comp == ".." {
            return Err(bad("`.` or `..` component"));
        }
        if !comp
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(bad("unsupported character"));
        }
        if i == 0 && comp == "tmp" {
            return Err(bad("`tmp` is reserved"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_validation() {
        for ok in ["config", "chunks/ab/abcdef", "keys/00"] {
            validate_key(ok).unwrap();
        }
        for bad in [
            "",
            "/etc/passwd",
            "a/../b",
            "..",
            "a//b",
            "a/",
            "tmp/x",
            "a/./b",
            "a\\b",
            "a b",
        ] {
            assert!(validate_key(bad).is_err(), "{bad}");
        }
        for ok in ["", "snapshots/", "chunks/ab/", "chunks/ab/a"] {
            validate_prefix(ok).unwrap();
        }
        for bad in ["/", "../", "a//"] {
            assert!(validate_prefix(bad).is_err(), "{bad}");
        }
    }
}
