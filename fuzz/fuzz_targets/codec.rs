//! Feeds arbitrary bytes to the client-facing codec: framing, message decoding, startup
//! packets and the server-message views. Nothing may panic or allocate past the bound.
//!
//! Run with: `cargo +nightly fuzz run codec` (from the repository root).
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use pgveil::protocol::{backend, frame::split_frame, frontend::FrontendMessage, startup};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = split_frame(&mut buf, 1 << 20) {
        let _ = FrontendMessage::parse(&frame);
        let _ = backend::row_description(&frame);
        let _ = backend::data_row(&frame);
        let _ = backend::error_fields(&frame);
        let _ = backend::sasl_mechanisms(&frame);
        let _ = pgveil::protocol::frontend::sasl_initial_response(&frame);
    }
    if data.len() >= 8 {
        let _ = startup::parse_startup_packet(Bytes::copy_from_slice(data));
    }
});
