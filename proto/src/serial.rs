//! Serial framing: each frame is COBS-encoded and ends with a 0x00 byte; inside, the protobuf
//! message is followed by its CRC-32 (IEEE, little-endian) over the message bytes.
//!
//! Line noise must cost only the frames it hits, so a bad frame is not a decoder error:
//! [`SerialCodec`] yields `Err(BadFrame)` as an *item* and decoding resumes at the next 0x00.
//! A frame longer than the limit is discarded up to its terminator. Whether a burst of bad
//! frames closes the link is the caller's policy.

use std::marker::PhantomData;

use bytes::{Buf, BytesMut};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder};

use crate::codec::CodecError;

/// Why one serial frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadFrame {
    /// The bytes between two 0x00 are not valid COBS.
    #[error("bad COBS encoding")]
    Cobs,
    /// Shorter than a CRC, or the CRC does not match.
    #[error("bad CRC")]
    Crc,
    /// Longer than the limit before its 0x00 terminator.
    #[error("frame over the size limit")]
    TooLarge,
    /// The CRC matched but the bytes are not a valid message.
    #[error("message does not decode")]
    Malformed,
}

/// COBS + CRC-32 codec that decodes `In` and encodes any message.
#[derive(Debug)]
pub struct SerialCodec<In> {
    max_frame_len: usize,
    /// Discarding an oversize frame until its terminator.
    skipping: bool,
    _in: PhantomData<fn() -> In>,
}

impl<In> SerialCodec<In> {
    /// A codec for messages of at most `max_frame_len` bytes (CRC and COBS overhead are
    /// allowed on top).
    pub fn new(max_frame_len: usize) -> Self {
        Self {
            max_frame_len,
            skipping: false,
            _in: PhantomData,
        }
    }

    /// Longest encoded frame accepted, terminator excluded.
    fn max_encoded(&self) -> usize {
        cobs::max_encoding_length(self.max_frame_len + 4)
    }
}

impl<In> Default for SerialCodec<In> {
    fn default() -> Self {
        Self::new(crate::DEFAULT_MAX_FRAME_LEN)
    }
}

/// Encodes one message as a serial frame: COBS(message ‖ CRC-32 LE) ‖ 0x00.
pub fn encode_frame(msg: &impl Message, dst: &mut BytesMut) {
    let mut raw = msg.encode_to_vec();
    let crc = crc32fast::hash(&raw);
    raw.extend_from_slice(&crc.to_le_bytes());
    dst.extend_from_slice(&cobs::encode_vec(&raw));
    dst.extend_from_slice(&[0]);
}

fn decode_frame<In: Message + Default>(mut frame: Vec<u8>) -> Result<In, BadFrame> {
    let report = cobs::decode_in_place_report(&mut frame).map_err(|_| BadFrame::Cobs)?;
    let raw = &frame[..report.frame_size()];
    if raw.len() < 4 {
        return Err(BadFrame::Crc);
    }
    let (body, crc) = raw.split_at(raw.len() - 4);
    let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32fast::hash(body) != crc {
        return Err(BadFrame::Crc);
    }
    In::decode(body).map_err(|_| BadFrame::Malformed)
}

impl<In: Message + Default> Decoder for SerialCodec<In> {
    type Item = Result<In, BadFrame>;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, CodecError> {
        loop {
            let Some(end) = src.iter().position(|&b| b == 0) else {
                if src.len() > self.max_encoded() {
                    // No terminator in sight: drop what we have and report it once.
                    src.clear();
                    if !self.skipping {
                        self.skipping = true;
                        return Ok(Some(Err(BadFrame::TooLarge)));
                    }
                }
                return Ok(None);
            };
            let frame = src.split_to(end).to_vec();
            src.advance(1);
            if self.skipping {
                // The tail of an oversize frame, already reported.
                self.skipping = false;
                continue;
            }
            if frame.is_empty() {
                continue; // back-to-back terminators: idle line or a resync marker
            }
            if frame.len() > self.max_encoded() {
                return Ok(Some(Err(BadFrame::TooLarge)));
            }
            return Ok(Some(decode_frame(frame)));
        }
    }
}

impl<In, Out: Message> Encoder<Out> for SerialCodec<In> {
    type Error = CodecError;

