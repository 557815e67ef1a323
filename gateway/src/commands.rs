//! The command desk: one path for commands, whoever sends them (MQTT or HTTP).
//!
//! A request is validated, stored (so a device that is offline gets it when it reconnects),
//! handed to the device's current link through the registry, and gets exactly one outcome:
//! the device's (`ok`, `error`, `rejected`, stored by the writer with the device's frame), or
//! the gateway's own (`timeout` when delivered and unanswered by the deadline, `expired`
//! when never delivered, `rejected` when refused before storing). Gateway outcomes are queued
//! in the outbox for MQTT when the bridge is on, and announced on the live hub for the API's
//! waiters and the WebSocket feed. [`Desk::run_deadlines`] closes overdue commands.

use std::sync::Arc;
use std::time::Duration;

use rand::RngCore;
use sqlx::SqlitePool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::live::{Hub, LiveEvent, Outcome};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::session::state::check_name;
use crate::store::commands::{self, Inserted, NewCommand};
use crate::store::outbox::Backlog;
use crate::store::{now_ms, StoreError};

/// Longest timeout a command may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// A command as a caller asks for it.
#[derive(Debug, Clone, serde::Deserialize, utoipa::ToSchema)]
pub struct Request {
    /// The caller's id for it (1 to 64 bytes, no control characters), unique per device;
    /// the gateway makes one up when it is missing.
    #[serde(default)]
    pub id: Option<String>,
    /// What to do.
    pub name: String,
    /// Arguments, any JSON value; handed to the device as JSON text.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    /// How long the device has to answer, ms. Default `mqtt.command_timeout`.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// A stored command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Its id.
    pub id: String,
    /// When it stops being worth doing, Unix ms.
    pub deadline_ms: i64,
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// A field is missing or malformed.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The gateway does not know the device.
    #[error("unknown device {0:?}")]
    UnknownDevice(String),
    /// The device already has a command with this id (a redelivery, or a reused id).
    #[error("device {device:?} already has a command with id {id:?}")]
    Duplicate {
        /// The device.
        device: String,
        /// The id.
        id: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Everything commands need; one per gateway, shared as `Arc<Desk>`.
pub struct Desk {
    pool: SqlitePool,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    hub: Hub,
    /// Where gateway outcomes are queued for MQTT; `None` when the bridge is off.
    uplink: Option<Arc<Backlog>>,
    default_timeout: Duration,
    /// Wakes the deadline task when a command with an earlier deadline arrives.
    new_deadline: Notify,
}

fn new_id() -> String {
    let mut raw = [0u8; 8];
    rand::rng().fill_bytes(&mut raw);
    format!("cmd-{}", hex::encode(raw))
}

impl Desk {
    /// A desk over the store's read pool and the registry.
    pub fn new(
        pool: SqlitePool,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        hub: Hub,
        uplink: Option<Arc<Backlog>>,
        default_timeout: Duration,
    ) -> Self {
        Self {
            pool,
            registry,
            metrics,
            hub,
            uplink,
            default_timeout,
            new_deadline: Notify::new(),
        }
    }

    /// Validates, stores and routes a command for `device_id`.
    pub async fn submit(&self, device_id: &str, request: Request) -> Result<Accepted, SubmitError> {
        self.metrics.commands_received.inc();
        let now = now_ms();
        let id = match request.id {
            Some(id) => id,
            None => new_id(),
        };
        let invalid = |field, reason| SubmitError::Invalid { field, reason };
        check_name("id", &id).map_err(|e| invalid("id", e))?;
        check_name("name", &request.name).map_err(|e| invalid("name", e))?;
        let timeout = request
            .timeout_ms
            .map_or(self.default_timeout, Duration::from_millis)
            .min(MAX_TIMEOUT);
        let command = NewCommand {
            device_id: device_id.to_owned(),
            command_id: id.clone(),
            name: request.name,
            params: serde_json::to_vec(&request.params).unwrap_or_else(|_| b"null".to_vec()),
            deadline_ms: now + timeout.as_millis() as i64,
        };
        // Before storing: a link that registers after `send_command` below found no link
        // must see this and look in the store.
        self.registry.expect_commands(device_id);
        match commands::insert(&self.pool, &command, now).await? {
            Inserted::Open => {}
            Inserted::Duplicate => {
                return Err(SubmitError::Duplicate {
                    device: command.device_id,
                    id,
                })
            }
            Inserted::UnknownDevice => return Err(SubmitError::UnknownDevice(command.device_id)),
        }
        // Offline (or a full queue): it waits in the store for the next connection.
        self.registry.send_command(
            &command.device_id,
            proto::v1::Command {
                id: id.clone(),
                name: command.name,
                params: command.params,
                deadline_ms: command.deadline_ms.max(0) as u64,
            },
        );
        self.new_deadline.notify_one();
        Ok(Accepted {
            id,
            deadline_ms: command.deadline_ms,
        })
    }

    /// Records a `rejected` outcome for a request refused before it was stored (MQTT callers
    /// learn of it on the results topic).
    pub async fn reject(&self, device_id: &str, command_id: &str, detail: &str) {
        let now = now_ms();
        if let Some(backlog) = &self.uplink {
            match commands::reject(&self.pool, device_id, command_id, detail, now).await {
                Ok(bytes) => backlog.added(bytes),
                Err(e) => tracing::error!(error = %e, "queueing a command rejection failed"),
            }
        }
        self.announce(device_id, command_id, "rejected", detail, now);
    }

    fn announce(
        &self,
        device_id: &str,
        command_id: &str,
        status: &'static str,
        detail: &str,
        ts_ms: i64,
    ) {
        self.metrics.record_outcome(status);
        self.hub.publish(LiveEvent::Outcome(Arc::new(Outcome {
            device_id: device_id.to_owned(),
            command_id: command_id.to_owned(),
            status,
            detail: detail.to_owned(),
            ts_ms,
        })));
    }

    /// Closes overdue commands as `timeout` or `expired` until `shutdown`.
    pub async fn run_deadlines(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let wait = match commands::next_deadline(&self.pool).await {
                Ok(Some(d)) => Duration::from_millis((d - now_ms()).clamp(0, 60_000) as u64),
                Ok(None) => Duration::from_secs(60),
                Err(e) => {
                    tracing::error!(error = %e, "reading command deadlines failed");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.new_deadline.notified() => continue,
                _ = tokio::time::sleep(wait) => {}
            }
            let now = now_ms();
            match commands::close_overdue(&self.pool, now, self.uplink.is_some()).await {
                Ok(closed) => {
                    let bytes: u64 = closed.iter().map(|c| c.outbox_bytes).sum();
                    if let Some(backlog) = &self.uplink {
                        backlog.added(bytes);
                    }
                    for c in &closed {
                        self.announce(&c.device_id, &c.command_id, c.outcome, c.detail, now);
                    }
                    if !closed.is_empty() {
                        tracing::debug!(closed = closed.len(), "closed overdue commands");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "closing overdue commands failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}
