//! Device sessions: the protocol state machine ([`state`]) and the task that runs it over a
//! link ([`task`]), with what all sessions share ([`Shared`]).

pub mod state;
pub mod task;

use std::sync::Arc;
use std::time::Duration;

use sqlx::SqlitePool;

use crate::auth::Authenticator;
use crate::bridge::BridgeHandle;
use crate::live::Hub;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::devices::HelloRecord;
use crate::store::writer::WriterHandle;

/// What kind of link a session runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// TCP: reliable and ordered; seqs may have gaps.
    Tcp,
    /// TLS over TCP: as TCP.
    Tls,
    /// A serial line: frames can be lost to noise, so seqs must follow on without gaps.
    Serial,
}

impl LinkKind {
    /// The name in device status and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkKind::Tcp => "tcp",
            LinkKind::Tls => "tls",
            LinkKind::Serial => "serial",
        }
    }
}

/// Timers of every session, from `[session]` and `[shutdown]`.
#[derive(Debug, Clone)]
pub struct Timers {
    /// A new link must say Hello within this.
    pub hello_timeout: Duration,
    /// A link silent this long is closed.
    pub idle_timeout: Duration,
    /// One write to a device may block this long.
    pub write_timeout: Duration,
    /// On shutdown, how long a session waits for its queued frames to commit.
    pub drain_timeout: Duration,
}

/// What every session holds a reference to.
pub struct Shared {
    /// Where data frames go; bounded, blocks when full.
    pub writer: WriterHandle,
    /// Checks Hello credentials.
    pub auth: Authenticator,
    /// Device id to current link.
    pub registry: Arc<Registry>,
    /// Gateway-wide counters.
    pub metrics: Arc<Metrics>,
    /// Read pool, for `last_seq` at Hello.
    pub pool: SqlitePool,
    /// Reads only (a device's sensor names at its first Telemetry): never queued behind
    /// the few writes that go through `pool` and wait for the store writer.
    pub reads: SqlitePool,
    /// Session timers.
    pub config: Timers,
    /// Where device status goes; `None` when the MQTT bridge is off.
    pub bridge: Option<BridgeHandle>,
    /// Live feed of status changes (committed data reaches it through the writer).
    pub hub: Hub,
    /// Where each authenticated Hello is recorded for the device list (bounded; a full
    /// queue skips the record, which is informational: the next Hello writes it again).
    pub hellos: tokio::sync::mpsc::Sender<HelloRecord>,
    /// Failed links per source address; refuses an address after a burst.
    pub guard: Arc<crate::anomaly::traffic::Guard>,
    /// `[limits]`: connections, Hello rate, devices, sensors, frame size, device rate.
    pub limits: Arc<crate::limits::Limits>,
}
