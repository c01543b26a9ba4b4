//! A fault-injecting wrapper, to test what the repository promises when storage misbehaves.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use super::Backend;
use crate::error::{Error, ErrorKind, Result};

/// Wraps a backend and injects failures: puts fail after a number of successful writes,
/// deletes can be refused (like a bucket under Object Lock), and faults can be toggled at run
/// time. Failed operations return [`ErrorKind::Io`] and do not reach the inner backend.
#[derive(Debug)]
pub struct FaultyBackend {
    inner: Arc<dyn Backend>,
    puts_left: AtomicUsize,
    limit_puts: AtomicBool,
    refuse_deletes: AtomicBool,
    fail_gets: AtomicBool,
}

impl FaultyBackend {
    /// A wrapper that injects no faults until configured.
    pub fn new(inner: Arc<dyn Backend>) -> Self {
        FaultyBackend {
            inner,
            puts_left: AtomicUsize::new(0),
            limit_puts: AtomicBool::new(false),
            refuse_deletes: AtomicBool::new(false),
            fail_gets: AtomicBool::new(false),
        }
    }

    /// Lets the next `n` puts through (whether or not they write), then fails every put.
    pub fn fail_puts_after(&self, n: usize) {
        self.puts_left.store(n, Ordering::SeqCst);
        self.limit_puts.store(true, Ordering::SeqCst);
    }

    /// Stops failing puts.
    pub fn allow_puts(&self) {
        self.limit_puts.store(false, Ordering::SeqCst);
    }

    /// Refuses (or allows again) every delete.
    pub fn set_refuse_deletes(&self, refuse: bool) {
        self.refuse_deletes.store(refuse, Ordering::SeqCst);
    }

    /// Fails (or stops failing) every get.
    pub fn set_fail_gets(&self, fail: bool) {
        self.fail_gets.store(fail, Ordering::SeqCst);
    }

    fn injected(what: &str, key: &str) -> Error {
        Error::with_source(
            ErrorKind::Io,
            format!("{what} of {key} failed"),
            std::io::Error::other("injected fault"),
        )
    }
}

impl Backend for FaultyBackend {
    fn put_if_absent(&self, key: &str, data: &[u8]) -> Result<bool> {
        if self.limit_puts.load(Ordering::SeqCst)
            && self
                .puts_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_err()
        {
            return Err(Self::injected("put", key));
        }
        self.inner.put_if_absent(key, data)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        if self.fail_gets.load(Ordering::SeqCst) {
            return Err(Self::injected("get", key));
        }
        self.inner.get(key)
    }

    fn get_into(&self, key: &str, buf: &mut Vec<u8>) -> Result<()> {
        if self.fail_gets.load(Ordering::SeqCst) {
            return Err(Self::injected("get", key));
        }
        self.inner.get_into(key, buf)
    }

    fn get_head(&self, key: &str, len: usize) -> Result<(Vec<u8>, u64)> {
        if self.fail_gets.load(Ordering::SeqCst) {
            return Err(Self::injected("get", key));
        }
        self.inner.get_head(key, len)
    }

    fn exists(&self, key: &str) -> Result<bool> {
        self.inner.exists(key)
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.inner.list(prefix)
    }

    fn delete(&self, key: &str) -> Result<()> {
        if self.refuse_deletes.load(Ordering::SeqCst) {
            return Err(Self::injected("delete", key));
        }
        self.inner.delete(key)
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
}
