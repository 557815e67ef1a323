//! Commands down: requests published on the commands topic go to the gateway's command desk
//! ([`crate::commands`]), the same path HTTP commands take; refusals and outcomes come back
//! on the results topic.
//!
//! The MQTT event loop hands raw requests over a bounded channel with `try_send` (it never
//! waits); this task parses them and submits them to the desk.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Context;
use crate::commands::{Request, SubmitError};

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

/// Parses a request; on failure returns the id to answer with (if any) and why. Over MQTT
/// the id is required: it is how the caller matches the outcome.
fn parse(incoming: &Incoming) -> Result<(String, Request), (String, String)> {
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
    if request.id.as_deref().unwrap_or_default().is_empty() {
        return Err((id, "id must be a non-empty string".into()));
    }
    Ok((id, request))
}

/// Runs until `shutdown` or until the event loop side is gone.
pub async fn run(ctx: Arc<Context>, mut rx: mpsc::Receiver<Incoming>, shutdown: CancellationToken) {
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => return,
            incoming = rx.recv() => match incoming {
                Some(i) => i,
                None => return,
            },
        };
        handle(&ctx, incoming).await;
    }
}

async fn handle(ctx: &Context, incoming: Incoming) {
    let (id, request) = match parse(&incoming) {
        Ok(r) => r,
        Err((id, detail)) => {
            ctx.metrics.commands_received.inc();
            tracing::warn!(device = %incoming.device_id, %detail, "command rejected");
            ctx.commands.reject(&incoming.device_id, &id, &detail).await;
            return;
        }
    };
    let detail = match ctx.commands.submit(&incoming.device_id, request).await {
        Ok(_) => return,
        Err(SubmitError::Duplicate { device, id }) => {
            tracing::debug!(%device, %id, "repeated command id; ignored");
            return;
        }
        Err(SubmitError::Invalid { field, reason }) => {
            tracing::warn!(device = %incoming.device_id, %field, %reason, "command rejected");
            reason
        }
        Err(SubmitError::UnknownDevice(_)) => "unknown device".to_owned(),
        Err(SubmitError::Store(e)) => {
            tracing::error!(error = %e, "storing a command failed");
            "the gateway could not store the command".to_owned()
        }
    };
    ctx.commands.reject(&incoming.device_id, &id, &detail).await;
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
    fn a_valid_request_keeps_its_fields() {
        let (id, r) = parse(&incoming(
            r#"{"id":"c1","name":"reboot","params":{"delay":5},"timeout_ms":1500}"#,
        ))
        .unwrap();
        assert_eq!((id.as_str(), r.name.as_str()), ("c1", "reboot"));
        assert_eq!(r.timeout_ms, Some(1500));
        assert_eq!(r.params, serde_json::json!({"delay": 5}));
    }

    #[test]
    fn bad_requests_are_refused_with_their_id_when_there_is_one() {
        assert_eq!(parse(&incoming("not json")).unwrap_err().0, "");
        assert_eq!(parse(&incoming(r#"{"id":"c3"}"#)).unwrap_err().0, "c3");
        assert!(
            parse(&incoming(r#"{"name":"x"}"#)).is_err(),
            "id is required"
        );
        assert!(parse(&incoming(r#"{"id":"c4","name":"x","timeout_ms":-1}"#)).is_err());
    }
}
