//! The MQTT bridge.

pub mod payload;
