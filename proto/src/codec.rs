//! TCP framing: protobuf's standard delimited form, a base-128 varint byte length followed
//! by one encoded message, with a maximum frame length.
//!
//! [`DelimitedCodec`] is a `tokio_util` codec: it decodes one message type and encodes any.
//! It never panics on input; every way a byte stream can be wrong is a [`CodecError`] that
//! says which, so the link owner can answer with the matching error code. It owns no
//! policy: whether an error closes the link is the caller's decision.

use std::marker::PhantomData;

use bytes::{Buf, BytesMut};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder};

/// Default maximum length of one frame's message, in bytes (64 KiB).
pub const DEFAULT_MAX_FRAME_LEN: usize = 64 * 1024;

/// The longest a varint of a `u64` can be.
const MAX_VARINT_LEN: usize = 10;

/// Why a byte stream could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The length prefix is not a valid varint (more than 10 bytes, or over 64 bits).
    #[error("bad framing: the length prefix is not a valid varint")]
    BadFraming,
    /// The length prefix announces a frame longer than the limit.
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    FrameTooLarge {
        /// Announced length in bytes.
        len: u64,
        /// The configured limit in bytes.
        max: usize,
    },
    /// The frame's bytes are not a valid message of the expected type.
    #[error("frame does not decode: {0}")]
    Malformed(#[from] prost::DecodeError),
    /// A serial line delivered this many bad frames in a row.
    #[error("{0} bad serial frames in a row (noise, wrong baud rate or framing)")]
    NoisyLine(u32),
    /// The transport failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Length-delimited protobuf codec that decodes `In` and encodes any message.
#[derive(Debug)]
pub struct DelimitedCodec<In> {
    max_frame_len: usize,
    _in: PhantomData<fn() -> In>,
}

impl<In> DelimitedCodec<In> {
    /// A codec that rejects frames longer than `max_frame_len` bytes.
    pub fn new(max_frame_len: usize) -> Self {
        Self {
            max_frame_len,
            _in: PhantomData,
        }
    }

    /// The maximum frame length this codec accepts, in bytes.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }
}

impl<In> Default for DelimitedCodec<In> {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME_LEN)
    }
}

