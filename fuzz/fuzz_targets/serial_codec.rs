//! Any bytes, in any chunking, into the serial codec: no panic, the buffer stays bounded
//! without a terminator in sight, and a clean frame after any noise still decodes.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use proto::serial::{encode_frame, SerialCodec};
use proto::v1::{device_message::Body, DeviceMessage, Ping};
use tokio_util::codec::Decoder;

/// Small, so oversize frames are reached often.
const MAX_FRAME: usize = 512;

fuzz_target!(|input: &[u8]| {
    let Some((&chunk, noise)) = input.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    // Noise, a terminator (a device resynchronises with one), then a clean Ping.
    let ping = DeviceMessage {
        seq: 0,
        body: Some(Body::Ping(Ping {})),
    };
    let mut line = noise.to_vec();
    line.push(0);
    let mut clean = BytesMut::new();
    encode_frame(&ping, &mut clean);
    line.extend_from_slice(&clean);

    let mut codec = SerialCodec::<DeviceMessage>::new(MAX_FRAME);
    let mut buf = BytesMut::new();
    let mut last = None;
    for piece in line.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => last = Some(frame),
                Ok(None) => {
                    // COBS adds a byte per 254, plus the CRC.
                    let bound = MAX_FRAME + 4 + (MAX_FRAME + 4) / 254 + 2;
                    assert!(buf.len() <= bound, "buffer grew to {}", buf.len());
                    break;
                }
                Err(e) => panic!("the serial codec never fails the line: {e}"),
            }
        }
    }
    assert_eq!(
        last,
        Some(Ok(ping)),
        "the clean frame after the noise decodes"
    );
});
