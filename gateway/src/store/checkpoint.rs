//! WAL checkpoints on a connection and thread of their own, so no ack waits for one.
//!
//! With `synchronous = NORMAL` a WAL commit writes the WAL and does not fsync; a checkpoint
//! copies WAL pages back into the database file and fsyncs both. SQLite's automatic
//! checkpoint (`wal_autocheckpoint`) runs inside the commit that crosses its threshold, so
//! every few seconds one batch's acks waited for two fsyncs: that was the ack tail (p99 tens
//! to hundreds of ms on a real disk, a few ms on tmpfs). Every connection now has automatic
//! checkpoints off ([`super::PRAGMAS`]), and this thread runs `PASSIVE` checkpoints, which
//! never take the write lock: the writer goes on appending to the WAL while pages are copied.
//!
//! When it runs: once the writer has committed [`ROWS_TRIGGER`] rows since the last
//! checkpoint (the writer wakes it), or a second after the last one if anything was written.
//!
//! The WAL stays bounded. SQLite starts the WAL over at a commit only once a checkpoint has
//! copied every frame in it; under a sustained load the writer appends while this thread
//! copies, so that moment may not come. When the WAL passes [`WAL_SOFT_FRAMES`] this thread
//! asks the writer to finish the job: right after it has raised the acks of a batch, the
//! writer runs one `RESTART` checkpoint itself (only the frames appended since this thread's
//! last pass are left to copy; it waits for readers' short snapshots, never for a writer), and
//! its next commit starts the WAL over. That costs the
//! frames queued meanwhile a few milliseconds, never an ack already due. Should the WAL still
//! pass [`WAL_MAX_FRAMES`] (a long read holding it), a `RESTART` checkpoint briefly makes the
//! writer wait, logged once per episode.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::StoreError;
use crate::config::Durability;
use crate::metrics::Metrics;

/// Rows written since the last checkpoint that wake the checkpointer early.
pub const ROWS_TRIGGER: u64 = 50_000;
/// Longest time anything written waits for a checkpoint.
const PERIOD: Duration = Duration::from_secs(1);
/// WAL size (in 4 KiB pages, ~256 MiB) past which the writer finishes a checkpoint itself
/// between batches. That costs the frames queued meanwhile ~20 ms (an fsync or two), so it
/// should be rare: at 64 MiB it came every second at 68 000 readings/s and set the ack p99.
pub const WAL_SOFT_FRAMES: i64 = 65_536;
/// How long the writer's own checkpoint waits for readers to leave the WAL.
const WRITER_CHECKPOINT_WAIT: Duration = Duration::from_millis(5);
/// WAL size (in 4 KiB pages, ~512 MiB) past which a checkpoint makes the writer wait.
pub const WAL_MAX_FRAMES: i64 = 131_072;

/// The writer's side: counts what it wrote and wakes the checkpointer.
#[derive(Clone)]
pub struct CheckpointHandle {
    shared: Arc<Shared>,
    thread: std::thread::Thread,
}

struct Shared {
    written: AtomicU64,
    stop: AtomicBool,
    /// Set by the thread when the WAL passed [`WAL_SOFT_FRAMES`]: the writer finishes.
    ask_writer: AtomicBool,
    metrics: Arc<Metrics>,
}

impl CheckpointHandle {
    /// `rows` were committed.
    pub fn wrote(&self, rows: u64) {
        let before = self.shared.written.fetch_add(rows, Ordering::Relaxed);
        if before < ROWS_TRIGGER && before + rows >= ROWS_TRIGGER {
            self.thread.unpark();
        }
    }

    /// Between batches, after their acks: runs a `RESTART` checkpoint on the writer's own
    /// connection if the thread asked for one (the WAL outgrew [`WAL_SOFT_FRAMES`]). No other
    /// connection writes, so it only waits for readers' short snapshots to end, copies what
    /// the thread had not, and lets the next commit start the WAL over.
    pub fn finish_if_asked(&self, conn: &Connection) {
        if !self.shared.ask_writer.swap(false, Ordering::Relaxed) {
            return;
        }
        let started = Instant::now();
        // Wait for readers briefly only: a reader may itself be waiting for the write lock
        // this checkpoint holds. If they do not clear, the checkpoint still copied what it
        // could; the thread asks again.
        let _ = conn.busy_timeout(WRITER_CHECKPOINT_WAIT);
        match checkpoint(conn, "RESTART") {
            Ok((wal, _)) => {
                self.shared.metrics.wal_frames.set(wal);
            }
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint on the writer failed"),
        }
        let _ = conn.busy_timeout(super::BUSY_TIMEOUT);
        self.shared.metrics.writer_checkpoints.inc();
        self.shared
            .metrics
            .checkpoint_seconds
            .observe(started.elapsed().as_secs_f64());
    }
}

