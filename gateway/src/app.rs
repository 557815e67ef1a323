//! Wiring: opens the store, starts the writer, serves device links, logs a periodic summary,
//! and shuts everything down in order within the configured deadline.
//!
//! Takes an already-bound listener, a validated config and a shutdown token; reads no config
//! file and installs no signal handler (that is `main.rs`'s job), so tests run it in-process.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use crate::admin;
use crate::anomaly::task::Detector;
use crate::anomaly::traffic::Guard;
use crate::api::{self, auth::Token, ApiState};
use crate::auth::Authenticator;
use crate::bridge;
use crate::broker;
use crate::commands::Desk;
use crate::config::{AuthMode, Config};
use crate::link::{serial, tcp};
use crate::live::Hub;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::session::{Shared, Timers};
use crate::stats::Stats;
use crate::store::devices;
use crate::store::outbox::Backlog;
use crate::store::{writer, Store};

/// Everything `serve` needs besides the config.
pub struct Inputs {
    /// The validated configuration.
    pub config: Config,
    /// The bound device TCP listener.
    pub listener: TcpListener,
    /// The fleet secret, if fleet tokens are on.
    pub fleet_secret: Option<Vec<u8>>,
    /// Counters; pass your own to read them afterwards.
    pub metrics: Arc<Metrics>,
    /// The bound HTTP listener of the operator API, and its token; `None`: no HTTP.
    pub http: Option<(TcpListener, String)>,
    /// New configurations to apply while running (SIGHUP), already validated.
    pub reloads: Option<tokio::sync::mpsc::Receiver<Config>>,
    /// Sets the log filter on reload; `None` when `RUST_LOG` decides.
    pub log: Option<crate::reload::LogFilter>,
}

