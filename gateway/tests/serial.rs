//! Serial links on real pseudo-terminal pairs (socat): a noisy simulated device has every
//! acknowledged reading stored exactly once; the line closed and reopened resumes; a command
//! round trip works over serial. With `CI` set a missing socat fails; otherwise these skip.

mod common;

use std::path::Path;
use std::time::Duration;

use common::mqtt::{BrokerKind, Subscriber, TestBroker};
use common::pty::PtyPair;
use common::*;
use firmware_sim::serial::{Noise, SerialTarget};
use gateway::config::SerialPortConfig;
use rumqttc::QoS;

fn serial_fleet(
    addr: std::net::SocketAddr,
    dev: &Path,
    noise: Noise,
    secs: u64,
) -> firmware_sim::FleetConfig {
    firmware_sim::FleetConfig {
        devices: 1,
        rate: 20.0,
        readings: 4,
        duration: Duration::from_secs(secs),
        drain: Duration::from_secs(30),
        prefix: "pty-".into(),
        keepalive: Duration::from_secs(2),
        serial: vec![SerialTarget {
            path: dev.to_path_buf(),
            baud: 115_200,
            noise,
        }],
        ..fleet(addr)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_serial_device_has_every_acked_reading_stored_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let Some(pty) = PtyPair::start(dir.path()).await else {
        return;
    };
    let port = pty.gw.clone();
    let gw = TestGateway::start(move |c| c.serial.push(SerialPortConfig::new(port, 115_200))).await;
    let noise = Noise {
        corrupt: 0.001,
        drop: 0.0003,
    };
    let report = firmware_sim::run_fleet(serial_fleet(gw.addr, &pty.dev, noise, 4)).await;
    assert!(report.is_clean(), "{}", report.to_table());
    assert!(
        report.frames_acked >= 40,
        "frames flowed: {}",
        report.to_table()
    );
    assert!(
        gw.metrics.serial_bad_frames.get() > 0,
        "the noise damaged frames"
    );
    assert!(report.frames_resent > 0, "damaged frames were resent");
    assert_stored_exactly_once(&gw.db, &report, 4).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serial_line_closed_and_reopened_resumes_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut pty) = PtyPair::start(dir.path()).await else {
        return;
    };
    let port = pty.gw.clone();
    let gw = TestGateway::start(move |c| {
        let mut p = SerialPortConfig::new(port, 115_200);
        p.reopen_max = Duration::from_millis(300);
        c.serial.push(p);
    })
    .await;
    let fleet = tokio::spawn(firmware_sim::run_fleet(serial_fleet(
        gw.addr,
        &pty.dev,
        Noise::default(),
        5,
    )));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pty.stop().await; // both ends vanish, like an unplugged USB adapter
    tokio::time::sleep(Duration::from_millis(700)).await;
    pty.restart().await;
    let report = fleet.await.unwrap();
    assert!(report.is_clean(), "{}", report.to_table());
    assert!(
        report.reconnects >= 1,
        "the device reconnected: {}",
        report.to_table()
    );
    assert_stored_exactly_once(&gw.db, &report, 4).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_round_trip_works_over_serial() {
    let dir = tempfile::tempdir().unwrap();
    let Some(pty) = PtyPair::start(dir.path()).await else {
        return;
    };
    let Some(broker) = TestBroker::start(BrokerKind::Embedded).await else {
        return;
    };
    let sub = Subscriber::start(broker.port, "gateway/test-gw/devices/+/#").await;
    let (port, url) = (pty.gw.clone(), broker.url());
    let gw = TestGateway::start(move |c| {
        c.serial.push(SerialPortConfig::new(port, 115_200));
        c.mqtt.enabled = true;
        c.mqtt.url = Some(url);
    })
    .await;
    let fleet = tokio::spawn(firmware_sim::run_fleet(serial_fleet(
        gw.addr,
        &pty.dev,
        Noise::default(),
        3,
    )));
    let status = "gateway/test-gw/devices/pty-00000/status";
    let seen = sub
        .wait_until(Duration::from_secs(15), |m| {
            m.iter()
                .any(|(t, p)| t == status && p.starts_with(br#"{"status":"online""#))
        })
        .await;
    let (_, online) = seen
        .iter()
        .find(|(t, _)| t == status)
        .expect("the serial device came online");
    assert!(String::from_utf8_lossy(online).contains(r#""link":"serial""#));
    sub.client
        .publish(
            "gateway/test-gw/devices/pty-00000/commands",
            QoS::AtLeastOnce,
            false,
            br#"{"id":"s-1","name":"blink"}"#.to_vec(),
        )
        .await
        .unwrap();
    let messages = sub
        .wait_until(Duration::from_secs(15), |m| {
            m.iter().any(|(t, _)| t.ends_with("/commands/results"))
        })
        .await;
    let (_, result) = messages
        .iter()
        .find(|(t, _)| t.ends_with("/commands/results"))
        .expect("a command outcome");
    let result: serde_json::Value = serde_json::from_slice(result).unwrap();
    assert_eq!(
        (result["id"].as_str(), result["status"].as_str()),
        (Some("s-1"), Some("ok"))
    );
    let report = fleet.await.unwrap();
    assert!(report.is_clean(), "{}", report.to_table());
    assert_eq!(report.outcomes[0].commands_received, vec!["s-1".to_owned()]);
    gw.stop().await;
}

/// A hand-driven device on the device end of a pty.
struct RawSerial {
    port: tokio_util::codec::Framed<
        tokio_serial::SerialStream,
        proto::serial::SerialCodec<proto::v1::GatewayMessage>,
    >,
}

impl RawSerial {
    fn open(path: &Path) -> Self {
        use tokio_serial::SerialPortBuilderExt;
        let stream = tokio_serial::new(path.to_string_lossy(), 115_200)
            .open_native_async()
            .expect("open the device end");
        Self {
            port: tokio_util::codec::Framed::new(stream, proto::serial::SerialCodec::default()),
        }
    }

    async fn send(&mut self, msg: proto::v1::DeviceMessage) {
        use tokio::io::AsyncWriteExt;
        let mut frame = bytes::BytesMut::new();
        proto::serial::encode_frame(&msg, &mut frame);
        self.port.get_mut().write_all(&frame).await.unwrap();
    }

    /// The next message; panics after 10 s or on a damaged frame (the pty is clean).
    async fn next(&mut self) -> proto::v1::gateway_message::Body {
        use futures::StreamExt;
        let msg = tokio::time::timeout(Duration::from_secs(10), self.port.next())
            .await
            .expect("an answer within 10 s")
            .expect("the port is open")
            .expect("no I/O error")
            .expect("a clean frame");
        msg.body.expect("a body")
    }

    /// Reads until an Ack of `seq`, failing on anything but Acks.
    async fn acked(&mut self, seq: u64) {
        loop {
            match self.next().await {
                proto::v1::gateway_message::Body::Ack(a) if a.seq == seq => return,
                proto::v1::gateway_message::Body::Ack(_) => {}
                other => panic!("expected Ack {seq}, got {other:?}"),
            }
        }
    }

    async fn hello(&mut self, epoch: u64) -> u64 {
        let token = proto::token::fleet_token(SECRET.as_bytes(), "restarting");
        self.send(hello("restarting", &token, epoch)).await;
        loop {
            match self.next().await {
                proto::v1::gateway_message::Body::HelloAck(a) => return a.last_seq,
                // The end of the previous session: what it sent is acknowledged first.
                proto::v1::gateway_message::Body::Ack(_) => {}
                other => panic!("expected HelloAck, got {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serial_device_that_restarts_just_says_hello_again() {
    let dir = tempfile::tempdir().unwrap();
    let Some(pty) = PtyPair::start(dir.path()).await else {
        return;
    };
    let port = pty.gw.clone();
    let gw = TestGateway::start(move |c| c.serial.push(SerialPortConfig::new(port, 115_200))).await;
    let mut dev = RawSerial::open(&pty.dev);
    assert_eq!(dev.hello(1).await, 0);
    dev.send(telemetry(1, &[("t", 1.0)])).await;
    dev.send(telemetry(2, &[("t", 2.0)])).await;
    dev.acked(2).await;
    // Its HelloAck lost to noise, a device says Hello again: it hears where it stands.
    assert_eq!(dev.hello(1).await, 2);
    dev.send(telemetry(3, &[("t", 3.0)])).await;
    // A power cut right after seq 3; it boots into a new epoch, on the same open port.
    assert_eq!(dev.hello(2).await, 0, "a new session, not an error");
    dev.send(telemetry(1, &[("t", 10.0)])).await;
    dev.acked(1).await;

    let mut conn = open_db(&gw.db).await;
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT epoch, seq FROM telemetry WHERE device_id = 'restarting' ORDER BY 1, 2",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(rows, vec![(1, 1), (1, 2), (1, 3), (2, 1)]);
    assert_eq!(
        gw.metrics
            .link_errors(proto::v1::ErrorCode::UnexpectedHello),
        0
    );
    gw.stop().await;
}