/// The running checkpointer; [`Checkpointer::stop`] ends it after a last checkpoint.
pub struct Checkpointer {
    handle: CheckpointHandle,
    join: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    /// Opens its connection to the store at `path` and starts its thread.
    pub fn start(
        path: &Path,
        durability: Durability,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let conn = super::batch::open_connection(path, durability)?;
        let shared = Arc::new(Shared {
            written: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            ask_writer: AtomicBool::new(false),
            metrics: metrics.clone(),
        });
        let theirs = shared.clone();
        let join = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || run(conn, &theirs, &metrics))
            .map_err(|e| StoreError::Encode(format!("starting the checkpoint thread: {e}")))?;
        Ok(Self {
            handle: CheckpointHandle {
                shared,
                thread: join.thread().clone(),
            },
            join: Some(join),
        })
    }

    /// What the writer uses to wake it.
    pub fn handle(&self) -> CheckpointHandle {
        self.handle.clone()
    }

    /// Runs a last checkpoint and waits for the thread (on a blocking thread when called
    /// from async code).
    pub fn stop(mut self) {
        self.signal_stop();
        if let Some(join) = self.join.take() {
            let _ = join.join();
        }
    }

    fn signal_stop(&self) {
        self.handle.shared.stop.store(true, Ordering::Relaxed);
        self.handle.thread.unpark();
    }
}

impl Drop for Checkpointer {
    /// A gateway that fails after starting it (a listener that cannot bind) does not leave
    /// the thread behind: it runs its last checkpoint and ends on its own.
    fn drop(&mut self) {
        self.signal_stop();
    }
}

fn run(conn: Connection, shared: &Shared, metrics: &Metrics) {
    let mut last = Instant::now();
    let mut restarting = false;
    loop {
        std::thread::park_timeout(PERIOD);
        let stop = shared.stop.load(Ordering::Relaxed);
        let pending = shared.written.load(Ordering::Relaxed);
        if pending == 0 && !stop {
            continue;
        }
        if !stop && pending < ROWS_TRIGGER && last.elapsed() < PERIOD {
            continue; // woken early: wait for the period or the trigger
        }
        shared.written.fetch_sub(pending, Ordering::Relaxed);
        last = Instant::now();
        match checkpoint(&conn, "PASSIVE") {
            Ok((wal, _)) => {
                metrics.wal_frames.set(wal);
                shared
                    .ask_writer
                    .store(wal > WAL_SOFT_FRAMES, Ordering::Relaxed);
                if wal > WAL_MAX_FRAMES {
                    if !restarting {
                        tracing::warn!(
                            wal_pages = wal,
                            "the WAL outgrew its bound: checkpointing with the writer held back"
                        );
                        restarting = true;
                    }
                    if let Ok((wal, _)) = checkpoint(&conn, "RESTART") {
                        metrics.wal_frames.set(wal);
                    }
                } else {
                    restarting = false;
                }
            }
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed; retrying in a second"),
        }
        metrics.checkpoints.inc();
        metrics
            .checkpoint_seconds
            .observe(last.elapsed().as_secs_f64());
        if stop {
            return;
        }
    }
}

/// Runs one checkpoint of `mode`; returns (frames in the WAL, frames copied).
fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<(i64, i64)> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        Ok((r.get(1)?, r.get(2)?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store written without automatic checkpoints is checkpointed by the thread: the
    /// frames copied catch up with the frames in the WAL.
    #[test]
    fn the_thread_checkpoints_what_the_writer_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let writer = super::super::batch::open_connection(&path, Durability::ProcessCrash).unwrap();
        writer
            .execute_batch("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1);")
            .unwrap();
        let metrics = Arc::new(Metrics::new());
        let cp = Checkpointer::start(&path, Durability::ProcessCrash, metrics.clone()).unwrap();
        for i in 0..200 {
            writer.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
        }
        let before = std::fs::metadata(&path).unwrap().len();
        cp.handle().wrote(ROWS_TRIGGER);
        cp.stop();
        let after = std::fs::metadata(&path).unwrap().len();
        assert!(
            after > before,
            "the database file took the WAL's pages ({before} -> {after} bytes)"
        );
        assert!(metrics.checkpoints.get() >= 1);
        let rows: i64 = writer
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 201);
    }
}
