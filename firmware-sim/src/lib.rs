//! `firmware-sim` as a library: simulated devices that speak the gateway's device protocol
//! the way real firmware must (Hello, keep unacknowledged frames, resend after HelloAck,
//! reconnect with back-off), fleets of them, and a report of what the gateway acknowledged.
//!
//! The gateway's tests use it as a dev-dependency; the `firmware-sim` binary is a thin CLI.

pub mod bench;
pub mod device;
pub mod fleet;
pub mod gate;
pub mod record;
pub mod report;
pub mod scenario;
pub mod score;
pub mod serial;
pub mod timeline;
pub mod tls;
pub mod verify;

pub use fleet::{run_fleet, FleetConfig};
pub use report::Report;
