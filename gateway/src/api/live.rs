//! `GET /api/v1/live`: the live WebSocket feed of what the store has committed, device
//! status changes and command outcomes, as JSON text messages in the MQTT payloads' shapes
//! with a `type` member (`telemetry`, `event`, `status`, `command`, `anomaly`).
//!
//! A client may send a subscribe message at any time,
//! `{"devices": [...], "sensors": [...], "kinds": [...]}` (each optional; missing means
//! all), answered with `{"type":"subscribed", ...}`. A client that cannot keep up loses its
//! place, never the gateway's speed: when the hub's buffer overflows for it, it gets
//! `{"type":"lagged","skipped":N}` (N hub messages, each a committed batch, a status change
//! or an outcome) and continues from live. Idle sockets are pinged; a client that does not
//! read at all is closed after a write timeout; on shutdown every client gets a close frame.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::SinkExt;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::error::{ApiError, ErrorBody};
use super::ApiState;
use crate::live::{Batch, LiveEvent, StatusChange};
use crate::payload;
use crate::store::writer::FrameBody;

/// A client that takes longer than this to accept one batch of messages is closed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest message a client may send (subscribe messages are small).
const MAX_CLIENT_MESSAGE: usize = 64 * 1024;

/// What a client subscribes to.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Subscribe {
    /// Only these devices.
    pub devices: Option<Vec<String>>,
    /// Only readings of these sensors (telemetry frames without any are left out).
    pub sensors: Option<Vec<String>>,
    /// Only these kinds: `telemetry`, `event`, `status`, `command`, `anomaly`.
    pub kinds: Option<Vec<String>>,
    /// Receive the frames of each commit as one message,
    /// `{"type":"batch","messages":[...]}`, instead of one message each: far cheaper for
    /// both ends when taking everything. Default false.
    #[serde(default)]
    pub batch: bool,
}

const KINDS: [&str; 5] = ["telemetry", "event", "status", "command", "anomaly"];

/// A subscription, ready to match.
#[derive(Debug, Default)]
struct Filter {
    devices: Option<HashSet<String>>,
    sensors: Option<HashSet<String>>,
    kinds: Option<HashSet<&'static str>>,
    batch: bool,
}

impl Filter {
    fn from(s: Subscribe) -> Result<Self, String> {
        let kinds = match s.kinds {
            None => None,
            Some(kinds) => Some(
                kinds
                    .iter()
                    .map(|k| {
                        KINDS
                            .iter()
                            .find(|known| *known == k)
                            .copied()
                            .ok_or_else(|| {
                                format!("kinds: unknown kind {k:?}; known: {}", KINDS.join(", "))
                            })
                    })
                    .collect::<Result<_, _>>()?,
            ),
        };
        Ok(Self {
            devices: s.devices.map(|d| d.into_iter().collect()),
            sensors: s.sensors.map(|d| d.into_iter().collect()),
            kinds,
            batch: s.batch,
        })
    }

    fn wants(&self, device: &str, kind: &str) -> bool {
        self.devices.as_ref().is_none_or(|d| d.contains(device))
            && self.kinds.as_ref().is_none_or(|k| k.contains(kind))
    }

    fn wants_everything(&self) -> bool {
        self.devices.is_none()
            && self.sensors.is_none()
            && self.kinds.as_ref().is_none_or(|k| {
                ["telemetry", "event", "command"]
                    .iter()
                    .all(|x| k.contains(x))
            })
    }

    fn describe(&self) -> serde_json::Value {
        let sorted = |set: &Option<HashSet<String>>| {
            set.as_ref().map(|s| {
                let mut v: Vec<&String> = s.iter().collect();
                v.sort();
                v.into_iter().cloned().collect::<Vec<_>>()
            })
        };
        serde_json::json!({
            "type": "subscribed",
            "devices": sorted(&self.devices),
            "sensors": sorted(&self.sensors),
            "kinds": self.kinds.as_ref().map(|k| KINDS.iter().filter(|x| k.contains(*x)).collect::<Vec<_>>()),
            "batch": self.batch,
        })
    }
}

/// Opens the live feed (a WebSocket upgrade). Browsers, which cannot set headers on a
/// WebSocket, may pass the token as `?token=`.
#[utoipa::path(get, path = "/api/v1/live", tag = "live",
    params(("token" = Option<String>, Query, description = "The API token, for clients that cannot send headers")),
    responses((status = 101, description = "WebSocket of JSON messages"), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn upgrade(State(state): State<Arc<ApiState>>, ws: WebSocketUpgrade) -> Response {
    // The gauge counts admitted clients, from admission to the socket's end.
    let taken = state.metrics.live_clients.inc();
    if taken >= state.max_live_clients as i64 {
        state.metrics.live_clients.dec();
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!(
                "the live feed has its {} clients already (http.max_live_clients)",
                state.max_live_clients
            ),
        )
        .into_response();
    }
    let metrics = state.metrics.clone();
    ws.max_message_size(MAX_CLIENT_MESSAGE)
        .on_failed_upgrade(move |_| {
            metrics.live_clients.dec();
        })
        .on_upgrade(move |socket| async move {
            feed(socket, &state).await;
            state.metrics.live_clients.dec();
        })
}

