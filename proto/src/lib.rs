//! The device protocol shared by `gateway` and `firmware-sim`.
//!
//! Owns the wire: the generated protobuf types of package `gateway.v1` ([`v1`]), the
//! TCP framing codec ([`codec`]), the serial framing codec ([`serial`]) and the fleet-token derivation ([`token`]). It does no
//! I/O of its own and knows nothing of sessions, storage or MQTT.

pub mod codec;
pub mod serial;
pub mod token;

/// Generated types of the `gateway.v1` protobuf package (`proto/gateway/v1/device.proto`).
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/gateway.v1.rs"));
}

pub use codec::{CodecError, DelimitedCodec, DEFAULT_MAX_FRAME_LEN};
