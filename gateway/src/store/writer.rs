//! The batching writer: the one task that writes device data to SQLite.
//!
//! Sessions send [`WriteFrame`]s over a bounded channel ([`WriterHandle`]). The writer takes
//! everything queued (up to `batch_max_frames`), commits it in one transaction
//! ([`super::batch`]), and only then raises each session's [`AckSignal`], so a device is
//! acknowledged only for data that is durable. Frames that arrive while a commit runs form the
//! next batch: group commit without a linger timer.
//!
//! Deduplication lives here because the writer is the single owner of each stream's
//! `last_seq`: a frame whose seq is at or below what is stored (or already in the batch) is
//! acknowledged again and not stored. That holds even while a superseded link's frames are
//! still queued beside its replacement's resends.
//!
//! Full-policy of the queue: **block**. A session waits to enqueue, so it stops reading its
//! socket and the device slows down; nothing is dropped. When the MQTT backlog reaches its
//! budget, the writer either stops taking frames until the bridge frees space (`slow`) or
//! drops the oldest unpublished outbox rows after each commit (`drop-oldest`).
//!
//! The writer is also the only connection that deletes published outbox rows (what the
//! bridge [`Backlog::confirm`]s, at most every [`CURSOR_EVERY`]) and it never checkpoints:
//! [`super::checkpoint`] does that on its own thread. So nothing an ack waits for fsyncs
//! (under `durability = "process-crash"`) or waits for a second writer.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::batch::{Batcher, Pruned};
use super::checkpoint::CheckpointHandle;
use super::outbox::Backlog;
use crate::config::BacklogPolicy;
use crate::live::{Batch, Committed, Hub, LiveEvent};
use crate::metrics::Metrics;

/// How often a full store is tried again.
const FULL_RETRY: Duration = Duration::from_secs(1);

/// What a session learns from the writer: how far its frames are durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Durable {
    /// Every frame of the link's epoch with a seq at or below this is durable.
    pub seq: u64,
    /// A commit holding this link's frames failed; the link should close so the device
    /// resends after reconnecting.
    pub failed: bool,
}

/// Shared by a session and its queued frames; the writer raises it after each commit.
pub type AckSignal = Arc<watch::Sender<Durable>>;

/// The data of one frame, validated by the session.
#[derive(Debug)]
pub enum FrameBody {
    /// Readings.
    Telemetry(proto::v1::Telemetry),
    /// One event.
    Event(proto::v1::Event),
    /// A device's answer to a command.
    CommandResult(proto::v1::CommandResult),
}

/// One data frame to store.
#[derive(Debug)]
pub struct WriteFrame {
    /// The device's id from its Hello.
    pub device: Arc<str>,
    /// The link's epoch.
    pub epoch: u64,
    /// The frame's seq (> 0).
    pub seq: u64,
    /// Gateway receive time, used where the device sent timestamp 0.
    pub received_ms: i64,
    /// What to store.
    pub body: FrameBody,
    /// Raised after the commit that makes this frame durable.
    pub acks: AckSignal,
}

/// A cheap, cloneable sender to the writer.
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<WriteFrame>,
    /// The longest a frame waited for its commit since the pacer last looked, ms.
    max_wait_ms: Arc<std::sync::atomic::AtomicU64>,
    /// When the running commit began, Unix ms (0: none running).
    commit_started_ms: Arc<std::sync::atomic::AtomicU64>,
    /// Room in the queue, in readings (`store.queue_readings` permits): what is taken is
    /// what is queued.
    room: Arc<tokio::sync::Semaphore>,
    /// `store.queue_readings`.
    room_max: u32,
    /// Where a full queue is counted.
    metrics: Arc<Metrics>,
    /// Told when a frame finds the queue full (the pacer decides at once).
    filled: Arc<tokio::sync::Notify>,
}

impl FrameBody {
    /// Readings it holds (1 for an event or a command result).
    pub fn readings(&self) -> u64 {
        match self {
            FrameBody::Telemetry(t) => t.readings.len().max(1) as u64,
            _ => 1,
        }
    }
}

