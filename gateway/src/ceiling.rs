//! The SQLite ceiling for benchmarks: the best plain insert rate of readings into this
//! project's own schema on this disk, with the same pragmas and durability as the store, and
//! no network, protobuf or channels: one prepared statement reused, many frames a
//! transaction. `firmware-sim bench` reports the gateway's durable ingest as a share of it.
//!
//! It uses rusqlite on the same libsqlite3 build as sqlx, because a reused prepared statement
//! is the fastest way in; the figure is a ceiling, not a way the gateway must write.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::config::Durability;
use crate::store::{Store, StoreError};

/// How to measure.
#[derive(Debug, Clone)]
pub struct CeilingParams {
    /// Devices the frames are spread over (round robin).
    pub devices: u32,
    /// Readings per frame (each a sensor of its own).
    pub readings: u32,
    /// Frames to insert.
    pub frames: u64,
    /// Frames per transaction.
    pub batch_frames: u64,
    /// As in `store.durability`.
    pub durability: Durability,
}

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    /// Readings inserted.
    pub rows: u64,
    /// Time taken.
    pub seconds: f64,
    /// The ceiling.
    pub rows_per_s: f64,
}

/// Why the ceiling could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum CeilingError {
    /// Creating the schema failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// SQLite refused.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The measuring thread failed.
    #[error("the measurement did not finish: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Inserts `frames x readings` rows into a fresh store at `path` and times it.
pub async fn measure(path: &Path, p: &CeilingParams) -> Result<Ceiling, CeilingError> {
    // The schema comes from the same migrations as the gateway's.
    drop(Store::open(path, p.durability).await?);
    let path = path.to_path_buf();
    let p = p.clone();
    tokio::task::spawn_blocking(move || insert(&path, &p)).await?
}

fn insert(path: &Path, p: &CeilingParams) -> Result<Ceiling, CeilingError> {
    // The same connection settings as the store writer's, but with SQLite's own automatic
    // checkpoints (the gateway runs them on a thread of its own): plain SQLite, as a user of
    // it would run it, with a bounded WAL.
    let mut conn = crate::store::batch::open_connection(path, p.durability)?;
    conn.execute_batch("PRAGMA wal_autocheckpoint = 10000")?;
    // Interned keys, as the gateway's writer would have them.
    let (devices, readings) = (p.devices.max(1) as i64, p.readings.max(1) as i64);
    let tx = conn.transaction()?;
    for s in 0..readings {
        tx.execute(
            "INSERT INTO sensors (id, name) VALUES (?1, ?2)",
            rusqlite::params![s + 1, format!("sensor_{s}")],
        )?;
    }
    for d in 0..devices {
        tx.execute(
            "INSERT INTO devices (id, device_id, created_at_ms) VALUES (?1, ?2, 0)",
            rusqlite::params![d + 1, format!("bench-{d:05}")],
        )?;
        tx.execute(
            "INSERT INTO streams (id, device, epoch) VALUES (?1, ?1, 1)",
            [d + 1],
        )?;
        for s in 0..readings {
            tx.execute(
                "INSERT INTO series (id, device, sensor) VALUES (?1, ?2, ?3)",
                rusqlite::params![d * readings + s + 1, d + 1, s + 1],
            )?;
        }
    }
    tx.commit()?;

    let start = Instant::now();
    let ts0: i64 = 1_800_000_000_000;
    let mut frame: u64 = 0;
    while frame < p.frames {
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO readings (series, ts_ms, stream, seq, idx, value, device) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?3)",
            )?;
            let end = (frame + p.batch_frames.max(1)).min(p.frames);
            for f in frame..end {
                let device = (f % devices as u64) as i64;
                let seq = (f / devices as u64) as i64 + 1;
                for s in 0..readings {
                    stmt.execute(rusqlite::params![
                        device * readings + s + 1,
                        ts0 + seq * 100,
                        device + 1,
                        seq,
                        s,
                        20.0 + (f % 97) as f64 * 0.1
                    ])?;
                }
            }
            frame = end;
        }
        tx.commit()?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let rows = p.frames * readings as u64;
    Ok(Ceiling {
        rows,
        seconds,
        rows_per_s: rows as f64 / seconds.max(1e-9),
    })
}
