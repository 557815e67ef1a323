//! The MQTT bridge: store-and-forward uplink, device status, and commands down.
//!
//! - [`connection`]: one MQTT connection at a time, rebuilt with capped, jittered back-off;
//!   the task polling rumqttc's event loop never awaits anything else.
//! - [`tracker`]: pairs PUBACKs with outbox rows; the cursor moves only over acknowledged rows.
//! - [`commands`]: requests from the broker, stored until they have an outcome.
//! - [`payload`] and [`topics`]: what is published where.
//!
//! Sessions tell the bridge about device status through a [`BridgeHandle`]; everything else
//! flows through SQLite (the outbox and the commands table), so a broker outage or a gateway
//! restart loses nothing that was stored.

pub mod commands;
pub mod connection;
pub mod options;
pub mod payload;
pub mod topics;
pub mod tracker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sqlx::SqlitePool;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::MqttConfig;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::outbox::{self, Backlog};
use crate::store::StoreError;

/// Device status changes waiting for the publisher. Full-policy: drop the change and publish
/// every device's status afresh (a resync) at the next chance; status is state, so the latest
/// snapshot replaces any lost change.
const STATUS_QUEUE: usize = 4096;

pub use crate::live::StatusChange;

/// What sessions hold to report status; cheap to clone.
#[derive(Clone)]
pub struct BridgeHandle {
    status: mpsc::Sender<StatusChange>,
    resync: Arc<AtomicBool>,
}

impl BridgeHandle {
    /// Reports a status change without waiting.
    pub fn status(&self, change: StatusChange) {
        if self.status.try_send(change).is_err() {
            self.resync.store(true, Ordering::Relaxed);
        }
    }
}

/// What the bridge's tasks share.
pub struct Context {
    /// `[mqtt]`.
    pub config: MqttConfig,
    /// Concrete topics.
    pub topics: topics::Topics,
    /// For the outbox, commands and device lists.
    pool: SqlitePool,
    /// Unpublished bytes and its signals.
    pub backlog: Arc<Backlog>,
    /// Who is online; where commands go.
    pub registry: Arc<Registry>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Set when a status change was dropped: publish every device's status again.
    pub resync: Arc<AtomicBool>,
    /// Where command requests go.
    pub commands: Arc<crate::commands::Desk>,
    /// Devices another gateway claimed (fleet-wide commands only): their commands are that
    /// gateway's. Cleared for a device when it connects here again.
    pub released: std::sync::Mutex<std::collections::HashSet<Arc<str>>>,
}

impl Context {
    /// The store pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The devices another gateway claimed.
    pub fn released(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<Arc<str>>> {
        self.released.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Everything the bridge needs from the gateway.
pub struct Parts {
    /// `[mqtt]`, validated.
    pub config: MqttConfig,
    /// The broker URL (the embedded broker's, if none was configured).
    pub url: String,
    /// The store pool.
    pub pool: SqlitePool,
    /// The backlog shared with the store writer.
    pub backlog: Arc<Backlog>,
    /// The device registry.
    pub registry: Arc<Registry>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The command desk.
    pub commands: Arc<crate::commands::Desk>,
}

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The MQTT settings are unusable.
    #[error(transparent)]
    Options(#[from] options::OptionsError),
    /// The outbox could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Starts the bridge's tasks; they stop when `shutdown` is cancelled (after publishing the
/// gateway's `offline` status).
pub async fn spawn(
    parts: Parts,
    shutdown: CancellationToken,
) -> Result<(BridgeHandle, JoinHandle<()>), BridgeError> {
    let topics = topics::Topics::new(&parts.config.topics, &parts.config.gateway_id);
    let options = options::mqtt_options(&parts.config, &parts.url, topics.gateway_status())?;
    let start = outbox::cursor(&parts.pool).await?;
    let (status_tx, status_rx) = mpsc::channel(STATUS_QUEUE);
    let (commands_tx, commands_rx) = mpsc::channel(commands::QUEUE);
    let resync = Arc::new(AtomicBool::new(false));
    let ctx = Arc::new(Context {
        config: parts.config,
        topics,
        pool: parts.pool,
        backlog: parts.backlog,
        registry: parts.registry,
        metrics: parts.metrics,
        resync: resync.clone(),
        commands: parts.commands,
        released: Default::default(),
    });
    let task = tokio::spawn(async move {
        let commands = tokio::spawn(commands::run(ctx.clone(), commands_rx, shutdown.clone()));
        connection::run(ctx, options, start, status_rx, commands_tx, shutdown).await;
        let _ = commands.await;
    });
    Ok((
        BridgeHandle {
            status: status_tx,
            resync,
        },
        task,
    ))
}
