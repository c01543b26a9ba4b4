//! Framing tests: round trips, malformed and hostile input (proptest), per-request collectors.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;

use super::*;
use crate::error::ErrorKind;
use crate::extent::BlockStatus;

fn decode_all(bytes: &[u8]) {
    let mut buf = bytes;
    while let Ok(n) = check_reply(buf) {
        let _ = parse_reply(Bytes::copy_from_slice(&buf[..n]));
        buf = &buf[n..];
    }
    let _ =
        check_option_reply(bytes).map(|n| parse_option_reply(Bytes::copy_from_slice(&bytes[..n])));
    let _ = parse_info(bytes);
    let _ = parse_meta_context(bytes);
    let _ = Request::decode(bytes);
}

fn payload_strategy() -> impl Strategy<Value = ChunkPayload> {
    prop_oneof![
        Just(ChunkPayload::None),
        (any::<u64>(), prop::collection::vec(any::<u8>(), 1..64)).prop_map(|(offset, d)| {
            ChunkPayload::OffsetData {
                offset,
                data: Bytes::from(d),
            }
        }),
        (any::<u64>(), 1..u32::MAX)
            .prop_map(|(offset, length)| ChunkPayload::OffsetHole { offset, length }),
        (
            any::<u32>(),
            prop::collection::vec((1..u32::MAX, any::<u32>()), 1..8)
        )
            .prop_map(|(context_id, d)| {
                ChunkPayload::BlockStatus {
                    context_id,
                    descriptors: d
                        .into_iter()
                        .map(|(length, flags)| Descriptor { length, flags })
                        .collect(),
                }
            }),
        (1..u32::MAX, "[a-z ]{0,20}")
            .prop_map(|(code, message)| ChunkPayload::Error { code, message }),
        (1..u32::MAX, "[a-z ]{0,20}", any::<u64>()).prop_map(|(code, message, offset)| {
            ChunkPayload::ErrorOffset {
                code,
                message,
                offset,
            }
        }),
    ]
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        decode_all(&bytes);
    }

    #[test]
    fn corrupted_valid_frames_never_panic(p in payload_strategy(), flip in any::<(usize, u8)>()) {
        let mut buf = BytesMut::new();
        Reply::Chunk(Chunk { flags: 1, cookie: 7, payload: p }).encode(&mut buf);
        let i = flip.0 % buf.len();
        buf[i] ^= flip.1;
        decode_all(&buf);
    }

    #[test]
    fn reply_round_trip(p in payload_strategy(), cookie in any::<u64>(), done in any::<bool>()) {
        let flags = if done || p == ChunkPayload::None { REPLY_FLAG_DONE } else { 0 };
        let r = Reply::Chunk(Chunk { flags, cookie, payload: p });
        let mut buf = BytesMut::new();
        r.encode(&mut buf);
        prop_assert_eq!(check_reply(&buf), Ok(buf.len()));
        for cut in 0..buf.len() {
            let is_incomplete = matches!(check_reply(&buf[..cut]), Err(FrameError::Incomplete { .. }));
            prop_assert!(is_incomplete);
        }
        prop_assert_eq!(parse_reply(buf.freeze()), Ok(r));
    }

    #[test]
    fn simple_and_request_round_trip(cookie in any::<u64>(), error in any::<u32>(), off in any::<u64>(), len in any::<u32>(), flags in any::<u16>(), cmd in any::<u16>()) {
        let r = Reply::Simple { cookie, error };
        let mut buf = BytesMut::new();
        r.encode(&mut buf);
        prop_assert_eq!(parse_reply(buf.freeze()), Ok(r));
        let q = Request { flags, command: cmd, cookie, offset: off, length: len };
        let mut buf = BytesMut::new();
        q.encode(&mut buf);
        prop_assert_eq!(buf.len(), REQUEST_HEADER_LEN);
        prop_assert_eq!(Request::decode(&buf), Ok(q));
    }

    #[test]
    fn option_reply_round_trip(option in any::<u32>(), ty in any::<u32>(), data in prop::collection::vec(any::<u8>(), 0..64)) {
        let r = OptionReply { option, reply_type: ty, data: Bytes::from(data) };
        let mut buf = BytesMut::new();
        r.encode(&mut buf);
        prop_assert_eq!(check_option_reply(&buf), Ok(buf.len()));
        prop_assert_eq!(parse_option_reply(buf.freeze()), Ok(r));
    }

    #[test]
    fn read_assembler_never_panics(chunks in prop::collection::vec(payload_strategy(), 0..6), off in 0u64..100, len in 0u32..100) {
        let mut a = ReadAssembler::new(off, len);
        let mut b = BlockStatusCollector::new(off, len, 1, vec![1, 2]);
        let mut e = EmptyCollector::new(off, len);
        for c in chunks {
            let _ = a.feed(c.clone());
            let _ = b.feed(c.clone());
            let _ = e.feed(c);
        }
        let _ = a.finish();
        let _ = b.finish();
        let _ = e.finish();
    }
}

