//! Bad input costs only its sender: each kind gets its error code and its link closes, while
//! a healthy device beside it keeps getting acks and nothing it was acked is touched.

mod common;

use std::time::Duration;

use common::*;
use proto::v1::{device_message::Body, DeviceMessage, ErrorCode, Ping, Telemetry};

async fn expect(addr: std::net::SocketAddr, bytes: Vec<u8>, code: ErrorCode) {
    let mut c = RawClient::connect(addr).await;
    c.send_raw(&bytes).await;
    assert_eq!(
        c.expect_error_and_close().await,
        code,
        "for bytes {bytes:02x?}"
    );
}

fn fleet_hello(device: &str) -> Vec<u8> {
    delimited(&hello(
        device,
        &proto::token::fleet_token(SECRET.as_bytes(), device),
        1,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_input_gets_its_code_and_closes_while_a_healthy_device_keeps_flowing() {
    let gw = TestGateway::start(|c| {
        c.tcp.max_frame_bytes = 1024;
        c.session.hello_timeout = Duration::from_millis(300);
        c.session.idle_timeout = Duration::from_millis(600);
    })
    .await;
    let healthy = tokio::spawn(firmware_sim::run_fleet(firmware_sim::FleetConfig {
        devices: 1,
        rate: 50.0,
        readings: 4,
        duration: Duration::from_secs(4),
        drain: Duration::from_secs(10),
        keepalive: Duration::from_millis(200),
        prefix: "healthy-".into(),
        ..fleet(gw.addr)
    }));
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Garbage: a length prefix that is not a varint.
    expect(gw.addr, vec![0xff; 12], ErrorCode::BadFraming).await;
    // A frame over the limit (announced length 100 000 > 1024).
    let mut big = Vec::new();
    prost::encode_length_delimiter(100_000, &mut big).unwrap();
    expect(gw.addr, big, ErrorCode::FrameTooLarge).await;
    // A frame whose body is not a DeviceMessage (wire type 7).
    expect(gw.addr, vec![3, 0x0f, 0, 0], ErrorCode::MalformedMessage).await;
    // Data before Hello.
    expect(
        gw.addr,
        delimited(&telemetry(1, &[("t", 1.0)])),
        ErrorCode::HelloRequired,
    )
    .await;
    // Ping before Hello.
    let ping = DeviceMessage {
        seq: 0,
        body: Some(Body::Ping(Ping {})),
    };
    expect(gw.addr, delimited(&ping), ErrorCode::HelloRequired).await;
    // A wrong token.
    expect(
        gw.addr,
        delimited(&hello("intruder", "00ff", 1)),
        ErrorCode::AuthFailed,
    )
    .await;
    // A body this gateway does not know: field 15, varint 1.
    let mut unknown = fleet_hello("newer-fw");
    unknown.extend_from_slice(&[4, 0x08, 0x05, 0x78, 0x01]);
    expect(gw.addr, unknown, ErrorCode::UnknownMessage).await;
    // A data message with seq 0.
    let mut seq0 = fleet_hello("seq-zero");
    seq0.extend(delimited(&telemetry(0, &[("t", 1.0)])));
    expect(gw.addr, seq0, ErrorCode::InvalidSeq).await;
    // A second Hello.
    let mut twice = fleet_hello("twice");
    twice.extend(fleet_hello("twice"));
    expect(gw.addr, twice, ErrorCode::UnexpectedHello).await;
    // A sensor name over 128 bytes.
    let mut long_name = fleet_hello("long-name");
    long_name.extend(delimited(&DeviceMessage {
        seq: 1,
        body: Some(Body::Telemetry(Telemetry {
            readings: vec![proto::v1::Reading {
                sensor: "s".repeat(129),
                value: 1.0,
                timestamp_ms: 0,
            }],
        })),
    }));
    expect(gw.addr, long_name, ErrorCode::MalformedMessage).await;
    // Nothing at all: the Hello timeout.
    expect(gw.addr, vec![], ErrorCode::HelloTimeout).await;
    // Hello, then silence: the idle timeout.
    expect(gw.addr, fleet_hello("sleepy"), ErrorCode::IdleTimeout).await;
    // Half a frame, then silence: still the idle timeout, never a hang.
    let mut half = fleet_hello("half");
    half.extend_from_slice(&[50, 0x08]);
    expect(gw.addr, half, ErrorCode::IdleTimeout).await;

    // A second link of the same device supersedes the first.
    let mut first = RawClient::connect(gw.addr).await;
    first.hello("twin", 1).await;
    let mut second = RawClient::connect(gw.addr).await;
    second.hello("twin", 1).await;
    assert_eq!(first.expect_error_and_close().await, ErrorCode::Superseded);
    drop(second); // closes quietly: not an error

    let report = healthy.await.unwrap();
    assert!(report.is_clean(), "{}", report.to_table());
    assert!(
        report.errors.is_empty(),
        "the healthy device saw no errors: {:?}",
        report.errors
    );
    assert!(
        report.frames_acked > 50,
        "the healthy device kept flowing: {}",
        report.to_table()
    );
    assert_stored_exactly_once(&gw.db, &report, 4).await;

    for code in [
        ErrorCode::BadFraming,
        ErrorCode::FrameTooLarge,
        ErrorCode::HelloRequired,
        ErrorCode::AuthFailed,
        ErrorCode::UnknownMessage,
        ErrorCode::InvalidSeq,
        ErrorCode::HelloTimeout,
        ErrorCode::Superseded,
    ] {
        assert!(gw.metrics.link_errors(code) >= 1, "{code:?} was counted");
    }
    assert_eq!(
        gw.metrics.link_errors(ErrorCode::HelloRequired),
        2,
        "{:?}",
        gw.metrics.link_error_summary()
    );
    assert_eq!(
        gw.metrics.link_errors(ErrorCode::IdleTimeout),
        2,
        "{:?}",
        gw.metrics.link_error_summary()
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_bad_devices_is_one_log_line_and_a_count_not_a_line_each() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("gateway.log");
    let gw = GatewayProcess::start(&dir.path().join("gw.db"), "127.0.0.1:0", &log, &[]).await;
    // 18 and one more stay under the address guard's burst of 20 (tests/anomalies.rs shows
    // what a burst gets).
    for i in 0..18 {
        let wrong = delimited(&hello(&format!("intruder-{i}"), "not-the-token", 1));
        expect(gw.addr, wrong, ErrorCode::AuthFailed).await;
    }
    expect(gw.addr, vec![0xff; 12], ErrorCode::BadFraming).await;
    assert!(gw.terminate().await.success());

    let log = std::fs::read_to_string(&log).unwrap();
    let warned = |code: &str| {
        log.lines()
            .filter(|l| l.contains("WARN") && l.contains(code))
            .count()
    };
    assert_eq!(warned("AUTH_FAILED"), 1, "one line for the storm:\n{log}");
    assert_eq!(
        warned("BAD_FRAMING"),
        1,
        "other codes still get theirs:\n{log}"
    );
    let summary = log
        .lines()
        .find(|l| l.contains("gateway stopped"))
        .expect("a summary line at stop");
    assert!(
        summary.contains("(\"ERROR_CODE_AUTH_FAILED\", 18)"),
        "the summary counts every one: {summary}"
    );
}
