//! Property tests for the codec (the stable-toolchain sibling of `fuzz/`): arbitrary bytes
//! never panic the framing or the decoders, frames split anywhere reassemble to the same
//! messages, and well-formed messages decode to what was encoded.

use bytes::{BufMut, Bytes, BytesMut};
use pgveil::protocol::frame::split_frame;
use pgveil::protocol::frontend::FrontendMessage;
use pgveil::protocol::{backend, startup, Frame};
use proptest::prelude::*;

fn framed(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u8(tag);
    b.put_i32(body.len() as i32 + 4);
    b.put_slice(body);
    b.to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(frame)) = split_frame(&mut buf, 4096) {
            let _ = FrontendMessage::parse(&frame);
            let _ = backend::row_description(&frame);
            let _ = backend::data_row(&frame);
            let _ = backend::error_fields(&frame);
            let _ = backend::ready_for_query(&frame);
        }
        if data.len() >= 8 {
            let _ = startup::parse_startup_packet(Bytes::copy_from_slice(&data));
        }
    }

    #[test]
    fn arbitrary_bodies_behind_valid_headers_never_panic(
        tag in prop::sample::select(b"QPBDECSHFdcfpXTDRKZE".to_vec()),
        body in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let raw = framed(tag, &body);
        let frame = Frame::from_raw(Bytes::from(raw)).unwrap();
        let _ = FrontendMessage::parse(&frame);
        let _ = backend::row_description(&frame);
        let _ = backend::data_row(&frame);
        let _ = backend::error_fields(&frame);
    }

    #[test]
    fn split_anywhere_reassembles(
        sqls in proptest::collection::vec("[a-zA-Z0-9 ,*()=']{0,40}", 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut stream = Vec::new();
        for sql in &sqls {
            let mut body = sql.as_bytes().to_vec();
            body.push(0);
            stream.extend(framed(b'Q', &body));
        }
        let at = cut.index(stream.len() + 1);
        let mut buf = BytesMut::from(&stream[..at]);
        let mut got = Vec::new();
        while let Some(f) = split_frame(&mut buf, 1 << 20).unwrap() {
            got.push(f);
        }
        buf.extend_from_slice(&stream[at..]);
        while let Some(f) = split_frame(&mut buf, 1 << 20).unwrap() {
            got.push(f);
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got.len(), sqls.len());
        for (f, sql) in got.iter().zip(&sqls) {
            prop_assert_eq!(FrontendMessage::parse(f).unwrap(), FrontendMessage::Query { sql });
        }
    }

    #[test]
    fn data_rows_decode_to_what_was_encoded(
        cols in proptest::collection::vec(proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)), 0..12),
    ) {
        let mut body = Vec::new();
        body.extend_from_slice(&(cols.len() as i16).to_be_bytes());
        for c in &cols {
            match c {
                None => body.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    body.extend_from_slice(v);
                }
            }
        }
        let frame = Frame::from_raw(Bytes::from(framed(b'D', &body))).unwrap();
        let decoded = backend::data_row(&frame).unwrap();
        let expected: Vec<Option<&[u8]>> = cols.iter().map(|c| c.as_deref()).collect();
        prop_assert_eq!(decoded, expected);
    }
}
