//! After a run: check the gateway's SQLite store, through its stable `telemetry` view, against
//! what the devices were acknowledged. Every acknowledged Telemetry frame must be there
//! exactly once with all its readings; anything else is loss or duplication.

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use crate::Report;

/// What the store check found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verification {
    /// Acknowledged Telemetry frames checked.
    pub frames_checked: u64,
    /// Acknowledged frames missing, or stored with fewer readings than sent.
    pub frames_missing: u64,
    /// Acknowledged frames stored with more rows than readings (duplicates).
    pub frames_duplicated: u64,
    /// Up to ten examples, as "device seq N: found R rows, expected E".
    pub examples: Vec<String>,
}

impl Verification {
    /// No loss and no duplicates.
    pub fn is_clean(&self) -> bool {
        self.frames_missing == 0 && self.frames_duplicated == 0
    }
}

/// Opens the gateway's store at `db` read-only (the gateway may still be writing it).
pub fn open_store(db: &Path) -> Result<rusqlite::Connection, rusqlite::Error> {
    let conn = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    Ok(conn)
}

/// Checks the store at `db` (opened read-only) against `report`.
pub fn verify_db(db: &Path, report: &Report) -> Result<Verification, rusqlite::Error> {
    let conn = open_store(db)?;
    let mut stmt = conn.prepare(
        "SELECT seq, COUNT(*) FROM telemetry WHERE device_id = ?1 AND epoch = ?2 GROUP BY seq",
    )?;
    let mut v = Verification::default();
    for o in &report.outcomes {
        let stored: HashMap<u64, u64> = stmt
            .query_map(rusqlite::params![o.device_id, o.epoch as i64], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })?
            .collect::<Result<_, _>>()?;
        for seq in 1..=o.last_acked_seq {
            if o.result_seqs.contains(&seq) {
                continue;
            }
            v.frames_checked += 1;
            let rows = stored.get(&seq).copied().unwrap_or(0);
            let expected = o.readings_of(seq);
            if rows == expected {
                continue;
            }
            if rows < expected {
                v.frames_missing += 1;
            } else {
                v.frames_duplicated += 1;
            }
            if v.examples.len() < 10 {
                v.examples.push(format!(
                    "{} seq {seq}: found {rows} rows, expected {expected}",
                    o.device_id
                ));
            }
        }
    }
    Ok(v)
}

/// What the MQTT check found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MqttVerification {
    /// Acknowledged Telemetry frames checked.
    pub frames_checked: u64,
    /// Acknowledged frames never published.
    pub frames_missing: u64,
    /// Frames published more than once (allowed: the bridge is at-least-once).
    pub frames_repeated: u64,
    /// Telemetry messages received in all.
    pub messages: u64,
    /// Up to ten examples of missing frames, as "device epoch E seq N".
    pub examples: Vec<String>,
}

impl MqttVerification {
    /// Every acknowledged frame was published at least once.
    pub fn is_clean(&self) -> bool {
        self.frames_missing == 0
    }
}

/// Seen telemetry: (device, epoch) to how often each seq was published.
type Seen = HashMap<(String, u64), HashMap<u64, u32>>;

/// An MQTT subscription started before a run, collecting every telemetry message the
/// gateway publishes (JSON payloads with `device_id`, `epoch`, `seq` and `readings`).
pub struct MqttWatch {
    seen: std::sync::Arc<std::sync::Mutex<Seen>>,
    messages: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// `mqtt://HOST[:PORT]` to (host, port).
fn parse_mqtt_url(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url.strip_prefix("mqtt://").ok_or_else(|| {
        anyhow::anyhow!(
            "--verify-mqtt {url:?}: expected mqtt://HOST[:PORT] (TLS is not supported here)"
        )
    })?;
    let rest = rest.trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((host, port)) => Ok((
            host.trim_matches(['[', ']']).to_owned(),
            port.parse()
                .map_err(|_| anyhow::anyhow!("--verify-mqtt {url:?}: bad port {port:?}"))?,
        )),
        None => Ok((rest.to_owned(), 1883)),
    }
}

