//! Anomaly detection end to end: the shipped labelled scenarios through the real `gateway`
//! binary, scored by `firmware-sim score` against their labels over several seeds, with the
//! anomalies on MQTT, the API and `/metrics`; a clean scenario for false alarms; a burst of
//! wrong tokens as a `security` anomaly that gets its address refused.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::mqtt::{BrokerKind, Subscriber, TestBroker};
use common::*;
use firmware_sim::scenario::Scenario;
use firmware_sim::score::{self, LabelLine, Score};
use futures::StreamExt;
use proto::v1::ErrorCode;
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

fn shipped(name: &str) -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../firmware-sim/scenarios")
        .join(format!("{name}.toml"));
    Scenario::load(&path).unwrap_or_else(|e| panic!("{e:#}"))
}

async fn api(http: SocketAddr, path: &str) -> Value {
    api_get(http, path).await.1
}

/// Runs scenario `name` with `seed` through a gateway process (with `extra` flags); returns
/// its labels, its store's score and the store path, with the gateway still running.
async fn scored_run(
    name: &str,
    seed: u64,
    extra: &[&str],
) -> (
    Vec<LabelLine>,
    Score,
    PathBuf,
    GatewayProcess,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    let listen = format!("127.0.0.1:{}", free_port());
    let gw = GatewayProcess::start(&db, &listen, &dir.path().join("gateway.log"), extra).await;
    let mut scenario = shipped(name);
    scenario.seed = Some(seed);
    let report =
        firmware_sim::scenario::run_scenario(&scenario, &fleet(gw.addr), None, Default::default())
            .await
            .expect("the scenario runs");
    assert!(
        report.is_clean(),
        "{name} seed {seed}: {}",
        report.to_table()
    );
    let stored = firmware_sim::verify::verify_db(&db, &report).unwrap();
    assert!(
        stored.is_clean(),
        "detection must not cost data: {stored:?}"
    );
    // The labels as `scenario --labels` writes them.
    let labels: Vec<LabelLine> = report
        .labels()
        .map(|l| serde_json::from_value(serde_json::to_value(l).unwrap()).unwrap())
        .collect();
    // The detector decides right after commits; give the last ones a moment to be written.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let view = score::read_store(&db).expect("read the store");
    let s = score::score(&labels, &view, 0);
    (labels, s, db, gw, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelled_anomalies_are_found_over_several_seeds_and_clean_data_raises_nothing() {
    let broker = TestBroker::start(BrokerKind::Embedded).await;
    let url = broker.as_ref().map(TestBroker::url);
    let port: Option<u16> = url
        .as_ref()
        .and_then(|u| u.rsplit(':').next())
        .and_then(|p| p.parse().ok());
    let sub = match port {
        Some(p) => Some(Subscriber::start(p, "gateway/+/devices/+/anomalies").await),
        None => None,
    };
    let bridged: Vec<&str> = match &url {
        Some(u) => vec!["--mqtt", u.as_str()],
        None => Vec::new(),
    };
    // Four runs at once: three seeds of the labelled scenario (the first bridged to MQTT)
    // and the clean one.
    let (a, b, c, clean) = tokio::join!(
        scored_run("anomalies", 3, &bridged),
        scored_run("anomalies", 8, &[]),
        scored_run("anomalies", 13, &[]),
        scored_run("clean", 21, &[]),
    );
    for (seed, (labels, s, ..)) in [(3, &a), (8, &b), (13, &c)] {
        let table = s.table();
        for kind in score::KINDS {
            let k = &s.kinds[kind];
            assert!(
                k.labels >= 5,
                "seed {seed}: too few {kind} labels to judge\n{table}"
            );
            assert!(k.f1 >= 0.9, "seed {seed}: {kind} F1 {:.3}\n{table}", k.f1);
        }
        let spike = s.kinds["spike"].median_delay_intervals.unwrap();
        assert!(
            spike <= 3.0,
            "seed {seed}: spike delay {spike} readings\n{table}"
        );
        let dropout = s.kinds["dropout"].median_delay_intervals.unwrap();
        assert!(
            dropout <= 2.0,
            "seed {seed}: dropout delay {dropout} intervals\n{table}"
        );
        assert!(!labels.is_empty());
    }
    let (_, clean_score, ..) = &clean;
    assert!(clean_score.device_hours > 100.0, "{}", clean_score.table());
    assert!(
        clean_score.false_positives_per_device_hour <= 0.05,
        "false alarms on clean data:\n{}",
        clean_score.table()
    );

    // The first run's anomalies: the same on the API, in /metrics and (bridged) on MQTT.
    let (_, _, db, gw, _dir) = &a;
    let mut conn = open_db(db).await;
    let rows: Vec<(i64, String, Option<String>)> =
        sqlx::query_as("SELECT id, kind, device_id FROM anomalies ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert!(rows.len() >= 30, "{} anomalies", rows.len());
    let listed = api(gw.http, "/api/v1/anomalies?limit=10000").await;
    let listed = listed["anomalies"].as_array().unwrap();
    assert_eq!(listed.len(), rows.len());
    assert!(listed
        .iter()
        .all(|a| a["score"].as_f64().unwrap() > 0.0 && a["score"].as_f64().unwrap() <= 1.0));
    let spikes = api(gw.http, "/api/v1/anomalies?kind=spike&limit=10000").await;
    let spikes = spikes["anomalies"].as_array().unwrap();
    assert_eq!(spikes.len(), rows.iter().filter(|r| r.1 == "spike").count());
    let device = rows[0].2.clone().unwrap();
    let one = api(gw.http, &format!("/api/v1/anomalies?device={device}")).await;
    assert!(one["anomalies"]
        .as_array()
        .unwrap()
        .iter()
        .all(|a| a["device_id"] == device.as_str()));
    let bad = api(gw.http, "/api/v1/anomalies?kind=weird").await;
    assert!(
        bad["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("kind"),
        "{bad}"
    );
    let metrics = scrape(gw.http).await;
    let counted: f64 = metrics
        .iter()
        .filter(|(k, _)| k.starts_with("gateway_anomalies_total"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(
        counted as usize,
        rows.len(),
        "every anomaly counted once by kind"
    );
    assert_eq!(
        metrics.get("gateway_anomaly_skipped_batches_total"),
        Some(&0.0)
    );
    if let Some(sub) = &sub {
        let ids = |m: &[(String, Vec<u8>)]| {
            let mut ids: Vec<i64> = m
                .iter()
                .filter_map(|(_, body)| serde_json::from_slice::<Value>(body).ok())
                .filter_map(|v| v["id"].as_i64())
                .collect();
            ids.sort_unstable();
            ids.dedup();
            ids
        };
        let got = sub
            .wait_until(Duration::from_secs(30), |m| ids(m).len() >= rows.len())
            .await;
        assert_eq!(ids(&got), rows.iter().map(|r| r.0).collect::<Vec<_>>());
        assert!(got
            .iter()
            .all(|(topic, _)| topic.starts_with("gateway/test-gw/devices/")));
    } else if std::env::var_os("CI").is_some() {
        panic!("CI: the embedded MQTT broker did not start");
    }
}

#[tokio::test]
async fn a_burst_of_wrong_tokens_is_a_security_anomaly_and_its_address_is_refused() {
    let gw = TestGateway::start(|c| {
        c.anomaly.security.failures = 5;
        c.anomaly.security.penalty = Duration::from_secs(60);
    })
    .await;
    let mut req = format!("ws://{}/api/v1/live", gw.http)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {API_TOKEN}").parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("ws");
    for i in 0..5 {
        let mut c = RawClient::connect(gw.addr).await;
        c.send(hello("pump-7", "guessed-token", i)).await;
        assert_eq!(c.expect_error_and_close().await, ErrorCode::AuthFailed);
    }
    // The sixth link from this address is refused before it can say anything.
    let mut c = RawClient::connect(gw.addr).await;
    assert_eq!(c.expect_error_and_close().await, ErrorCode::LimitExceeded);
    assert!(gw.metrics.security_refused.get() >= 1);
    let anomaly = loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("an anomaly on the live feed within 20 s")
            .expect("open")
            .expect("message");
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["type"] == "anomaly" {
                break v;
            }
        }
    };
    assert_eq!(anomaly["kind"], "security");
    assert_eq!(anomaly["device_id"], "pump-7");
    assert_eq!(anomaly["peer"], "127.0.0.1");
    assert!(
        anomaly["detail"].as_str().unwrap().contains("AUTH_FAILED"),
        "{anomaly}"
    );
    let listed = api(gw.http, "/api/v1/anomalies?kind=security").await;
    assert_eq!(listed["anomalies"].as_array().unwrap().len(), 1, "{listed}");
    gw.stop().await;
}

/// A pump's pressure, steady with some noise: reading `i` of a fixed pseudo-random sequence.
fn pressure(i: u64) -> f64 {
    10.0 + ((i * 7919) % 100) as f64 / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_raises_no_burst_of_false_alarms_and_judges_at_once() {
    use firmware_sim::scenario::{SensorSpec, Waveform};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    let log = dir.path().join("gateway.log");
    let listen = format!("127.0.0.1:{}", free_port());
    // Steady sensors with noise: the same physical signal before and after the restart.
    let sensors = vec![
        SensorSpec {
            noise: 0.5,
            ..SensorSpec::plain("temperature", Waveform::Constant { value: 20.0 })
        },
        SensorSpec {
            noise: 1.0,
            quantum: Some(0.5),
            ..SensorSpec::plain("voltage", Waveform::Constant { value: 230.0 })
        },
    ];
    let devices = firmware_sim::FleetConfig {
        devices: 10,
        rate: 10.0,
        readings: sensors.len(),
        sensors: Some(std::sync::Arc::new(sensors)),
        duration: Duration::from_secs(6),
        drain: Duration::from_secs(2),
        ..fleet(listen.parse().unwrap())
    };
    let mut seq = 0;
    for round in 0..2u64 {
        let gw = GatewayProcess::start(&db, &listen, &log, &[]).await;
        let fleet = tokio::spawn(firmware_sim::run_fleet(devices.clone()));
        // A pump of our own: 100 steady readings before the restart; after it, a spike at
        // its sixth reading, long before a series learning afresh could judge anything.
        let mut pump = RawClient::connect(gw.addr).await;
        pump.hello("pump-3", round + 1).await;
        let readings: Vec<f64> = if round == 0 {
            (0..100).map(pressure).collect()
        } else {
            (100..105)
                .map(pressure)
                .chain([50.0])
                .chain((105..108).map(pressure))
                .collect()
        };
        for (i, v) in readings.into_iter().enumerate() {
            seq = i as u64 + 1;
            pump.send(telemetry(seq, &[("pressure", v)])).await;
        }
        let report = fleet.await.unwrap();
        assert!(report.is_clean(), "round {round}: {}", report.to_table());
        tokio::time::sleep(Duration::from_millis(500)).await;
        let page = api(gw.http, "/api/v1/anomalies").await;
        let found = page["anomalies"].as_array().unwrap();
        let expected = if round == 0 { 0 } else { 1 };
        if found.len() != expected {
            // What the detector saw, for the failure message.
            let mut conn = open_db(&db).await;
            let a = &found[0];
            let rows: Vec<(i64, f64)> = sqlx::query_as(
                "SELECT ts_ms, value FROM telemetry WHERE device_id = ? AND sensor = ? ORDER BY ts_ms",
            )
            .bind(a["device_id"].as_str())
            .bind(a["sensor"].as_str())
            .fetch_all(&mut conn)
            .await
            .unwrap();
            panic!("round {round}: {page}\nits series: {rows:?}");
        }
        if round == 1 {
            assert_eq!(
                (found[0]["device_id"].as_str(), found[0]["kind"].as_str()),
                (Some("pump-3"), Some("spike"))
            );
            assert_eq!(found[0]["value"], 50.0);
        }
        assert_eq!(gw.terminate().await.code(), Some(0));
    }
    assert_eq!(seq, 9, "the last round sent 9 readings");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_flooding_far_above_its_usual_rate_is_a_traffic_anomaly() {
    let gw = TestGateway::start(|c| c.anomaly.traffic_window = Duration::from_secs(1)).await;
    let mut meter = RawClient::connect(gw.addr).await;
    meter.hello("meter-1", 1).await;
    let mut seq = 0;
    // Its usual pace: 10 frames a second for 8 windows.
    for _ in 0..80 {
        seq += 1;
        meter
            .send(telemetry(seq, &[("power", 5.0 + (seq % 3) as f64)]))
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Then a flood: 2 000 frames as fast as the link takes them, and a pause to close the
    // window.
    for _ in 0..2000 {
        seq += 1;
        meter
            .send(telemetry(seq, &[("power", 5.0 + (seq % 3) as f64)]))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    seq += 1;
    meter.send(telemetry(seq, &[("power", 5.0)])).await;
    let mut found = Value::Null;
    for _ in 0..100 {
        found = api(gw.http, "/api/v1/anomalies?kind=traffic").await;
        if !found["anomalies"].as_array().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let list = found["anomalies"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{found}");
    assert_eq!(list[0]["device_id"], "meter-1");
    assert_eq!(list[0]["detector"], "frame-rate");
    assert!(
        list[0]["detail"].as_str().unwrap().contains("frames/s"),
        "{found}"
    );
    assert_eq!(gw.metrics.anomalies(gateway::anomaly::Kind::Traffic), 1);
    gw.stop().await;
}
