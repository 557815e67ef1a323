//! Commands in the store: kept from arrival until they have an outcome, so a device that is
//! offline gets them when it reconnects, and every outcome (the device's, or the gateway's
//! own `timeout`, `expired`, `rejected`) is queued in the outbox exactly once: the first
//! outcome of an open command wins.

use proto::v1::Command;
use sqlx::SqlitePool;

use super::outbox::{self, Kind};
use super::StoreError;
use crate::payload::command_result_json;

/// A command as it arrived from MQTT, validated.
#[derive(Debug, Clone)]
pub struct NewCommand {
    /// The device it is for.
    pub device_id: String,
    /// The operator's id for it.
    pub command_id: String,
    /// What to do.
    pub name: String,
    /// JSON text of its params.
    pub params: Vec<u8>,
    /// When it stops being worth doing, ms since the Unix epoch.
    pub deadline_ms: i64,
}

/// What happened to a new command.
#[derive(Debug, PartialEq, Eq)]
pub enum Inserted {
    /// Stored and open.
    Open,
    /// The store already has a command with this id for this device (a broker redelivery).
    Duplicate,
    /// This gateway does not know the device.
    UnknownDevice,
}

/// Stores a new command.
pub async fn insert(
    pool: &SqlitePool,
    cmd: &NewCommand,
    now_ms: i64,
) -> Result<Inserted, StoreError> {
    let device: Option<i64> = sqlx::query_scalar("SELECT id FROM devices WHERE device_id = ?")
        .bind(&cmd.device_id)
        .fetch_optional(pool)
        .await?;
    let Some(device) = device else {
        return Ok(Inserted::UnknownDevice);
    };
    let done = sqlx::query(
        "INSERT INTO commands (device, command_id, name, params, created_ms, deadline_ms)
         VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (device, command_id) DO NOTHING",
    )
    .bind(device)
    .bind(&cmd.command_id)
    .bind(&cmd.name)
    .bind(&cmd.params)
    .bind(now_ms)
    .bind(cmd.deadline_ms)
    .execute(pool)
    .await?;
    Ok(if done.rows_affected() > 0 {
        Inserted::Open
    } else {
        Inserted::Duplicate
    })
}

/// Devices with open commands (at start: they look for them when they connect).
pub async fn devices_with_open_commands(pool: &SqlitePool) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT DISTINCT d.device_id FROM commands c JOIN devices d ON d.id = c.device
         WHERE c.outcome IS NULL",
    )
    .fetch_all(pool)
    .await?)
}

/// The device's open commands that have not passed their deadline, oldest first.
pub async fn open_for_device(
    pool: &SqlitePool,
    device_id: &str,
    now_ms: i64,
) -> Result<Vec<Command>, StoreError> {
    let rows: Vec<(String, String, Vec<u8>, i64)> = sqlx::query_as(
        "SELECT c.command_id, c.name, c.params, c.deadline_ms FROM commands c
         JOIN devices d ON d.id = c.device
         WHERE d.device_id = ? AND c.outcome IS NULL AND c.deadline_ms > ?
         ORDER BY c.id",
    )
    .bind(device_id)
    .bind(now_ms)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, name, params, deadline_ms)| Command {
            id,
            name,
            params,
            deadline_ms: deadline_ms.max(0) as u64,
        })
        .collect())
}

/// Records that a command was written to its device (the first time counts).
pub async fn mark_sent(
    pool: &SqlitePool,
    device_id: &str,
    command_id: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE commands SET sent_ms = COALESCE(sent_ms, ?)
         WHERE command_id = ? AND device = (SELECT id FROM devices WHERE device_id = ?)",
    )
    .bind(now_ms)
    .bind(command_id)
    .bind(device_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Queues a `rejected` outcome for a command the gateway refused before storing it.
/// Returns the outbox bytes added.
pub async fn reject(
    pool: &SqlitePool,
    device_id: &str,
    command_id: &str,
    detail: &str,
    now_ms: i64,
) -> Result<u64, StoreError> {
    let body = command_result_json(device_id, command_id, "rejected", detail, &[], now_ms);
    let mut conn = pool.acquire().await?;
    outbox::insert_one(&mut conn, Kind::CommandResult, device_id, now_ms, &body).await
}

/// A command closed by [`close_overdue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedCommand {
    /// The device.
    pub device_id: String,
    /// The command's id.
    pub command_id: String,
    /// `timeout` or `expired`.
    pub outcome: &'static str,
    /// Why, in words.
    pub detail: &'static str,
    /// Outbox bytes added for it (0 without uplink).
    pub outbox_bytes: u64,
}

/// Closes every open command past its deadline: `timeout` if it was written to its device,
/// `expired` if it never was; with `uplink`, queues each outcome in the outbox.
pub async fn close_overdue(
    pool: &SqlitePool,
    now_ms: i64,
    uplink: bool,
) -> Result<Vec<ClosedCommand>, StoreError> {
    // IMMEDIATE: it reads, then writes; a deferred transaction could not upgrade once the
    // writer has committed in between (SQLITE_BUSY at once, no busy wait).
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let due: Vec<(i64, String, String, Option<i64>)> = sqlx::query_as(
        "SELECT c.id, d.device_id, c.command_id, c.sent_ms FROM commands c
         JOIN devices d ON d.id = c.device
         WHERE c.outcome IS NULL AND c.deadline_ms <= ? ORDER BY c.id LIMIT 1000",
    )
    .bind(now_ms)
    .fetch_all(&mut *tx)
    .await?;
    let mut closed = Vec::with_capacity(due.len());
    for (id, device_id, command_id, sent_ms) in due {
        let (outcome, detail) = match sent_ms {
            Some(_) => ("timeout", "the device did not answer before the deadline"),
            None => (
                "expired",
                "the device was not reachable before the deadline",
            ),
        };
        sqlx::query("UPDATE commands SET outcome = ?, detail = ?, finished_ms = ? WHERE id = ? AND outcome IS NULL")
            .bind(outcome)
            .bind(detail)
            .bind(now_ms)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let mut outbox_bytes = 0;
        if uplink {
            let body = command_result_json(&device_id, &command_id, outcome, detail, &[], now_ms);
            outbox_bytes =
                outbox::insert_one(&mut tx, Kind::CommandResult, &device_id, now_ms, &body).await?;
        }
        closed.push(ClosedCommand {
            device_id,
            command_id,
            outcome,
            detail,
            outbox_bytes,
        });
    }
    tx.commit().await?;
    Ok(closed)
}

/// The earliest deadline of an open command.
pub async fn next_deadline(pool: &SqlitePool) -> Result<Option<i64>, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT MIN(deadline_ms) FROM commands WHERE outcome IS NULL")
            .fetch_one(pool)
            .await?,
    )
}