/// Reads a varint from the start of `buf`: `Ok(None)` when more bytes are needed,
/// `Ok(Some((value, prefix_len)))` when complete.
fn peek_varint(buf: &[u8]) -> Result<Option<(u64, usize)>, CodecError> {
    let mut value: u64 = 0;
    for (i, &byte) in buf.iter().take(MAX_VARINT_LEN).enumerate() {
        if i == MAX_VARINT_LEN - 1 && byte > 1 {
            return Err(CodecError::BadFraming);
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= MAX_VARINT_LEN {
        Err(CodecError::BadFraming)
    } else {
        Ok(None)
    }
}

impl<In: Message + Default> Decoder for DelimitedCodec<In> {
    type Item = In;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, CodecError> {
        let Some((len, prefix)) = peek_varint(src)? else {
            return Ok(None);
        };
        if len > self.max_frame_len as u64 {
            return Err(CodecError::FrameTooLarge {
                len,
                max: self.max_frame_len,
            });
        }
        // Bounded by max_frame_len above, so this fits in usize.
        let len = len as usize;
        if src.len() < prefix + len {
            src.reserve(prefix + len - src.len());
            return Ok(None);
        }
        src.advance(prefix);
        let frame = src.split_to(len).freeze();
        Ok(Some(In::decode(frame)?))
    }
}

impl<In, Out: Message> Encoder<Out> for DelimitedCodec<In> {
    type Error = CodecError;

    fn encode(&mut self, msg: Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        let len = msg.encoded_len();
        dst.reserve(len + prost::length_delimiter_len(len));
        // Cannot fail: the buffer was reserved above.
        msg.encode_length_delimited(dst)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{device_message::Body, DeviceMessage, Hello, Reading, Telemetry};
    use proptest::prelude::*;

    type Codec = DelimitedCodec<DeviceMessage>;

    fn encode_all(msgs: &[DeviceMessage]) -> BytesMut {
        let mut codec = Codec::default();
        let mut buf = BytesMut::new();
        for m in msgs {
            codec.encode(m.clone(), &mut buf).unwrap();
        }
        buf
    }

    /// Feeds `bytes` to a fresh codec in the given chunk sizes; returns what decoded and the
    /// first error, if any.
    fn decode_chunked(bytes: &[u8], chunks: &[usize]) -> (Vec<DeviceMessage>, Option<CodecError>) {
        let mut codec = Codec::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut rest = bytes;
        let mut sizes = chunks.iter().copied().cycle();
        while !rest.is_empty() {
            let n = sizes.next().unwrap_or(rest.len()).clamp(1, rest.len());
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(m)) => out.push(m),
                    Ok(None) => break,
                    Err(e) => return (out, Some(e)),
                }
            }
        }
        (out, None)
    }

    fn arb_message() -> impl Strategy<Value = DeviceMessage> {
        let hello = (".{0,40}", ".{0,70}", ".{0,20}", any::<u64>()).prop_map(|(d, t, f, e)| {
            Body::Hello(Hello {
                device_id: d,
                token: t,
                firmware_version: f,
                epoch: e,
            })
        });
        let reading = (".{0,20}", any::<f64>(), any::<u64>()).prop_map(|(s, v, ts)| Reading {
            sensor: s,
            value: v,
            timestamp_ms: ts,
        });
        let telemetry = prop::collection::vec(reading, 0..20)
            .prop_map(|readings| Body::Telemetry(Telemetry { readings }));
        (any::<u64>(), prop_oneof![hello, telemetry]).prop_map(|(seq, body)| DeviceMessage {
            seq,
            body: Some(body),
        })
    }

    /// NaN != NaN, so compare encodings instead of values.
    fn bytes_of(msgs: &[DeviceMessage]) -> Vec<Vec<u8>> {
        msgs.iter().map(|m| m.encode_to_vec()).collect()
    }

    proptest! {
        #[test]
        fn arbitrary_messages_round_trip(msgs in prop::collection::vec(arb_message(), 0..20)) {
            let buf = encode_all(&msgs);
            let (out, err) = decode_chunked(&buf, &[buf.len().max(1)]);
            prop_assert!(err.is_none());
            prop_assert_eq!(bytes_of(&out), bytes_of(&msgs));
        }

        #[test]
        fn any_chunking_decodes_to_the_same_messages(
            msgs in prop::collection::vec(arb_message(), 1..10),
            chunks in prop::collection::vec(1usize..64, 1..16),
        ) {
            let buf = encode_all(&msgs);
            let (out, err) = decode_chunked(&buf, &chunks);
            prop_assert!(err.is_none());
            prop_assert_eq!(bytes_of(&out), bytes_of(&msgs));
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in prop::collection::vec(any::<u8>(), 0..4096),
            chunks in prop::collection::vec(1usize..512, 1..8),
        ) {
            let _ = decode_chunked(&bytes, &chunks);
        }
    }

    #[test]
    fn an_eleven_byte_varint_is_bad_framing() {
        let (out, err) = decode_chunked(&[0xff; 11], &[11]);
        assert!(out.is_empty());
        assert!(matches!(err, Some(CodecError::BadFraming)));
    }

    #[test]
    fn a_varint_over_64_bits_is_bad_framing() {
        let mut bytes = vec![0xff; 9];
        bytes.push(0x02);
        let (_, err) = decode_chunked(&bytes, &[10]);
        assert!(matches!(err, Some(CodecError::BadFraming)));
    }

    #[test]
    fn a_frame_over_the_limit_is_rejected_before_its_body_arrives() {
        let mut codec = Codec::new(100);
        let mut buf = BytesMut::new();
        prost::encode_length_delimiter(101, &mut buf).unwrap();
        match codec.decode(&mut buf) {
            Err(CodecError::FrameTooLarge { len: 101, max: 100 }) => {}
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
    }

    #[test]
    fn a_frame_at_the_limit_is_accepted() {
        let msg = DeviceMessage {
            seq: 1,
            body: Some(Body::Hello(Hello {
                device_id: "x".repeat(200),
                ..Default::default()
            })),
        };
        let len = msg.encoded_len();
        let mut codec = Codec::new(len);
        let mut buf = BytesMut::new();
        codec.encode(msg.clone(), &mut buf).unwrap();
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(msg));
        assert!(buf.is_empty());
    }

    #[test]
    fn bytes_that_are_not_a_message_are_malformed() {
        // Length 3, then a field with wire type 7 (invalid).
        let (_, err) = decode_chunked(&[3, 0x0f, 0x00, 0x00], &[4]);
        assert!(matches!(err, Some(CodecError::Malformed(_))));
    }
}
