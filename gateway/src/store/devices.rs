//! The read side of the store and device administration: credentials and `last_seq` for
//! Hello, and `gateway devices add/list/revoke`. Runs on the shared pool, never on the
//! writer's connection.

use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::SqlitePool;

use super::{now_ms, u64_from_sql, u64_to_sql, StoreError};

/// What the store knows of a device's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Hex SHA-256 of its provisioned token, if it has one.
    pub token_hash: Option<String>,
    /// When it was revoked, if it was.
    pub revoked_at_ms: Option<i64>,
}

/// One row of `gateway devices list`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeviceRow {
    /// The device's id.
    pub device_id: String,
    /// Whether it has a per-device token.
    pub has_token: bool,
    /// When it was revoked, if it was.
    pub revoked_at_ms: Option<i64>,
    /// When it was provisioned or first seen.
    pub created_at_ms: i64,
    /// Readings stored for it.
    pub readings: i64,
}

/// Hex SHA-256 of a token, as stored.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Credentials of `device_id`, or `None` if the store has never heard of it.
pub async fn credentials(
    pool: &SqlitePool,
    device_id: &str,
) -> Result<Option<Credentials>, StoreError> {
    let row: Option<(Option<String>, Option<i64>)> =
        sqlx::query_as("SELECT token_hash, revoked_at_ms FROM devices WHERE device_id = ?")
            .bind(device_id)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|(token_hash, revoked_at_ms)| Credentials {
        token_hash,
        revoked_at_ms,
    }))
}

/// The highest seq durably stored for (`device_id`, `epoch`), 0 if none.
pub async fn last_seq(pool: &SqlitePool, device_id: &str, epoch: u64) -> Result<u64, StoreError> {
    let seq: Option<i64> = sqlx::query_scalar(
        "SELECT s.last_seq FROM streams s JOIN devices d ON d.id = s.device
         WHERE d.device_id = ? AND s.epoch = ?",
    )
    .bind(device_id)
    .bind(u64_to_sql(epoch))
    .fetch_optional(pool)
    .await?;
    Ok(seq.map_or(0, u64_from_sql))
}

/// Devices in the store (for `limits.max_devices`).
pub async fn count(pool: &SqlitePool) -> Result<u64, StoreError> {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM devices")
        .fetch_one(pool)
        .await?;
    Ok(n.max(0) as u64)
}

/// The sensor names `device_id` has in the store (for `limits.max_sensors_per_device`).
pub async fn sensor_names(pool: &SqlitePool, device_id: &str) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT se.name FROM devices d JOIN series s ON s.device = d.id
         JOIN sensors se ON se.id = s.sensor WHERE d.device_id = ?",
    )
    .bind(device_id)
    .fetch_all(pool)
    .await?)
}

/// Records a device that authenticated, so the gateway owns it (MQTT subscriptions,
/// commands) even before it sends data.
pub async fn ensure(pool: &SqlitePool, device_id: &str) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO devices (device_id, created_at_ms) VALUES (?, ?) ON CONFLICT (device_id) DO NOTHING")
        .bind(device_id)
        .bind(now_ms())
        .execute(pool)
        .await?;
    Ok(())
}

/// Why `devices add` refused.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    /// The device already has an active token; rotating it needs `--force`.
    #[error("device {0:?} already has a token; pass --force to replace it (the old token stops working)")]
    HasToken(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Provisions `device_id` with a new random token and returns it. The store keeps only its
/// hash. Clears a revocation.
pub async fn add(pool: &SqlitePool, device_id: &str, force: bool) -> Result<String, AddError> {
    let mut raw = [0u8; 24];
    rand::rng().fill_bytes(&mut raw);
    let token = hex::encode(raw);
    // One statement, so it takes the write lock at once and cannot race the writer.
    let done = sqlx::query(
        "INSERT INTO devices (device_id, token_hash, created_at_ms) VALUES (?, ?, ?)
         ON CONFLICT (device_id) DO UPDATE SET token_hash = excluded.token_hash, revoked_at_ms = NULL
         WHERE ? OR devices.token_hash IS NULL OR devices.revoked_at_ms IS NOT NULL",
    )
    .bind(device_id)
    .bind(hash_token(&token))
    .bind(now_ms())
    .bind(force)
    .execute(pool)
    .await
    .map_err(StoreError::from)?;
    if done.rows_affected() == 0 {
        return Err(AddError::HasToken(device_id.to_owned()));
    }
    Ok(token)
}

/// Revokes `device_id`: its next Hello is refused whatever token it presents. Returns false
/// if the device is unknown.
pub async fn revoke(pool: &SqlitePool, device_id: &str) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE devices SET revoked_at_ms = COALESCE(revoked_at_ms, ?) WHERE device_id = ?",
    )
    .bind(now_ms())
    .bind(device_id)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Every known device, by id.
pub async fn list(pool: &SqlitePool) -> Result<Vec<DeviceRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT d.device_id, d.token_hash IS NOT NULL AS has_token, d.revoked_at_ms, d.created_at_ms,
                (SELECT COUNT(*) FROM readings r WHERE r.device = d.id) AS readings
         FROM devices d ORDER BY d.device_id",
    )
    .fetch_all(pool)
    .await?)
}

/// What a device said at its latest Hello, for the device list.
#[derive(Debug, Clone)]
pub struct HelloRecord {
    /// The device.
    pub device: std::sync::Arc<str>,
    /// Its firmware version.
    pub firmware_version: String,
    /// `tcp`, `tls` or `serial`.
    pub link: &'static str,
    /// Peer address or serial port.
    pub peer: std::sync::Arc<str>,
    /// When, Unix ms.
    pub ts_ms: i64,
}

/// Hello records waiting to be written. Full-policy: skip the record (it is informational;
/// the device's next Hello writes it again), so a reconnect storm never waits on the store.
pub const HELLO_QUEUE: usize = 4096;

/// Writes queued Hello records, one transaction per second at most, until every sender is
/// gone. Keeps these small writes off the session path and off the writer's connection.
pub async fn record_hellos(pool: SqlitePool, mut rx: tokio::sync::mpsc::Receiver<HelloRecord>) {
    let mut batch = Vec::with_capacity(256);
    while rx.recv_many(&mut batch, 1024).await > 0 {
        // Only the newest record of each device matters.
        batch.reverse();
        let mut seen = std::collections::HashSet::new();
        batch.retain(|r| seen.insert(r.device.clone()));
        if let Err(e) = write_hellos(&pool, &batch).await {
            tracing::warn!(error = %e, devices = batch.len(), "recording device Hellos failed; the device list shows older values until their next Hello");
        }
        batch.clear();
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

async fn write_hellos(pool: &SqlitePool, batch: &[HelloRecord]) -> Result<(), StoreError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    for r in batch {
        sqlx::query(
            "UPDATE devices SET firmware_version = ?, last_link = ?, last_peer = ?, last_hello_ms = ?
             WHERE device_id = ?",
        )
        .bind(&r.firmware_version)
        .bind(r.link)
        .bind(&*r.peer)
        .bind(r.ts_ms)
        .bind(&*r.device)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}
