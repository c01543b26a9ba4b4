//! Tests of framed chunk objects: hashing, round trips, updates, tampering.

use super::*;

const FS: usize = 64 << 10;

fn keys() -> Keys {
    Keys::from_master([9; 32])
}

fn data(n: usize, seed: u8) -> Vec<u8> {
    // Half compressible text, half pseudo-random bytes, some zero frames.
    let mut v = Vec::with_capacity(n * FS);
    let mut x = u32::from(seed) | 1;
    for f in 0..n {
        for i in 0..FS {
            let b = match f % 4 {
                0 => b"lifeboat frames "[i % 16],
                1 => {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                }
                2 => 0,
                _ => (i / 100) as u8 ^ seed,
            };
            v.push(b);
        }
    }
    v
}

fn seal_fresh(k: Option<&Keys>, d: &[u8]) -> ([u8; 32], Vec<u8>) {
    let cvs = frame_cvs(k, d, FS);
    let id = merge_root(k, &cvs);
    (id, seal(k, &id, d, &cvs, FS, 3).unwrap())
}

#[test]
fn root_of_frames_is_the_plain_hash() {
    for n in [2usize, 4, 16, 64] {
        let d = data(n, 3);
        for k in [None, Some(keys())] {
            let cvs = frame_cvs(k.as_ref(), &d, FS);
            assert_eq!(
                merge_root(k.as_ref(), &cvs),
                crate::object::object_hash(k.as_ref(), &d),
                "{n} frames"
            );
        }
    }
}

#[test]
fn round_trip_and_zero_frames_cost_nothing() {
    let d = data(16, 1);
    for k in [None, Some(keys())] {
        let (id, mut sealed) = seal_fresh(k.as_ref(), &d);
        assert!(is_framed(&sealed));
        let mut out = Vec::new();
        open_into(k.as_ref(), &id, &mut sealed, FS, 1 << 20, "x", &mut out).unwrap();
        assert_eq!(out, d);
    }
    let zeros = vec![0u8; 16 * FS];
    let (_, sealed) = seal_fresh(Some(&keys()), &zeros);
    assert!(
        sealed.len() < 1024,
        "{} bytes for 16 zero frames",
        sealed.len()
    );
}

#[test]
fn update_equals_fresh_seal() {
    let k = keys();
    let old = data(16, 1);
    let (old_id, old_sealed) = seal_fresh(Some(&k), &old);
    let parent = parse_parent(Some(&k), &old_id, old_sealed, FS, 1 << 20, "p")
        .unwrap()
        .unwrap();
    let mut new = old.clone();
    let f5 = vec![0xabu8; FS];
    let f2 = data(1, 7);
    new[5 * FS..6 * FS].copy_from_slice(&f5);
    new[2 * FS..3 * FS].copy_from_slice(&f2);
    let up = seal_update(Some(&k), &parent, &[(5, &f5), (2, &f2)], 3).unwrap();
    assert_eq!(up.id, crate::object::object_hash(Some(&k), &new));
    assert!(!up.all_zero);
    let mut sealed = up.sealed.clone();
    let mut out = Vec::new();
    open_into(Some(&k), &up.id, &mut sealed, FS, 1 << 20, "x", &mut out).unwrap();
    assert_eq!(out, new);
    // Unchanged frames were copied, not re-sealed: their bytes are in the new object.
    let s = parent.starts[0];
    let f0 = &parent.sealed[s..s + parent.entries[0].sealed_len as usize];
    assert!(up.sealed.windows(f0.len()).any(|w| w == f0));
}

#[test]
fn update_to_all_zero_is_reported() {
    let k = keys();
    let mut old = vec![0u8; 4 * FS];
    old[FS + 3] = 1;
    let (id, sealed) = seal_fresh(Some(&k), &old);
    let parent = parse_parent(Some(&k), &id, sealed, FS, 1 << 20, "p")
        .unwrap()
        .unwrap();
    let z = vec![0u8; FS];
    let up = seal_update(Some(&k), &parent, &[(1, &z)], 3).unwrap();
    assert!(up.all_zero);
    assert_eq!(
        up.id,
        crate::object::object_hash(Some(&k), &vec![0u8; 4 * FS])
    );
}

