//! The `api` bench: ingest with the operator API under use (20 WebSocket clients on the
//! live feed taking everything, and a client polling `/api/v1/stats` and a readings query
//! every 100 ms) against the same ingest with the API idle, in the same run. The API reads
//! committed data and the read pool only, so ingest should barely notice: the target is at
//! least 90 % of the idle figure, with the clients taking one message per frame (the
//! default) and again with each commit as one message (`{"batch": true}`), both measured.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;

use super::procs::{cpu_seconds, Gateway, API_TOKEN};
use super::{extra, fleet, measured_run, with_report, BenchOptions, Outcome};
use crate::run_fleet;

/// WebSocket clients of the loaded run.
const WS_CLIENTS: usize = 20;
/// Poll period of the HTTP client.
const POLL: Duration = Duration::from_millis(100);

#[derive(Default)]
struct SideLoad {
    stop: AtomicBool,
    ws_messages: AtomicU64,
    ws_lagged: AtomicU64,
    polls: AtomicU64,
    poll_errors: AtomicU64,
}

async fn ws_client(
    http: std::net::SocketAddr,
    side: Arc<SideLoad>,
    batch: bool,
) -> anyhow::Result<()> {
    let url = format!("ws://{http}/api/v1/live?token={API_TOKEN}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .context("connecting to the live feed")?;
    if batch {
        use futures::SinkExt;
        ws.send(tokio_tungstenite::tungstenite::Message::text(
            r#"{"batch": true}"#,
        ))
        .await
        .context("subscribing")?;
    }
    while !side.stop.load(Ordering::Relaxed) {
        match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) => {
                side.ws_messages.fetch_add(1, Ordering::Relaxed);
                if t.as_str().starts_with(r#"{"type":"lagged""#) {
                    side.ws_lagged.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(Some(Ok(_))) | Err(_) => {}
            Ok(Some(Err(_)) | None) => break,
        }
    }
    Ok(())
}

async fn poller(http: std::net::SocketAddr, device: String, side: Arc<SideLoad>) {
    let client = reqwest::Client::new();
    let mut tick = tokio::time::interval(POLL);
    // The device may not have connected yet at first: 404 counts as an answer until its
    // first readings come back.
    let mut device_seen = false;
    while !side.stop.load(Ordering::Relaxed) {
        tick.tick().await;
        for (path, readings) in [
            ("/api/v1/stats".to_owned(), false),
            (format!("/api/v1/devices/{device}/readings?limit=100"), true),
        ] {
            let status = client
                .get(format!("http://{http}{path}"))
                .bearer_auth(API_TOKEN)
                .send()
                .await
                .map(|r| r.status());
            let ok = match status {
                Ok(s) if s.is_success() => {
                    device_seen |= readings;
                    true
                }
                Ok(s) => readings && !device_seen && s == reqwest::StatusCode::NOT_FOUND,
                Err(_) => false,
            };
            let counter = if ok { &side.polls } else { &side.poll_errors };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What one run with the API under use gave.
struct Loaded {
    report: crate::Report,
    cpu: f64,
    side: Arc<SideLoad>,
    ws_failed: u64,
}

impl Loaded {
    /// This run's figures as extras named with `prefix`.
    fn extras(&self, out: &mut Outcome, prefix: &str, idle_rate: f64) {
        let side = &self.side;
        let mut put =
            |key: &str, value: serde_json::Value| extra(out, &format!("{prefix}{key}"), value);
        put("readings_per_s", self.report.readings_per_s.round().into());
        put(
            "ratio_to_idle",
            ((self.report.readings_per_s / idle_rate * 100.0).round() / 100.0).into(),
        );
        put(
            "ws_messages",
            side.ws_messages.load(Ordering::Relaxed).into(),
        );
        put(
            "ws_lagged_messages",
            side.ws_lagged.load(Ordering::Relaxed).into(),
        );
        put("http_polls", side.polls.load(Ordering::Relaxed).into());
        put(
            "http_poll_errors",
            side.poll_errors.load(Ordering::Relaxed).into(),
        );
    }
}

/// One ingest run with 20 live-feed clients (each commit as one message with `batch`, else
/// one message per frame) and the poller.
async fn loaded_run(o: &BenchOptions, args: &[String], batch: bool) -> anyhow::Result<Loaded> {
    let dir = tempfile::tempdir()?;
    let gw = Gateway::start(&o.gateway_bin, dir.path(), args).await?;
    let http = gw
        .http
        .context("the gateway printed no HTTP address (is http disabled?)")?;
    let side = Arc::new(SideLoad::default());
    let mut tasks = Vec::new();
    for _ in 0..WS_CLIENTS {
        tasks.push(tokio::spawn(ws_client(http, side.clone(), batch)));
    }
    let config = fleet(gw.addr, o, 0.0, o.seconds);
    let polling = tokio::spawn(poller(http, config.device_id(0), side.clone()));
    let cpu0 = cpu_seconds(gw.pid());
    let report = run_fleet(config).await;
    let cpu = cpu_seconds(gw.pid()) - cpu0;
    side.stop.store(true, Ordering::Relaxed);
    let mut ws_failed = 0;
    for t in tasks {
        if !matches!(t.await, Ok(Ok(()))) {
            ws_failed += 1;
        }
    }
    let _ = polling.await;
    gw.stop().await?;
    Ok(Loaded {
        report,
        cpu,
        side,
        ws_failed,
    })
}

/// Idle API, then the API under use (clients taking each commit as one message), then the
/// same with one message per frame (the headline); compares readings/s with the idle run.
pub async fn api(o: &BenchOptions, args: &[String]) -> anyhow::Result<Outcome> {
    let (idle, _, _) = measured_run(o, args, 0.0).await?;
    let batched = loaded_run(o, args, true).await?;
    let per_frame = loaded_run(o, args, false).await?;
    let idle_rate = idle.readings_per_s.max(1e-9);

    let mut out = with_report("api", &per_frame.report);
    out.cpu_s = per_frame.cpu;
    out.ceiling = idle.readings_per_s;
    out.ceiling_unit = "readings/s of the same ingest with the API idle".into();
    out.ratio = out.readings_per_s / idle_rate;
    out.target = ">= 0.90 of ingest with the API idle".into();
    out.met = out.ratio >= 0.90
        && batched.report.readings_per_s / idle_rate >= 0.90
        && idle.is_clean()
        && batched.report.is_clean()
        && per_frame.report.is_clean()
        && batched.ws_failed + per_frame.ws_failed == 0;
    extra(&mut out, "ws_clients", WS_CLIENTS as u64);
    extra(
        &mut out,
        "ws_clients_failed",
        batched.ws_failed + per_frame.ws_failed,
    );
    per_frame.extras(&mut out, "", idle_rate);
    batched.extras(&mut out, "batch_", idle_rate);
    Ok(out)
}
