//! Any bytes, in any chunking, into the TCP codec: no panic, the buffer stays bounded by the
//! frame limit, and every message it yields encodes back to one that decodes the same.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use proto::v1::DeviceMessage;
use proto::DelimitedCodec;
use tokio_util::codec::{Decoder, Encoder};

/// Small, so oversize frames are reached often.
const MAX_FRAME: usize = 512;
/// Longest varint length prefix.
const MAX_PREFIX: usize = 10;

fuzz_target!(|input: &[u8]| {
    let Some((&chunk, data)) = input.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut codec = DelimitedCodec::<DeviceMessage>::new(MAX_FRAME);
    let mut buf = BytesMut::new();
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(msg)) => round_trip(&msg),
                Ok(None) => {
                    assert!(
                        buf.len() <= MAX_PREFIX + MAX_FRAME,
                        "buffer grew to {}",
                        buf.len()
                    );
                    break;
                }
                // The link closes on any error: nothing more is read.
                Err(_) => return,
            }
        }
    }
});

fn round_trip(msg: &DeviceMessage) {
    let mut codec = DelimitedCodec::<DeviceMessage>::new(usize::MAX);
    let mut out = BytesMut::new();
    codec.encode(msg.clone(), &mut out).expect("encode");
    let again = codec
        .decode(&mut out)
        .expect("decode")
        .expect("a whole frame");
    assert_eq!(&again, msg);
    assert!(out.is_empty());
    assert_eq!(again.encoded_len(), msg.encoded_len());
}
