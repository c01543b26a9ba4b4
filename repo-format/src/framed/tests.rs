//! Tests of framed chunk objects: hashing, round trips, updates, tampering.

use super::open::{parse, Parsed};
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

/// How the tests read objects: 1 MiB chunk limit, frames of `FS`, delta objects allowed.
fn op(k: Option<&Keys>) -> Opener<'_> {
    Opener {
        keys: k,
        frame_size: FS,
        limit: 1 << 20,
        deltas: true,
    }
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
        open_into(op(k.as_ref()), &id, &mut sealed, None, "x", &mut out).unwrap();
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

/// A reused output buffer is not zeroed first: every frame kind (zero, compressed, stored
/// raw) must overwrite its whole range, also over a longer, different chunk's bytes.
#[test]
fn reused_buffer_holds_only_the_new_chunk() {
    let k = keys();
    let mut out = vec![0xA5u8; 20 * FS];
    for (n, seed) in [(16usize, 1u8), (16, 2), (4, 7), (16, 3)] {
        let d = data(n, seed);
        let (id, mut sealed) = seal_fresh(Some(&k), &d);
        open_into(op(Some(&k)), &id, &mut sealed, None, "x", &mut out).unwrap();
        assert!(out == d, "{n} frames, seed {seed}");
        out.iter_mut().for_each(|b| *b = !*b);
    }
}

#[test]
fn update_equals_fresh_seal() {
    let k = keys();
    let old = data(16, 1);
    let (old_id, old_sealed) = seal_fresh(Some(&k), &old);
    let parent = parse_parent(op(Some(&k)), &old_id, old_sealed, "p")
        .unwrap()
        .unwrap();
    let mut new = old.clone();
    let f5 = vec![0xabu8; FS];
    let f2 = data(1, 7);
    new[5 * FS..6 * FS].copy_from_slice(&f5);
    new[2 * FS..3 * FS].copy_from_slice(&f2);
    let up = seal_update(Some(&k), &parent, &[(5, &f5), (2, &f2)], 3, false).unwrap();
    assert_eq!(up.id, crate::object::object_hash(Some(&k), &new));
    assert!(!up.all_zero);
    let mut sealed = up.sealed.clone();
    let mut out = Vec::new();
    open_into(op(Some(&k)), &up.id, &mut sealed, None, "x", &mut out).unwrap();
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
    let parent = parse_parent(op(Some(&k)), &id, sealed, "p")
        .unwrap()
        .unwrap();
    let z = vec![0u8; FS];
    let up = seal_update(Some(&k), &parent, &[(1, &z)], 3, true).unwrap();
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
        open_into(op(Some(&k)), id, &mut b, None, "x", &mut out)
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
    let wide = Opener {
        frame_size: FS * 2,
        ..op(Some(&k))
    };
    assert!(open_into(wide, &id, &mut b, None, "x", &mut out).is_err());
    // Unencrypted object in an encrypted repository and the reverse.
    let (pid, plain_obj) = seal_fresh(None, &d);
    let mut b = plain_obj.clone();
    assert!(open_into(op(Some(&k)), &pid, &mut b, None, "x", &mut out).is_err());
    let mut b = sealed.clone();
    assert!(open_into(op(None), &id, &mut b, None, "x", &mut out).is_err());
    // A frame count over the limit.
    let mut b = sealed.clone();
    let small = Opener {
        limit: 4 * FS,
        ..op(Some(&k))
    };
    assert!(open_into(small, &id, &mut b, None, "x", &mut out).is_err());
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
    let Parsed {
        entries: e,
        starts: s,
        ..
    } = parse(
        Opener {
            deltas: false,
            ..op(None)
        },
        &id,
        &mut b,
        "x",
    )
    .unwrap();
    assert_eq!(e[0].sealed_len, e[1].sealed_len);
    let l = e[0].sealed_len as usize;
    let mut swapped = sealed.clone();
    let f0 = sealed[s[0]..s[0] + l].to_vec();
    let f1 = sealed[s[1]..s[1] + l].to_vec();
    swapped[s[0]..s[0] + l].copy_from_slice(&f1);
    swapped[s[1]..s[1] + l].copy_from_slice(&f0);
    let mut out = Vec::new();
    assert!(open_into(op(None), &id, &mut swapped, None, "x", &mut out).is_err());
}

