//! Anomalies the detector stored, in the order it decided them (`anomaly_log.id`), filtered
//! by device, kind and the timestamp of their first reading.

use sqlx::SqlitePool;

use crate::payload::Anomaly;
use crate::store::StoreError;

type AnomalyRow = (
    i64,
    Option<String>,
    Option<String>,
    String,
    String,
    f64,
    i64,
    i64,
    i64,
    Option<f64>,
    String,
    i64,
    Option<String>,
    bool,
);

/// What to list.
#[derive(Debug, Clone, Default)]
pub struct AnomalyFilter<'a> {
    /// Only this device's.
    pub device: Option<&'a str>,
    /// Only this kind.
    pub kind: Option<&'a str>,
    /// First reading at or after this timestamp.
    pub since: i64,
    /// First reading before this timestamp.
    pub to: i64,
    /// After this id (the previous page's cursor).
    pub after: i64,
    /// Most rows.
    pub limit: u32,
}

/// A page of anomalies, oldest decision first, and the id to continue after if there may
/// be more.
pub async fn anomalies(
    pool: &SqlitePool,
    f: &AnomalyFilter<'_>,
) -> Result<(Vec<Anomaly>, Option<i64>), StoreError> {
    let rows: Vec<AnomalyRow> = sqlx::query_as(
        "SELECT id, device_id, sensor, kind, detector, score, ts_ms, to_ms, raised_ts_ms, value,
                detail, detected_ms, peer, ongoing
         FROM anomaly_log
         WHERE (?1 IS NULL OR device_id = ?1) AND (?2 IS NULL OR kind = ?2)
           AND ts_ms >= ?3 AND ts_ms < ?4 AND id > ?5
         ORDER BY id LIMIT ?6",
    )
    .bind(f.device)
    .bind(f.kind)
    .bind(f.since)
    .bind(f.to)
    .bind(f.after)
    .bind(i64::from(f.limit))
    .fetch_all(pool)
    .await?;
    let full = rows.len() == f.limit as usize;
    let list: Vec<Anomaly> = rows
        .into_iter()
        .map(|r| Anomaly {
            id: r.0,
            device_id: r.1,
            sensor: r.2,
            kind: r.3,
            detector: r.4,
            score: r.5,
            ts_ms: r.6,
            to_ms: r.7,
            raised_ts_ms: r.8,
            value: r.9,
            detail: r.10,
            detected_ms: r.11,
            peer: r.12,
            ongoing: r.13,
        })
        .collect();
    let next = if full {
        list.last().map(|a| a.id)
    } else {
        None
    };
    Ok((list, next))
}