/// What [`WriterHandle::queue`] did with a frame.
pub enum Queued<'a> {
    /// Queued.
    Done,
    /// The writer has stopped.
    Stopped,
    /// The queue is full: this waits for room (backpressure: the session stops reading its
    /// socket meanwhile), then queues the frame. Boxed, so the waiting state is paid only
    /// while waiting, not by every idle session's future.
    Wait(
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), WriterStopped>> + Send + 'a>>,
    ),
}

impl WriterHandle {
    /// Queues a frame if there is room now; otherwise says how to wait for room
    /// (backpressure). Fails only when the writer has stopped.
    pub fn queue(&self, frame: WriteFrame) -> Queued<'_> {
        let readings = frame.body.readings();
        // A frame takes room for its readings first (a frame bigger than the whole queue
        // takes all of it), then a slot.
        let need = (readings.min(u64::from(self.room_max))) as u32;
        match self.room.try_acquire_many(need) {
            Ok(permit) => permit.forget(),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                self.full();
                return Queued::Wait(Box::pin(async move {
                    match self.room.acquire_many(need).await {
                        Ok(permit) => permit.forget(),
                        Err(_) => return Err(WriterStopped),
                    }
                    match self.tx.try_send(frame) {
                        Ok(()) => Ok(()),
                        Err(mpsc::error::TrySendError::Full(frame)) => {
                            self.full();
                            self.tx.send(frame).await.map_err(|_| WriterStopped)
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => Err(WriterStopped),
                    }
                }));
            }
            Err(tokio::sync::TryAcquireError::Closed) => return Queued::Stopped,
        }
        match self.tx.try_send(frame) {
            Ok(()) => Queued::Done,
            Err(mpsc::error::TrySendError::Full(frame)) => {
                self.full();
                Queued::Wait(Box::pin(async move {
                    self.tx.send(frame).await.map_err(|_| WriterStopped)
                }))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Queued::Stopped,
        }
    }

    /// Counts a full queue and wakes the pacer.
    fn full(&self) {
        self.metrics.store_queue_full.inc();
        self.filled.notify_one();
    }

    /// Watches how full the queue is without keeping the writer alive (it stops when the
    /// last handle is dropped).
    pub fn probe(&self) -> QueueProbe {
        QueueProbe {
            tx: self.tx.downgrade(),
            max_wait_ms: self.max_wait_ms.clone(),
            commit_started_ms: self.commit_started_ms.clone(),
            room: self.room.clone(),
            room_max: self.room_max,
            filled: self.filled.clone(),
        }
    }
}

/// How full the queue to the writer is, and how long frames wait in it (see
/// [`WriterHandle::probe`]).
pub struct QueueProbe {
    tx: mpsc::WeakSender<WriteFrame>,
    max_wait_ms: Arc<std::sync::atomic::AtomicU64>,
    commit_started_ms: Arc<std::sync::atomic::AtomicU64>,
    room: Arc<tokio::sync::Semaphore>,
    room_max: u32,
    filled: Arc<tokio::sync::Notify>,
}

impl QueueProbe {
    /// Resolves when a frame has found the queue full since the last call.
    pub async fn filled(&self) {
        self.filled.notified().await;
    }

