//! The `overload` and `fairness` benches: a default gateway (pacing on, MQTT on through its
//! embedded broker) offered far more than it can take.
//!
//! `overload`: the ingest fleet, each device sampling at a rate that offers 3x the readings/s
//! `ingest` sustained in the same run. Paced devices keep sampling and send fewer, bigger
//! frames, so the gateway should ack at least 0.9 of `ingest`, with an ack p99 under 250 ms,
//! the store queue never full (its sessions never had to wait), and every acked reading in
//! the store exactly once. What the devices could not send is counted as dropped at the
//! devices (a device's buffer holds one frame).
//!
//! `fairness`: nine devices at a rate that together offers half of `ingest`, alone and then
//! beside one device offering twenty times as much (more than the gateway takes on its own):
//! the nine must keep their acked rate within 10 %.

use std::time::Duration;

use anyhow::Context;

use super::anomaly::metric;
use super::procs::{cpu_seconds, free_port, status_kib, Gateway};
use super::{extra, with_report, BenchOptions, Outcome};
use crate::{run_fleet, FleetConfig, Report};

/// A gateway on its defaults (pacing on, its embedded MQTT broker on a free port).
async fn default_gateway(o: &BenchOptions, dir: &std::path::Path) -> anyhow::Result<Gateway> {
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!("[mqtt.embedded]\nlisten = \"127.0.0.1:{}\"\n", free_port()?),
    )?;
    Gateway::start_paced(
        &o.gateway_bin,
        dir,
        &["--config".into(), config.display().to_string()],
    )
    .await
}

/// A fleet of `devices` sampling at `rate` frames' worth a second, ids from `prefix`.
fn paced_fleet(
    gw: &Gateway,
    o: &BenchOptions,
    devices: usize,
    rate: f64,
    prefix: &str,
) -> FleetConfig {
    FleetConfig {
        gateway: gw.addr.to_string(),
        devices,
        rate,
        readings: o.readings,
        duration: Duration::from_secs_f64(o.seconds),
        drain: Duration::from_secs(60),
        window: o.window,
        token: Some("bench".into()),
        prefix: prefix.into(),
        ramp: Duration::from_secs_f64((o.seconds / 4.0).min(1.0)),
        ..FleetConfig::default()
    }
}

async fn scrape(gw: &Gateway) -> anyhow::Result<String> {
    let http = gw.http.context("the gateway printed no HTTP address")?;
    Ok(reqwest::get(format!("http://{http}/metrics"))
        .await
        .context("scraping /metrics")?
        .text()
        .await?)
}

/// Readings/s `ingest` sustains (measured now unless given).
async fn ingest_rate(o: &BenchOptions, known: Option<f64>) -> anyhow::Result<f64> {
    if let Some(r) = known {
        return Ok(r);
    }
    let (r, _, _) = super::measured_run(o, &["--no-mqtt".to_owned()], 0.0).await?;
    Ok(r.readings_per_s)
}

