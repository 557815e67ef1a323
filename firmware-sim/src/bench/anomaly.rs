//! The `anomaly` bench: the ingest load with anomaly detection on (the default) against the
//! same load with it off (`--no-anomaly`), interleaved (off, on, off, on) so a shift of the
//! shared machine hits both alike. The detector reads committed batches beside the writer,
//! so ingest should barely notice: the target is at least 90 % of the speed with it off.
//! Also reported: the detector's share of the gateway's CPU time (its own busy time from
//! `/metrics` over the process's CPU seconds), the series it tracked, and memory per series
//! (the difference of peak RSS between the two, per series: an upper bound, since the
//! detector's batches also live longer).

use anyhow::Context;

use super::procs::{cpu_seconds, status_kib, Gateway};
use super::{extra, fleet, with_report, BenchOptions, Outcome};
use crate::run_fleet;

/// One ingest run; with detection on, also the detector's figures from `/metrics`.
struct Run {
    report: crate::Report,
    cpu: f64,
    rss_kib: u64,
    busy_s: f64,
    series: f64,
    skipped_batches: f64,
    anomalies: f64,
}

/// The value of the metric `name` (summed over its labels) in a Prometheus text page.
pub(crate) fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn one_run(o: &BenchOptions, args: &[String], detect: bool) -> anyhow::Result<Run> {
    let dir = tempfile::tempdir()?;
    let mut args = args.to_vec();
    if !detect {
        args.push("--no-anomaly".into());
    }
    let gw = Gateway::start(&o.gateway_bin, dir.path(), &args).await?;
    let cpu0 = cpu_seconds(gw.pid());
    let report = run_fleet(fleet(gw.addr, o, 0.0, o.seconds)).await;
    let cpu = cpu_seconds(gw.pid()) - cpu0;
    let rss_kib = status_kib(gw.pid(), "VmHWM");
    let http = gw.http.context("the gateway printed no HTTP address")?;
    let page = reqwest::get(format!("http://{http}/metrics"))
        .await
        .context("scraping /metrics")?
        .text()
        .await?;
    gw.stop().await?;
    Ok(Run {
        report,
        cpu,
        rss_kib,
        busy_s: metric(&page, "gateway_anomaly_busy_seconds_total"),
        series: metric(&page, "gateway_anomaly_series"),
        skipped_batches: metric(&page, "gateway_anomaly_skipped_batches_total"),
        anomalies: metric(&page, "gateway_anomalies_total"),
    })
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Off, on, off, on; compares the mean readings/s.
pub async fn anomaly(o: &BenchOptions, args: &[String]) -> anyhow::Result<Outcome> {
    let mut off = Vec::new();
    let mut on = Vec::new();
    for _ in 0..2 {
        off.push(one_run(o, args, false).await?);
        on.push(one_run(o, args, true).await?);
    }
    let rate = |runs: &[Run]| {
        mean(
            &runs
                .iter()
                .map(|r| r.report.readings_per_s)
                .collect::<Vec<_>>(),
        )
    };
    let (off_rate, on_rate) = (rate(&off), rate(&on));
    let last = &on[1];
    let mut out = with_report("anomaly", &last.report);
    out.readings_per_s = on_rate;
    out.cpu_s = last.cpu;
    out.peak_rss_kib = last.rss_kib;
    out.ceiling = off_rate;
    out.ceiling_unit =
        "readings/s of the same ingest with detection off (mean of 2, interleaved)".into();
    out.ratio = on_rate / off_rate.max(1e-9);
    out.target = ">= 0.90 of ingest with detection off".into();
    out.met = out.ratio >= 0.90 && off.iter().chain(&on).all(|r| r.report.is_clean());
    let judged: f64 = on.iter().map(|r| r.report.readings_acked as f64).sum();
    let busy: f64 = on.iter().map(|r| r.busy_s).sum();
    let cpu: f64 = on.iter().map(|r| r.cpu).sum();
    extra(
        &mut out,
        "readings_per_s_off",
        off.iter()
            .map(|r| r.report.readings_per_s.round())
            .collect::<Vec<_>>(),
    );
    extra(
        &mut out,
        "readings_per_s_on",
        on.iter()
            .map(|r| r.report.readings_per_s.round())
            .collect::<Vec<_>>(),
    );
    extra(
        &mut out,
        "detector_cpu_share",
        ((busy / cpu.max(1e-9)) * 1000.0).round() / 1000.0,
    );
    extra(
        &mut out,
        "detector_ns_per_reading",
        (busy / judged.max(1.0) * 1e9).round(),
    );
    extra(&mut out, "series", last.series);
    let rss_off = mean(&off.iter().map(|r| r.rss_kib as f64).collect::<Vec<_>>());
    let rss_on = mean(&on.iter().map(|r| r.rss_kib as f64).collect::<Vec<_>>());
    extra(
        &mut out,
        "rss_bytes_per_series_upper_bound",
        if last.series > 0.0 {
            ((rss_on - rss_off) * 1024.0 / last.series).round()
        } else {
            0.0
        },
    );
    extra(
        &mut out,
        "skipped_batches",
        on.iter().map(|r| r.skipped_batches).sum::<f64>(),
    );
    extra(
        &mut out,
        "anomalies_raised",
        on.iter().map(|r| r.anomalies).sum::<f64>(),
    );
    Ok(out)
}