/// Runs the gateway until `shutdown` is cancelled, then drains and returns.
pub async fn serve(inputs: Inputs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let Inputs {
        config,
        listener,
        fleet_secret,
        metrics,
        http,
        reloads,
        log,
    } = inputs;
    let tls = match &config.tcp.tls {
        Some(t) => Some(Arc::new(std::sync::RwLock::new(
            tokio_rustls::TlsAcceptor::from(crate::tls::server_config(&t.cert_file, &t.key_file)?),
        ))),
        None => None,
    };
    let db_path = config.db_path();
    let store = Store::open_checked(
        &db_path,
        config.store.durability,
        config.store.check_at_start,
    )
    .await
    .with_context(|| format!("opening the store {}", db_path.display()))?;
    let writer_conn = store
        .writer_connection()
        .context("opening the store writer's connection")?;
    if let Some(max) = config.store.max_bytes {
        crate::store::limit_size(&writer_conn, max).context("applying store.max_bytes")?;
    }
    let registry = Arc::new(Registry::default());
    for device in crate::store::commands::devices_with_open_commands(store.pool())
        .await
        .context("reading open commands")?
    {
        registry.expect_commands(&device);
    }
    let hub = Hub::new(config.http.live_buffer);
    // The bridge outlives the sessions and the writer on shutdown, so it stops on its own
    // token.
    let bridge_shutdown = CancellationToken::new();
    let broker_url = if config.mqtt.enabled {
        Some(match &config.mqtt.url {
            Some(url) => url.clone(),
            None if config.mqtt.embedded.enabled => {
                let listen = config.mqtt.embedded.listen;
                tokio::task::spawn_blocking(move || broker::start(listen)).await??
            }
            None => anyhow::bail!(
                "mqtt.enabled is true, but mqtt.url is unset and the embedded broker is off: set mqtt.url, or mqtt.enabled = false"
            ),
        })
    } else {
        None
    };
    let backlog = match &broker_url {
        Some(_) => Some(Arc::new(
            Backlog::load(
                store.pool(),
                config.mqtt.backlog.max_bytes,
                config.mqtt.backlog.when_full,
                metrics.clone(),
            )
            .await
            .context("reading the MQTT backlog")?,
        )),
        None => None,
    };
    let desk = Arc::new(Desk::new(
        store.pool().clone(),
        registry.clone(),
        metrics.clone(),
        hub.clone(),
        backlog.clone(),
        config.mqtt.command_timeout,
    ));
    let bridge = match (broker_url, &backlog) {
        (Some(url), Some(backlog)) => {
            tracing::info!(%url, gateway_id = %config.mqtt.gateway_id, backlog_bytes = backlog.bytes(), "bridging to MQTT");
            Some(
                bridge::spawn(
                    bridge::Parts {
                        config: config.mqtt.clone(),
                        url,
                        pool: store.pool().clone(),
                        backlog: backlog.clone(),
                        registry: registry.clone(),
                        metrics: metrics.clone(),
                        commands: desk.clone(),
                    },
                    bridge_shutdown.clone(),
                )
                .await
                .context("starting the MQTT bridge")?,
            )
        }
        _ => None,
    };
    // The detector subscribes before the writer starts, so it sees every committed batch.
    let (anomaly_tx, anomaly_rx) = tokio::sync::mpsc::channel(config.anomaly.queue);
    let (burst_tx, burst_rx) = tokio::sync::mpsc::channel(64);
    let guard = Arc::new(Guard::new(config.anomaly.guard_policy(), burst_tx));
    let detector = if config.anomaly.enabled {
        let detector = Detector::new(
            config.anomaly.clone(),
            // Its warm-up reads recent readings of every new series: a pool of its own.
            store.side_pool(1),
            anomaly_tx,
            metrics.clone(),
        )
        .await
        .context("starting the anomaly detector")?;
        Some((detector, hub.subscribe()))
    } else {
        drop(anomaly_tx);
        None
    };
    let checkpointer = store
        .checkpointer(metrics.clone())
        .context("starting the WAL checkpointer")?;
    let (retention_tx, retention_rx) = tokio::sync::watch::channel(config.store.retention);
    let (writer, writer_task) = writer::spawn(
        writer_conn,
        writer::WriterParts {
            queue_frames: config.store.queue_frames,
            batch_max_frames: config.store.batch_max_frames,
            queue_readings: config.store.queue_readings,
            batch_max_readings: config.store.batch_max_readings,
            backlog: backlog.clone(),
            retention: retention_rx,
            metrics: metrics.clone(),
            hub: hub.clone(),
            anomalies: anomaly_rx,
            checkpoint: Some(checkpointer.handle()),
        },
    );
    if config.session.slow_report_interval.is_some() {
        tracing::warn!("session.slow_report_interval is deprecated: it now sets pacing.max_interval (\"0s\": pacing.enabled = false); set those instead");
    }
    if config.auth.mode == AuthMode::None {
        tracing::warn!("auth.mode = none: every device is accepted without checking its token");
    }
    let shutdown_timeout = config.shutdown.timeout;
    let pace = Arc::new(crate::pacing::PaceStatus::new(&config.pacing));
    let (hellos, hellos_rx) = tokio::sync::mpsc::channel(devices::HELLO_QUEUE);
    let hello_recorder = tokio::spawn(devices::record_hellos(store.pool().clone(), hellos_rx));
    let limits = Arc::new(crate::limits::Limits::new(
        config.limits.clone(),
        config.session.hello_timeout,
        metrics.clone(),
    ));
    limits.set_devices(
        devices::count(store.pool())
            .await
            .context("counting the store's devices")?,
    );
    let shared = Arc::new(Shared {
        writer,
        auth: Authenticator::new(config.auth.mode, fleet_secret, store.pool().clone()),
        registry,
        metrics: metrics.clone(),
        pool: store.pool().clone(),
        reads: store.side_pool(2),
        config: Timers {
            hello_timeout: config.session.hello_timeout,
            idle_timeout: config.session.idle_timeout,
            write_timeout: config.session.write_timeout,
            drain_timeout: shutdown_timeout / 2,
        },
        bridge: bridge.as_ref().map(|(handle, _)| handle.clone()),
        hub: hub.clone(),
        hellos,
        guard,
        limits,
    });
    // Background parts stop on their own token, after the links have drained.
    let background = CancellationToken::new();
    let stats = Arc::new(Stats::new(
        metrics.clone(),
        shared.writer.probe(),
        store.pool().clone(),
        db_path.clone(),
        config.mqtt.enabled,
    ));
    let sampler = tokio::spawn(stats.clone().run(background.clone()));
    let detector = match detector {
        Some((detector, live)) => tokio::spawn(detector.run(live, burst_rx, background.clone())),
        None => tokio::spawn(async move { drop(burst_rx) }),
    };
    let deadlines = tokio::spawn(desk.clone().run_deadlines(background.clone()));
    let revocations = tokio::spawn(admin::watch_revocations(
        store.pool().clone(),
        shared.registry.clone(),
        background.clone(),
    ));
    let http_task = match http {
        Some((listener, token)) => {
            let tls = match &config.http.tls {
                Some(t) => Some(crate::tls::server_config_for(
                    "http.tls",
                    &t.cert_file,
                    &t.key_file,
                )?),
                None => None,
            };
            let state = Arc::new(ApiState {
                pool: store.pool().clone(),
                registry: shared.registry.clone(),
                metrics: metrics.clone(),
                stats: stats.clone(),
                hub: hub.clone(),
                commands: desk.clone(),
                token: Token::new(&token),
                protect_all: config.http.protect_all,
                mqtt_enabled: config.mqtt.enabled,
                pace: pace.clone(),
                max_live_clients: config.http.max_live_clients,
                live_ping: config.http.live_ping,
                live_budget: api::live::Budget::new(config.http.live_max_bytes_per_s),
                shutdown: shutdown.clone(),
            });
            Some(tokio::spawn(api::serve(
                listener,
                tls,
                state,
                shutdown.clone(),
            )))
        }
        None => None,
    };
    let pacer = if config.pacing.enabled {
        tokio::spawn(crate::pacing::run(
            config.pacing.clone(),
            shared.registry.clone(),
            shared.writer.probe(),
            backlog.clone(),
            metrics.clone(),
            pace.clone(),
            shutdown.clone(),
        ))
    } else {
        tracing::info!("pacing is off: devices are held back by backpressure alone");
        tokio::spawn(async {})
    };
    let reporter = tokio::spawn(report_periodically(metrics.clone(), shutdown.clone()));

    let mut ports = tokio::task::JoinSet::new();
    for port in &config.serial {
        ports.spawn(serial::run_port(
            shared.clone(),
            port.clone(),
            config.tcp.max_frame_bytes,
            shutdown.clone(),
        ));
    }

    let reloader = reloads.map(|updates| {
        tokio::spawn(
            crate::reload::Reloader {
                current: config.clone(),
                limits: shared.limits.clone(),
                tls: tls.clone(),
                retention: retention_tx,
                log,
            }
            .run(updates),
        )
    });
    // Pings end when the stop begins (systemd watches a stopping service by TimeoutStopSec).
    let watchdog = tokio::spawn(crate::service::watchdog(
        shared.writer.probe(),
        shutdown.clone(),
    ));
    crate::service::ready();
    let mut sessions = tcp::accept_loop(
        listener,
        shared.clone(),
        config.tcp.max_frame_bytes,
        tls,
        shutdown.clone(),
    )
    .await;

    // Shutdown: sessions stop reading, wait for their commits, ack and close.
    crate::service::stopping();
    tracing::info!(
        links = sessions.len(),
        "shutting down: draining device links"
    );
    let deadline = tokio::time::Instant::now() + shutdown_timeout;
    let drained = timeout(shutdown_timeout, async {
        while sessions.join_next().await.is_some() {}
        while ports.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            links = sessions.len() + ports.len(),
            "shutdown deadline reached; closing the remaining links"
        );
        sessions.abort_all();
        ports.abort_all();
        while sessions.join_next().await.is_some() {}
        while ports.join_next().await.is_some() {}
    }
    // The last handle to the writer goes with `shared`; the writer then commits what it holds.
    drop(shared);
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    if timeout(remaining.max(Duration::from_secs(1)), writer_task)
        .await
        .is_err()
    {
        tracing::error!("the store writer did not finish in time; unacknowledged frames will be resent by devices");
    }
    let _ = tokio::task::spawn_blocking(move || checkpointer.stop()).await;
    // Then the bridge: it publishes the gateway's `offline` and records what the broker
    // acknowledged; the rest of the backlog waits in the store for the next start.
    bridge_shutdown.cancel();
    if let Some((_, task)) = bridge {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if timeout(remaining.max(Duration::from_secs(3)), task)
            .await
            .is_err()
        {
            tracing::warn!("the MQTT bridge did not stop in time");
        }
    }
    // The API finished its open requests when `shutdown` fired; bounded all the same.
    if let Some(task) = http_task {
        match timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the HTTP server failed"),
            Ok(Err(_)) | Err(_) => tracing::warn!("the HTTP server did not stop in time"),
        }
    }
    background.cancel();
    for task in [sampler, deadlines, revocations, detector, watchdog] {
        let _ = task.await;
    }
    let _ = timeout(Duration::from_secs(2), hello_recorder).await;
    reporter.abort();
    pacer.abort();
    if let Some(r) = reloader {
        r.abort();
    }
    log_summary(&metrics, "stopped");
    Ok(())
}

/// Logs one summary line a minute while anything changes.
async fn report_periodically(metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let mut last = (0, 0);
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = (metrics.frames_stored.get(), metrics.connections_total());
        if now != last {
            log_summary(&metrics, "running");
            last = now;
        }
    }
}

fn log_summary(metrics: &Metrics, state: &str) {
    tracing::info!(
        mqtt_connected = metrics.mqtt_connected.get(),
        uplink_published = metrics.uplink_published.get(),
        backlog_bytes = metrics.uplink_backlog_bytes.get(),
        uplink_dropped = metrics.uplink_dropped.get(),
        commands = metrics.commands_received.get(),
        sessions = metrics.sessions_active.get(),
        connections = metrics.connections_total(),
        frames_stored = metrics.frames_stored.get(),
        frames_duplicate = metrics.frames_duplicate.get(),
        readings_stored = metrics.readings_stored.get(),
        batches = metrics.batches_committed.get(),
        link_errors = ?metrics.link_error_summary(),
        "gateway {state}"
    );
}
