//! The TCP accept loop: one session task per connection, framed with the delimited codec.
//!
//! Accept errors (such as running out of file descriptors) are logged once per burst and
//! retried after a pause; they never stop the listener. On shutdown the loop stops accepting
//! and returns the set of running sessions for the caller to drain.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use proto::v1::DeviceMessage;
use proto::DelimitedCodec;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use crate::session::{task, LinkKind, Shared};

/// Initial read buffer of a link, bytes: two or three typical frames (a Telemetry of 8
/// readings is ~180 bytes); it grows for larger frames. 2 KiB measured no faster on ingest
/// and cost 1.5 KiB more per idle link (BENCHMARKS.md).
const READ_BUFFER: usize = 512;
/// Initial write buffer of a link, bytes: acks and pongs are a few bytes each.
const WRITE_BUFFER: usize = 64;

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
                    let mut link = Framed::new(stream, DelimitedCodec::<DeviceMessage>::new(max_frame_bytes));
                    // tokio-util starts each buffer at 8 KiB; most links are idle or send small
                    // frames, so start small (they grow for large frames). 16 KiB -> under 1 KiB a link.
                    *link.read_buffer_mut() = BytesMut::with_capacity(READ_BUFFER);
                    *link.write_buffer_mut() = BytesMut::with_capacity(WRITE_BUFFER);
                    sessions.spawn(task::run(shared.clone(), link, LinkKind::Tcp, format!("tcp {peer}"), shutdown.clone()));
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