#[test]
fn rejects_hostile_chunks() {
    let hdr = |ty: u16, flags: u16, payload: &[u8]| {
        let mut b = BytesMut::new();
        b.put_u32(STRUCTURED_REPLY_MAGIC);
        b.put_u16(flags);
        b.put_u16(ty);
        b.put_u64(1);
        b.put_u32(payload.len() as u32);
        b.put_slice(payload);
        b.freeze()
    };
    // Zero-length descriptor.
    let mut p = vec![0, 0, 0, 1];
    p.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 3]);
    assert!(matches!(
        parse_reply(hdr(REPLY_TYPE_BLOCK_STATUS, 1, &p)),
        Err(FrameError::Invalid(_))
    ));
    // NONE without DONE, NONE with payload.
    assert!(parse_reply(hdr(REPLY_TYPE_NONE, 0, &[])).is_err());
    assert!(parse_reply(hdr(REPLY_TYPE_NONE, 1, &[0])).is_err());
    // Hole of size 0 and bad length.
    assert!(parse_reply(hdr(REPLY_TYPE_OFFSET_HOLE, 1, &[0; 12])).is_err());
    assert!(parse_reply(hdr(REPLY_TYPE_OFFSET_HOLE, 1, &[0; 11])).is_err());
    // Data chunk with no data.
    assert!(parse_reply(hdr(REPLY_TYPE_OFFSET_DATA, 1, &[0; 8])).is_err());
    // Error message longer than the chunk.
    assert!(parse_reply(hdr(REPLY_TYPE_ERROR, 1, &[0, 0, 0, 5, 0, 9, b'x'])).is_err());
    // Unknown non-error type.
    assert!(parse_reply(hdr(3, 1, &[])).is_err());
    // Unknown error type is an error chunk.
    assert!(matches!(
        parse_reply(hdr(REPLY_TYPE_FLAG_ERROR + 77, 1, &[0, 0, 0, 5, 0, 0])),
        Ok(Reply::Chunk(Chunk {
            payload: ChunkPayload::Error { code: 5, .. },
            ..
        }))
    ));
    // Oversize length fails fast, without waiting for the payload.
    let mut b = BytesMut::new();
    b.put_u32(STRUCTURED_REPLY_MAGIC);
    b.put_u16(1);
    b.put_u16(REPLY_TYPE_OFFSET_DATA);
    b.put_u64(1);
    b.put_u32(u32::MAX);
    assert!(matches!(check_reply(&b), Err(FrameError::Invalid(_))));
    // Wrong magic fails after 4 bytes.
    assert!(matches!(
        check_reply(&[1, 2, 3, 4]),
        Err(FrameError::Invalid(_))
    ));
}

