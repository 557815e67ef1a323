//! `firmware-sim` as a library: simulated devices that speak the gateway's device protocol
//! the way real firmware must (Hello, keep unacknowledged frames, resend after HelloAck,
//! reconnect with back-off), fleets of them, and a report of what the gateway acknowledged.
//!
//! The gateway's tests use it as a dev-dependency; the `firmware-sim` binary is a thin CLI.
//!
//! Layers, each using only those below it:
//! - the device model: [`device`] (one device on a TCP link), [`sensor`] (waveforms),
//!   [`stats`] (the counters it updates), [`timeline`] (its faults and anomalies), [`record`]
//!   and [`tls`] (what its link goes through); it knows nothing of fleets, scenarios or
//!   reports;
//! - links beside TCP: [`serial`];
//! - [`fleet`] (many devices), [`report`] (what a run measured);
//! - [`scenario`] (files of profiles, faults and outages), [`verify`], [`score`], [`bench`],
//!   [`chaos`] (a soak through the real gateway and broker with faults at random instants).

pub mod bench;
pub mod chaos;
pub mod device;
pub mod fleet;
pub mod gate;
pub mod record;
pub mod report;
pub mod scenario;
pub mod score;
pub mod sensor;
pub mod serial;
pub mod stats;
pub mod timeline;
pub mod tls;
pub mod verify;

pub use fleet::{run_fleet, FleetConfig};
pub use report::Report;
