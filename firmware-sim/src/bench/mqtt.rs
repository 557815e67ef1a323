//! MQTT measurements: a counting subscriber, and the broker ceiling (a plain rumqttc client
//! publishing QoS 1 as fast as PUBACKs allow).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

/// Counts telemetry messages and their bytes, with the first and last arrival.
#[derive(Default)]
pub struct Counter {
    /// Messages received.
    pub messages: AtomicU64,
    /// Payload bytes received.
    pub bytes: AtomicU64,
    times: Mutex<(Option<Instant>, Option<Instant>)>,
}

impl Counter {
    /// Messages per second between the first and the last arrival.
    pub fn rate(&self) -> f64 {
        let (first, last) = *self.times.lock().unwrap_or_else(|e| e.into_inner());
        match (first, last) {
            (Some(f), Some(l)) if l > f => {
                self.messages.load(Ordering::Relaxed) as f64 / (l - f).as_secs_f64()
            }
            _ => 0.0,
        }
    }

    /// Average payload size in bytes.
    pub fn average_size(&self) -> usize {
        let n = self.messages.load(Ordering::Relaxed).max(1);
        (self.bytes.load(Ordering::Relaxed) / n) as usize
    }

    /// Waits until `n` messages arrived or `limit` passed; returns whether they did.
    pub async fn wait_for(&self, n: u64, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.messages.load(Ordering::Relaxed) < n {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

/// Subscribes to `filter` on the broker at `port` (reconnecting while it is away) and counts
/// what arrives. Returns once subscribed, or after 10 s.
pub async fn subscribe(port: u16, filter: &str) -> (Arc<Counter>, tokio::task::JoinHandle<()>) {
    let mut options = MqttOptions::new(
        format!("bench-sub-{port}-{}", std::process::id()),
        "127.0.0.1",
        port,
    );
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let counter = Arc::new(Counter::default());
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let task = {
        let counter = counter.clone();
        let filter = filter.to_owned();
        tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let now = Instant::now();
                        counter.messages.fetch_add(1, Ordering::Relaxed);
                        counter
                            .bytes
                            .fetch_add(p.payload.len() as u64, Ordering::Relaxed);
                        let mut times = counter.times.lock().unwrap_or_else(|e| e.into_inner());
                        times.0.get_or_insert(now);
                        times.1 = Some(now);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), ready_rx).await;
    (counter, task)
}

/// Publishes QoS 1 messages of `size` bytes for `seconds` with `inflight` outstanding, as
/// fast as PUBACKs come back; returns PUBACKs per second.
pub async fn broker_ceiling(
    port: u16,
    size: usize,
    seconds: f64,
    inflight: u16,
) -> anyhow::Result<f64> {
    let mut options = MqttOptions::new(
        format!("bench-pub-{port}-{}", std::process::id()),
        "127.0.0.1",
        port,
    );
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(inflight)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, usize::from(inflight));
    let payload = vec![b'x'; size.max(1)];
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if client
                    .publish("bench/ceiling", QoS::AtLeastOnce, false, payload.clone())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        })
    };
    let mut acks = 0u64;
    let mut start = None;
    let run = Duration::from_secs_f64(seconds.max(0.5));
    let result = tokio::time::timeout(run + Duration::from_secs(10), async {
        loop {
            match eventloop
                .poll()
                .await
                .context("broker ceiling connection")?
            {
                Event::Incoming(Packet::ConnAck(_)) => start = Some(Instant::now()),
                Event::Incoming(Packet::PubAck(_)) => {
                    acks += 1;
                    if start.is_some_and(|s| s.elapsed() >= run) {
                        return Ok::<_, anyhow::Error>(acks as f64 / run.as_secs_f64());
                    }
                }
                Event::Outgoing(Outgoing::Disconnect) => anyhow::bail!("disconnected"),
                _ => {}
            }
        }
    })
    .await
    .context("the broker ceiling run did not finish")?;
    stop.store(true, Ordering::Relaxed);
    publisher.abort();
    result
}