#[test]
fn read_assembly() {
    let mut a = ReadAssembler::new(100, 10);
    a.feed(ChunkPayload::OffsetHole {
        offset: 104,
        length: 6,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    a.feed(ChunkPayload::OffsetData {
        offset: 100,
        data: Bytes::from_static(b"abcd"),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        &a.finish().unwrap_or_else(|e| panic!("{e}"))[..],
        b"abcd\0\0\0\0\0\0"
    );
    // Outside, overlap, incomplete.
    let mut a = ReadAssembler::new(100, 10);
    assert!(a
        .feed(ChunkPayload::OffsetData {
            offset: 99,
            data: Bytes::from_static(b"ab")
        })
        .is_err());
    assert!(a
        .feed(ChunkPayload::OffsetData {
            offset: 109,
            data: Bytes::from_static(b"ab")
        })
        .is_err());
    assert!(a
        .feed(ChunkPayload::OffsetHole {
            offset: u64::MAX,
            length: 5
        })
        .is_err());
    a.feed(ChunkPayload::OffsetHole {
        offset: 100,
        length: 5,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(a
        .feed(ChunkPayload::OffsetHole {
            offset: 104,
            length: 2
        })
        .is_err());
    assert_eq!(a.finish().map_err(|e| e.kind()), Err(ErrorKind::Protocol));
    // Server error wins.
    let mut a = ReadAssembler::new(0, 4);
    a.feed(ChunkPayload::Error {
        code: 5,
        message: "bad".into(),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        a.finish().map_err(|e| e.kind()),
        Err(ErrorKind::ServerError { code: 5 })
    );
}

#[test]
fn block_status_collection() {
    let bs = |id, d: &[(u32, u32)]| ChunkPayload::BlockStatus {
        context_id: id,
        descriptors: d
            .iter()
            .map(|&(length, flags)| Descriptor { length, flags })
            .collect(),
    };
    let mut c = BlockStatusCollector::new(10, 100, 2, vec![1, 2]);
    c.feed(bs(1, &[(5, 0)])).unwrap_or_else(|e| panic!("{e}"));
    c.feed(bs(2, &[(50, 3), (1000, 0)]))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(c.feed(bs(2, &[(1, 0)])).is_err(), "duplicate context");
    let v = c.finish().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        v,
        vec![
            BlockStatus {
                offset: 10,
                length: 50,
                flags: 3
            },
            BlockStatus {
                offset: 60,
                length: 50,
                flags: 0
            },
        ]
    );
    let mut c = BlockStatusCollector::new(0, 10, 1, vec![1]);
    assert!(
        c.feed(bs(1, &[(10, 0), (5, 0)])).is_err(),
        "descriptor beyond end"
    );
    assert!(c.feed(bs(9, &[(1, 0)])).is_err(), "unknown id");
    let c = BlockStatusCollector::new(0, 10, 1, vec![1]);
    assert_eq!(c.finish().map_err(|e| e.kind()), Err(ErrorKind::Protocol));
}

#[test]
fn server_side_option_parsing() {
    let d = option_go_data("vda", &[INFO_BLOCK_SIZE]).expect("go");
    assert_eq!(
        parse_go_data(&d),
        Ok(("vda".to_string(), vec![INFO_BLOCK_SIZE]))
    );
    assert!(parse_go_data(&d[..d.len() - 1]).is_err());
    let mut long = d.clone();
    long.push(0);
    assert!(parse_go_data(&long).is_err());
    assert!(parse_go_data(&[0, 0, 0xff, 0xff]).is_err());
    let q = vec!["base:allocation".to_string(), "qemu:x".to_string()];
    let d = option_meta_context_data("", &q).expect("meta");
    assert_eq!(parse_meta_context_data(&d), Ok((String::new(), q)));
    assert!(parse_meta_context_data(&d[..d.len() - 2]).is_err());
    // A huge query count must not allocate.
    assert!(parse_meta_context_data(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).is_err());
    let mut h = BytesMut::new();
    encode_option(&mut h, OPT_GO, &[1, 2, 3]).expect("enc");
    assert_eq!(parse_option_header(&h), Ok((OPT_GO, 3)));
    assert!(parse_option_header(&h[..10]).is_err());
    h[0] = 0;
    assert!(parse_option_header(&h).is_err());
    assert_eq!(
        parse_info(&info_block_size_data(1, 4096, 1 << 25)),
        Ok(Info::BlockSize {
            min: 1,
            preferred: 4096,
            max: 1 << 25
        })
    );
    assert_eq!(
        parse_info(&info_export_data(7, 3)),
        Ok(Info::Export { size: 7, flags: 3 })
    );
    assert_eq!(
        parse_meta_context(&meta_context_reply_data(1, "base:allocation")),
        Ok((1, "base:allocation".to_string()))
    );
    let mut b = BytesMut::new();
    encode_data_chunk_header(&mut b, REPLY_FLAG_DONE, 9, 4096, 3);
    b.put_slice(b"abc");
    let n = check_reply(&b).expect("complete");
    let r = parse_reply(b.split_to(n).freeze()).expect("parse");
    assert_eq!(
        r,
        Reply::Chunk(Chunk {
            flags: REPLY_FLAG_DONE,
            cookie: 9,
            payload: ChunkPayload::OffsetData {
                offset: 4096,
                data: Bytes::from_static(b"abc")
            }
        })
    );
}

proptest! {
    #[test]
    fn server_parsers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse_go_data(&bytes);
        let _ = parse_meta_context_data(&bytes);
        let _ = parse_option_header(&bytes);
    }
}
