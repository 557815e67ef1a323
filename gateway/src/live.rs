//! The live hub: what the store has **committed**, device status changes and command
//! outcomes, fanned out to whoever watches (the WebSocket feed and the anomaly detector).
//!
//! A `tokio::sync::broadcast` channel of bounded capacity. The writer sends one message per
//! committed batch (an `Arc` of the frames it stored, moved, not copied) and only while
//! someone is subscribed, so the hub costs ingest nothing when nobody watches and one
//! allocation per batch when someone does. Full-policy: **the slow reader loses its place**.
//! The sender never waits; a receiver that falls more than `capacity` messages behind gets
//! `Lagged(n)` and goes on from the oldest message still held, so a slow client can never
//! slow the writer or other clients.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::broadcast;

use crate::payload;
use crate::store::writer::FrameBody;

/// One frame as committed to the store.
#[derive(Debug)]
pub struct Committed {
    /// The device's id.
    pub device: Arc<str>,
    /// Its epoch.
    pub epoch: u64,
    /// Its seq.
    pub seq: u64,
    /// Gateway receive time, Unix ms.
    pub received_ms: i64,
    /// What was stored. A `CommandResult` here closed an open command.
    pub body: FrameBody,
}

impl Committed {
    /// The feed kind of this frame: `telemetry`, `event` or `command`.
    pub fn kind(&self) -> &'static str {
        match self.body {
            FrameBody::Telemetry(_) => "telemetry",
            FrameBody::Event(_) => "event",
            FrameBody::CommandResult(_) => "command",
        }
    }

    /// The frame as the live feed shows it: the MQTT payload's JSON with a `type` member.
    pub fn to_json(&self) -> Vec<u8> {
        let plain = match &self.body {
            FrameBody::Telemetry(t) => {
                payload::telemetry_json(&self.device, self.epoch, self.seq, self.received_ms, t)
            }
            FrameBody::Event(e) => {
                payload::event_json(&self.device, self.epoch, self.seq, self.received_ms, e)
            }
            FrameBody::CommandResult(r) => payload::command_result_json(
                &self.device,
                &r.id,
                payload::status_name(r),
                &r.detail,
                &r.payload,
                self.received_ms,
            ),
        };
        payload::typed(self.kind(), &plain)
    }
}

/// The frames one commit stored, and their JSON, rendered once by the first reader that
/// needs it and shared by every other (so twenty clients cost one rendering).
#[derive(Debug)]
pub struct Batch {
    /// The frames, in commit order.
    pub frames: Vec<Committed>,
    /// Async, so clients that want it while another renders wait without blocking a
    /// runtime thread.
    rendered: tokio::sync::OnceCell<Vec<Bytes>>,
    /// All of them as one `batch` message, likewise shared.
    joined: tokio::sync::OnceCell<Bytes>,
}

impl Batch {
    /// A batch of committed frames.
    pub fn new(frames: Vec<Committed>) -> Self {
        Self {
            frames,
            rendered: tokio::sync::OnceCell::new(),
            joined: tokio::sync::OnceCell::new(),
        }
    }

    /// The rendering, if some reader has made it already.
    pub fn rendered_now(&self) -> Option<&[Bytes]> {
        self.rendered.get().map(Vec::as_slice)
    }

    /// Every frame as one [`payload::batch`] message.
    pub async fn joined(&self) -> &Bytes {
        self.joined
            .get_or_init(|| async {
                let rendered = self.rendered().await;
                Bytes::from(payload::batch(rendered.iter().map(|b| &b[..])))
            })
            .await
    }

    /// Each frame's [`Committed::to_json`], in order.
    pub async fn rendered(&self) -> &[Bytes] {
        self.rendered
            .get_or_init(|| async {
                self.frames
                    .iter()
                    .map(|f| Bytes::from(f.to_json()))
                    .collect()
            })
            .await
    }
}

/// A device came or went.
#[derive(Debug, Clone)]
pub struct StatusChange {
    /// The device.
    pub device: Arc<str>,
    /// Online now?
    pub online: bool,
    /// The link kind ("tcp", "tls", "serial").
    pub link: &'static str,
    /// Firmware version from its Hello, when it came online.
    pub firmware_version: Option<String>,
    /// When, ms since the Unix epoch.
    pub ts_ms: i64,
}

/// A command outcome the gateway decided itself (`timeout`, `expired`, `rejected`); a
/// device's own result arrives as a committed `CommandResult` frame.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The device.
    pub device_id: String,
    /// The command's id.
    pub command_id: String,
    /// The outcome name.
    pub status: &'static str,
    /// Why.
    pub detail: String,
    /// When, Unix ms.
    pub ts_ms: i64,
}

/// One message of the hub.
#[derive(Debug, Clone)]
pub enum LiveEvent {
    /// The frames one commit stored, in commit order.
    Frames(Arc<Batch>),
    /// A device's status changed.
    Status(Arc<StatusChange>),
    /// The gateway closed a command.
    Outcome(Arc<Outcome>),
    /// The detector raised or ended an anomaly (committed to the store).
    Anomaly(Arc<payload::Anomaly>),
}

/// The sending side; cheap to clone.
#[derive(Clone)]
pub struct Hub {
    tx: broadcast::Sender<LiveEvent>,
}

impl Hub {
    /// A hub keeping up to `capacity` messages for its slowest receiver.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Self { tx }
    }

    /// A new receiver, starting with the next message.
    pub fn subscribe(&self) -> broadcast::Receiver<LiveEvent> {
        self.tx.subscribe()
    }

    /// Whether anyone listens (the writer skips building messages otherwise).
    pub fn has_subscribers(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// Sends without waiting; nobody listening is fine.
    pub fn publish(&self, event: LiveEvent) {
        let _ = self.tx.send(event);
    }
}

impl Default for Hub {
    fn default() -> Self {
        Self::new(1024)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(device: &str) -> LiveEvent {
        LiveEvent::Status(Arc::new(StatusChange {
            device: Arc::from(device),
            online: true,
            link: "tcp",
            firmware_version: None,
            ts_ms: 1,
        }))
    }

    #[tokio::test]
    async fn a_slow_receiver_is_told_how_much_it_missed_and_goes_on() {
        let hub = Hub::new(4);
        let mut slow = hub.subscribe();
        for i in 0..10 {
            hub.publish(status(&format!("d{i}")));
        }
        match slow.recv().await {
            Err(broadcast::error::RecvError::Lagged(n)) => assert_eq!(n, 6),
            other => panic!("expected Lagged, got {other:?}"),
        }
        match slow.recv().await {
            Ok(LiveEvent::Status(s)) => assert_eq!(&*s.device, "d6"),
            other => panic!("expected the oldest kept message, got {other:?}"),
        }
    }

    #[test]
    fn publishing_with_nobody_listening_is_fine() {
        let hub = Hub::new(2);
        assert!(!hub.has_subscribers());
        hub.publish(status("d"));
    }
}
