//! After a run: check the gateway's SQLite store, through its stable `telemetry` view, against
//! what the devices were acknowledged. Every acknowledged Telemetry frame must be there
//! exactly once with all its readings; anything else is loss or duplication.

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use crate::Report;

/// What the store check found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verification {
    /// Acknowledged Telemetry frames checked.
    pub frames_checked: u64,
    /// Acknowledged frames missing, or stored with fewer readings than sent.
    pub frames_missing: u64,
    /// Acknowledged frames stored with more rows than readings (duplicates).
    pub frames_duplicated: u64,
    /// Up to ten examples, as "device seq N: found R rows, expected E".
    pub examples: Vec<String>,
}

impl Verification {
    /// No loss and no duplicates.
    pub fn is_clean(&self) -> bool {
        self.frames_missing == 0 && self.frames_duplicated == 0
    }
}

/// Checks the store at `db` (opened read-only) against `report`.
pub fn verify_db(db: &Path, report: &Report) -> Result<Verification, rusqlite::Error> {
    let conn = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    let mut stmt = conn.prepare(
        "SELECT seq, COUNT(*) FROM telemetry WHERE device_id = ?1 AND epoch = ?2 GROUP BY seq",
    )?;
    let mut v = Verification::default();
    for o in &report.outcomes {
        let stored: HashMap<u64, u64> = stmt
            .query_map(rusqlite::params![o.device_id, o.epoch as i64], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })?
            .collect::<Result<_, _>>()?;
        for seq in 1..=o.last_acked_seq {
            if o.result_seqs.contains(&seq) {
                continue;
            }
            v.frames_checked += 1;
            let rows = stored.get(&seq).copied().unwrap_or(0);
            let expected = o.readings_per_frame;
            if rows == expected {
                continue;
            }
            if rows < expected {
                v.frames_missing += 1;
            } else {
                v.frames_duplicated += 1;
            }
            if v.examples.len() < 10 {
                v.examples.push(format!(
                    "{} seq {seq}: found {rows} rows, expected {expected}",
                    o.device_id
                ));
            }
        }
    }
    Ok(v)
}