#[test]
fn frame_counts() {
    assert_eq!(frames_for(1 << 20, FS), Some(16));
    assert_eq!(frames_for(FS, FS), None);
    assert_eq!(frames_for(3 * FS, FS), None);
    assert_eq!(frames_for(FS + 1, FS), None);
    assert_eq!(frames_for(1 << 20, 0), None);
}

/// Opens `sealed` (chunk `id`), taking a delta object's base from `store`.
fn open_with(
    k: Option<&Keys>,
    store: &std::collections::HashMap<[u8; 32], Vec<u8>>,
    id: &[u8; 32],
    sealed: &[u8],
) -> Result<Vec<u8>> {
    let mut b = sealed.to_vec();
    let mut base_bytes = match base_of(sealed) {
        Some(bid) => Some(
            store
                .get(&bid)
                .cloned()
                .ok_or_else(|| Error::corrupt("no such base"))?,
        ),
        None => None,
    };
    let base = base_bytes.as_mut().map(|s| BaseObject {
        sealed: s,
        name: "base",
    });
    let mut out = Vec::new();
    open_into(op(k), id, &mut b, base, "x", &mut out)?;
    Ok(out)
}

#[test]
fn delta_stores_only_the_changed_frames() {
    for k in [None, Some(keys())] {
        let k = k.as_ref();
        let old = data(16, 1);
        let (old_id, old_sealed) = seal_fresh(k, &old);
        let store = std::collections::HashMap::from([(old_id, old_sealed.clone())]);
        let parent = parse_parent(op(k), &old_id, old_sealed.clone(), "p")
            .unwrap()
            .unwrap();
        let f3 = data(2, 9)[FS..].to_vec();
        let mut new = old.clone();
        new[3 * FS..4 * FS].copy_from_slice(&f3);
        let up = seal_update(k, &parent, &[(3, &f3)], 3, true).unwrap();
        assert_eq!(up.id, crate::object::object_hash(k, &new));
        assert_eq!(base_of(&up.sealed), Some(old_id));
        // One stored frame (≈ FS, incompressible) and the table, not the 12 stored frames.
        assert!(
            up.sealed.len() < FS + 1024,
            "{} bytes for a one-frame delta",
            up.sealed.len()
        );
        assert_eq!(open_with(k, &store, &up.id, &up.sealed).unwrap(), new);
        // Without its base, or with another chunk as its base, it does not open.
        let mut b = up.sealed.clone();
        let mut out = Vec::new();
        assert!(open_into(op(k), &up.id, &mut b, None, "x", &mut out).is_err());
        let (other_id, other) = seal_fresh(k, &data(16, 2));
        let wrong = std::collections::HashMap::from([(old_id, other)]);
        assert!(open_with(k, &wrong, &up.id, &up.sealed).is_err());
        // Claiming the other chunk as the base (its own id) fails the table's authentication
        // when encrypted, and the frames' chaining values either way.
        let mut renamed = up.sealed.clone();
        renamed[16..48].copy_from_slice(&other_id);
        let mut store2 = store.clone();
        store2.insert(other_id, seal_fresh(k, &data(16, 2)).1);
        assert!(open_with(k, &store2, &up.id, &renamed).is_err());
        // Encrypted: any byte flipped, in the header (base id included), table or frame.
        // (Unencrypted, a stored frame's chaining value is not checked against its bytes when
        // the chunk opens, as in a framed object: nothing authenticates it.)
        let flips = if k.is_some() { up.sealed.len() } else { 0 };
        for pos in (0..flips)
            .step_by(61)
            .chain([4, 16, 47, 48].into_iter().filter(|_| flips > 0))
        {
            let mut b = up.sealed.clone();
            b[pos] ^= 0x20;
            assert!(open_with(k, &store, &up.id, &b).is_err(), "flip at {pos}");
        }
        // A repository of version 2 has no delta objects.
        let mut b = up.sealed.clone();
        let mut base = old_sealed.clone();
        let v2 = Opener {
            deltas: false,
            ..op(k)
        };
        let base_obj = BaseObject {
            sealed: &mut base,
            name: "b",
        };
        assert!(open_into(v2, &up.id, &mut b, Some(base_obj), "x", &mut out).is_err());
        // In version 2 the same update is a whole framed object.
        let whole = seal_update(k, &parent, &[(3, &f3)], 3, false).unwrap();
        assert_eq!((whole.id, base_of(&whole.sealed)), (up.id, None));
    }
}

