//! One MQTT connection at a time, and the publisher that feeds it from the outbox.
//!
//! The supervisor builds a fresh rumqttc client and event loop per connection (clean
//! session), polls the event loop in its own task and does only non-blocking bookkeeping
//! there: pairing PUBACKs with outbox rows ([`Tracker`]), handing command requests on with
//! `try_send`. On ConnAck it starts a publisher task that subscribes, announces the gateway
//! and device status, then streams the outbox from the durable cursor. When the connection
//! drops, the publisher is stopped, rumqttc's queued requests die with the old client, and
//! the next connection replays everything past the cursor: at least once, in order.
//!
//! A cursor task deletes acknowledged rows in batches, which is what makes the cursor
//! durable.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use rumqttc::{AsyncClient, ClientError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::commands::Incoming;
use super::tracker::Tracker;
use super::{payload, Context, StatusChange};
use crate::store::now_ms;
use crate::store::outbox::{self, Kind};

/// Outbox rows read per query.
const READ_BATCH: i64 = 256;

type SharedTracker = Arc<Mutex<Tracker>>;
type StatusRx = Arc<tokio::sync::Mutex<mpsc::Receiver<StatusChange>>>;

fn lock(tracker: &SharedTracker) -> std::sync::MutexGuard<'_, Tracker> {
    tracker.lock().unwrap_or_else(|e| e.into_inner())
}

/// Moves the watermark forward (never back).
fn advance(watermark: &watch::Sender<i64>, to: i64) {
    watermark.send_if_modified(|w| {
        let forward = to > *w;
        if forward {
            *w = to;
        }
        forward
    });
}

