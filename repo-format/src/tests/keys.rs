//! Init and open, key slots, the config and error messages.

use std::sync::Arc;

use super::{backup, init, mem_repo, password, CHEAP, CHUNK};
use crate::backend::{FaultyBackend, MemoryBackend};
use crate::*;

#[test]
fn wrong_or_missing_secret_is_wrong_key() {
    let (mem, _repo) = mem_repo(true);
    let kf = Secret::KeyFile(KeyFile::try_generate().unwrap());
    for secret in [Some(&password("nope")), Some(&kf), None] {
        let e = Repository::open(mem.clone(), secret).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WrongKey, "{e}");
    }
}

#[test]
fn password_and_key_file_slots_both_open() {
    let (mem, repo) = mem_repo(true);
    let kf = KeyFile::try_generate().unwrap();
    let kf = KeyFile::parse(&kf.to_text()).unwrap();
    let kf_slot = repo
        .add_key(&Secret::KeyFile(kf.clone()), CHEAP, "backup key file")
        .unwrap();
    let id = backup(&repo, "web", "2024-05-01T10:00:00Z", 1);

    let keys = repo.list_keys().unwrap();
    assert_eq!(keys.len(), 2);
    assert!(keys.iter().any(|k| k.id == kf_slot
        && k.kind == KeySlotKind::Keyfile
        && k.label == "backup key file"));

    for secret in [password("pw"), Secret::KeyFile(kf.clone())] {
        let r = Repository::open(mem.clone(), Some(&secret)).unwrap();
        assert_eq!(r.id(), repo.id());
        assert_eq!(r.load_snapshot(&id).unwrap().name, "web");
    }

    // Remove the password slot: only the key file opens now; the last slot stays.
    let pw_slot = keys.iter().find(|k| k.id != kf_slot).unwrap().id;
    repo.remove_key(&pw_slot).unwrap();
    assert_eq!(
        Repository::open(mem.clone(), Some(&password("pw")))
            .unwrap_err()
            .kind(),
        ErrorKind::WrongKey
    );
    Repository::open(mem.clone(), Some(&Secret::KeyFile(kf))).unwrap();
    assert_eq!(
        repo.remove_key(&kf_slot).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        repo.remove_key(&pw_slot).unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn damaged_key_slot_does_not_lock_out_others() {
    let (mem, repo) = mem_repo(true);
    repo.add_key(&password("second"), CHEAP, "").unwrap();
    let first = mem
        .keys()
        .into_iter()
        .find(|k| k.starts_with("keys/"))
        .unwrap();
    mem.overwrite(&first, b"{garbage".to_vec());
    // Whichever slot was damaged, one of the two passphrases still opens.
    let opened = [password("pw"), password("second")]
        .iter()
        .filter(|s| Repository::open(mem.clone(), Some(s)).is_ok())
        .count();
    assert_eq!(opened, 1);
}

#[test]
fn refused_delete_keeps_key_slot() {
    let mem = Arc::new(MemoryBackend::new());
    let faulty = Arc::new(FaultyBackend::new(mem.clone()));
    let repo = init(faulty.clone(), true);
    let id = repo.add_key(&password("second"), CHEAP, "").unwrap();
    faulty.set_refuse_deletes(true);
    assert_eq!(repo.remove_key(&id).unwrap_err().kind(), ErrorKind::Io);
    assert_eq!(repo.list_keys().unwrap().len(), 2);
    Repository::open(mem, Some(&password("second"))).unwrap();
}

#[test]
fn init_and_open_errors() {
    let (mem, _) = mem_repo(false);
    let e = Repository::init(mem.clone(), InitOptions::new(Encryption::None)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);

    let empty = Arc::new(MemoryBackend::new());
    let e = Repository::open(empty.clone(), None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotARepository);
    empty.overwrite("config", br#"{"version":1,"kdf":"restic"}"#.to_vec());
    let e = Repository::open(empty, None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotARepository);

    for bad in [0, 4096, 3 << 16, 32 << 20] {
        let mut opts = InitOptions::new(Encryption::None);
        opts.chunk_size = bad;
        let e = Repository::init(Arc::new(MemoryBackend::new()), opts).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    }
}

#[test]
fn config_format() {
    let (mem, repo) = mem_repo(true);
    let v: serde_json::Value = serde_json::from_slice(&mem.get("config").unwrap()).unwrap();
    assert_eq!(v["format"], "lifeboat-repo");
    assert_eq!(v["version"], 1);
    let expected = match Cipher::preferred() {
        Cipher::Aegis256 => "aegis256-blake3",
        Cipher::XChaCha20Poly1305 => "xchacha20poly1305-blake3",
    };
    assert_eq!(v["encryption"], expected);
    assert_eq!(v["compression"], "zstd");
    assert_eq!(v["zstd_level"], DEFAULT_ZSTD_LEVEL);
    assert_eq!(v["chunk_size"], CHUNK);
    assert_eq!(v["id"].as_str().unwrap().len(), 32);
    assert_eq!(v["mac"].as_str().unwrap().len(), 64);
    assert_eq!(repo.config().id, v["id"]);

    let (mem, _) = mem_repo(false);
    let v: serde_json::Value = serde_json::from_slice(&mem.get("config").unwrap()).unwrap();
    assert_eq!(v["encryption"], "none");
    assert!(v.get("mac").is_none());
}

#[test]
fn errors_display_only_their_context() {
    let (mem, _) = mem_repo(true);
    let e = Repository::open(mem, Some(&password("bad"))).unwrap_err();
    assert!(e.to_string().starts_with("no key slot opens"), "{e}");
    let e = Repository::open(Arc::new(MemoryBackend::new()), None).unwrap_err();
    let source = std::error::Error::source(&e).unwrap();
    assert!(!e.to_string().contains(&source.to_string()));
}

#[test]
fn orphan_key_slot_with_same_password_is_passed_over() {
    // E.g. left behind by the loser of two concurrent `init`s.
    let (mem, repo) = mem_repo(true);
    let (other, _) = mem_repo(true);
    let orphan = other
        .keys()
        .into_iter()
        .find(|k| k.starts_with("keys/"))
        .unwrap();
    mem.overwrite(
        &format!("keys/{}", "0".repeat(64)),
        other.get(&orphan).unwrap(),
    );
    let r = Repository::open(mem.clone(), Some(&password("pw"))).unwrap();
    assert_eq!(r.id(), repo.id());
    let sealed = repo.try_seal_chunk(b"x").unwrap();
    repo.store_chunk(&sealed).unwrap();
    assert_eq!(r.load_chunk(&sealed.id).unwrap(), b"x");
}

/// A config naming a cipher this build does not know is refused as unsupported, not misread.
#[test]
fn unknown_cipher_in_config_is_unsupported() {
    let (mem, _) = mem_repo(true);
    let config = String::from_utf8(mem.get("config").unwrap()).unwrap();
    let scheme = Cipher::preferred().scheme();
    let name = serde_json::to_value(scheme).unwrap();
    let changed = config.replace(name.as_str().unwrap(), "rot13-blake3");
    assert_ne!(changed, config);
    mem.overwrite("config", changed.into_bytes());
    let e = Repository::open(mem, Some(&password("pw"))).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UnsupportedVersion, "{e}");
}
