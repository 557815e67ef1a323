//! The shipped scenarios (`firmware-sim/scenarios/`) against the real `gateway` binary and a
//! real broker: every acknowledged frame stored exactly once (checked through the
//! `telemetry` view) and published at least once (checked by a subscription started before
//! the run), with the faults each scenario promises visibly happening. Also: recording a run
//! and replaying it, the recording proxy, and seeded determinism.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::mqtt::{BrokerKind, TestBroker};
use common::pty::PtyPair;
use common::*;
use firmware_sim::gate::Gate;
use firmware_sim::record::{Recorder, Recording};
use firmware_sim::scenario::Scenario;
use firmware_sim::verify::MqttWatch;
use firmware_sim::{FleetConfig, Report};

fn shipped(name: &str) -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../firmware-sim/scenarios")
        .join(format!("{name}.toml"));
    Scenario::load(&path).unwrap_or_else(|e| panic!("{e:#}"))
}

/// A gateway process with its store and log in a temporary directory.
struct Site {
    dir: tempfile::TempDir,
    db: PathBuf,
    gw: GatewayProcess,
}

impl Site {
    async fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, extra).await
    }

    async fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Self {
        let db = dir.path().join("gateway.db");
        let listen = format!("127.0.0.1:{}", free_port());
        let gw = GatewayProcess::start(&db, &listen, &dir.path().join("gateway.log"), extra).await;
        Self { dir, db, gw }
    }

    fn devices(&self) -> FleetConfig {
        FleetConfig {
            gateway: self.gw.addr.to_string(),
            fleet_secret: Some(SECRET.into()),
            ..FleetConfig::default()
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }
}

/// Runs `scenario` against `site` and checks the store and, with `watch`, the uplink.
async fn run_and_verify(
    scenario: &Scenario,
    site: &Site,
    gate: Option<Arc<Gate>>,
    watch: Option<&MqttWatch>,
) -> Report {
    let report =
        firmware_sim::scenario::run_scenario(scenario, &site.devices(), gate, Default::default())
            .await
            .expect("the scenario runs");
    assert!(
        report.is_clean(),
        "{}: {}\n{}",
        scenario.name,
        report.to_table(),
        site.log()
    );
    assert!(report.frames_acked > 0, "{}", report.to_table());
    let stored = firmware_sim::verify::verify_db(&site.db, &report).unwrap();
    assert!(stored.is_clean(), "{}: {stored:?}", scenario.name);
    assert_eq!(stored.frames_checked, report.frames_acked);
    if let Some(watch) = watch {
        let published = watch.verify(&report, Duration::from_secs(60)).await;
        if !published.is_clean() {
            let log = site.log();
            let tail: String = log
                .chars()
                .skip(log.chars().count().saturating_sub(4000))
                .collect();
            panic!(
                "{}: {published:?}\ngateway log tail:\n{tail}",
                scenario.name
            );
        }
        assert_eq!(published.frames_checked, report.frames_acked);
    }
    report
}

/// The gateway bridged to a fresh embedded broker, and a subscription to it.
async fn bridged_site() -> Option<(TestBroker, Site, MqttWatch)> {
    let broker = TestBroker::start(BrokerKind::Embedded).await?;
    let url = broker.url();
    let watch = MqttWatch::start(&url, "#").await.expect("subscribe");
    let site = Site::start(&["--mqtt", &url]).await;
    Some((broker, site, watch))
}