/// Runs connections until `shutdown`; then says goodbye (retained `offline`) and returns.
pub async fn run(
    ctx: Arc<Context>,
    options: MqttOptions,
    start: i64,
    status_rx: mpsc::Receiver<StatusChange>,
    commands_tx: mpsc::Sender<Incoming>,
    shutdown: CancellationToken,
) {
    let (watermark_tx, watermark_rx) = watch::channel(start);
    let cursor = tokio::spawn(cursor_task(ctx.clone(), watermark_rx, start));
    let status_rx: StatusRx = Arc::new(tokio::sync::Mutex::new(status_rx));
    let broker = format!(
        "{}:{}",
        options.broker_address().0,
        options.broker_address().1
    );
    let mut backoff = ctx.config.reconnect_min;
    let mut failure_logged = false;
    let mut commands_full_logged = false;

    while !shutdown.is_cancelled() {
        let (client, mut eventloop) =
            AsyncClient::new(options.clone(), usize::from(ctx.config.inflight));
        let tracker: SharedTracker = Arc::new(Mutex::new(Tracker::new(*watermark_tx.borrow())));
        let mut publisher: Option<JoinHandle<()>> = None;
        let mut connected = false;
        let failure = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break None,
                event = eventloop.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connected = true;
                        failure_logged = false;
                        backoff = ctx.config.reconnect_min;
                        ctx.metrics.mqtt_connected.set(1);
                        ctx.metrics.mqtt_connects.inc();
                        info!(%broker, "connected to the MQTT broker");
                        let start_after = lock(&tracker).watermark();
                        let publisher_task = publish(
                            ctx.clone(), client.clone(), tracker.clone(), status_rx.clone(), watermark_tx.clone(), start_after,
                        );
                        publisher = Some(tokio::spawn(async move {
                            if let Err(e) = publisher_task.await {
                                debug!(error = %e, "publisher stopped");
                            }
                        }));
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        if let Some(w) = lock(&tracker).on_outgoing(pkid) {
                            advance(&watermark_tx, w);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(w) = lock(&tracker).on_puback(ack.pkid) {
                            advance(&watermark_tx, w);
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Some(device) = ctx.topics.commands_fleet_wide().then(|| ctx.topics.owner_device(&p.topic)).flatten() {
                            on_claim(&ctx, &client, device, &p.payload);
                            continue;
                        }
                        let Some(device_id) = ctx.topics.command_device(&p.topic) else {
                            debug!(topic = %p.topic, "ignoring a message on an unexpected topic");
                            continue;
                        };
                        if ctx.released().contains(device_id) {
                            debug!(device = %device_id, "ignoring a command for a device another gateway claimed");
                            continue;
                        }
                        let incoming = Incoming { device_id: device_id.to_owned(), payload: p.payload };
                        if commands_tx.try_send(incoming).is_err() {
                            ctx.metrics.commands_dropped.inc();
                            if !commands_full_logged {
                                warn!("command queue full: dropping commands (counted in commands_dropped)");
                                commands_full_logged = true;
                            }
                        } else {
                            commands_full_logged = false;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => break Some(e.to_string()),
                }
            }
        };
        if let Some(p) = publisher.take() {
            p.abort();
            let _ = p.await;
        }
        ctx.metrics.mqtt_connected.set(0);
        let Some(failure) = failure else {
            if connected {
                say_goodbye(&ctx, &client, &mut eventloop, &tracker, &watermark_tx).await;
            }
            break;
        };
        // Status changes the stopped publisher held may be lost: republish all on reconnect.
        ctx.resync.store(true, Ordering::Relaxed);
        if connected {
            warn!(%broker, error = %failure, "lost the MQTT broker; reconnecting (data waits in the store)");
        } else if !failure_logged {
            warn!(%broker, error = %failure, "cannot reach the MQTT broker; retrying with back-off (data waits in the store)");
        } else {
            debug!(%broker, error = %failure, "MQTT connection attempt failed");
        }
        failure_logged = true;
        let wait = backoff.mul_f64(rand::rng().random_range(0.5..1.5));
        backoff = (backoff * 2).min(ctx.config.reconnect_max);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    drop(watermark_tx); // lets the cursor task make its last deletion and stop
    let _ = cursor.await;
}

/// Another gateway's claim on a device (fleet-wide commands): unless the device is connected
/// here, its commands are that gateway's from now on. Runs on the event loop: no waiting.
/// Claims arrive in order with commands, so a command after a claim is never taken here.
fn on_claim(ctx: &Context, client: &AsyncClient, device: &str, payload: &[u8]) {
    #[derive(serde::Deserialize)]
    struct Claim {
        gateway_id: String,
    }
    let Ok(claim) = serde_json::from_slice::<Claim>(payload) else {
        debug!(%device, "ignoring an owner claim that is not {{\"gateway_id\": ...}}");
        return;
    };
    if claim.gateway_id == ctx.config.gateway_id || ctx.registry.get(device).is_some() {
        return;
    }
    if ctx.released().insert(Arc::from(device)) {
        let _ = client.try_unsubscribe(ctx.topics.commands(device));
        info!(%device, gateway = %claim.gateway_id, "device is on another gateway now; its commands go there");
    }
}

/// Publishes the gateway's `offline` and disconnects, waiting briefly for the broker.
async fn say_goodbye(
    ctx: &Context,
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    tracker: &SharedTracker,
    watermark: &watch::Sender<i64>,
) {
    let _ = client.try_publish(
        ctx.topics.gateway_status(),
        QoS::AtLeastOnce,
        true,
        "offline",
    );
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some(w) = lock(tracker).on_puback(ack.pkid) {
                        advance(watermark, w);
                    }
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// Hands what the broker acknowledged to the writer, which deletes those outbox rows between
/// its batches, at most every 50 ms, until the watermark's sender is dropped. Once the writer
/// has stopped (gateway shutdown), deletes them itself: no writer is left to contend with.
async fn cursor_task(ctx: Arc<Context>, mut watermark: watch::Receiver<i64>, start: i64) {
    let mut confirmed = start;
    loop {
        let closed = watermark.changed().await.is_err();
        if !closed {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let upto = *watermark.borrow_and_update();
        if upto > confirmed {
            confirmed = upto;
            if !ctx.backlog.confirm(upto) {
                match outbox::delete_upto(ctx.pool(), upto).await {
                    Ok((rows, bytes)) => ctx.backlog.published(rows, bytes),
                    Err(e) => {
                        error!(error = %e, "advancing the MQTT cursor failed; rows will be published again")
                    }
                }
            }
        }
        if closed {
            return;
        }
    }
}

/// One QoS 1 publish, tagged for the tracker.
async fn send(
    client: &AsyncClient,
    tracker: &SharedTracker,
    outbox_id: Option<i64>,
    topic: String,
    retain: bool,
    payload: Vec<u8>,
) -> Result<(), ClientError> {
    lock(tracker).push(outbox_id);
    client
        .publish(topic, QoS::AtLeastOnce, retain, payload)
        .await
}

struct Publisher {
    ctx: Arc<Context>,
    client: AsyncClient,
    tracker: SharedTracker,
    /// Per-device command (and owner) subscriptions made on this connection (when the
    /// commands topic is fleet-wide, not scoped by the gateway id).
    subscribed: Option<HashSet<Arc<str>>>,
}

impl Publisher {
    /// Claims a device that connected here (fleet-wide commands): retained, so gateways that
    /// subscribe later see it too.
    async fn claim(&mut self, device: &Arc<str>) -> Result<(), ClientError> {
        if self.ctx.released().remove(device) {
            if let Some(subscribed) = &mut self.subscribed {
                subscribed.remove(device);
            }
        }
        let body = serde_json::json!({
            "gateway_id": self.ctx.config.gateway_id,
            "ts_ms": now_ms(),
        });
        send(
            &self.client,
            &self.tracker,
            None,
            self.ctx.topics.owner(device),
            true,
            body.to_string().into_bytes(),
        )
        .await
    }

    async fn status(&mut self, change: &StatusChange) -> Result<(), ClientError> {
        if change.online && self.subscribed.is_some() {
            self.claim(&change.device).await?;
        }
        let body = crate::payload::status_json(
            None,
            change.online,
            change.ts_ms,
            Some(change.link),
            change.firmware_version.as_deref(),
        );
        send(
            &self.client,
            &self.tracker,
            None,
            self.ctx.topics.status(&change.device),
            true,
            body,
        )
        .await?;
        self.subscribe(std::slice::from_ref(&change.device)).await
    }

    async fn subscribe(&mut self, devices: &[Arc<str>]) -> Result<(), ClientError> {
        let Some(subscribed) = &mut self.subscribed else {
            return Ok(());
        };
        let new: Vec<_> = {
            let released = self.ctx.released();
            devices
                .iter()
                .filter(|d| !released.contains(*d) && subscribed.insert((*d).clone()))
                .collect()
        };
        // A device's owner topic first: its retained claim reaches the event loop before
        // any command on the same subscription can.
        for chunk in new.chunks(100) {
            let topics = &self.ctx.topics;
            let filters = chunk.iter().flat_map(|d| {
                [
                    rumqttc::SubscribeFilter::new(topics.owner(d), QoS::AtLeastOnce),
                    rumqttc::SubscribeFilter::new(topics.commands(d), QoS::AtLeastOnce),
                ]
            });
            self.client
                .subscribe_many(filters.collect::<Vec<_>>())
                .await?;
        }
        Ok(())
    }

    /// Publishes every owned device's status (online ones from the registry) and makes sure
    /// each is subscribed for commands.
    async fn resync(&mut self) -> Result<(), ClientError> {
        let online: std::collections::HashMap<Arc<str>, &'static str> =
            self.ctx.registry.online().into_iter().collect();
        let owned: Vec<String> =
            sqlx::query_scalar("SELECT device_id FROM devices ORDER BY device_id")
                .fetch_all(self.ctx.pool())
                .await
                .unwrap_or_else(|e| {
                    error!(error = %e, "listing devices for the status resync failed");
                    Vec::new()
                });
        let mut devices: Vec<Arc<str>> = owned.into_iter().map(Arc::from).collect();
        devices.extend(
            online
                .keys()
                .filter(|d| !devices.contains(d))
                .cloned()
                .collect::<Vec<_>>(),
        );
        // Devices here are claimed again (a claim may have been lost with the connection);
        // devices another gateway claimed are its to announce.
        if self.subscribed.is_some() {
            for device in online.keys() {
                self.claim(device).await?;
            }
        }
        {
            let released = self.ctx.released();
            devices.retain(|d| !released.contains(d));
        }
        let now = now_ms();
        for device in &devices {
            let link = online.get(device).copied();
            let body = crate::payload::status_json(None, link.is_some(), now, link, None);
            send(
                &self.client,
                &self.tracker,
                None,
                self.ctx.topics.status(device),
                true,
                body,
            )
            .await?;
        }
        self.subscribe(&devices).await
    }
}

/// The publisher of one connection: subscriptions, status, then the outbox from
/// `start_after`. Ends when the client's event loop is gone (the connection dropped).
async fn publish(
    ctx: Arc<Context>,
    client: AsyncClient,
    tracker: SharedTracker,
    status_rx: StatusRx,
    watermark: watch::Sender<i64>,
    start_after: i64,
) -> Result<(), ClientError> {
    // The previous connection's publisher was stopped before this one started.
    let mut status_rx = status_rx.lock().await;
    let wildcard = ctx.topics.commands_wildcard();
    if let Some(filter) = &wildcard {
        client.subscribe(filter.clone(), QoS::AtLeastOnce).await?;
    }
    let mut p = Publisher {
        ctx: ctx.clone(),
        client,
        tracker,
        subscribed: wildcard.is_none().then(HashSet::new),
    };
    send(
        &p.client,
        &p.tracker,
        None,
        ctx.topics.gateway_status().to_owned(),
        true,
        b"online".to_vec(),
    )
    .await?;
    ctx.resync.store(false, Ordering::Relaxed);
    p.resync().await?;

    let mut position = start_after;
    loop {
        if ctx.resync.swap(false, Ordering::Relaxed) {
            p.resync().await?;
        }
        while let Ok(change) = status_rx.try_recv() {
            p.status(&change).await?;
        }
        let rows = match outbox::read_after(ctx.pool(), position, READ_BATCH).await {
            Ok(rows) => rows,
            Err(e) => {
                error!(error = %e, "reading the outbox failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if rows.is_empty() {
            let added = ctx.backlog.added.notified();
            tokio::select! {
                _ = added => {}
                change = status_rx.recv() => if let Some(change) = change { p.status(&change).await? },
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
            continue;
        }
        for row in &rows {
            position = row.id;
            let topic = match row.kind {
                Kind::Telemetry => ctx.topics.telemetry(&row.device_id),
                Kind::Event => ctx.topics.events(&row.device_id),
                Kind::CommandResult => ctx.topics.command_results(&row.device_id),
                Kind::Anomaly => ctx.topics.anomalies(&row.device_id),
            };
            match payload::render(row, ctx.config.payload) {
                Ok(body) => send(&p.client, &p.tracker, Some(row.id), topic, false, body).await?,
                Err(e) => {
                    warn!(id = row.id, error = %e, "an outbox row does not decode; skipped");
                    ctx.metrics.uplink_skipped.inc();
                    let w = lock(&p.tracker).skip(row.id);
                    advance(&watermark, w);
                }
            }
        }
    }
}
