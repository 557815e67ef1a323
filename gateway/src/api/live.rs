//! `GET /api/v1/live`: the live WebSocket feed of what the store has committed, device
//! status changes and command outcomes, as JSON text messages in the MQTT payloads' shapes
//! with a `type` member (`telemetry`, `event`, `status`, `command`).
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
use futures::SinkExt;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::error::{ApiError, ErrorBody};
use super::ApiState;
use crate::live::{LiveEvent, StatusChange};
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
    /// Only these kinds: `telemetry`, `event`, `status`, `command`.
    pub kinds: Option<Vec<String>>,
}

const KINDS: [&str; 4] = ["telemetry", "event", "status", "command"];

/// A subscription, ready to match.
#[derive(Debug, Default)]
struct Filter {
    devices: Option<HashSet<String>>,
    sensors: Option<HashSet<String>>,
    kinds: Option<HashSet<&'static str>>,
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
        })
    }

    fn wants(&self, device: &str, kind: &str) -> bool {
        self.devices.as_ref().is_none_or(|d| d.contains(device))
            && self.kinds.as_ref().is_none_or(|k| k.contains(kind))
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

/// Queues the messages an event holds for this client; returns how many.
async fn queue(
    socket: &mut WebSocket,
    filter: &Filter,
    event: &LiveEvent,
) -> Result<usize, axum::Error> {
    let mut n = 0;
    match event {
        LiveEvent::Frames(batch) => {
            let wanted = batch
                .frames
                .iter()
                .filter(|f| filter.wants(&f.device, f.kind()))
                .count();
            if wanted == 0 {
                return Ok(0);
            }
            // Rendered once for all clients; a client that wants a few frames of a batch
            // nobody rendered yet renders just those, and a sensor filter needs a rendering
            // of its own.
            let shared = match (&filter.sensors, batch.rendered_now()) {
                (Some(_), _) => None,
                (None, Some(r)) => Some(r),
                (None, None) if wanted * 4 < batch.frames.len() => None,
                (None, None) => Some(batch.rendered().await),
            };
            for (i, frame) in batch.frames.iter().enumerate() {
                if !filter.wants(&frame.device, frame.kind()) {
                    continue;
                }
                let message = match (&frame.body, &filter.sensors, shared) {
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
                        text(payload::typed("telemetry", &json))
                    }
                    (_, _, Some(rendered)) => match Utf8Bytes::try_from(rendered[i].clone()) {
                        Ok(t) => Message::Text(t),
                        Err(_) => continue,
                    },
                    (_, _, None) => text(frame.to_json()),
                };
                socket.feed(message).await?;
                n += 1;
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
                        let n = queue(&mut socket, &filter, &event).await?;
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

    #[test]
    fn a_subscription_matches_devices_and_kinds() {
        let f = Filter::from(Subscribe {
            devices: Some(vec!["a".into()]),
            sensors: None,
            kinds: Some(vec!["telemetry".into(), "status".into()]),
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
