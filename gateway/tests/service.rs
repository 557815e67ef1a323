//! Running under systemd, with the real `gateway` binary and a real notify socket (what
//! systemd gives a `Type=notify` service): `READY=1` once the store is open and the listener
//! is up, watchdog pings that stop while the store writer is stuck and resume after it, and
//! `STOPPING=1` on SIGTERM.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{telemetry, RawClient};
use proto::v1::{gateway_message, GatewayMessage};
use tokio::net::UnixDatagram;

/// The next notification, or `None` after `within`.
async fn next(sock: &UnixDatagram, within: Duration) -> Option<String> {
    let mut buf = [0u8; 512];
    match tokio::time::timeout(within, sock.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Ok(Err(e)) => panic!("notify socket: {e}"),
        Err(_) => None,
    }
}

/// Reads notifications until one contains `what`; panics after 30 s.
async fn wait_for(sock: &UnixDatagram, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next(sock, left).await {
            Some(m) if m.lines().any(|l| l == what) => return,
            Some(_) => {}
            None => panic!("no {what} from the gateway within 30 s"),
        }
    }
}

/// Waits for the Ack of `seq`.
async fn acked(device: &mut RawClient, seq: u64) {
    loop {
        match device.recv().await {
            Some(GatewayMessage {
                body: Some(gateway_message::Body::Ack(a)),
            }) if a.seq == seq => return,
            Some(_) => {}
            None => panic!("the link closed before the ack of {seq}"),
        }
    }
}

async fn log_has(log: &Path, what: &str) -> bool {
    std::fs::read_to_string(log).is_ok_and(|t| t.contains(what))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_after_the_store_opens_and_the_watchdog_follows_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let db = dir.path().join("g.db");
    let log = dir.path().join("gateway.log");
    // A 2 s watchdog: pinged every 0.5 s, withheld once a commit has run for 1 s.
    let (mut child, addr) = common::spawn_gateway(
        &["--db".as_ref(), db.as_os_str()],
        &[
            ("NOTIFY_SOCKET", Some(sock_path.as_os_str())),
            ("WATCHDOG_USEC", Some("2000000".as_ref())),
            ("RUST_LOG", Some("info".as_ref())),
        ],
        &log,
    )
    .await;

    wait_for(&sock, "READY=1").await;
    // Ready means the store is open and migrated.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let migrated: i64 = conn
        .query_row("SELECT count(*) FROM _sqlx_migrations", [], |r| r.get(0))
        .unwrap();
    assert!(migrated > 0);
    wait_for(&sock, "WATCHDOG=1").await;
    wait_for(&sock, "WATCHDOG=1").await;

    let mut device = RawClient::connect(addr).await;
    device.hello("stuck-1", 1).await;
    device.send(telemetry(1, &[("t", 1.0)])).await;
    acked(&mut device, 1).await;

    // Another process holds the store's write lock: the writer's next commit waits for it.
    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    device.send(telemetry(2, &[("t", 2.0)])).await;
    let mut stuck = false;
    for _ in 0..80 {
        if log_has(&log, "the store writer is stuck").await {
            stuck = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(stuck, "the gateway never noticed its stuck writer");
    // Drain what was sent before it noticed; then nothing while the lock is held.
    while next(&sock, Duration::from_millis(100)).await.is_some() {}
    let during = next(&sock, Duration::from_millis(1500)).await;
    assert_eq!(
        during, None,
        "pinged the watchdog while the writer was stuck"
    );

    // The lock goes: the commit completes, the frame is acknowledged, the pings resume.
    conn.execute_batch("COMMIT").unwrap();
    acked(&mut device, 2).await;
    wait_for(&sock, "WATCHDOG=1").await;

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_for(&sock, "STOPPING=1").await;
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the gateway stops within 30 s")
        .unwrap();
    assert!(status.success(), "{status:?}");
}