/// The `overload` bench; `ingest` is the readings/s the ingest scenario sustained in this
/// run, if it ran.
pub async fn overload(o: &BenchOptions, ingest: Option<f64>) -> anyhow::Result<Outcome> {
    let ingest = ingest_rate(o, ingest).await?;
    let offered = 3.0 * ingest;
    let rate = offered / (o.devices as f64 * o.readings as f64);
    let dir = tempfile::tempdir()?;
    let gw = default_gateway(o, dir.path()).await?;
    let cpu0 = cpu_seconds(gw.pid());
    let r = run_fleet(paced_fleet(&gw, o, o.devices, rate, "bench-")).await;
    let cpu = cpu_seconds(gw.pid()) - cpu0;
    let rss = status_kib(gw.pid(), "VmHWM");
    let page = scrape(&gw).await?;
    gw.stop().await?;
    let check = crate::verify::verify_db(&dir.path().join("gateway.db"), &r)?;
    let queue_full = metric(&page, "gateway_store_queue_full_total");
    let mut out = with_report("overload", &r);
    out.cpu_s = cpu;
    out.peak_rss_kib = rss;
    out.ceiling = ingest;
    out.ceiling_unit = "readings/s ingest sustained (MQTT off, pacing off)".into();
    out.ratio = r.readings_per_s / ingest.max(1e-9);
    out.target = ">= 0.90 of ingest, ack p99 <= 250 ms, queue never full, no loss".into();
    out.met = out.ratio >= 0.90
        && r.ack_latency.p99_ms <= 250.0
        && queue_full == 0.0
        && check.is_clean()
        && r.is_clean()
        && r.readings_accounted();
    extra(&mut out, "offered_readings_per_s", offered.round());
    extra(&mut out, "rate_per_device", (rate * 10.0).round() / 10.0);
    extra(&mut out, "readings_produced", r.readings_produced);
    extra(&mut out, "readings_dropped_at_devices", r.readings_dropped);
    extra(
        &mut out,
        "readings_per_frame",
        (r.readings_per_frame() * 10.0).round() / 10.0,
    );
    extra(&mut out, "config_updates", r.config_updates);
    extra(&mut out, "store_queue_full", queue_full);
    extra(
        &mut out,
        "pacing_episodes",
        metric(&page, "gateway_pacing_episodes_total"),
    );
    extra(&mut out, "store_check_missing", check.frames_missing);
    extra(&mut out, "store_check_duplicated", check.frames_duplicated);
    extra(
        &mut out,
        "cpu_s_per_million_readings",
        super::per_million(cpu, r.readings_acked),
    );
    Ok(out)
}

/// Acked readings/s of the devices whose id starts with `prefix`.
fn rate_of(r: &Report, prefix: &str, seconds: f64) -> f64 {
    r.outcomes
        .iter()
        .filter(|d| d.device_id.starts_with(prefix))
        .map(|d| d.readings_acked as f64)
        .sum::<f64>()
        / seconds.max(1e-9)
}

/// One fairness run: nine quiet devices, and with `heavy` one more at 20x their rate.
async fn fairness_run(
    o: &BenchOptions,
    rate: f64,
    heavy: bool,
) -> anyhow::Result<(Report, Option<Report>)> {
    let dir = tempfile::tempdir()?;
    let gw = default_gateway(o, dir.path()).await?;
    let quiet = tokio::spawn(run_fleet(paced_fleet(&gw, o, 9, rate, "quiet-")));
    let loud =
        heavy.then(|| tokio::spawn(run_fleet(paced_fleet(&gw, o, 1, rate * 20.0, "heavy-"))));
    let quiet = quiet.await.context("quiet fleet")?;
    let loud = match loud {
        Some(task) => Some(task.await.context("heavy device")?),
        None => None,
    };
    gw.stop().await?;
    Ok((quiet, loud))
}

/// The `fairness` bench.
pub async fn fairness(o: &BenchOptions, ingest: Option<f64>) -> anyhow::Result<Outcome> {
    let ingest = ingest_rate(o, ingest).await?;
    let rate = ingest * 0.5 / (9.0 * o.readings as f64);
    let (alone, _) = fairness_run(o, rate, false).await?;
    let (beside, heavy) = fairness_run(o, rate, true).await?;
    let heavy = heavy.context("the heavy device's report")?;
    let seconds = o.seconds + (o.seconds / 4.0).min(1.0);
    let before = rate_of(&alone, "quiet-", seconds);
    let after = rate_of(&beside, "quiet-", seconds);
    let mut out = with_report("fairness", &beside);
    out.readings_per_s = after;
    out.ceiling = before;
    out.ceiling_unit = "readings/s of the nine quiet devices alone".into();
    out.ratio = after / before.max(1e-9);
    out.target = "the quiet devices keep >= 0.90 of their rate beside a 20x device".into();
    out.met = out.ratio >= 0.90 && alone.is_clean() && beside.is_clean() && heavy.is_clean();
    extra(
        &mut out,
        "rate_per_quiet_device",
        (rate * 10.0).round() / 10.0,
    );
    extra(
        &mut out,
        "heavy_offered_readings_per_s",
        (rate * 20.0 * o.readings as f64).round(),
    );
    extra(
        &mut out,
        "heavy_acked_readings_per_s",
        heavy.readings_per_s.round(),
    );
    extra(&mut out, "heavy_readings_dropped", heavy.readings_dropped);
    extra(&mut out, "quiet_readings_dropped", beside.readings_dropped);
    Ok(out)
}
