//! Two gateway processes on one Mosquitto, with fleet-wide command topics: a command reaches
//! the gateway the device is on and no other, follows the device when it moves (site
//! re-cabling), and when one gateway is SIGKILLed its Last Will says so while the other
//! stays online.

mod common;

use std::path::Path;
use std::time::Duration;

use common::mqtt::{BrokerKind, Subscriber, TestBroker};
use common::*;
use rumqttc::QoS;

const DEVICE: &str = "mover-00000";

/// Every outcome published for command `id`, as (status, whole message).
fn outcomes(messages: &[(String, Vec<u8>)], id: &str) -> Vec<String> {
    messages
        .iter()
        .filter(|(t, _)| t == &format!("devices/{DEVICE}/commands/results"))
        .filter_map(|(_, p)| serde_json::from_slice::<serde_json::Value>(p).ok())
        .filter(|v| v["id"] == id)
        .map(|v| v["status"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The device, connected to `gateway` for `secs`, answering commands.
fn device_on(
    gateway: std::net::SocketAddr,
    secs: u64,
) -> tokio::task::JoinHandle<firmware_sim::Report> {
    tokio::spawn(firmware_sim::run_fleet(firmware_sim::FleetConfig {
        devices: 1,
        rate: 5.0,
        readings: 1,
        duration: Duration::from_secs(secs),
        ramp: Duration::ZERO,
        prefix: "mover-".into(),
        ..fleet(gateway)
    }))
}

/// Waits until `log` has a line with every one of `words` (the gateway logs once per move).
async fn wait_for_log(log: &Path, words: &[&str]) {
    for _ in 0..400 {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.lines().any(|l| words.iter().all(|w| l.contains(w))) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{} never logged {words:?}:\n{}",
        log.display(),
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

async fn command(sub: &Subscriber, id: &str) {
    sub.client
        .publish(
            format!("devices/{DEVICE}/commands"),
            QoS::AtLeastOnce,
            false,
            format!(r#"{{"id":"{id}","name":"reboot","timeout_ms":1500}}"#).into_bytes(),
        )
        .await
        .expect("publish a command");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_follow_a_device_between_gateways_and_last_wills_name_the_dead_one() {
    let Some(broker) = TestBroker::start(BrokerKind::Mosquitto).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fleet.toml");
    std::fs::write(
        &config,
        "[mqtt.topics]\n\
         commands = \"devices/{device_id}/commands\"\n\
         command_results = \"devices/{device_id}/commands/results\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let url = broker.url();
    let sub = Subscriber::start(broker.port, "#").await;
    let start = |name: &'static str| {
        let home = dir.path().join(name);
        std::fs::create_dir_all(&home).unwrap();
        let db = home.join("gateway.db");
        let log = home.join("gateway.log");
        let url = url.clone();
        async move {
            let gw = GatewayProcess::start(
                &db,
                "127.0.0.1:0",
                &log,
                &["--mqtt", &url, "--gateway-id", name, "--config", config],
            )
            .await;
            (gw, log)
        }
    };
    let (a, a_log) = start("site-a").await;
    let (b, b_log) = start("site-b").await;
    let online = |m: &[(String, Vec<u8>)], gw: &str| {
        m.iter()
            .rev()
            .find(|(t, _)| t == &format!("gateway/{gw}/status"))
            .is_some_and(|(_, p)| p == b"online")
    };
    let seen = sub
        .wait_until(Duration::from_secs(20), |m| {
            online(m, "site-a") && online(m, "site-b")
        })
        .await;
    assert!(online(&seen, "site-a") && online(&seen, "site-b"));

    // The device starts on B, then is re-cabled to A: A claims it and B lets it go.
    let first = device_on(b.addr, 1).await.unwrap();
    assert_eq!(first.unacked_frames, 0);
    let on_a = device_on(a.addr, 6);
    wait_for_log(&b_log, &["another gateway", DEVICE, "site-a"]).await;
    command(&sub, "c-on-a").await;
    let report = on_a.await.unwrap();
    assert_eq!(
        report.commands_received, 1,
        "the device got the command on A"
    );
    // Past the deadline, a gateway that had taken it without the device would say `expired`.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        outcomes(&sub.messages(), "c-on-a"),
        vec!["ok"],
        "one outcome, from the gateway the device is on"
    );

    // Back to B: the command follows it there.
    let on_b = device_on(b.addr, 6);
    wait_for_log(&a_log, &["another gateway", DEVICE, "site-b"]).await;
    command(&sub, "c-on-b").await;
    let report = on_b.await.unwrap();
    assert_eq!(
        report.commands_received, 1,
        "the device got the command on B"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(outcomes(&sub.messages(), "c-on-b"), vec!["ok"]);
    let claim = sub
        .messages()
        .iter()
        .rev()
        .find(|(t, _)| t == &format!("devices/{DEVICE}/owner"))
        .map(|(_, p)| serde_json::from_slice::<serde_json::Value>(p).unwrap())
        .expect("an owner claim");
    assert_eq!(claim["gateway_id"], "site-b");

    // B dies without a goodbye: its Last Will says offline; A is still online.
    b.kill().await;
    let seen = sub
        .wait_until(Duration::from_secs(20), |m| !online(m, "site-b"))
        .await;
    assert!(!online(&seen, "site-b"), "B's Last Will published offline");
    assert!(online(&seen, "site-a"), "A's status is untouched");
    let last_b = seen
        .iter()
        .rev()
        .find(|(t, _)| t == "gateway/site-b/status")
        .map(|(_, p)| p.clone());
    assert_eq!(last_b.as_deref(), Some(&b"offline"[..]));

    // A late subscriber sees the same through retained messages.
    let late = Subscriber::start(broker.port, "gateway/+/status").await;
    let retained = late
        .wait_until(Duration::from_secs(10), |m| m.len() >= 2)
        .await;
    assert!(retained.contains(&("gateway/site-a/status".into(), b"online".to_vec())));
    assert!(retained.contains(&("gateway/site-b/status".into(), b"offline".to_vec())));
    assert!(a.terminate().await.success());
}
