//! The TCP accept loop: one session task per connection, framed with the delimited codec,
//! over TLS when `[tcp.tls]` is set (the handshake runs in the connection's task, never in
//! the accept loop).
//!
//! Accept errors (such as running out of file descriptors) are logged once per burst and
//! retried after a pause; they never stop the listener. On shutdown the loop stops accepting
//! and returns the set of running sessions for the caller to drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use proto::v1::DeviceMessage;
use proto::DelimitedCodec;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use crate::session::{task, LinkKind, Shared};

/// Initial read buffer of a link, bytes: a typical frame (a Telemetry of 8
/// readings is ~180 bytes); it grows for larger frames. 2 KiB measured no faster on ingest
/// and cost 1.5 KiB more per idle link (BENCHMARKS.md).
const READ_BUFFER: usize = 256;
/// Initial write buffer of a link, bytes: acks and pongs are a few bytes each.
const WRITE_BUFFER: usize = 64;

/// Accepts devices on `listener` until `shutdown`; returns the sessions still running.
/// With `tls`, every connection first completes a TLS handshake (within the hello timeout).
pub async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    max_frame_bytes: usize,
    tls: Option<crate::reload::SharedAcceptor>,
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
                    let _ = stream.set_nodelay(true);
                    // Two task types, so a plain link's task is not sized for a TLS one.
                    match &tls {
                        None => {
                            let link = framed(stream, max_frame_bytes);
                            sessions.spawn(task::run(shared.clone(), link, LinkKind::Tcp, peer.to_string(), shutdown.clone()));
                        }
                        Some(acceptor) => {
                            // The current certificate (a reload may have replaced it).
                            let acceptor = acceptor.read().unwrap_or_else(|e| e.into_inner()).clone();
                            sessions.spawn(serve_tls(shared.clone(), stream, peer, acceptor, max_frame_bytes, shutdown.clone()));
                        }
                    }
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

/// Frames a device stream with small starting buffers: tokio-util starts each at 8 KiB, but
/// most links are idle or send small frames (the buffers grow for large ones).
fn framed<S: AsyncRead + AsyncWrite>(
    stream: S,
    max_frame_bytes: usize,
) -> Framed<S, DelimitedCodec<DeviceMessage>> {
    let mut link = Framed::new(stream, DelimitedCodec::new(max_frame_bytes));
    *link.read_buffer_mut() = BytesMut::with_capacity(READ_BUFFER);
    *link.write_buffer_mut() = BytesMut::with_capacity(WRITE_BUFFER);
    link
}

/// One connection to a TLS listener: the handshake (within the hello timeout), then the
/// session.
async fn serve_tls(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    max_frame_bytes: usize,
    shutdown: CancellationToken,
) {
    let handshake = tokio::select! {
        _ = shutdown.cancelled() => return,
        r = tokio::time::timeout(shared.config.hello_timeout, acceptor.accept(stream)) => r,
    };
    let failure = match handshake {
        Ok(Ok(stream)) => {
            let link = framed(stream, max_frame_bytes);
            return task::run(shared, link, LinkKind::Tls, peer.to_string(), shutdown).await;
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no TLS handshake within the hello timeout".to_owned(),
    };
    // No error frame is possible before TLS is up: count it, log it (throttled), close.
    let metrics = &shared.metrics;
    metrics.tls_handshake_failures.inc();
    match metrics.tls_failure_log.check(crate::store::now_ms() as u64) {
        Some(unlogged) => tracing::warn!(
            %peer,
            unlogged,
            "TLS handshake failed: {failure} (a device without TLS, or one that does not trust this certificate?)"
        ),
        None => tracing::debug!(%peer, "TLS handshake failed: {failure}"),
    }
}
