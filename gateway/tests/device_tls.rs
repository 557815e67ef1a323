//! Devices over TLS (`[tcp.tls]`): a fleet has every acked reading stored exactly once; a
//! plain-TCP client and a device that does not trust the certificate cost only themselves.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::pki::{pki, write};
use common::*;
use firmware_sim::tls::TlsClient;
use gateway::config::TcpTlsConfig;

struct Certs {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn certs() -> Certs {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    Certs {
        ca: write(dir.path(), "ca.pem", &pki.ca).into(),
        cert: write(dir.path(), "gateway.pem", &pki.server.0).into(),
        key: write(dir.path(), "gateway.key", &pki.server.1).into(),
        _dir: dir,
    }
}

async fn tls_gateway(certs: &Certs) -> TestGateway {
    let tls = TcpTlsConfig {
        cert_file: certs.cert.clone(),
        key_file: certs.key.clone(),
    };
    TestGateway::start(move |c| c.tcp.tls = Some(tls)).await
}

/// The gateway's count of failed handshakes once it reaches `at_least` (it is counted just
/// after the connection drops), or what it is after 10 s.
async fn handshake_failures(gw: &TestGateway, at_least: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = gw.metrics.tls_handshake_failures.get();
        if n >= at_least || tokio::time::Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_over_tls_has_every_acked_reading_stored_exactly_once() {
    let certs = certs();
    let gw = tls_gateway(&certs).await;

    // A device that speaks plain TCP to the TLS listener gets nothing and is closed.
    let mut plain = RawClient::connect(gw.addr).await;
    plain.send(hello("plain", "t", 1)).await;
    assert!(plain.recv().await.is_none(), "no answer without TLS");
    assert_eq!(handshake_failures(&gw, 1).await, 1);

    let report = firmware_sim::run_fleet(firmware_sim::FleetConfig {
        devices: 20,
        rate: 20.0,
        readings: 4,
        duration: Duration::from_secs(2),
        tls: Some(TlsClient::new(&certs.ca, "localhost").unwrap()),
        ..fleet(gw.addr)
    })
    .await;
    assert!(report.is_clean(), "{}", report.to_table());
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(report.frames_acked >= 20, "{}", report.to_table());
    assert_stored_exactly_once(&gw.db, &report, 4).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_does_not_trust_the_certificate_sends_nothing() {
    let certs = certs();
    let other = self::certs(); // another CA
    let gw = tls_gateway(&certs).await;
    let report = firmware_sim::run_fleet(firmware_sim::FleetConfig {
        devices: 2,
        duration: Duration::from_secs(1),
        drain: Duration::from_secs(1),
        tls: Some(TlsClient::new(&other.ca, "localhost").unwrap()),
        ..fleet(gw.addr)
    })
    .await;
    assert_eq!(report.frames_acked, 0);
    assert!(
        report
            .errors
            .get("TLS_HANDSHAKE_FAILED")
            .copied()
            .unwrap_or(0)
            >= 2,
        "{:?}",
        report.errors
    );
    assert!(handshake_failures(&gw, 2).await >= 2);
    gw.stop().await;
}

#[test]
fn a_missing_certificate_is_refused_at_start_with_the_field_named() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--no-mqtt", "--listen", "127.0.0.1:0"])
        .args([
            "--tls-cert",
            "/nonexistent/gw.pem",
            "--tls-key",
            "/nonexistent/gw.key",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tcp.tls.cert_file") && err.contains("/nonexistent/gw.pem"),
        "{err}"
    );
    let half = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--tls-cert", "/x.pem"])
        .output()
        .unwrap();
    assert_eq!(half.status.code(), Some(2), "clap refuses --tls-cert alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_records_tls_devices_in_the_clear_for_a_plain_replay() {
    let certs = certs();
    let gw = tls_gateway(&certs).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("field.jsonl");
    let recorder = firmware_sim::record::Recorder::create(&path).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = listener.local_addr().unwrap();
    let tls = firmware_sim::record::ProxyTls {
        devices: Some(firmware_sim::tls::acceptor(&certs.cert, &certs.key).unwrap()),
        upstream: Some(TlsClient::new(&certs.ca, "localhost").unwrap()),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let proxy = tokio::spawn({
        let recorder = recorder.clone();
        let upstream = gw.addr.to_string();
        async move {
            firmware_sim::record::proxy(listener, &upstream, tls, recorder, async {
                let _ = stopped.await;
            })
            .await
        }
    });
    let report = firmware_sim::run_fleet(firmware_sim::FleetConfig {
        devices: 4,
        rate: 20.0,
        readings: 2,
        duration: Duration::from_secs(1),
        tls: Some(TlsClient::new(&certs.ca, "localhost").unwrap()),
        ..fleet(proxy_addr)
    })
    .await;
    assert!(report.is_clean(), "{}", report.to_table());
    assert!(report.frames_acked >= 4, "{}", report.to_table());
    let _ = stop.send(());
    assert_eq!(proxy.await.unwrap(), 4);
    recorder.finish().unwrap();

    // The recording holds what the devices sent inside TLS: it replays to a plain gateway.
    let replica = TestGateway::start(|_| {}).await;
    let replayed = firmware_sim::record::replay(
        firmware_sim::record::Recording::load(&path).unwrap(),
        &replica.addr.to_string(),
        0.0,
    )
    .await;
    assert_eq!(replayed.hello_acks, 4, "{replayed:?}");
    assert!(replayed.errors.is_empty(), "{replayed:?}");
    let rows = |db: PathBuf| async move {
        let mut conn = open_db(&db).await;
        sqlx::query_as::<_, (String, i64, i64, String, i64)>(
            "SELECT device_id, epoch, seq, sensor, ts_ms FROM telemetry ORDER BY 1, 2, 3, 4",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap()
    };
    let original = rows(gw.db.clone()).await;
    assert_eq!(original.len() as u64, report.readings_acked);
    assert_eq!(rows(replica.db.clone()).await, original);
    replica.stop().await;

    // And over TLS into a TLS-only gateway.
    let tls_replica = tls_gateway(&certs).await;
    let replayed = firmware_sim::record::replay_with(
        firmware_sim::record::Recording::load(&path).unwrap(),
        &tls_replica.addr.to_string(),
        0.0,
        Some(TlsClient::new(&certs.ca, "localhost").unwrap()),
    )
    .await;
    assert_eq!(replayed.hello_acks, 4, "{replayed:?}");
    assert_eq!(rows(tls_replica.db.clone()).await, original);
    tls_replica.stop().await;
    gw.stop().await;
}