    /// The longest a frame waited from its arrival to its commit since the last call.
    pub fn take_max_wait(&self) -> Duration {
        Duration::from_millis(
            self.max_wait_ms
                .swap(0, std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// How long the writer's running commit has taken so far (`None`: none running).
    pub fn commit_running_for(&self) -> Option<Duration> {
        let started = self
            .commit_started_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        (started != 0).then(|| {
            Duration::from_millis(super::now_ms().saturating_sub(started as i64).max(0) as u64)
        })
    }

    /// Whether the writer is still running.
    pub fn writer_alive(&self) -> bool {
        self.tx.upgrade().is_some()
    }

    /// Readings waiting in the queue (not yet taken by the writer): the room taken. A frame
    /// bigger than the whole queue counts as the whole queue.
    pub fn queued_readings(&self) -> u64 {
        u64::from(self.room_max).saturating_sub(self.room.available_permits() as u64)
    }

    /// 0 (empty) to 1 (full), by frames or by readings, whichever is fuller; `None` once
    /// the writer has stopped.
    pub fn fill(&self) -> Option<f64> {
        let tx = self.tx.upgrade()?;
        let max = tx.max_capacity().max(1);
        let frames = 1.0 - tx.capacity() as f64 / max as f64;
        let readings = self.queued_readings() as f64 / f64::from(self.room_max.max(1));
        Some(frames.max(readings).min(1.0))
    }
}

/// The writer task is gone (the store failed or the gateway is stopping).
#[derive(Debug, thiserror::Error)]
#[error("the store writer has stopped")]
pub struct WriterStopped;

/// Where the anomaly detector sends what it decided. Full-policy: **drop and count**
/// (`gateway_anomalies_dropped_total`): findings are derived data, and the detector must
/// never wait for the writer.
pub type AnomalySender = mpsc::Sender<Arc<crate::payload::Anomaly>>;

/// What the writer is started with besides its connection.
pub struct WriterParts {
    /// `store.queue_frames`.
    pub queue_frames: usize,
    /// `store.batch_max_frames`.
    pub batch_max_frames: usize,
    /// `store.queue_readings`.
    pub queue_readings: usize,
    /// `store.batch_max_readings`: a batch with more is cut after the frame that reaches it
    /// (the rest goes into the next commit), so one commit of big frames cannot hold every
    /// ack behind it for long.
    pub batch_max_readings: usize,
    /// With a backlog, frames are also queued in the outbox for the MQTT bridge.
    pub backlog: Option<Arc<Backlog>>,
    /// `store.retention`, and its new values on reload.
    pub retention: watch::Receiver<Option<Duration>>,
    /// Where batches, failures and the cursor are counted.
    pub metrics: Arc<Metrics>,
    /// Where committed batches are announced.
    pub hub: Hub,
    /// Findings of the detector, written between batches in their own small transaction.
    pub anomalies: mpsc::Receiver<Arc<crate::payload::Anomaly>>,
    /// Told how much was written, to checkpoint the WAL off this thread.
    pub checkpoint: Option<CheckpointHandle>,
}

/// Starts the writer on `conn`, on a blocking thread of its own (its SQLite calls are
/// synchronous). It runs until every [`WriterHandle`] is dropped, then commits what is
/// queued and returns.
pub fn spawn(
    conn: rusqlite::Connection,
    parts: WriterParts,
) -> (WriterHandle, tokio::task::JoinHandle<()>) {
    let WriterParts {
        queue_frames,
        batch_max_frames,
        queue_readings,
        batch_max_readings,
        backlog,
        retention,
        metrics,
        hub,
        anomalies,
        checkpoint,
    } = parts;
    let (tx, rx) = mpsc::channel(queue_frames);
    let max_wait_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let commit_started_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer_metrics = metrics.clone();
    let room_max = u32::try_from(queue_readings.max(1)).unwrap_or(u32::MAX >> 3);
    let room = Arc::new(tokio::sync::Semaphore::new(room_max as usize));
    let first_retention = *retention.borrow();
    let writer = Writer {
        room: room.clone(),
        room_max,
        max_wait_ms: max_wait_ms.clone(),
        commit_started_ms: commit_started_ms.clone(),
        checkpoint,
        cursor_deleted: 0,
        cursor_at: std::time::Instant::now(),
        anomalies,
        anomalies_open: true,
        batcher: Batcher::new(conn, backlog.is_some()),
        backlog,
        metrics,
        dropping: false,
        dropped_to: 0,
        retention: first_retention,
        retention_updates: retention,
        pruned: Pruned::default(),
        hub,
    };
    let runtime = tokio::runtime::Handle::current();
    let task = tokio::task::spawn_blocking(move || {
        runtime.block_on(writer.run(rx, batch_max_frames, batch_max_readings))
    });
    (
        WriterHandle {
            tx,
            max_wait_ms,
            commit_started_ms,
            room,
            room_max,
            metrics: writer_metrics,
            filled: Arc::new(tokio::sync::Notify::new()),
        },
        task,
    )
}

struct Writer {
    batcher: Batcher,
    /// Room in readings, given back as frames are taken.
    room: Arc<tokio::sync::Semaphore>,
    /// `store.queue_readings`.
    room_max: u32,
    /// Longest arrival-to-commit time since the pacer last looked, ms.
    max_wait_ms: Arc<std::sync::atomic::AtomicU64>,
    /// When the running commit began, Unix ms (0: none running); the watchdog reads it.
    commit_started_ms: Arc<std::sync::atomic::AtomicU64>,
    /// Wakes the checkpointer once enough was written.
    checkpoint: Option<CheckpointHandle>,
    /// Outbox rows up to this id are deleted.
    cursor_deleted: i64,
    /// When the cursor last moved.
    cursor_at: std::time::Instant,
    /// Findings of the detector, written between batches.
    anomalies: mpsc::Receiver<Arc<crate::payload::Anomaly>>,
    /// Whether the detector may still send (false once it has stopped).
    anomalies_open: bool,
    backlog: Option<Arc<Backlog>>,
    metrics: Arc<Metrics>,
    /// Whether `drop-oldest` is dropping now (to log the start and end once).
    dropping: bool,
    /// The backlog's bytes right after the last drop: an episode ends when publishing takes
    /// it under half the budget, not when a drop of uneven rows overshot below half.
    dropped_to: u64,
    /// `store.retention`.
    retention: Option<Duration>,
    /// Its new values (a reload).
    retention_updates: watch::Receiver<Option<Duration>>,
    /// What the current retention pass deleted so far (logged once at its end).
    pruned: Pruned,
    /// Where committed frames are announced (only while someone listens).
    hub: Hub,
}

/// Most readings (and as many events and commands) one retention step deletes: a step runs
/// between batches on the writer, so it must stay short.
const PRUNE_STEP_ROWS: i64 = 20_000;
/// Pause between retention steps while old rows remain (batches run in between).
const PRUNE_BUSY: Duration = Duration::from_millis(100);
/// Longest pause between retention passes.
const PRUNE_IDLE_MAX: Duration = Duration::from_secs(60);

/// Where to cut `batch` so that it holds at most `max` readings (at least one frame), or
/// `None` if it fits.
fn cut_at(batch: &[WriteFrame], max: usize) -> Option<usize> {
    let mut readings = 0;
    for (i, frame) in batch.iter().enumerate() {
        readings += frame.body.readings() as usize;
        if readings > max {
            let cut = i.max(1);
            return (cut < batch.len()).then_some(cut);
        }
    }
    None
}

/// Under load, published outbox rows are deleted at most this often (one short transaction
/// between batches); when idle, as soon as the bridge confirms them.
pub const CURSOR_EVERY: Duration = Duration::from_millis(50);

impl Writer {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<WriteFrame>,
        batch_max_frames: usize,
        batch_max_readings: usize,
    ) {
        let mut batch = Vec::with_capacity(batch_max_frames);
        let mut carry = Vec::new();
        let mut prune_at = tokio::time::Instant::now();
        loop {
            self.wait_for_backlog_room().await;
            // Checked here, not only in the select below: under a steady load frames are
            // always ready, and retention must still get its turn between batches.
            if let Some(retention) = self.retention {
                if tokio::time::Instant::now() >= prune_at {
                    prune_at = tokio::time::Instant::now() + self.prune_step(retention);
                }
            }
            self.record_anomalies();
            self.advance_cursor(false);
            let backlog = self.backlog.clone();
            // Frames left over from a batch cut at `store.batch_max_readings` go first.
            if carry.is_empty() {
                let received = tokio::select! {
                    n = rx.recv_many(&mut batch, batch_max_frames) => n,
                _ = tokio::time::sleep_until(prune_at), if self.retention.is_some() => continue,
                Ok(()) = self.retention_updates.changed() => {
                    self.retention = *self.retention_updates.borrow_and_update();
                    prune_at = tokio::time::Instant::now();
                    continue;
                }
                _ = confirmed_rose(backlog.as_deref()) => {
                    self.advance_cursor(true);
                    continue;
                }
                    a = self.anomalies.recv(), if self.anomalies_open => {
                        match a {
                            Some(a) => self.record(vec![a]),
                            None => self.anomalies_open = false,
                        }
                        continue;
                    }
                };
                if received == 0 {
                    break;
                }
                let permits: u64 = batch
                    .iter()
                    .map(|f| f.body.readings().min(u64::from(self.room_max)))
                    .sum();
                self.room.add_permits(permits as usize);
            } else {
                batch.append(&mut carry);
            }
            // Big frames (a paced device batches its samples) make a frame count a poor
            // bound of a commit's length: cut the batch by readings too.
            if let Some(cut) = cut_at(&batch, batch_max_readings) {
                carry = batch.split_off(cut);
            }
            // A link whose frames failed to commit is closing, and its device resends from
            // its last ack: a later frame of it must not commit first, or its stream's
            // stored seq would pass the failed frames and their resends would be taken
            // for duplicates (acknowledged, never stored).
            batch.retain(|f| !f.acks.borrow().failed);
            if batch.is_empty() {
                continue;
            }
            let started = std::time::Instant::now();
            self.commit_started_ms.store(
                super::now_ms().max(1) as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            let mut result = self.batcher.commit(&batch);
            // A full store (the disk, or `store.max_bytes`): keep the batch, acknowledge
            // nothing, and try again until space returns. Sessions wait for their acks and
            // then for room in the queue, so devices are paced, then held back.
            while result.as_ref().is_err_and(super::StoreError::is_full) {
                self.batcher.forget();
                if self.metrics.store_full.get() == 0 {
                    self.metrics.store_full.set(1);
                    if let Err(e) = &result {
                        tracing::error!(error = %e, frames = batch.len(), "the store is full: nothing is acknowledged and devices are held back until space returns (free disk space, or raise store.max_bytes)");
                    }
                }
                self.metrics.commit_failures.inc();
                if rx.is_closed() {
                    break; // stopping: these frames are resent after the restart
                }
                tokio::time::sleep(FULL_RETRY).await;
                self.commit_started_ms.store(
                    super::now_ms().max(1) as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
                result = self.batcher.commit(&batch);
            }
            if result.is_ok() && self.metrics.store_full.get() != 0 {
                self.metrics.store_full.set(0);
                tracing::warn!("the store has space again: acknowledging and taking frames again");
            }
            match result {
                Ok(stored) => {
                    self.metrics.record_batch(
                        batch.len() as u64,
                        stored.frames,
                        stored.readings,
                        started.elapsed().as_secs_f64(),
                    );
                    if let Some(backlog) = &self.backlog {
                        backlog.added(stored.outbox_bytes);
                    }
                    self.wrote(stored.readings + stored.frames);
                    // The batch is in arrival order: its first frame waited longest.
                    if let Some(first) = batch.first() {
                        let waited = super::now_ms().saturating_sub(first.received_ms).max(0);
                        self.max_wait_ms
                            .fetch_max(waited as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                    for frame in &batch {
                        frame.acks.send_if_modified(|d| {
                            let raise = frame.seq > d.seq;
                            if raise {
                                d.seq = frame.seq;
                            }
                            raise
                        });
                    }
                    self.announce(&mut batch);
                    self.drop_oldest_if_over_budget();
                    // After the acks: the WAL has grown past what the checkpoint thread
                    // can bring back while commits keep coming.
                    if let Some(c) = &self.checkpoint {
                        c.finish_if_asked(self.batcher.connection());
                    }
                }
                Err(e) => {
                    // Nothing of this batch was acknowledged; its devices resend after
                    // reconnecting. Interned ids may have been rolled back: forget them.
                    tracing::error!(error = %e, frames = batch.len(), "store commit failed; closing the links of this batch");
                    self.metrics.commit_failures.inc();
                    self.batcher.forget();
                    for frame in &batch {
                        frame.acks.send_modify(|d| d.failed = true);
                    }
                }
            }
            self.commit_started_ms
                .store(0, std::sync::atomic::Ordering::Relaxed);
            batch.clear();
        }
        // Sessions still waiting for room learn that the writer is gone.
        self.room.close();
        if let Some(backlog) = &self.backlog {
            backlog.stop_writer();
        }
        self.advance_cursor(true);
        tracing::debug!("store writer drained and stopped");
    }

    /// Tells the checkpointer about rows written.
    fn wrote(&self, rows: u64) {
        if let Some(c) = &self.checkpoint {
            c.wrote(rows);
        }
    }

    /// Deletes the outbox rows the broker has confirmed (unless done less than
    /// [`CURSOR_EVERY`] ago and not `now`).
    fn advance_cursor(&mut self, now: bool) {
        let Some(backlog) = &self.backlog else { return };
        let upto = backlog.confirmed();
        if upto <= self.cursor_deleted || (!now && self.cursor_at.elapsed() < CURSOR_EVERY) {
            return;
        }
        self.cursor_at = std::time::Instant::now();
        match self.batcher.delete_published(upto) {
            Ok((rows, bytes)) => {
                backlog.published(rows, bytes);
                self.cursor_deleted = upto;
                self.wrote(rows);
            }
            Err(e) => {
                tracing::error!(error = %e, "advancing the MQTT cursor failed; retrying")
            }
        }
    }

    /// Writes the anomalies waiting (never more than a bounded slice per turn).
    fn record_anomalies(&mut self) {
        let mut rows = Vec::new();
        while rows.len() < 1024 {
            match self.anomalies.try_recv() {
                Ok(a) => rows.push(a),
                Err(_) => break,
            }
        }
        if !rows.is_empty() {
            self.record(rows);
        }
    }

    fn record(&mut self, rows: Vec<Arc<crate::payload::Anomaly>>) {
        match self.batcher.record_anomalies(&rows) {
            Ok(bytes) => {
                if let Some(backlog) = &self.backlog {
                    backlog.added(bytes);
                }
                self.wrote(rows.len() as u64);
                for a in rows {
                    self.hub.publish(LiveEvent::Anomaly(a));
                }
            }
            Err(e) => {
                self.metrics.anomalies_dropped.inc_by(rows.len() as u64);
                tracing::error!(error = %e, anomalies = rows.len(), "storing anomalies failed; they are dropped");
            }
        }
    }

    /// After a commit: counts command outcomes and hands the stored frames to the live hub
    /// (moved out of `batch`, which the caller clears anyway).
    fn announce(&self, batch: &mut Vec<WriteFrame>) {
        let kept = self.batcher.kept();
        for (frame, _) in batch.iter().zip(kept).filter(|(_, k)| **k) {
            if let FrameBody::CommandResult(r) = &frame.body {
                self.metrics.record_outcome(crate::payload::status_name(r));
            }
        }
        if !self.hub.has_subscribers() || !kept.contains(&true) {
            return;
        }
        let committed: Vec<Committed> = batch
            .drain(..)
            .zip(kept)
            .filter(|(_, k)| **k)
            .map(|(f, _)| Committed {
                device: f.device,
                epoch: f.epoch,
                seq: f.seq,
                received_ms: f.received_ms,
                body: f.body,
            })
            .collect();
        self.hub
            .publish(LiveEvent::Frames(Arc::new(Batch::new(committed))));
    }

    /// One retention step; returns how long to wait before the next.
    fn prune_step(&mut self, retention: Duration) -> Duration {
        let idle = (retention / 10).min(PRUNE_IDLE_MAX);
        let cutoff = super::now_ms().saturating_sub(retention.as_millis() as i64);
        match self.batcher.prune(cutoff, PRUNE_STEP_ROWS) {
            Ok(step) => {
                self.metrics.rows_pruned.inc_by(step.total());
                self.wrote(step.total());
                self.pruned.readings += step.readings;
                self.pruned.events += step.events;
                self.pruned.commands += step.commands;
                self.pruned.anomalies += step.anomalies;
                let full = PRUNE_STEP_ROWS as u64;
                if step.readings == full
                    || step.events == full
                    || step.commands == full
                    || step.anomalies == full
                {
                    return PRUNE_BUSY; // more remain
                }
                if self.pruned.total() > 0 {
                    tracing::info!(
                        readings = self.pruned.readings,
                        events = self.pruned.events,
                        commands = self.pruned.commands,
                        anomalies = self.pruned.anomalies,
                        older_than = %humantime::format_duration(retention),
                        "retention: deleted old data"
                    );
                    self.pruned = Pruned::default();
                }
                idle
            }
            Err(e) => {
                tracing::error!(error = %e, "retention: deleting old data failed; retrying later");
                idle
            }
        }
    }

    /// `slow` policy: while the backlog is over budget, take no frames (sessions block, so
    /// devices slow down) until the bridge has brought it under three quarters of the budget
    /// (hysteresis, so a sustained load does not flap at the edge).
    async fn wait_for_backlog_room(&mut self) {
        let Some(backlog) = self.backlog.clone() else {
            return;
        };
        if backlog.policy() != BacklogPolicy::Slow || !backlog.over_budget() {
            return;
        }
        backlog.set_full(true);
        tracing::warn!(
            backlog_bytes = backlog.bytes(),
            budget = backlog.budget(),
            "uplink backlog reached its budget: slowing devices until the broker catches up"
        );
        let resume = backlog.budget() / 4 * 3;
        loop {
            // This writer deletes what the broker confirmed, so it frees the room itself.
            let rose = backlog.confirmed_rose.notified();
            self.advance_cursor(true);
            if backlog.bytes() <= resume {
                break;
            }
            // Also re-check now and then in case a notification raced the check above.
            let _ = tokio::time::timeout(Duration::from_millis(500), rose).await;
        }
        backlog.set_full(false);
        tracing::info!(
            backlog_bytes = backlog.bytes(),
            "uplink backlog under budget again: devices resume"
        );
    }

    /// `drop-oldest` policy: past the budget, delete the oldest unpublished rows down to
    /// three quarters of it. The episode ends (and is logged) once the bridge has brought the
    /// backlog under half the budget.
    fn drop_oldest_if_over_budget(&mut self) {
        let Some(backlog) = self.backlog.clone() else {
            return;
        };
        if backlog.policy() != BacklogPolicy::DropOldest {
            return;
        }
        if self.dropping && backlog.bytes() < (backlog.budget() / 2).min(self.dropped_to) {
            self.dropping = false;
            backlog.set_full(false);
            tracing::info!(
                dropped_total = self.metrics.uplink_dropped.get(),
                "uplink backlog under budget again: no longer dropping"
            );
        }
        if !backlog.over_budget() {
            return;
        }
        if !self.dropping {
            self.dropping = true;
            backlog.set_full(true);
            tracing::warn!(
                budget = backlog.budget(),
                "uplink backlog reached its budget: dropping the oldest unpublished frames (they stay in the store)"
            );
        }
        let target = backlog.budget() / 4 * 3;
        // Rows vary in size (a paced device's frames carry many readings): size each slice
        // from the cost of the rows just dropped, starting with one row.
        let mut row_cost = u64::MAX;
        while backlog.bytes() > target {
            let excess = backlog.bytes() - target;
            let n = (excess / row_cost.max(1)).clamp(1, 10_000) as i64;
            match self.batcher.drop_oldest(n) {
                Ok((0, _)) => break,
                Ok((rows, bytes)) => {
                    backlog.dropped(rows);
                    backlog.removed(bytes);
                    row_cost = (bytes / rows.max(1)).max(1);
                }
                Err(e) => {
                    tracing::error!(error = %e, "dropping the oldest outbox rows failed");
                    break;
                }
            }
        }
        self.dropped_to = backlog.bytes();
    }
}

/// Resolves when the bridge confirms more published rows (never without a bridge).
async fn confirmed_rose(backlog: Option<&Backlog>) {
    match backlog {
        Some(b) => b.confirmed_rose.notified().await,
        None => std::future::pending().await,
    }
}
