//! The TCP accept loop: one session task per connection, framed with the delimited codec.
//!
//! Accept errors (such as running out of file descriptors) are logged once per burst and
//! retried after a pause; they never stop the listener. On shutdown the loop stops accepting
//! and returns the set of running sessions for the caller to drain.

use std::sync::Arc;
use std::time::Duration;

use proto::v1::DeviceMessage;
use proto::DelimitedCodec;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use crate::session::{task, Shared};

/// Accepts devices on `listener` until `shutdown`; returns the sessions still running.
pub async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    max_frame_bytes: usize,
    shutdown: CancellationToken,
) -> JoinSet<()> {
    let mut sessions = JoinSet::new();
    let mut accept_errors_logged = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            // Reap finished sessions so the set does not grow.
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    accept_errors_logged = false;
                    shared.metrics.inc(&shared.metrics.connections_accepted);
                    let _ = stream.set_nodelay(true);
                    let link = Framed::new(stream, DelimitedCodec::<DeviceMessage>::new(max_frame_bytes));
                    sessions.spawn(task::run(shared.clone(), link, "tcp", format!("tcp {peer}"), shutdown.clone()));
                }
                Err(e) => {
                    if !accept_errors_logged {
                        tracing::warn!(error = %e, "accepting a device connection failed; retrying");
                        accept_errors_logged = true;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    sessions
}