fn error_count(report: &Report, code: &str) -> u64 {
    report.errors.get(code).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_is_stored_once_and_published() {
    let Some((_broker, site, watch)) = bridged_site().await else {
        return;
    };
    let report = run_and_verify(&shipped("smoke"), &site, None, Some(&watch)).await;
    assert_eq!(report.devices, 8, "both profiles ran");
    // The MQTT check can fail: a device nobody published is all missing.
    let mut ghost = report.clone();
    ghost.outcomes.truncate(1);
    ghost.outcomes[0].device_id = "ghost".into();
    let missing = watch.verify(&ghost, Duration::from_millis(300)).await;
    assert_eq!(missing.frames_missing, ghost.outcomes[0].last_acked_seq);
    // The step waveform stepped: meters reported 800 W before 2 s and 1500 W after.
    let mut conn = open_db(&site.db).await;
    let powers: Vec<f64> = sqlx::query_scalar(
        "SELECT DISTINCT value FROM telemetry WHERE sensor = 'power' ORDER BY value",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(powers, vec![800.0, 1500.0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_storm_with_reboots_loses_nothing() {
    let Some((_broker, site, watch)) = bridged_site().await else {
        return;
    };
    let report = run_and_verify(&shipped("storm"), &site, None, Some(&watch)).await;
    // 30 devices in the first storm and 60 in the second reconnect, at least.
    assert!(report.reconnects >= 90, "{}", report.to_table());
    assert_eq!(report.reboots, 6, "a tenth of 60 rebooted into a new epoch");
    let mut conn = open_db(&site.db).await;
    let streams: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT DISTINCT device_id, epoch FROM telemetry)",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(streams, 66, "each reboot is a new stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_fault_costs_only_its_device() {
    let Some((_broker, site, watch)) = bridged_site().await else {
        return;
    };
    let scenario = shipped("faults");
    let report = run_and_verify(&scenario, &site, None, Some(&watch)).await;
    // 20 % of 30 devices for each coded fault.
    assert_eq!(error_count(&report, "ERROR_CODE_MALFORMED_MESSAGE"), 6);
    assert_eq!(error_count(&report, "ERROR_CODE_FRAME_TOO_LARGE"), 6);
    assert_eq!(error_count(&report, "ERROR_CODE_AUTH_FAILED"), 6);
    assert_eq!(report.reboots, 3);
    // /metrics, read with a Prometheus parser, counts the same: every frame stored once,
    // every link error a device saw under its code.
    let metrics = scrape(site.gw.http).await;
    assert_eq!(
        metrics["gateway_frames_stored_total"] as u64,
        report.frames_acked
    );
    for (code, seen) in &report.errors {
        let name = code.trim_start_matches("ERROR_CODE_");
        let counted = metrics
            .get(&format!("gateway_link_errors_total{{code={name}}}"))
            .copied()
            .unwrap_or(0.0) as u64;
        assert!(
            counted >= *seen,
            "{code}: devices saw {seen}, /metrics counted {counted}"
        );
    }
    // Two samples of two sensors a frame; a frame sent after a gap (a reconnect, a full
    // window) carries every sample taken meanwhile, so whole multiples of four.
    for o in &report.outcomes {
        assert_eq!(o.readings_per_frame, 4, "two samples of two sensors");
        for (seq, n) in &o.frame_sizes {
            assert_eq!(n % 4, 0, "{} seq {seq}: {n} readings", o.device_id);
        }
    }
    assert!(report.readings_per_frame() >= 4.0);
    assert!(report.readings_accounted(), "{}", report.to_table());
    // Clock skew: some readings are stamped about an hour before the rest.
    let mut conn = open_db(&site.db).await;
    let (earliest, latest): (i64, i64) =
        sqlx::query_as("SELECT MIN(ts_ms), MAX(ts_ms) FROM telemetry")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert!(latest - earliest > 3_000_000, "{earliest}..{latest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anomalies_are_labelled_and_the_same_seed_gives_the_same_store() {
    // The first 15 s of it: about half a day of the boilers' lives (a frame is 5 minutes).
    let mut scenario = shipped("anomalies");
    scenario.duration = Duration::from_secs(15);
    let mut stores = Vec::new();
    let mut labels = Vec::new();
    for _ in 0..2 {
        let site = Site::start(&[]).await;
        let report = run_and_verify(&scenario, &site, None, None).await;
        let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
        for l in report.labels() {
            *by_kind
                .entry(serde_json::to_value(l.kind).unwrap().to_string())
                .or_default() += 1;
        }
        for kind in ["\"spike\"", "\"drift\"", "\"stuck\""] {
            assert!(by_kind.get(kind).is_some_and(|n| *n >= 3), "{by_kind:?}");
        }
        // A spike label points at readings that carry it: 8 above a 55..65 daily cycle at
        // its peak (6 h in).
        let spike = report
            .labels()
            .find(|l| format!("{:?}", l.kind) == "Spike" && l.sensor == "temperature")
            .unwrap()
            .clone();
        let mut conn = open_db(&site.db).await;
        let value: f64 = sqlx::query_scalar(
            "SELECT value FROM telemetry WHERE device_id = ? AND sensor = 'temperature' AND ts_ms = ?",
        )
        .bind(&spike.device_id)
        .bind(spike.from_ms as i64)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert!(value > 69.0, "spiked value {value}");
        let rows: Vec<(String, i64, String, f64, i64)> = sqlx::query_as(
            "SELECT device_id, seq, sensor, value, ts_ms FROM telemetry ORDER BY 1, 2, 3, 5",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        stores.push(rows);
        // Where each anomaly starts; one still under way when the run stops ends where the
        // wall clock cut it, which can differ by a frame.
        labels.push(
            report
                .labels()
                .map(|l| (l.device_id.clone(), l.sensor.clone(), l.kind, l.from_ms))
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(labels[0], labels[1], "same seed, same labels");
    // Runs last a wall-clock time, so a device may make a frame more in one of them; every
    // frame both made is the same.
    let last_seq = |rows: &[(String, i64, String, f64, i64)]| -> BTreeMap<String, i64> {
        let mut last = BTreeMap::new();
        for r in rows {
            let e = last.entry(r.0.clone()).or_insert(0);
            *e = (*e).max(r.1);
        }
        last
    };
    let (a, b) = (last_seq(&stores[0]), last_seq(&stores[1]));
    let common = |rows: &[(String, i64, String, f64, i64)]| {
        rows.iter()
            .filter(|r| r.1 <= a[&r.0].min(b[&r.0]))
            .cloned()
            .collect::<Vec<_>>()
    };
    let (first, second) = (common(&stores[0]), common(&stores[1]));
    assert!(first.len() > 1000, "{} readings compared", first.len());
    assert!(first == second, "same seed, same readings");
}

async fn broker_outage(kind: BrokerKind) {
    let Some(broker) = TestBroker::start(kind).await else {
        return;
    };
    let watch = MqttWatch::start(&broker.url(), "#")
        .await
        .expect("subscribe");
    let gate = Arc::new(
        Gate::start("127.0.0.1:0", &format!("127.0.0.1:{}", broker.port), true)
            .await
            .unwrap(),
    );
    let site = Site::start(&["--mqtt", &gate.url()]).await;
    let scenario = shipped("broker-outage");
    // The test keeps the gate, as the CLI does: the backlog crosses it after the run.
    let report = run_and_verify(&scenario, &site, Some(gate.clone()), Some(&watch)).await;
    assert!(report.frames_acked > 0);
    assert!(
        site.log().contains("broker"),
        "the gateway noticed the outage"
    );
    // Without a gate the scenario refuses to run rather than skip the outage.
    let err =
        firmware_sim::scenario::run_scenario(&scenario, &site.devices(), None, Default::default())
            .await
            .unwrap_err();
    assert!(format!("{err}").contains("--broker-gate"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_mid_run_loses_nothing_embedded() {
    broker_outage(BrokerKind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_mid_run_loses_nothing_mosquitto() {
    broker_outage(BrokerKind::Mosquitto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noisy_serial_lines_next_to_tcp_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_a) = PtyPair::named(dir.path(), "gw-0", "sim-serial-0").await else {
        return;
    };
    let Some(_b) = PtyPair::named(dir.path(), "gw-1", "sim-serial-1").await else {
        return;
    };
    let (gw0, gw1) = (
        dir.path().join("gw-0").display().to_string(),
        dir.path().join("gw-1").display().to_string(),
    );
    let ports = dir.path().to_path_buf();
    let site = Site::start_in(dir, &["--no-mqtt", "--serial", &gw0, "--serial", &gw1]).await;
    let mut scenario = shipped("noisy-serial");
    scenario.resolve_ports(&ports);
    let report = run_and_verify(&scenario, &site, None, None).await;
    assert_eq!(report.devices, 6);
    assert!(report.frames_resent > 0, "noise made devices resend");
    assert_eq!(report.reboots, 1, "{}", report.to_table());
    // The rebooted serial device said Hello again on its open port: a second epoch stored.
    let mut conn = open_db(&site.db).await;
    let epochs: Vec<(String, i64)> = sqlx::query_as(
        "SELECT device_id, COUNT(DISTINCT epoch) FROM telemetry WHERE device_id LIKE 'rs485-%' GROUP BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    // Two devices, one rebooted: three sequence spaces in the report. Each one the gateway
    // acknowledged a frame of is in the store (the new epoch may have none if the reboot's
    // Hello met the line noise and the pulled cable before the run ended).
    let serial: Vec<_> = report
        .outcomes
        .iter()
        .filter(|d| d.device_id.starts_with("rs485-"))
        .collect();
    assert_eq!(serial.len(), 3, "{}", report.to_table());
    let acked_epochs = serial.iter().filter(|d| d.frames_acked > 0).count() as i64;
    assert!(acked_epochs >= 2, "{}", report.to_table());
    assert_eq!(
        epochs.iter().map(|(_, n)| n).sum::<i64>(),
        acked_epochs,
        "stored epochs: {epochs:?}"
    );
}

/// (device, epoch, seq, sensor, value, ts) of every stored reading.
async fn readings(db: &Path) -> Vec<Row> {
    let mut conn = open_db(db).await;
    sqlx::query_as(
        "SELECT device_id, epoch, seq, sensor, value, ts_ms FROM telemetry ORDER BY 1, 2, 3, 4, 6",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_run_replays_into_the_same_store() {
    let site = Site::start(&[]).await;
    let path = site.dir.path().join("run.jsonl");
    let recorder = Recorder::create(&path).unwrap();
    let report = firmware_sim::scenario::run_scenario(
        &shipped("smoke"),
        &FleetConfig {
            recorder: Some(recorder.clone()),
            ..site.devices()
        },
        None,
        Default::default(),
    )
    .await
    .unwrap();
    assert!(report.is_clean(), "{}", report.to_table());
    recorder.finish().unwrap();
    let original = readings(&site.db).await;

    let replica = Site::start(&[]).await;
    let recording = Recording::load(&path).unwrap();
    assert_eq!(recording.connections(), 8);
    let replayed = firmware_sim::record::replay(recording, &replica.gw.addr.to_string(), 4.0).await;
    assert_eq!(replayed.connect_failures, 0);
    assert_eq!(replayed.hello_acks, 8);
    assert!(replayed.errors.is_empty(), "{replayed:?}");
    assert_same_readings(&readings(&replica.db).await, &original);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_records_field_traffic_for_replay() {
    let site = Site::start(&[]).await;
    let path = site.dir.path().join("field.jsonl");
    let recorder = Recorder::create(&path).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let proxy = tokio::spawn({
        let recorder = recorder.clone();
        let upstream = site.gw.addr.to_string();
        async move {
            firmware_sim::record::proxy(listener, &upstream, Default::default(), recorder, async {
                let _ = stopped.await;
            })
            .await
        }
    });
    // "Field devices": a fleet that only knows the proxy's address, with a bad device too.
    let report = firmware_sim::run_fleet(FleetConfig {
        gateway: proxy_addr.clone(),
        devices: 5,
        rate: 20.0,
        readings: 3,
        duration: Duration::from_secs(2),
        prefix: "field-".into(),
        ..site.devices()
    })
    .await;
    assert!(report.is_clean(), "{}", report.to_table());
    let mut bad = RawClient::connect(proxy_addr.parse().unwrap()).await;
    bad.send_raw(&[0xff; 12]).await;
    assert_eq!(
        bad.expect_error_and_close().await,
        proto::v1::ErrorCode::BadFraming
    );
    let _ = stop.send(());
    assert_eq!(proxy.await.unwrap(), 6);
    recorder.finish().unwrap();

    let replica = Site::start(&[]).await;
    let replayed = firmware_sim::record::replay(
        Recording::load(&path).unwrap(),
        &replica.gw.addr.to_string(),
        0.0,
    )
    .await;
    assert_eq!(replayed.connections, 6);
    assert_eq!(
        replayed.errors.get("ERROR_CODE_BAD_FRAMING"),
        Some(&1),
        "the garbage is replayed too: {replayed:?}"
    );
    assert_same_readings(&readings(&replica.db).await, &readings(&site.db).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_as_fast_as_possible_keeps_each_devices_reconnections_in_order() {
    // Each device sent seq 1..=5, lost its link, and resent 3..=8 on the next one.
    let site = Site::start(&[]).await;
    let path = site.dir.path().join("reconnects.jsonl");
    let recorder = Recorder::create(&path).unwrap();
    let devices = 20;
    let link = |device: &str, seqs: std::ops::RangeInclusive<u64>| {
        let token = proto::token::fleet_token(SECRET.as_bytes(), device);
        let mut bytes = delimited(&hello(device, &token, 7));
        for seq in seqs {
            bytes.extend(delimited(&telemetry(seq, &[("t", seq as f64)])));
        }
        bytes
    };
    for i in 0..devices {
        let device = format!("re-{i:02}");
        let first = recorder.open();
        recorder.data(first, &link(&device, 1..=5));
        recorder.close(first);
        let second = recorder.open();
        recorder.data(second, &link(&device, 3..=8));
        recorder.close(second);
    }
    recorder.finish().unwrap();

    let replayed = firmware_sim::record::replay(
        Recording::load(&path).unwrap(),
        &site.gw.addr.to_string(),
        0.0,
    )
    .await;
    assert_eq!(replayed.connections, 2 * devices);
    assert!(replayed.errors.is_empty(), "{replayed:?}");
    let mut conn = open_db(&site.db).await;
    let stored: Vec<(String, i64)> =
        sqlx::query_as("SELECT device_id, COUNT(DISTINCT seq) FROM telemetry GROUP BY 1")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(stored.len(), devices as usize);
    for (device, seqs) in stored {
        assert_eq!(
            seqs, 8,
            "{device}: seq 1..=8 stored, none taken for a duplicate"
        );
    }
}

type Row = (String, i64, i64, String, f64, i64);

/// Equal stores, or the first difference and the sizes.
fn assert_same_readings(replayed: &[Row], original: &[Row]) {
    if let Some(i) =
        (0..replayed.len().max(original.len())).find(|&i| replayed.get(i) != original.get(i))
    {
        panic!(
            "replayed {} readings, original {}; first difference at {i}: {:?} vs {:?}",
            replayed.len(),
            original.len(),
            replayed.get(i),
            original.get(i)
        );
    }
}
