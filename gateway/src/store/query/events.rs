//! Events by their timestamps, of one device (`event_log_by_device_time`) or of all
//! (`event_log_by_time`), oldest first.

use sqlx::SqlitePool;

use crate::store::{u64_from_sql, StoreError};

/// One stored event.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    /// The device.
    pub device_id: String,
    /// Its epoch.
    pub epoch: u64,
    /// Its seq.
    pub seq: u64,
    /// The device's timestamp.
    pub ts_ms: i64,
    /// Kind.
    pub kind: String,
    /// Message.
    pub message: String,
    /// Severity number.
    pub severity: i32,
    /// Cursor position (ts_ms, stream, seq).
    pub key: (i64, i64, i64),
}

/// (device_id, epoch, seq, ts_ms, kind, message, severity, stream).
type EventRow = (String, i64, i64, i64, String, String, i32, i64);

/// SQL for a page of events, oldest first, of one device (`?1` its id) or of all
/// (`?1` NULL).
pub fn events_sql(device: bool) -> &'static str {
    if device {
        "SELECT d.device_id, st.epoch, e.seq, e.ts_ms, e.kind, e.message, e.severity, e.stream
         FROM event_log e JOIN streams st ON st.id = e.stream JOIN devices d ON d.id = e.device
         WHERE e.device = (SELECT id FROM devices WHERE device_id = ?1)
           AND (e.ts_ms, e.stream, e.seq) > (?2, ?3, ?4) AND e.ts_ms < ?5
         ORDER BY e.ts_ms, e.stream, e.seq LIMIT ?6"
    } else {
        "SELECT d.device_id, st.epoch, e.seq, e.ts_ms, e.kind, e.message, e.severity, e.stream
         FROM event_log e JOIN streams st ON st.id = e.stream JOIN devices d ON d.id = e.device
         WHERE ?1 IS NULL AND (e.ts_ms, e.stream, e.seq) > (?2, ?3, ?4) AND e.ts_ms < ?5
         ORDER BY e.ts_ms, e.stream, e.seq LIMIT ?6"
    }
}

/// A page of events (of `device_id`, or of every device), oldest first, from `from` (or
/// after the cursor `after`) to `to`.
pub async fn events(
    pool: &SqlitePool,
    device_id: Option<&str>,
    from: i64,
    to: i64,
    limit: u32,
    after: Option<(i64, i64, i64)>,
) -> Result<(Vec<EventRecord>, Option<(i64, i64, i64)>), StoreError> {
    let b = after.unwrap_or((from, i64::MIN, i64::MIN));
    let rows: Vec<EventRow> = sqlx::query_as(events_sql(device_id.is_some()))
        .bind(device_id)
        .bind(b.0.max(from))
        .bind(if b.0 >= from { b.1 } else { i64::MIN })
        .bind(if b.0 >= from { b.2 } else { i64::MIN })
        .bind(to)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    let out: Vec<EventRecord> = rows
        .into_iter()
        .map(|r| EventRecord {
            device_id: r.0,
            epoch: u64_from_sql(r.1),
            seq: u64_from_sql(r.2),
            ts_ms: r.3,
            kind: r.4,
            message: r.5,
            severity: r.6,
            key: (r.3, r.7, r.2),
        })
        .collect();
    let next = (out.len() == limit as usize)
        .then(|| out.last().map(|e| e.key))
        .flatten();
    Ok((out, next))
}
