//! The promise across crashes: a real `gateway` process is killed with SIGKILL mid-stream
//! and restarted on the same file, then stopped gracefully with SIGTERM and restarted again,
//! while a fleet keeps sending. Every acknowledged reading ends up stored exactly once.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_mid_stream_and_restarted_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    let log = dir.path().join("gateway.log");
    let listen = format!("127.0.0.1:{}", free_port());

    let gw = GatewayProcess::start(&db, &listen, &log, &[]).await;
    let fleet = tokio::spawn(firmware_sim::run_fleet(firmware_sim::FleetConfig {
        devices: 20,
        rate: 50.0,
        readings: 4,
        duration: Duration::from_secs(6),
        drain: Duration::from_secs(30),
        ramp: Duration::from_millis(200),
        // Also leave committed-but-unacknowledged frames on purpose and resend them all,
        // so deduplication is exercised on every run, not only when a kill lands just so.
        faults: firmware_sim::device::Faults {
            disconnect_after_send: 0.02,
            ignore_hello_ack: true,
        },
        ..fleet(gw.addr)
    }));

    // Crash: no chance to commit what is queued or to say goodbye.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    gw.kill().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let gw = GatewayProcess::start(&db, &listen, &log, &[]).await;

    // Graceful restart: stop accepting, commit and ack in-flight frames, exit 0.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = gw.terminate().await;
    assert!(
        status.success(),
        "SIGTERM exits 0, got {status:?}; log: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let gw = GatewayProcess::start(&db, &listen, &log, &[]).await;

    let report = fleet.await.unwrap();
    assert!(report.is_clean(), "{}", report.to_table());
    eprintln!("{}", report.to_table());
    assert!(
        report.frames_resent > 0,
        "frames were resent: {}",
        report.to_table()
    );
    assert!(
        report.reconnects >= 20,
        "every device reconnected at least once: {}",
        report.to_table()
    );
    assert_stored_exactly_once(&db, &report, 4).await;
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        log_text.contains("shutting down"),
        "the graceful stop is logged: {log_text}"
    );
    assert!(gw.terminate().await.success());
}
