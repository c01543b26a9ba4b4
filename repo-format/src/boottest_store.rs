//! Storage of boot-test results: `boottests/<snapshot id>/<result id>`, sealed objects of kind 4
//! (FORMAT.md 1.11). Results are write-once like every other object; a snapshot may have many.

use crate::boottest::BootTestResult;
use crate::error::{Error, ErrorKind, Result};
use crate::id::{BootTestId, SnapshotId};
use crate::magic;
use crate::object;
use crate::repository::Repository;

fn prefix(snapshot: &SnapshotId) -> String {
    format!("{}{}/", magic::PREFIX_BOOT_TESTS, snapshot.to_hex())
}

fn boot_test_key(snapshot: &SnapshotId, id: &BootTestId) -> String {
    format!("{}{}", prefix(snapshot), id.to_hex())
}

impl Repository {
    /// Seals and stores a boot-test result next to its snapshot (`result.snapshot`), which
    /// must exist. Returns the result's id (storing the same result twice is a no-op).
    pub fn store_boot_test(&self, result: &BootTestResult) -> Result<BootTestId> {
        let snap_key = format!("{}{}", magic::PREFIX_SNAPSHOTS, result.snapshot.to_hex());
        if !self.backend().exists(&snap_key)? {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "cannot store a boot-test result for snapshot {}: no such snapshot",
                    result.snapshot
                ),
            ));
        }
        let plain = result.encode()?;
        let id = BootTestId::from_bytes(object::object_hash(self.keys(), &plain));
        let sealed = object::seal(
            self.keys(),
            magic::KIND_BOOT_TEST,
            id.as_bytes(),
            &plain,
            self.config().zstd_level,
        )?;
        self.backend()
            .put_if_absent(&boot_test_key(&result.snapshot, &id), &sealed)?;
        Ok(id)
    }

    /// Loads and verifies one boot-test result. A result stored under another snapshot than the
    /// one it names is [`ErrorKind::Corrupt`].
    pub fn load_boot_test(&self, snapshot: &SnapshotId, id: &BootTestId) -> Result<BootTestResult> {
        let key = boot_test_key(snapshot, id);
        let bytes = self.get_named(&key, "boot-test result")?;
        let plain = object::open(
            self.keys(),
            magic::KIND_BOOT_TEST,
            id.as_bytes(),
            bytes,
            magic::MAX_METADATA_OBJECT,
            &key,
        )?;
        let r = BootTestResult::decode(&plain)
            .map_err(|e| e.wrap(format!("object {key} is corrupt")))?;
        if r.snapshot != *snapshot {
            return Err(Error::corrupt(format!(
                "object {key} is corrupt: it is the result of snapshot {}",
                r.snapshot
            )));
        }
        Ok(r)
    }

    /// Ids of the boot-test results of `snapshot` (keys whose last component is not 64 hex
    /// digits are skipped), sorted by id.
    pub fn list_boot_test_ids(&self, snapshot: &SnapshotId) -> Result<Vec<BootTestId>> {
        let p = prefix(snapshot);
        let mut ids: Vec<BootTestId> = self
            .backend()
            .list(&p)?
            .iter()
            .filter_map(|k| k.strip_prefix(&p).and_then(|n| n.parse().ok()))
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Every boot-test result of `snapshot`, verified, oldest first (by `finished`, then id).
    pub fn list_boot_tests(
        &self,
        snapshot: &SnapshotId,
    ) -> Result<Vec<(BootTestId, BootTestResult)>> {
        let mut out = Vec::new();
        for id in self.list_boot_test_ids(snapshot)? {
            out.push((id, self.load_boot_test(snapshot, &id)?));
        }
        out.sort_by_key(|a| (a.1.finished, a.0));
        Ok(out)
    }

    /// The most recent boot-test result of `snapshot`, if any.
    pub fn last_boot_test(&self, snapshot: &SnapshotId) -> Result<Option<BootTestResult>> {
        Ok(self.list_boot_tests(snapshot)?.pop().map(|(_, r)| r))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::backend::{Backend, MemoryBackend};
    use crate::boottest::tests::sample;
    use crate::manifest::{Manifest, SnapshotKind};
    use crate::*;

    fn repo(encrypted: bool) -> (Arc<MemoryBackend>, Repository) {
        let mem = Arc::new(MemoryBackend::new());
        let enc = if encrypted {
            Encryption::Encrypted {
                secret: Secret::Password("pw".into()),
                kdf: KdfParams::new(8, 1, 1),
            }
        } else {
            Encryption::None
        };
        let r = Repository::init(mem.clone(), InitOptions::new(enc)).unwrap();
        (mem, r)
    }

    fn snapshot(r: &Repository, name: &str) -> SnapshotId {
        let m = Manifest::new(
            name,
            SnapshotKind::Vm,
            "h",
            "2024-05-01T10:00:00Z".parse().unwrap(),
        );
        r.commit_snapshot(&m).unwrap()
    }

    #[test]
    fn store_list_last_both_modes() {
        for enc in [false, true] {
            let (mem, r) = repo(enc);
            let s = snapshot(&r, "a");
            let other = snapshot(&r, "b");
            assert!(r.list_boot_tests(&s).unwrap().is_empty());
            assert!(r.last_boot_test(&s).unwrap().is_none());
            let r1 = sample(s, "2024-05-02T10:00:00Z");
            let mut r2 = sample(s, "2024-05-03T10:00:00Z");
            r2.verdict = Verdict::Fail;
            let id2 = r.store_boot_test(&r2).unwrap();
            let id1 = r.store_boot_test(&r1).unwrap();
            assert_eq!(r.store_boot_test(&r1).unwrap(), id1);
            let all = r.list_boot_tests(&s).unwrap();
            assert_eq!(all.len(), 2);
            assert_eq!(all[0], (id1, r1.clone()));
            assert_eq!(all[1], (id2, r2.clone()));
            assert_eq!(r.last_boot_test(&s).unwrap().unwrap(), r2);
            assert!(r.list_boot_tests(&other).unwrap().is_empty());
            // Stored under the documented key, with kind 4 and the mode's flags.
            let key = format!("boottests/{}/{}", s.to_hex(), id1.to_hex());
            let bytes = mem.get(&key).unwrap();
            assert_eq!(&bytes[..6], b"LBOB\x01\x04");
            assert_eq!(bytes[6] & magic::FLAG_ENCRYPTED != 0, enc);
            // Stray names are skipped.
            mem.put_if_absent(&format!("boottests/{}/junk", s.to_hex()), b"x")
                .unwrap();
            assert_eq!(r.list_boot_tests(&s).unwrap().len(), 2);
        }
    }

    #[test]
    fn refuses_missing_snapshot_and_detects_tampering() {
        for enc in [false, true] {
            let (mem, r) = repo(enc);
            let s = snapshot(&r, "a");
            let missing = SnapshotId::from_bytes([9; 32]);
            let e = r
                .store_boot_test(&sample(missing, "2024-05-02T10:00:00Z"))
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::NotFound);

            let id = r
                .store_boot_test(&sample(s, "2024-05-02T10:00:00Z"))
                .unwrap();
            let key = format!("boottests/{}/{}", s.to_hex(), id.to_hex());
            let mut bytes = mem.get(&key).unwrap();
            // Moved under another snapshot: the id still matches, the named snapshot does not.
            let other = snapshot(&r, "b");
            let moved = format!("boottests/{}/{}", other.to_hex(), id.to_hex());
            mem.put_if_absent(&moved, &bytes).unwrap();
            let e = r.list_boot_tests(&other).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt);
            // A flipped byte fails authentication (encrypted) or the id check.
            let last = bytes.len() - 1;
            bytes[last] ^= 1;
            mem.delete(&key).unwrap();
            mem.put_if_absent(&key, &bytes).unwrap();
            let e = r.list_boot_tests(&s).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt);
            // A manifest object is not a boot-test result (kind byte).
            let snap_bytes = mem.get(&format!("snapshots/{}", s.to_hex())).unwrap();
            let fake = BootTestId::from_bytes(*s.as_bytes());
            mem.put_if_absent(
                &format!("boottests/{}/{}", other.to_hex(), fake.to_hex()),
                &snap_bytes,
            )
            .unwrap();
            let e = r.load_boot_test(&other, &fake).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt);
        }
    }
}