    fn encode(&mut self, msg: Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode_frame(&msg, dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{device_message::Body, DeviceMessage, Reading, Telemetry};
    use proptest::prelude::*;

    type Codec = SerialCodec<DeviceMessage>;

    fn msg(seq: u64, n: usize) -> DeviceMessage {
        DeviceMessage {
            seq,
            body: Some(Body::Telemetry(Telemetry {
                readings: (0..n)
                    .map(|i| Reading {
                        sensor: format!("s{i}"),
                        value: i as f64,
                        timestamp_ms: 0,
                    })
                    .collect(),
            })),
        }
    }

    fn decode_all(codec: &mut Codec, bytes: &[u8]) -> Vec<Result<DeviceMessage, BadFrame>> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(item) = codec.decode(&mut buf).expect("serial decoding never fails") {
            out.push(item);
        }
        out
    }

    #[test]
    fn a_frame_round_trips_and_contains_no_zero_before_its_terminator() {
        let mut buf = BytesMut::new();
        encode_frame(&msg(7, 3), &mut buf);
        assert_eq!(buf.last(), Some(&0));
        assert!(!buf[..buf.len() - 1].contains(&0));
        assert_eq!(decode_all(&mut Codec::default(), &buf), vec![Ok(msg(7, 3))]);
    }

    #[test]
    fn a_flipped_bit_is_a_bad_crc_and_the_next_frame_still_decodes() {
        let mut buf = BytesMut::new();
        encode_frame(&msg(1, 2), &mut buf);
        let first = buf.len();
        encode_frame(&msg(2, 2), &mut buf);
        buf[first / 2] ^= 0x10;
        let out = decode_all(&mut Codec::default(), &buf);
        assert_eq!(out.len(), 2);
        assert!(out[0].is_err());
        assert_eq!(out[1], Ok(msg(2, 2)));
    }

    #[test]
    fn an_oversize_frame_is_reported_once_and_skipped_to_its_terminator() {
        let mut codec = SerialCodec::<DeviceMessage>::new(64);
        let mut buf = BytesMut::new();
        encode_frame(&msg(1, 40), &mut buf); // far over 64 bytes
        encode_frame(&msg(2, 1), &mut buf);
        let out = decode_all(&mut codec, &buf);
        assert_eq!(out, vec![Err(BadFrame::TooLarge), Ok(msg(2, 1))]);
    }

    #[test]
    fn an_endless_stream_without_terminator_does_not_grow_the_buffer() {
        let mut codec = SerialCodec::<DeviceMessage>::new(64);
        let mut buf = BytesMut::new();
        let mut reports = 0;
        for _ in 0..100 {
            buf.extend_from_slice(&[0x55; 50]);
            while let Some(item) = codec.decode(&mut buf).unwrap() {
                assert_eq!(item, Err(BadFrame::TooLarge));
                reports += 1;
            }
            assert!(buf.len() <= 200);
        }
        assert_eq!(reports, 1, "reported once per oversize frame");
    }

    proptest! {
        #[test]
        fn any_corruption_never_panics_and_clean_frames_after_noise_decode(
            noise in prop::collection::vec(any::<u8>(), 0..300),
            flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..8),
            chunks in prop::collection::vec(1usize..64, 1..8),
        ) {
            let mut bytes = BytesMut::new();
            encode_frame(&msg(1, 4), &mut bytes);
            let mut corrupted = bytes.to_vec();
            for (i, x) in &flips {
                let i = i.index(corrupted.len());
                corrupted[i] ^= x;
            }
            corrupted.extend_from_slice(&noise);
            // A terminator ends whatever the noise was; then two clean frames.
            corrupted.push(0);
            let mut clean = BytesMut::new();
            encode_frame(&msg(2, 3), &mut clean);
            encode_frame(&msg(3, 1), &mut clean);
            corrupted.extend_from_slice(&clean);

            let mut codec = Codec::default();
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            let mut rest = &corrupted[..];
            let mut sizes = chunks.iter().copied().cycle();
            while !rest.is_empty() {
                let n = sizes.next().unwrap_or(1).clamp(1, rest.len());
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                while let Some(item) = codec.decode(&mut buf).unwrap() {
                    out.push(item);
                }
            }
            let good: Vec<_> = out.iter().filter_map(|r| r.as_ref().ok()).cloned().collect();
            prop_assert!(good.ends_with(&[msg(2, 3), msg(3, 1)]), "got {:?}", out);
        }
    }
}