impl MqttWatch {
    /// Subscribes to `filter` on the broker at `url` and returns once the broker confirmed
    /// the subscription (within 10 s).
    pub async fn start(url: &str, filter: &str) -> anyhow::Result<Self> {
        Self::start_with(url, filter, false).await
    }

    /// [`MqttWatch::start`]; `durable` asks the broker to keep the subscription and its
    /// queued messages while the watch is away (a persistent session), so a broker that
    /// stops and starts again delivers what it had accepted. A session the broker lost is
    /// subscribed again on reconnect.
    pub async fn start_with(url: &str, filter: &str, durable: bool) -> anyhow::Result<Self> {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
        let (host, port) = parse_mqtt_url(url)?;
        let id = format!("firmware-sim-verify-{}", std::process::id());
        let mut options = MqttOptions::new(id, host, port);
        options.set_clean_session(!durable);
        options.set_keep_alive(std::time::Duration::from_secs(10));
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut events) = AsyncClient::new(options, 16);
        client.subscribe(filter, QoS::AtLeastOnce).await?;
        let seen: std::sync::Arc<std::sync::Mutex<Seen>> = Default::default();
        let messages = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel::<()>();
        let task = {
            let seen = seen.clone();
            let messages = messages.clone();
            let filter = filter.to_owned();
            tokio::spawn(async move {
                let mut subscribed_tx = Some(subscribed_tx);
                let mut connected_before = false;
                let mut lost = false;
                loop {
                    match events.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                            if connected_before && !ack.session_present {
                                let _ = client.try_subscribe(filter.as_str(), QoS::AtLeastOnce);
                            }
                            if lost {
                                tracing::info!("verify-mqtt: back on the broker");
                            }
                            connected_before = true;
                            lost = false;
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            if let Some(tx) = subscribed_tx.take() {
                                let _ = tx.send(());
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let Ok(msg) = serde_json::from_slice::<TelemetryMessage>(&p.payload)
                            else {
                                continue; // status, events, results: not telemetry
                            };
                            if msg.readings.is_none() {
                                continue;
                            }
                            messages.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                            *seen
                                .entry((msg.device_id, msg.epoch))
                                .or_default()
                                .entry(msg.seq)
                                .or_default() += 1;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            if !lost {
                                tracing::warn!(error = %e, "verify-mqtt: broker connection lost; reconnecting every 500 ms");
                                lost = true;
                            }
                            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                        }
                    }
                }
            })
        };
        match tokio::time::timeout(std::time::Duration::from_secs(10), subscribed).await {
            Ok(Ok(())) => Ok(Self {
                seen,
                messages,
                task,
            }),
            _ => {
                task.abort();
                anyhow::bail!("--verify-mqtt {url}: no subscription confirmed within 10 s")
            }
        }
    }

    /// Waits (up to `wait`) until every acknowledged Telemetry frame of `report` has been
    /// published, and says what was missing.
    pub async fn verify(&self, report: &Report, wait: std::time::Duration) -> MqttVerification {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let v = self.check(report);
            if v.is_clean() || tokio::time::Instant::now() >= deadline {
                return v;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    fn check(&self, report: &Report) -> MqttVerification {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut v = MqttVerification {
            messages: self.messages.load(std::sync::atomic::Ordering::Relaxed),
            ..Default::default()
        };
        let empty = HashMap::new();
        for o in &report.outcomes {
            let published = seen.get(&(o.device_id.clone(), o.epoch)).unwrap_or(&empty);
            for seq in 1..=o.last_acked_seq {
                if o.result_seqs.contains(&seq) {
                    continue;
                }
                v.frames_checked += 1;
                match published.get(&seq).copied().unwrap_or(0) {
                    0 => {
                        v.frames_missing += 1;
                        if v.examples.len() < 10 {
                            v.examples
                                .push(format!("{} epoch {} seq {seq}", o.device_id, o.epoch));
                        }
                    }
                    1 => {}
                    _ => v.frames_repeated += 1,
                }
            }
        }
        v
    }
}

impl Drop for MqttWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(serde::Deserialize)]
struct TelemetryMessage {
    device_id: String,
    epoch: u64,
    seq: u64,
    readings: Option<serde::de::IgnoredAny>,
}
