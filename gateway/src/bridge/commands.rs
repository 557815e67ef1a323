//! Commands down: requests published on the commands topic become stored commands, reach
//! the device's current link (or wait for its next connection), and get exactly one outcome
//! on the results topic.
//!
//! The MQTT event loop hands raw requests over a bounded channel with `try_send` (it never
//! waits); this task validates them, stores them, routes them through the registry, and closes
//! overdue commands as `timeout` (delivered, unanswered) or `expired` (never delivered).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Context;
use crate::session::state::check_name;
use crate::store::commands::{self, Inserted, NewCommand};
use crate::store::now_ms;

/// Commands waiting between the MQTT event loop and this task. Full-policy: drop the request,
/// count it in `commands_dropped` and log; the event loop must never wait.
pub const QUEUE: usize = 1024;

/// A request as it came off the broker.
#[derive(Debug)]
pub struct Incoming {
    /// The device named by the topic.
    pub device_id: String,
    /// The JSON payload.
    pub payload: Bytes,
}

#[derive(Deserialize)]
struct Request {
    id: String,
    name: String,
    #[serde(default)]
    params: serde_json::Value,
    timeout_ms: Option<u64>,
}

/// Checks a request; on failure returns the id to answer with (if any) and why.
fn parse(
    incoming: &Incoming,
    default_timeout: Duration,
    now: i64,
) -> Result<NewCommand, (String, String)> {
    let value: serde_json::Value = serde_json::from_slice(&incoming.payload)
        .map_err(|e| (String::new(), format!("not JSON: {e}")))?;
    let id = value
        .get("id")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    let request: Request = serde_json::from_value(value).map_err(|e| {
        (
            id.clone(),
            format!("expected {{\"id\", \"name\", \"params\", \"timeout_ms\"}}: {e}"),
        )
    })?;
    check_name("id", &request.id).map_err(|e| (id.clone(), e))?;
    check_name("name", &request.name).map_err(|e| (id.clone(), e))?;
    let timeout = request
        .timeout_ms
        .map_or(default_timeout, Duration::from_millis)
        .min(Duration::from_secs(365 * 24 * 3600));
    Ok(NewCommand {
        device_id: incoming.device_id.clone(),
        command_id: request.id,
        name: request.name,
        params: serde_json::to_vec(&request.params).unwrap_or_else(|_| b"null".to_vec()),
        deadline_ms: now + timeout.as_millis() as i64,
    })
}

/// Runs until `shutdown` or until the event loop side is gone.
pub async fn run(ctx: Arc<Context>, mut rx: mpsc::Receiver<Incoming>, shutdown: CancellationToken) {
    let mut deadline = next_deadline(&ctx).await;
    loop {
        let wait = deadline.map_or(Duration::from_secs(60), |d| {
            Duration::from_millis((d - now_ms()).clamp(0, 60_000) as u64)
        });
        tokio::select! {
            _ = shutdown.cancelled() => return,
            incoming = rx.recv() => {
                let Some(incoming) = incoming else { return };
                if let Some(due) = handle(&ctx, incoming).await {
                    deadline = Some(deadline.map_or(due, |d| d.min(due)));
                }
            }
            _ = tokio::time::sleep(wait) => {
                match commands::close_overdue(ctx.pool(), now_ms()).await {
                    Ok((closed, bytes)) if closed > 0 => {
                        ctx.backlog.added(bytes);
                        tracing::debug!(closed, "closed overdue commands");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "closing overdue commands failed"),
                }
                deadline = next_deadline(&ctx).await;
            }
        }
    }
}

async fn next_deadline(ctx: &Context) -> Option<i64> {
    match commands::next_deadline(ctx.pool()).await {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "reading command deadlines failed");
            Some(now_ms() + 1000)
        }
    }
}

/// Stores and routes one request; returns its deadline if it is now open.
async fn handle(ctx: &Context, incoming: Incoming) -> Option<i64> {
    let now = now_ms();
    ctx.metrics.commands_received.inc();
    let command = match parse(&incoming, ctx.config.command_timeout, now) {
        Ok(c) => c,
        Err((id, detail)) => {
            tracing::warn!(device = %incoming.device_id, %detail, "command rejected");
            reject(ctx, &incoming.device_id, &id, &detail, now).await;
            return None;
        }
    };
    match commands::insert(ctx.pool(), &command, now).await {
        Ok(Inserted::Open) => {
            let proto_command = proto::v1::Command {
                id: command.command_id.clone(),
                name: command.name.clone(),
                params: command.params.clone(),
                deadline_ms: command.deadline_ms.max(0) as u64,
            };
            // Offline (or a full queue): it waits in the store for the next connection.
            ctx.registry.send_command(&command.device_id, proto_command);
            Some(command.deadline_ms)
        }
        Ok(Inserted::Duplicate) => {
            tracing::debug!(device = %command.device_id, id = %command.command_id, "repeated command id; ignored");
            None
        }
        Ok(Inserted::UnknownDevice) => {
            reject(
                ctx,
                &command.device_id,
                &command.command_id,
                "unknown device",
                now,
            )
            .await;
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "storing a command failed");
            reject(
                ctx,
                &command.device_id,
                &command.command_id,
                "the gateway could not store the command",
                now,
            )
            .await;
            None
        }
    }
}

async fn reject(ctx: &Context, device_id: &str, id: &str, detail: &str, now: i64) {
    match commands::reject(ctx.pool(), device_id, id, detail, now).await {
        Ok(bytes) => ctx.backlog.added(bytes),
        Err(e) => tracing::error!(error = %e, "queueing a command rejection failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incoming(json: &str) -> Incoming {
        Incoming {
            device_id: "d1".into(),
            payload: Bytes::from(json.to_owned()),
        }
    }

    #[test]
    fn a_valid_request_becomes_a_command_with_a_deadline() {
        let c = parse(
            &incoming(r#"{"id":"c1","name":"reboot","params":{"delay":5},"timeout_ms":1500}"#),
            Duration::from_secs(60),
            1000,
        )
        .unwrap();
        assert_eq!(
            (c.command_id.as_str(), c.name.as_str(), c.deadline_ms),
            ("c1", "reboot", 2500)
        );
        assert_eq!(c.params, br#"{"delay":5}"#);
        let c = parse(
            &incoming(r#"{"id":"c2","name":"ping"}"#),
            Duration::from_secs(60),
            0,
        )
        .unwrap();
        assert_eq!((c.params.as_slice(), c.deadline_ms), (&b"null"[..], 60_000));
    }

    #[test]
    fn bad_requests_are_refused_with_their_id_when_there_is_one() {
        let d = Duration::from_secs(1);
        assert_eq!(parse(&incoming("not json"), d, 0).unwrap_err().0, "");
        assert_eq!(
            parse(&incoming(r#"{"id":"c3"}"#), d, 0).unwrap_err().0,
            "c3"
        );
        assert_eq!(
            parse(&incoming(r#"{"id":"","name":"x"}"#), d, 0)
                .unwrap_err()
                .0,
            ""
        );
        assert!(parse(&incoming(r#"{"id":"c4","name":"x","timeout_ms":-1}"#), d, 0).is_err());
    }
}
