//! The bench never rots: every scenario runs for a second or two with a tiny fleet against
//! the gateway binary, and must produce its figures and lose nothing. How fast is never
//! asserted.

mod common;

use firmware_sim::bench::{self, BenchOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bench_scenario_produces_figures_and_loses_nothing() {
    let mosquitto = common::mqtt::mosquitto_or_skip("uplink and replay");
    let options = BenchOptions {
        gateway_bin: env!("CARGO_BIN_EXE_gateway").into(),
        seconds: 1.0,
        devices: 10,
        connections: 200,
        replay_outage: 1.0,
        cold_start_readings: 20_000,
        rounds: 2,
        ..BenchOptions::default()
    };
    let names: Vec<String> = bench::SCENARIOS
        .iter()
        .filter(|s| mosquitto || !matches!(**s, "uplink" | "replay"))
        .map(|s| s.to_string())
        .collect();
    let outcomes = bench::run(&names, &options, |_| {})
        .await
        .expect("bench runs");
    assert_eq!(outcomes.len(), names.len());
    for o in &outcomes {
        assert_eq!(o.unacked_frames, 0, "{}: nothing lost", o.scenario);
        assert!(
            o.ceiling > 0.0,
            "{}: a ceiling or budget to compare with",
            o.scenario
        );
        assert!(!o.target.is_empty());
        let json = serde_json::to_value(o).unwrap();
        for key in ["scenario", "readings_per_s", "ceiling", "ratio", "target"] {
            assert!(json.get(key).is_some(), "{}: JSON has {key}", o.scenario);
        }
        match o.scenario.as_str() {
            "ingest" | "latency" | "uplink" | "replay" => {
                assert!(o.readings_per_s > 0.0, "{}: readings flowed", o.scenario);
                assert!(
                    o.p99_ms > 0.0 && o.cpu_s > 0.0 && o.peak_rss_kib > 0,
                    "{}: {o:?}",
                    o.scenario
                );
            }
            "connections" => {
                assert_eq!(o.extra["connections"], 200);
                assert!(
                    o.extra["all_connected_s"].is_number(),
                    "every idle device connected: {o:?}"
                );
            }
            "cold-start" => assert!(o.extra["startup_s_median_of_3"].as_f64().unwrap() > 0.0),
            "api" => {
                assert!(o.readings_per_s > 0.0, "api: readings flowed");
                assert_eq!(o.extra["ws_clients_failed"], 0, "{o:?}");
                assert!(o.extra["ws_messages"].as_u64().unwrap() > 0, "{o:?}");
                assert!(o.extra["http_polls"].as_u64().unwrap() > 0, "{o:?}");
                assert_eq!(o.extra["http_poll_errors"], 0, "{o:?}");
            }
            "overload" => {
                assert!(o.readings_per_s > 0.0, "overload: readings flowed");
                assert_eq!(o.extra["store_check_missing"], 0, "{o:?}");
                assert_eq!(o.extra["store_check_duplicated"], 0, "{o:?}");
                assert!(o.extra["readings_produced"].as_u64().unwrap() > 0, "{o:?}");
            }
            "fairness" => {
                assert!(o.readings_per_s > 0.0, "fairness: the quiet devices flowed");
                assert!(o.extra["heavy_acked_readings_per_s"].as_f64().unwrap() > 0.0);
            }
            "anomaly" => {
                assert!(o.readings_per_s > 0.0, "anomaly: readings flowed");
                assert!(
                    o.extra["series"].as_f64().unwrap() > 0.0,
                    "the detector tracked series: {o:?}"
                );
                assert!(
                    o.extra["detector_cpu_share"].as_f64().unwrap() > 0.0,
                    "{o:?}"
                );
            }
            other => panic!("unexpected scenario {other}"),
        }
    }
    let uplink = outcomes.iter().find(|o| o.scenario == "uplink");
    if let Some(u) = uplink {
        assert_eq!(
            u.extra["backlog_after_drain"], 0,
            "the bridge caught up: {u:?}"
        );
    }
}
