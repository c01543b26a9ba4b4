//! Tests of key derivation, key slots and the object ciphers.

use super::*;

const CHEAP: KdfParams = KdfParams::new(8, 1, 1);

fn unhex<const N: usize>(s: &str) -> [u8; N] {
    hex::decode(s).unwrap().try_into().unwrap()
}

/// AEGIS-256 test vector 1 of draft-irtf-cfrg-aegis-aead, whose 32-byte nonce ends in eight
/// zero bytes: it is also what our 24-byte stored nonce extends to.
#[test]
fn aegis256_matches_the_drafts_test_vector() {
    let key = unhex::<32>("1001000000000000000000000000000000000000000000000000000000000000");
    let nonce = unhex::<24>("100002000000000000000000000000000000000000000000");
    let cipher = ObjectCipher::Aegis256(key);
    let mut buf = [0u8; 16];
    let tag = cipher.seal_in_place(&nonce, b"", &mut buf).unwrap();
    assert_eq!(hex::encode(buf), "754fc3d8c973246dcc6d741412a4b236");
    assert_eq!(hex::encode(tag), "3fe91994768b332ed7f570a19ec5896e");
    assert!(cipher.open_in_place(&nonce, b"", &mut buf, &tag));
    assert_eq!(buf, [0u8; 16]);
    let mut bad = tag;
    bad[15] ^= 1;
    assert!(!cipher.open_in_place(&nonce, b"", &mut buf.clone(), &bad));
}

/// Each cipher opens what it sealed, refuses a changed byte of the ciphertext, tag, nonce or
/// associated data, and refuses what the other cipher sealed under the same master key.
#[test]
fn each_object_cipher_round_trips_and_authenticates() {
    let master = [5u8; 32];
    let keys = [Cipher::XChaCha20Poly1305, Cipher::Aegis256]
        .map(|c| Keys::from_master(master).for_cipher(c));
    let plain: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
    let nonce = [9u8; magic::NONCE_LEN];
    for (n, k) in keys.iter().enumerate() {
        let mut ct = plain.clone();
        let tag = k.cipher().seal_in_place(&nonce, b"aad", &mut ct).unwrap();
        assert_ne!(ct, plain);
        let mut pt = ct.clone();
        assert!(k.cipher().open_in_place(&nonce, b"aad", &mut pt, &tag));
        assert_eq!(pt, plain);
        let mut flipped = ct.clone();
        flipped[500] ^= 0x10;
        assert!(!k.cipher().open_in_place(&nonce, b"aad", &mut flipped, &tag));
        let mut bad_tag = tag;
        bad_tag[0] ^= 1;
        assert!(!k
            .cipher()
            .open_in_place(&nonce, b"aad", &mut ct.clone(), &bad_tag));
        let mut bad_nonce = nonce;
        bad_nonce[23] ^= 1;
        assert!(!k
            .cipher()
            .open_in_place(&bad_nonce, b"aad", &mut ct.clone(), &tag));
        assert!(!k
            .cipher()
            .open_in_place(&nonce, b"aae", &mut ct.clone(), &tag));
        let other = &keys[1 - n];
        assert!(!other
            .cipher()
            .open_in_place(&nonce, b"aad", &mut ct.clone(), &tag));
    }
}

#[test]
fn key_file_text_round_trip() {
    let kf = KeyFile::try_generate().unwrap();
    let text = kf.to_text();
    assert!(text.starts_with(magic::KEYFILE_HEADER));
    assert_eq!(KeyFile::parse(&text).unwrap(), kf);
    assert!(KeyFile::parse("hello").is_err());
    assert!(KeyFile::parse(&format!("{}\nAAAA\n", magic::KEYFILE_HEADER)).is_err());
    assert!(format!("{kf:?}").contains("redacted"));
}

#[test]
fn wrap_and_unwrap() {
    let keys = Keys::generate().unwrap();
    let pw = Secret::Password("hunter2".into());
    let slot = keys.wrap(&pw, CHEAP, "host", "label").unwrap();
    let json = serde_json::to_vec(&slot).unwrap();
    let slot = KeySlot::parse(&json, "s").unwrap();
    let got = slot.unwrap_key(&pw, "s").unwrap().unwrap();
    assert_eq!(got.master, keys.master);
    let wrong = Secret::Password("hunter3".into());
    assert!(slot.unwrap_key(&wrong, "s").unwrap().is_none());
    let kf = Secret::KeyFile(KeyFile::try_generate().unwrap());
    assert!(slot.unwrap_key(&kf, "s").unwrap().is_none());
    let slot2 = keys.wrap(&kf, CHEAP, "host", "").unwrap();
    assert!(slot2.kdf.is_none());
    assert_eq!(
        slot2.unwrap_key(&kf, "s").unwrap().unwrap().master,
        keys.master
    );
}

#[test]
fn absurd_kdf_params_refused() {
    assert!(KdfParams::new(u32::MAX, 1, 1).argon2().is_err());
    assert!(KdfParams::new(8, 0, 1).argon2().is_err());
}
