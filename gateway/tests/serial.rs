//! Serial links on real pseudo-terminal pairs (socat): a noisy simulated device has every
//! acknowledged reading stored exactly once; the line closed and reopened resumes; a command
//! round trip works over serial. With `CI` set a missing socat fails; otherwise these skip.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
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
        gw.metrics.serial_bad_frames.load(Ordering::Relaxed) > 0,
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
