//! In-memory backend for tests.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use super::{validate_key, validate_prefix, Backend};
use crate::error::{Error, ErrorKind, Result};

/// A backend holding objects in a `BTreeMap` behind a mutex. For tests.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    objects: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl MemoryBackend {
    /// An empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        // A panic while holding the lock cannot leave the map half-updated (every operation
        // is a single map call), so a poisoned lock is still consistent.
        self.objects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces (or creates) an object unconditionally, bypassing `put_if_absent`. For tests that
    /// simulate corruption or an attacker with write access to the storage.
    pub fn overwrite(&self, key: &str, data: Vec<u8>) {
        self.lock().insert(key.to_owned(), data);
    }

    /// Removes an object unconditionally. For tests.
    pub fn remove(&self, key: &str) -> Option<Vec<u8>> {
        self.lock().remove(key)
    }

    /// All keys currently stored, sorted. For tests.
    pub fn keys(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }
}

impl Backend for MemoryBackend {
    fn put_if_absent(&self, key: &str, data: &[u8]) -> Result<bool> {
        validate_key(key)?;
        let mut map = self.lock();
        if map.contains_key(key) {
            return Ok(false);
        }
        map.insert(key.to_owned(), data.to_vec());
        Ok(true)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        validate_key(key)?;
        self.lock()
            .get(key)
            .cloned()
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("object {key} not found")))
    }

    fn exists(&self, key: &str) -> Result<bool> {
        validate_key(key)?;
        Ok(self.lock().contains_key(key))
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        validate_prefix(prefix)?;
        Ok(self
            .lock()
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect())
    }

    fn delete(&self, key: &str) -> Result<()> {
        validate_key(key)?;
        self.lock().remove(key);
        Ok(())
    }
}
