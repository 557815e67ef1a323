//! Serial links: one device per port, framed with COBS + CRC-32 ([`proto::serial`]).
//!
//! A bad frame (noise, a wrong baud rate) is dropped and counted, never acknowledged, and
//! decoding resumes at the next 0x00; only a configurable burst of bad frames in a row closes
//! the link. Each port has a supervisor: a port missing at start or unplugged later (USB) is
//! reopened with capped back-off, each change of state is logged once, and nothing about a
//! port ever stops the gateway. When a session ends the port is reopened for the next Hello.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures::{Sink, Stream, StreamExt};
use proto::serial::SerialCodec;
use proto::v1::{DeviceMessage, GatewayMessage};
use proto::CodecError;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_serial::SerialPortBuilderExt;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{FlowControl, Parity, SerialPortConfig};
use crate::metrics::Metrics;
use crate::session::{task, LinkKind, Shared};

/// A serial port's framed stream, with bad frames counted and skipped.
pub struct SerialLink<T> {
    inner: Framed<T, SerialCodec<DeviceMessage>>,
    /// Bad frames in a row so far.
    burst: u32,
    /// Bad frames in a row that close the link.
    max_burst: u32,
    metrics: Arc<Metrics>,
}

impl<T> SerialLink<T> {
    /// Frames `io` with messages of at most `max_frame_len` bytes.
    pub fn new(io: T, max_frame_len: usize, max_burst: u32, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Framed::new(io, SerialCodec::new(max_frame_len)),
            burst: 0,
            max_burst,
            metrics,
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Stream for SerialLink<T> {
    type Item = Result<DeviceMessage, CodecError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            match ready!(self.inner.poll_next_unpin(cx)) {
                None => return Poll::Ready(None),
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                Some(Ok(Ok(msg))) => {
                    self.burst = 0;
                    return Poll::Ready(Some(Ok(msg)));
                }
                Some(Ok(Err(bad))) => {
                    self.metrics.serial_bad_frames.inc();
                    self.burst += 1;
                    debug!(reason = %bad, in_a_row = self.burst, "serial frame dropped");
                    if self.burst >= self.max_burst {
                        return Poll::Ready(Some(Err(CodecError::NoisyLine(self.burst))));
                    }
                }
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Sink<GatewayMessage> for SerialLink<T> {
    type Error = CodecError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
        Sink::<GatewayMessage>::poll_ready(Pin::new(&mut self.inner), cx)
    }
    fn start_send(mut self: Pin<&mut Self>, item: GatewayMessage) -> Result<(), CodecError> {
        Pin::new(&mut self.inner).start_send(item)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
        Sink::<GatewayMessage>::poll_flush(Pin::new(&mut self.inner), cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), CodecError>> {
        Sink::<GatewayMessage>::poll_close(Pin::new(&mut self.inner), cx)
    }
}

fn open(port: &SerialPortConfig) -> Result<tokio_serial::SerialStream, tokio_serial::Error> {
    let data_bits = match port.data_bits {
        5 => tokio_serial::DataBits::Five,
        6 => tokio_serial::DataBits::Six,
        7 => tokio_serial::DataBits::Seven,
        _ => tokio_serial::DataBits::Eight,
    };
    tokio_serial::new(port.path.to_string_lossy(), port.baud)
        .data_bits(data_bits)
        .parity(match port.parity {
            Parity::None => tokio_serial::Parity::None,
            Parity::Odd => tokio_serial::Parity::Odd,
            Parity::Even => tokio_serial::Parity::Even,
        })
        .stop_bits(if port.stop_bits == 2 {
            tokio_serial::StopBits::Two
        } else {
            tokio_serial::StopBits::One
        })
        .flow_control(match port.flow_control {
            FlowControl::None => tokio_serial::FlowControl::None,
            FlowControl::Software => tokio_serial::FlowControl::Software,
            FlowControl::Hardware => tokio_serial::FlowControl::Hardware,
        })
        .open_native_async()
}

/// Keeps one port served until `shutdown`: open, run a session, reopen.
pub async fn run_port(
    shared: Arc<Shared>,
    port: SerialPortConfig,
    max_frame_len: usize,
    shutdown: CancellationToken,
) {
    let path = port.path.display().to_string();
    let first_wait = Duration::from_millis(500);
    let mut wait = first_wait;
    let mut unavailable = false;
    while !shutdown.is_cancelled() {
        match open(&port) {
            Ok(stream) => {
                if unavailable {
                    info!(port = %path, "serial port available again");
                } else {
                    debug!(port = %path, "serial port open");
                }
                unavailable = false;
                wait = first_wait;
                let link = SerialLink::new(
                    stream,
                    max_frame_len,
                    port.max_bad_frames,
                    shared.metrics.clone(),
                );
                task::run(
                    shared.clone(),
                    link,
                    LinkKind::Serial,
                    path.to_string(),
                    shutdown.clone(),
                )
                .await;
                // The session ended (device silent or gone, line too noisy): reopen shortly.
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
            Err(e) => {
                if !unavailable {
                    warn!(port = %path, error = %e, "serial port unavailable; retrying with back-off");
                    unavailable = true;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(port.reopen_max);
            }
        }
    }
}