#[test]
fn delta_of_a_delta_keeps_one_base_and_rebases_past_half() {
    let k = keys();
    let k = Some(&k);
    let mut plain = data(8, 1);
    let (first, sealed) = seal_fresh(k, &plain);
    let mut store = std::collections::HashMap::from([(first, sealed)]);
    let mut id = first;
    // Frames 0, 1, 3, 4, 5 (non-zero data) changed one per update: four deltas on `first`,
    // each storing the frames changed so far; the fifth would store 5 of 8 and rebases.
    for (step, f) in [0usize, 1, 3, 4, 5].into_iter().enumerate() {
        let frame = vec![step as u8 + 1; FS];
        plain[f * FS..(f + 1) * FS].copy_from_slice(&frame);
        let mut parent = parse_parent(op(k), &id, store[&id].clone(), "p")
            .unwrap()
            .unwrap();
        if parent.wants_base(&[f]) {
            let bid = parent.base_id().unwrap();
            let base = parse_parent(op(k), &bid, store[&bid].clone(), "b")
                .unwrap()
                .unwrap();
            parent.attach_base(base, "p").unwrap();
        }
        let up = seal_update(k, &parent, &[(f, &frame)], 3, true).unwrap();
        let expect = if step < 4 { Some(first) } else { None };
        assert_eq!(base_of(&up.sealed), expect, "step {step}");
        assert_eq!(open_with(k, &store, &up.id, &up.sealed).unwrap(), plain);
        store.insert(up.id, up.sealed);
        id = up.id;
    }
    // A delta named as the base of another object is refused.
    let delta_id = store
        .iter()
        .find(|(_, s)| base_of(s).is_some())
        .map(|(i, _)| *i)
        .unwrap();
    let mut parent = parse_parent(op(k), &delta_id, store[&delta_id].clone(), "p")
        .unwrap()
        .unwrap();
    let not_a_base = parse_parent(op(k), &delta_id, store[&delta_id].clone(), "d")
        .unwrap()
        .unwrap();
    assert!(parent.attach_base(not_a_base, "p").is_err());
    // Without its base attached, an update past half stays a delta on the same base.
    let frames: Vec<(usize, Vec<u8>)> = (0..8).map(|f| (f, vec![0x77; FS])).collect();
    let refs: Vec<(usize, &[u8])> = frames.iter().map(|(f, b)| (*f, &b[..])).collect();
    let up = seal_update(k, &parent, &refs[..6], 3, true).unwrap();
    assert_eq!(base_of(&up.sealed), Some(first));
    assert!(seal_update(k, &parent, &refs[..6], 3, false).is_err());
}