fn text(json: Vec<u8>) -> Message {
    // Every message here is serde_json output, valid UTF-8.
    Message::Text(Utf8Bytes::from(String::from_utf8(json).unwrap_or_default()))
}

/// The live feed's byte budget, shared by every client: a token bucket refilled at
/// `http.live_max_bytes_per_s` (holding at most a second's worth). A client that wants more
/// waits, falls behind the hub, and is told it lagged: on a small box the feed can never take
/// the cores that ingest needs, however many clients take everything.
pub struct Budget {
    /// Bytes per second; 0: unlimited.
    rate: f64,
    /// (bytes available, when last refilled); negative after a message larger than a
    /// second's worth.
    state: std::sync::Mutex<(f64, tokio::time::Instant)>,
}

impl Budget {
    /// A budget of `bytes_per_s` (0: unlimited).
    pub fn new(bytes_per_s: u64) -> Self {
        Self {
            rate: bytes_per_s as f64,
            state: std::sync::Mutex::new((bytes_per_s as f64, tokio::time::Instant::now())),
        }
    }

    /// Waits until `bytes` may be sent.
    pub async fn take(&self, bytes: usize) {
        if self.rate <= 0.0 {
            return;
        }
        loop {
            let wait = {
                let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let now = tokio::time::Instant::now();
                let refill = now.duration_since(state.1).as_secs_f64() * self.rate;
                state.0 = (state.0 + refill).min(self.rate);
                state.1 = now;
                // A message larger than the bucket needs a full bucket, and then takes
                // the bucket into debt.
                let needed = (bytes as f64).min(self.rate);
                if state.0 >= needed {
                    state.0 -= bytes as f64;
                    return;
                }
                Duration::from_secs_f64((needed - state.0) / self.rate)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// The JSON of the frames of `batch` that `filter` wants, in order.
async fn frame_jsons(filter: &Filter, batch: &Batch) -> Vec<Bytes> {
    let wanted = batch
        .frames
        .iter()
        .filter(|f| filter.wants(&f.device, f.kind()))
        .count();
    if wanted == 0 {
        return Vec::new();
    }
    // Rendered once for all clients; a client that wants a few frames of a batch nobody
    // rendered yet renders just those, and a sensor filter needs a rendering of its own.
    let shared = match (&filter.sensors, batch.rendered_now()) {
        (Some(_), _) => None,
        (None, Some(r)) => Some(r),
        (None, None) if wanted * 4 < batch.frames.len() => None,
        (None, None) => Some(batch.rendered().await),
    };
    let mut out = Vec::with_capacity(wanted);
    for (i, frame) in batch.frames.iter().enumerate() {
        if !filter.wants(&frame.device, frame.kind()) {
            continue;
        }
        out.push(match (&frame.body, &filter.sensors, shared) {
            (FrameBody::Telemetry(t), Some(sensors), _) => {
                let mut t = t.clone();
                t.readings.retain(|r| sensors.contains(&r.sensor));
                if t.readings.is_empty() {
                    continue;
                }
                let json = payload::telemetry_json(
                    &frame.device,
                    frame.epoch,
                    frame.seq,
                    frame.received_ms,
                    &t,
                );
                Bytes::from(payload::typed("telemetry", &json))
            }
            (_, _, Some(rendered)) => rendered[i].clone(),
            (_, _, None) => Bytes::from(frame.to_json()),
        });
    }
    out
}

/// Queues the messages an event holds for this client; returns how many.
async fn queue(
    socket: &mut WebSocket,
    filter: &Filter,
    event: &LiveEvent,
    budget: &Budget,
) -> Result<usize, axum::Error> {
    let mut n = 0;
    match event {
        LiveEvent::Frames(batch) => {
            if filter.batch && filter.wants_everything() {
                // The whole commit as one message, built once for every such client.
                let joined = batch.joined().await.clone();
                budget.take(joined.len()).await;
                if let Ok(t) = Utf8Bytes::try_from(joined) {
                    socket.feed(Message::Text(t)).await?;
                    n += 1;
                }
                return Ok(n);
            }
            let frames = frame_jsons(filter, batch).await;
            if frames.is_empty() {
                return Ok(0);
            }
            if filter.batch {
                let joined = payload::batch(frames.iter().map(|b| &b[..]));
                budget.take(joined.len()).await;
                socket.feed(text(joined)).await?;
                return Ok(1);
            }
            budget.take(frames.iter().map(Bytes::len).sum()).await;
            for json in frames {
                if let Ok(t) = Utf8Bytes::try_from(json) {
                    socket.feed(Message::Text(t)).await?;
                    n += 1;
                }
            }
        }
        LiveEvent::Status(s) => {
            if filter.wants(&s.device, "status") {
                socket.feed(text(status(s))).await?;
                n += 1;
            }
        }
        LiveEvent::Outcome(o) => {
            if filter.wants(&o.device_id, "command") {
                let json = payload::command_result_json(
                    &o.device_id,
                    &o.command_id,
                    o.status,
                    &o.detail,
                    &[],
                    o.ts_ms,
                );
                socket.feed(text(payload::typed("command", &json))).await?;
                n += 1;
            }
        }
        LiveEvent::Anomaly(a) => {
            if filter.wants(a.device_id.as_deref().unwrap_or(""), "anomaly") {
                let json = payload::anomaly_json(a);
                socket.feed(text(payload::typed("anomaly", &json))).await?;
                n += 1;
            }
        }
    }
    Ok(n)
}

fn status(s: &StatusChange) -> Vec<u8> {
    let json = payload::status_json(
        Some(&s.device),
        s.online,
        s.ts_ms,
        Some(s.link),
        s.firmware_version.as_deref(),
    );
    payload::typed("status", &json)
}

async fn feed(mut socket: WebSocket, state: &ApiState) {
    let mut live = state.hub.subscribe();
    let mut filter = Filter::default();
    let mut ping = tokio::time::interval(state.live_ping);
    ping.tick().await;
    let reason = loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => {
                let close = CloseFrame { code: 1001, reason: Utf8Bytes::from_static("the gateway is shutting down") };
                let _ = tokio::time::timeout(Duration::from_secs(1), socket.send(Message::Close(Some(close)))).await;
                break "gateway shutting down";
            }
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(t))) => {
                    let reply = match serde_json::from_str::<Subscribe>(t.as_str()).map_err(|e| e.to_string()).and_then(Filter::from) {
                        Ok(f) => {
                            filter = f;
                            filter.describe()
                        }
                        Err(e) => serde_json::json!({"type": "error", "message": format!("expected a subscribe message {{\"devices\", \"sensors\", \"kinds\"}}: {e}")}),
                    };
                    if socket.send(text(reply.to_string().into_bytes())).await.is_err() {
                        break "write failed";
                    }
                }
                Some(Ok(Message::Close(_))) | None => break "client closed",
                Some(Ok(_)) => {} // pongs, pings (answered by the library), binary: ignored
                Some(Err(_)) => break "read failed",
            },
            event = live.recv() => {
                let sent = match event {
                    Ok(event) => tokio::time::timeout(WRITE_TIMEOUT, async {
                        let n = queue(&mut socket, &filter, &event, &state.live_budget).await?;
                        if n > 0 {
                            socket.flush().await?;
                        }
                        Ok::<_, axum::Error>(())
                    }).await,
                    Err(RecvError::Lagged(skipped)) => {
                        state.metrics.live_lagged.inc_by(skipped);
                        // Continue from live, not from the oldest message still buffered.
                        live = live.resubscribe();
                        let msg = serde_json::json!({"type": "lagged", "skipped": skipped}).to_string();
                        tokio::time::timeout(WRITE_TIMEOUT, socket.send(text(msg.into_bytes()))).await
                    }
                    Err(RecvError::Closed) => break "hub closed",
                };
                match sent {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break "write failed",
                    Err(_) => break "client stopped reading (write timeout)",
                }
            }
            _ = ping.tick() => {
                if socket.send(Message::Ping(bytes::Bytes::from_static(b"gw"))).await.is_err() {
                    break "write failed";
                }
            }
        }
    };
    tracing::debug!(reason, "live feed client left");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_byte_budget_holds_senders_to_its_rate() {
        let budget = Budget::new(1000);
        let start = tokio::time::Instant::now();
        for _ in 0..5 {
            budget.take(1000).await;
        }
        // A second's worth at once, then one message a second.
        assert_eq!(start.elapsed().as_secs(), 4);
        let free = Budget::new(0);
        free.take(usize::MAX).await;
        free.take(usize::MAX).await;
    }

    #[test]
    fn a_subscription_matches_devices_and_kinds() {
        let f = Filter::from(Subscribe {
            devices: Some(vec!["a".into()]),
            sensors: None,
            kinds: Some(vec!["telemetry".into(), "status".into()]),
            batch: false,
        })
        .unwrap();
        assert!(f.wants("a", "telemetry"));
        assert!(!f.wants("b", "telemetry"));
        assert!(!f.wants("a", "event"));
        assert!(Filter::default().wants("z", "command"));
        let err = Filter::from(Subscribe {
            kinds: Some(vec!["readings".into()]),
            ..Subscribe::default()
        })
        .unwrap_err();
        assert!(err.contains("readings"), "{err}");
    }
}