#[test]
fn tampering_is_detected() {
    let k = keys();
    let d = data(8, 2);
    let (id, sealed) = seal_fresh(Some(&k), &d);
    let open = |b: &[u8], id: &[u8; 32]| {
        let mut b = b.to_vec();
        let mut out = Vec::new();
        open_into(Some(&k), id, &mut b, FS, 1 << 20, "x", &mut out)
    };
    // Every byte flipped somewhere in the object.
    for pos in (0..sealed.len())
        .step_by(997)
        .chain([sealed.len() - 1, 9, 13])
    {
        let mut b = sealed.clone();
        b[pos] ^= 0x40;
        assert!(open(&b, &id).is_err(), "flip at {pos}");
    }
    // Truncated, extended, opened under another id or frame size.
    assert!(open(&sealed[..sealed.len() - 1], &id).is_err());
    let mut longer = sealed.clone();
    longer.push(0);
    assert!(open(&longer, &id).is_err());
    assert!(open(&sealed, &[1; 32]).is_err());
    let mut b = sealed.clone();
    let mut out = Vec::new();
    assert!(open_into(Some(&k), &id, &mut b, FS * 2, 1 << 20, "x", &mut out).is_err());
    // Unencrypted object in an encrypted repository and the reverse.
    let (pid, plain_obj) = seal_fresh(None, &d);
    let mut b = plain_obj.clone();
    assert!(open_into(Some(&k), &pid, &mut b, FS, 1 << 20, "x", &mut out).is_err());
    let mut b = sealed.clone();
    assert!(open_into(None, &id, &mut b, FS, 1 << 20, "x", &mut out).is_err());
    // A frame count over the limit.
    let mut b = sealed.clone();
    assert!(open_into(Some(&k), &id, &mut b, FS, 4 * FS, "x", &mut out).is_err());
}

#[test]
fn frames_swapped_between_positions_fail() {
    // Unencrypted: swap two equal-length stored frames and their table entries; the
    // position-bound chaining values no longer hash to the id.
    let mut d = vec![0u8; 4 * FS];
    d[..FS].fill(1);
    d[FS..2 * FS].fill(2);
    let (id, sealed) = seal_fresh(None, &d);
    let mut b = sealed.clone();
    let (e, s) = parse(None, &id, &mut b, FS, 1 << 20, "x").unwrap();
    assert_eq!(e[0].sealed_len, e[1].sealed_len);
    let l = e[0].sealed_len as usize;
    let mut swapped = sealed.clone();
    let f0 = sealed[s[0]..s[0] + l].to_vec();
    let f1 = sealed[s[1]..s[1] + l].to_vec();
    swapped[s[0]..s[0] + l].copy_from_slice(&f1);
    swapped[s[1]..s[1] + l].copy_from_slice(&f0);
    let mut out = Vec::new();
    assert!(open_into(None, &id, &mut swapped, FS, 1 << 20, "x", &mut out).is_err());
}

#[test]
fn frame_counts() {
    assert_eq!(frames_for(1 << 20, FS), Some(16));
    assert_eq!(frames_for(FS, FS), None);
    assert_eq!(frames_for(3 * FS, FS), None);
    assert_eq!(frames_for(FS + 1, FS), None);
    assert_eq!(frames_for(1 << 20, 0), None);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

    /// Any chain of updates (frames replaced by zeros, runs or pseudo-random bytes) yields
    /// the id of the whole new plaintext and opens to it, encrypted or not.
    #[test]
    fn chained_updates_match_whole_chunk(
        log_n in 1u32..4,
        encrypted: bool,
        steps in proptest::collection::vec(
            proptest::collection::vec((0usize..8, 0u8..4, 0u8..255), 1..5), 1..4),
    ) {
        let n = 1usize << log_n;
        let k = encrypted.then(keys);
        let k = k.as_ref();
        let mut plain = data(n, 5);
        let (mut id, mut sealed) = seal_fresh(k, &plain);
        for step in steps {
            let parent = parse_parent(k, &id, sealed.clone(), FS, 1 << 20, "p")
                .unwrap()
                .unwrap();
            let mut changed: Vec<(usize, Vec<u8>)> = Vec::new();
            for (f, kind, b) in step {
                let f = f % n;
                let frame = match kind {
                    0 => vec![0u8; FS],
                    1 => vec![b; FS],
                    _ => data(2, b)[FS..].to_vec(),
                };
                changed.retain(|(g, _)| *g != f);
                changed.push((f, frame));
            }
            for (f, frame) in &changed {
                plain[f * FS..(f + 1) * FS].copy_from_slice(frame);
            }
            let refs: Vec<(usize, &[u8])> =
                changed.iter().map(|(f, b)| (*f, &b[..])).collect();
            let up = seal_update(k, &parent, &refs, 3).unwrap();
            proptest::prop_assert_eq!(up.id, crate::object::object_hash(k, &plain));
            proptest::prop_assert_eq!(up.all_zero, crate::is_zero(&plain));
            let mut b = up.sealed.clone();
            let mut out = Vec::new();
            open_into(k, &up.id, &mut b, FS, 1 << 20, "x", &mut out).unwrap();
            proptest::prop_assert!(out == plain);
            id = up.id;
            sealed = up.sealed;
        }
    }
}
