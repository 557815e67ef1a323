//! Ingest end to end: simulated fleets over real TCP into a real SQLite file.

mod common;

use std::time::Duration;

use common::*;
use proto::v1::{device_message::Body, gateway_message, DeviceMessage, Event, GatewayMessage};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_100_devices_has_every_acked_reading_stored_exactly_once() {
    let gw = TestGateway::start(|_| {}).await;
    let report = firmware_sim::run_fleet(firmware_sim::FleetConfig {
        devices: 100,
        rate: 20.0,
        readings: 8,
        duration: Duration::from_secs(3),
        drain: Duration::from_secs(20),
        ..fleet(gw.addr)
    })
    .await;
    assert!(report.is_clean(), "{}", report.to_table());
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(
        report.frames_acked >= 100,
        "every device sent something: {}",
        report.to_table()
    );
    assert_stored_exactly_once(&gw.db, &report, 8).await;
    gw.stop().await;
}

fn ack_seq(msg: Option<GatewayMessage>) -> u64 {
    match msg {
        Some(GatewayMessage {
            body: Some(gateway_message::Body::Ack(a)),
        }) => a.seq,
        other => panic!("expected Ack, got {other:?}"),
    }
}

#[tokio::test]
async fn device_retransmits_are_acked_again_and_stored_once() {
    let gw = TestGateway::start(|_| {}).await;
    let mut dev = RawClient::connect(gw.addr).await;
    assert_eq!(dev.hello("meter-1", 42).await, 0);
    dev.send(telemetry(1, &[("t", 1.0), ("h", 2.0)])).await;
    assert_eq!(ack_seq(dev.recv().await), 1);
    dev.send(telemetry(2, &[("t", 1.5)])).await;
    assert_eq!(ack_seq(dev.recv().await), 2);
    drop(dev);

    // Reconnect: HelloAck says what is stored; a resend of it is acked but not stored.
    let mut dev = RawClient::connect(gw.addr).await;
    assert_eq!(dev.hello("meter-1", 42).await, 2);
    dev.send(telemetry(2, &[("t", 1.5)])).await;
    assert_eq!(ack_seq(dev.recv().await), 2);
    dev.send(telemetry(3, &[("t", 9.0)])).await;
    assert_eq!(ack_seq(dev.recv().await), 3);

    // A new epoch is a new sequence space.
    let mut rebooted = RawClient::connect(gw.addr).await;
    assert_eq!(rebooted.hello("meter-1", 43).await, 0);
    rebooted.send(telemetry(1, &[("t", 3.0)])).await;
    assert_eq!(ack_seq(rebooted.recv().await), 1);

    let mut conn = open_db(&gw.db).await;
    let rows: Vec<(i64, i64, String, Option<f64>)> =
        sqlx::query_as("SELECT epoch, seq, sensor, value FROM telemetry WHERE device_id = 'meter-1' ORDER BY epoch, seq, sensor")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(
        rows,
        vec![
            (42, 1, "h".into(), Some(2.0)),
            (42, 1, "t".into(), Some(1.0)),
            (42, 2, "t".into(), Some(1.5)),
            (42, 3, "t".into(), Some(9.0)),
            (43, 1, "t".into(), Some(3.0)),
        ]
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_device_that_half_closes_after_its_last_frame_still_gets_its_acks() {
    let gw = TestGateway::start(|_| {}).await;
    let mut dev = RawClient::connect(gw.addr).await;
    assert_eq!(dev.hello("batch-uploader", 7).await, 0);
    let burst: Vec<u8> = (1..=50)
        .flat_map(|seq| delimited(&telemetry(seq, &[("t", seq as f64)])))
        .collect();
    dev.send_raw(&burst).await;
    // "That is all I have": the write side closes, the read side stays open.
    tokio::io::AsyncWriteExt::shutdown(dev.framed.get_mut())
        .await
        .unwrap();
    let mut acked = 0;
    while let Some(msg) = dev.recv().await {
        acked = acked.max(ack_seq(Some(msg)));
    }
    assert_eq!(acked, 50, "every frame sent before the half-close is acked");
    let mut conn = open_db(&gw.db).await;
    let stored: i64 = sqlx::query_scalar(
        "SELECT COUNT(DISTINCT seq) FROM telemetry WHERE device_id = 'batch-uploader'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(stored, 50);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_and_events_past_the_retention_are_deleted_and_newer_ones_kept() {
    let gw = TestGateway::start(|c| c.store.retention = Some(Duration::from_secs(60))).await;
    let now = gateway::store::now_ms() as u64;
    let old = now - 2 * 3600 * 1000;
    let readings = |ts: u64| {
        Body::Telemetry(proto::v1::Telemetry {
            readings: ["t", "h", "p"]
                .iter()
                .map(|s| proto::v1::Reading {
                    sensor: (*s).into(),
                    value: 1.0,
                    timestamp_ms: ts,
                })
                .collect(),
        })
    };
    let event = |ts: u64| {
        Body::Event(Event {
            kind: "door_open".into(),
            message: String::new(),
            severity: proto::v1::Severity::Info as i32,
            timestamp_ms: ts,
        })
    };
    let mut dev = RawClient::connect(gw.addr).await;
    dev.hello("keeper", 1).await;
    for (seq, body) in [
        (1, readings(old)),
        (2, readings(now)),
        (3, event(old)),
        (4, event(now)),
    ] {
        dev.send(DeviceMessage {
            seq,
            body: Some(body),
        })
        .await;
    }
    while ack_seq(dev.recv().await) < 4 {}
    let mut conn = open_db(&gw.db).await;
    // Two commands for it from long ago: one finished then, one still open.
    for (command_id, outcome) in [("done", Some("ok")), ("waiting", None)] {
        sqlx::query(
            "INSERT INTO commands (device, command_id, name, params, created_ms, deadline_ms, outcome, finished_ms) \
             SELECT id, ?1, 'blink', '{}', ?2, ?3, ?4, ?5 FROM devices WHERE device_id = 'keeper'",
        )
        .bind(command_id)
        .bind(old as i64)
        .bind((now + 3_600_000) as i64)
        .bind(outcome)
        .bind(outcome.map(|_| old as i64))
        .execute(&mut conn)
        .await
        .unwrap();
    }

    // Retention steps run every tenth of the retention (6 s here).
    let count = |sql: &'static str| sqlx::query_scalar::<_, i64>(sql);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while count("SELECT COUNT(*) FROM telemetry WHERE seq = 1")
        .fetch_one(&mut conn)
        .await
        .unwrap()
        > 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "old readings still there after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let kept: Vec<(i64, String)> =
        sqlx::query_as("SELECT seq, sensor FROM telemetry ORDER BY seq, sensor")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(
        kept,
        vec![(2, "h".into()), (2, "p".into()), (2, "t".into())]
    );
    let events: Vec<i64> = sqlx::query_scalar("SELECT seq FROM events")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(events, vec![4]);
    let commands: Vec<String> = sqlx::query_scalar("SELECT command_id FROM commands")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(commands, vec!["waiting".to_owned()], "open commands stay");
    assert_eq!(gw.metrics.rows_pruned.get(), 5);
    // Deleting old rows does not reopen their seqs: a resend is still a duplicate.
    let mut again = RawClient::connect(gw.addr).await;
    assert_eq!(again.hello("keeper", 1).await, 4);
    gw.stop().await;
}

#[tokio::test]
async fn events_and_nan_readings_are_stored_and_zero_timestamps_get_the_receive_time() {
    let gw = TestGateway::start(|_| {}).await;
    let mut dev = RawClient::connect(gw.addr).await;
    dev.hello("door-7", 1).await;
    let before = gateway::store::now_ms();
    dev.send(DeviceMessage {
        seq: 1,
        body: Some(Body::Event(Event {
            kind: "door_open".into(),
            message: "front door".into(),
            severity: proto::v1::Severity::Warning as i32,
            timestamp_ms: 0,
        })),
    })
    .await;
    assert_eq!(ack_seq(dev.recv().await), 1);
    dev.send(telemetry(2, &[("t", f64::NAN)])).await;
    assert_eq!(ack_seq(dev.recv().await), 2);

    let mut conn = open_db(&gw.db).await;
    let (kind, message, severity, ts): (String, String, i64, i64) = sqlx::query_as(
        "SELECT kind, message, severity, ts_ms FROM events WHERE device_id = 'door-7' AND seq = 1",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        (kind.as_str(), message.as_str(), severity),
        ("door_open", "front door", 3)
    );
    assert!(ts >= before, "receive time used for timestamp 0");
    let value: Option<f64> =
        sqlx::query_scalar("SELECT value FROM telemetry WHERE device_id = 'door-7' AND seq = 2")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(value, None, "NaN is stored as NULL");
    gw.stop().await;
}

#[tokio::test]
async fn a_provisioned_token_works_until_the_device_is_revoked() {
    let gw = TestGateway::start(|c| c.auth.fleet_tokens = true).await;
    let store = gateway::store::Store::open(&gw.db, gateway::config::Durability::ProcessCrash)
        .await
        .unwrap();
    let token = gateway::store::devices::add(store.pool(), "pump-3", false)
        .await
        .unwrap();
    assert!(
        gateway::store::devices::add(store.pool(), "pump-3", false)
            .await
            .is_err(),
        "a second add without --force is refused"
    );

    let mut dev = RawClient::connect(gw.addr).await;
    dev.send(hello("pump-3", &token, 1)).await;
    assert!(matches!(
        dev.recv().await,
        Some(GatewayMessage {
            body: Some(gateway_message::Body::HelloAck(_))
        })
    ));
    drop(dev);

    assert!(gateway::store::devices::revoke(store.pool(), "pump-3")
        .await
        .unwrap());
    for t in [
        token.as_str(),
        &proto::token::fleet_token(SECRET.as_bytes(), "pump-3"),
    ] {
        let mut dev = RawClient::connect(gw.addr).await;
        dev.send(hello("pump-3", t, 1)).await;
        assert_eq!(
            dev.expect_error_and_close().await,
            proto::v1::ErrorCode::DeviceRevoked
        );
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_check_passes_a_clean_run_and_catches_lost_and_duplicated_frames() {
    let gw = TestGateway::start(|_| {}).await;
    let report = firmware_sim::run_fleet(firmware_sim::FleetConfig {
        devices: 3,
        rate: 20.0,
        readings: 2,
        duration: Duration::from_secs(1),
        ..fleet(gw.addr)
    })
    .await;
    assert!(report.is_clean(), "{}", report.to_table());
    let clean = firmware_sim::verify::verify_db(&gw.db, &report).unwrap();
    assert!(clean.is_clean(), "{clean:?}");
    assert_eq!(clean.frames_checked, report.frames_acked);

    // Damage the store the way a broken gateway would: lose one frame, duplicate another.
    let mut conn = open_db(&gw.db).await;
    sqlx::query("DELETE FROM readings WHERE seq = 2 AND stream = (SELECT MIN(id) FROM streams)")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO readings (device, series, ts_ms, stream, seq, idx, value)
         SELECT device, series, ts_ms, stream, seq, idx + 100, value FROM readings
         WHERE seq = 3 AND stream = (SELECT MIN(id) FROM streams)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let damaged = firmware_sim::verify::verify_db(&gw.db, &report).unwrap();
    assert_eq!(
        (damaged.frames_missing, damaged.frames_duplicated),
        (1, 1),
        "{damaged:?}"
    );
    assert!(!damaged.is_clean());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_from_before_the_device_clustered_readings_keeps_every_reading() {
    use sqlx::{ConnectOptions, Connection};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    // The store as the previous release left it: every migration before the re-clustering.
    let mut old = sqlx::migrate!("../migrations");
    let before = old
        .migrations
        .iter()
        .position(|m| m.description.contains("readings by device"))
        .expect("the re-clustering migration");
    old.migrations = old.migrations[..before].to_vec().into();
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&db)
        .create_if_missing(true)
        .connect()
        .await
        .unwrap();
    old.run(&mut conn).await.unwrap();
    sqlx::raw_sql(
        "INSERT INTO devices (id, device_id, created_at_ms) VALUES (1, 'a', 0), (2, 'b', 0);
         INSERT INTO sensors (id, name) VALUES (1, 'temp'), (2, 'rh');
         INSERT INTO series (id, device, sensor) VALUES (1, 1, 1), (2, 1, 2), (3, 2, 1);
         INSERT INTO streams (id, device, epoch, last_seq) VALUES (1, 1, 7, 2), (2, 2, 9, 1);
         INSERT INTO readings (series, ts_ms, stream, seq, idx, value) VALUES
             (1, 1000, 1, 1, 0, 20.5), (2, 1000, 1, 1, 1, 40.0),
             (1, 2000, 1, 2, 0, 21.5), (2, 2000, 1, 2, 1, NULL),
             (3, 1500, 2, 1, 0, -3.25);",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let telemetry = "SELECT device_id, epoch, seq, sensor, ts_ms, value FROM telemetry
                     ORDER BY device_id, seq, sensor";
    type Row = (String, i64, i64, String, i64, Option<f64>);
    let expected: Vec<Row> = sqlx::query_as(telemetry)
        .fetch_all(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    assert_eq!(expected.len(), 5);

    let store = gateway::store::Store::open(&db, gateway::config::Durability::ProcessCrash)
        .await
        .expect("migrates the old store");
    let after: Vec<Row> = sqlx::query_as(telemetry)
        .fetch_all(store.pool())
        .await
        .unwrap();
    assert_eq!(after, expected);
    let devices: Vec<(i64, i64)> =
        sqlx::query_as("SELECT device, COUNT(*) FROM readings GROUP BY device ORDER BY device")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(devices, vec![(1, 4), (2, 1)]);
    // The dedup point is untouched: stream seqs carry over.
    let seqs: Vec<(i64,)> = sqlx::query_as("SELECT last_seq FROM streams ORDER BY id")
        .fetch_all(store.pool())
        .await
        .unwrap();
    assert_eq!(seqs, vec![(2,), (1,)]);
}