#[test]
fn base_frames_checked_against_the_base_table() {
    // Unencrypted: a delta whose base reference carries another chaining value than the
    // base's frame (table edited; nothing authenticates it) is refused before hashing.
    let old = data(4, 1);
    let (old_id, old_sealed) = seal_fresh(None, &old);
    let parent = parse_parent(op(None), &old_id, old_sealed.clone(), "p")
        .unwrap()
        .unwrap();
    let z = vec![5u8; FS];
    let up = seal_update(None, &parent, &[(1, &z)], 3, true).unwrap();
    let store = std::collections::HashMap::from([(old_id, old_sealed)]);
    // Entry 0 (a base reference to frame 0) at 48 + 0·37: flags, len, CV.
    let mut bad = up.sealed.clone();
    assert_eq!(bad[48], magic::FRAME_FLAG_BASE);
    bad[48 + 5] ^= 1;
    let err = open_with(None, &store, &up.id, &bad).unwrap_err();
    assert!(err.to_string().contains("frame 0"), "{err}");
    // A base reference with a length, or combined with another flag, is a bad entry.
    for (off, v) in [
        (49usize, 1u8),
        (48, magic::FRAME_FLAG_BASE | magic::FRAME_FLAG_ZSTD),
    ] {
        let mut bad = up.sealed.clone();
        bad[off] = v;
        assert!(open_with(None, &store, &up.id, &bad).is_err());
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(40))]

    /// Any chain of updates (frames replaced by zeros, runs or pseudo-random bytes) yields
    /// the id of the whole new plaintext and opens (with its base, for a delta) to it,
    /// encrypted or not, with delta objects or without; every base is a framed object, and a
    /// delta stores at most half its frames unless its base was not attached.
    #[test]
    fn chained_updates_match_whole_chunk(
        log_n in 1u32..4,
        encrypted: bool,
        deltas: bool,
        attach: bool,
        steps in proptest::collection::vec(
            proptest::collection::vec((0usize..8, 0u8..4, 0u8..255), 1..5), 1..6),
    ) {
        let n = 1usize << log_n;
        let k = encrypted.then(keys);
        let k = k.as_ref();
        let mut plain = data(n, 5);
        let (mut id, sealed) = seal_fresh(k, &plain);
        let mut store = std::collections::HashMap::from([(id, sealed)]);
        for step in steps {
            let mut parent = parse_parent(op(k), &id, store[&id].clone(), "p")
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
            let touched: Vec<usize> = changed.iter().map(|(f, _)| *f).collect();
            if attach && deltas && parent.wants_base(&touched) {
                let bid = parent.base_id().unwrap();
                let base = parse_parent(op(k), &bid, store[&bid].clone(), "b")
                    .unwrap()
                    .unwrap();
                parent.attach_base(base, "p").unwrap();
            }
            for (f, frame) in &changed {
                plain[f * FS..(f + 1) * FS].copy_from_slice(frame);
            }
            let refs: Vec<(usize, &[u8])> =
                changed.iter().map(|(f, b)| (*f, &b[..])).collect();
            let up = seal_update(k, &parent, &refs, 3, deltas).unwrap();
            proptest::prop_assert_eq!(up.id, crate::object::object_hash(k, &plain));
            proptest::prop_assert_eq!(up.all_zero, crate::is_zero(&plain));
            proptest::prop_assert!(open_with(k, &store, &up.id, &up.sealed).unwrap() == plain);
            if let Some(b) = base_of(&up.sealed) {
                proptest::prop_assert!(deltas);
                proptest::prop_assert!(base_of(&store[&b]).is_none());
                if attach {
                    let mut s = up.sealed.clone();
                    let p = parse(op(k), &up.id, &mut s, "x").unwrap();
                    let own = p.entries.iter().filter(|e| e.stored()).count();
                    proptest::prop_assert!(own <= n / 2, "{} of {} frames stored", own, n);
                }
            }
            store.entry(up.id).or_insert(up.sealed);
            id = up.id;
        }
    }
}

/// A parent read from the head of its object only is checked as strictly as a whole one (table
/// authenticated, frame lengths against the object's size), makes the same delta, and refuses
/// (an error, not a panic) an update that would copy its frames.
#[test]
fn parent_from_the_head_only() {
    let k = keys();
    let d = data(16, 5);
    let (id, sealed) = seal_fresh(Some(&k), &d);
    let hl = head_len(true, 16);
    let head = sealed[..hl].to_vec();
    let parent = |h: Vec<u8>, size: usize| parse_parent_head(op(Some(&k)), &id, h, size, "x");
    let p = parent(head.clone(), sealed.len()).unwrap().unwrap();
    assert_eq!(p.frame_count(), 16);
    for size in [sealed.len() - 1, sealed.len() + 1, hl - 1] {
        assert!(parent(head.clone(), size).is_err(), "size {size}");
    }
    for i in [0, 5, 16, hl - 30, hl - 1] {
        let mut bad = head.clone();
        bad[i] ^= 1;
        assert!(parent(bad, sealed.len()).is_err(), "byte {i}");
    }
    assert!(parent(sealed[..hl - 1].to_vec(), sealed.len()).is_err());

    let new = vec![9u8; FS];
    let full = parse_parent(op(Some(&k)), &id, sealed.clone(), "x")
        .unwrap()
        .unwrap();
    let a = seal_update(Some(&k), &p, &[(2, &new)], 3, true).unwrap();
    let b = seal_update(Some(&k), &full, &[(2, &new)], 3, true).unwrap();
    assert_eq!(a.id, b.id);
    let mut want = d.clone();
    want[2 * FS..3 * FS].copy_from_slice(&new);
    let store = std::collections::HashMap::from([(id, sealed.clone())]);
    assert_eq!(open_with(Some(&k), &store, &a.id, &a.sealed).unwrap(), want);

    let frames: Vec<Vec<u8>> = (0..9).map(|i| vec![i as u8 + 1; FS]).collect();
    let changed: Vec<(usize, &[u8])> = frames
        .iter()
        .enumerate()
        .map(|(i, f)| (i, &f[..]))
        .collect();
    assert!(seal_update(Some(&k), &p, &changed, 3, true).is_err());
    assert!(seal_update(Some(&k), &full, &changed, 3, true).is_ok());
}
