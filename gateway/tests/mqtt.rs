//! The MQTT bridge against two real brokers: the embedded one (rumqttd, as `gateway broker`)
//! and Debian's Mosquitto, each a process the test starts on an ephemeral port. With `CI`
//! set, a missing Mosquitto fails these tests; otherwise they say they were skipped.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use common::mqtt::{BrokerKind, Subscriber, TestBroker};
use common::*;
use firmware_sim::gate::Gate;
use gateway::config::{BacklogPolicy, Config};
use rumqttc::QoS;

/// Runs `$scenario(kind)` once per broker kind, as two tests.
macro_rules! against_both_brokers {
    ($scenario:ident) => {
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$scenario(super::BrokerKind::Embedded).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mosquitto() {
                super::$scenario(super::BrokerKind::Mosquitto).await
            }
        }
    };
}

const TELEMETRY: &str = "gateway/test-gw/devices/+/telemetry";

fn bridged(url: String) -> impl FnOnce(&mut Config) {
    move |c| {
        c.mqtt.enabled = true;
        c.mqtt.url = Some(url);
        c.mqtt.reconnect_min = Duration::from_millis(200);
        c.mqtt.reconnect_max = Duration::from_millis(500);
    }
}

/// (device, seq) of every stored telemetry frame.
async fn stored_frames(db: &Path) -> HashSet<(String, i64)> {
    let mut conn = open_db(db).await;
    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT DISTINCT device_id, seq FROM telemetry")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    rows.into_iter().collect()
}

/// (device, seq) of each telemetry message, in arrival order.
fn published(messages: &[(String, Vec<u8>)]) -> Vec<(String, i64)> {
    messages
        .iter()
        .filter(|(topic, _)| topic.ends_with("/telemetry"))
        .map(|(_, payload)| {
            let v: serde_json::Value = serde_json::from_slice(payload).expect("JSON telemetry");
            (
                v["device_id"].as_str().unwrap().to_owned(),
                v["seq"].as_i64().unwrap(),
            )
        })
        .collect()
}

fn covers(messages: &[(String, Vec<u8>)], stored: &HashSet<(String, i64)>) -> bool {
    let seen: HashSet<_> = published(messages).into_iter().collect();
    stored.is_subset(&seen)
}

/// Every stored frame arrived at least once, and each device's frames first arrived in
/// seq order.
fn assert_complete_and_in_order(messages: &[(String, Vec<u8>)], stored: &HashSet<(String, i64)>) {
    let arrivals = published(messages);
    let seen: HashSet<_> = arrivals.iter().cloned().collect();
    let missing: Vec<_> = stored.difference(&seen).take(10).collect();
    assert!(
        missing.is_empty(),
        "{} stored frames never published, e.g. {missing:?}",
        stored.len() - stored.intersection(&seen).count()
    );
    let mut first_seen: HashMap<&str, Vec<i64>> = HashMap::new();
    let mut dedup = HashSet::new();
    for (device, seq) in &arrivals {
        if dedup.insert((device, seq)) {
            first_seen.entry(device).or_default().push(*seq);
        }
    }
    for (device, seqs) in first_seen {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{device}: first arrivals out of order: {seqs:?}"
        );
    }
}

async fn uplink_survives_a_broker_outage(kind: BrokerKind) {
    let Some(mut broker) = TestBroker::start(kind).await else {
        return;
    };
    let sub = Subscriber::start(broker.port, TELEMETRY).await;
    let gate = Gate::start("127.0.0.1:0", &format!("127.0.0.1:{}", broker.port), true)
        .await
        .expect("start the gate");
    let gw = TestGateway::start(bridged(gate.url())).await;
    let fleet = tokio::spawn(firmware_sim::run_fleet(firmware_sim::FleetConfig {
        devices: 10,
        rate: 20.0,
        readings: 2,
        duration: Duration::from_secs(5),
        drain: Duration::from_secs(20),
        ..fleet(gw.addr)
    }));

    tokio::time::sleep(Duration::from_millis(1500)).await;
    gate.close();
    broker.stop().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    broker.restart().await;
    // The subscriber is back before the gateway may reconnect, so nothing passes it by.
    sub.wait_subscribed(2).await;
    gate.open();

    let report = fleet.await.unwrap();
    assert!(
        report.is_clean(),
        "devices kept being acked through the outage: {}",
        report.to_table()
    );
    assert_stored_exactly_once(&gw.db, &report, 2).await;
    let stored = stored_frames(&gw.db).await;
    let messages = sub
        .wait_until(Duration::from_secs(30), |m| covers(m, &stored))
        .await;
    assert_complete_and_in_order(&messages, &stored);
    assert!(
        gw.metrics.mqtt_connects.get() >= 2,
        "the bridge reconnected"
    );
    gw.stop().await;
}
against_both_brokers!(uplink_survives_a_broker_outage);

async fn a_backlog_survives_a_gateway_kill(kind: BrokerKind) {
    let Some(broker) = TestBroker::start(kind).await else {
        return;
    };
    let sub = Subscriber::start(broker.port, TELEMETRY).await;
    let gate = Gate::start("127.0.0.1:0", &format!("127.0.0.1:{}", broker.port), false)
        .await
        .expect("start the gate"); // the broker is unreachable at first
    let dir = tempfile::tempdir().unwrap();
    let (db, log) = (
        dir.path().join("gateway.db"),
        dir.path().join("gateway.log"),
    );
    let listen = format!("127.0.0.1:{}", free_port());
    let url = gate.url();
    let args = ["--mqtt", url.as_str()];
    let gw = GatewayProcess::start(&db, &listen, &log, &args).await;
    let report = firmware_sim::run_fleet(firmware_sim::FleetConfig {
        devices: 5,
        rate: 20.0,
        readings: 2,
        duration: Duration::from_secs(2),
        ..fleet(gw.addr)
    })
    .await;
    assert!(report.is_clean(), "{}", report.to_table());
    gw.kill().await;

    let gw = GatewayProcess::start(&db, &listen, &log, &args).await;
    gate.open();
    let stored = stored_frames(&db).await;
    assert_eq!(stored.len() as u64, report.frames_acked);
    let messages = sub
        .wait_until(Duration::from_secs(30), |m| covers(m, &stored))
        .await;
    assert_complete_and_in_order(&messages, &stored);
    assert!(gw.terminate().await.success());
}
against_both_brokers!(a_backlog_survives_a_gateway_kill);

/// The outcome published for command `id`, waiting up to 15 s.
async fn outcome(sub: &Subscriber, id: &str) -> serde_json::Value {
    let messages = sub
        .wait_until(Duration::from_secs(15), |m| {
            m.iter().any(|(t, p)| {
                t.ends_with("/commands/results")
                    && serde_json::from_slice::<serde_json::Value>(p).is_ok_and(|v| v["id"] == id)
            })
        })
        .await;
    messages
        .iter()
        .filter(|(t, _)| t.ends_with("/commands/results"))
        .filter_map(|(_, p)| serde_json::from_slice::<serde_json::Value>(p).ok())
        .find(|v| v["id"] == id)
        .unwrap_or_else(|| {
            let got: Vec<_> = messages
                .iter()
                .map(|(t, p)| format!("{t} {}", String::from_utf8_lossy(p)))
                .collect();
            panic!("no outcome for command {id}; received: {got:#?}")
        })
}

async fn command(sub: &Subscriber, device: &str, json: &str) {
    sub.client
        .publish(
            format!("gateway/test-gw/devices/{device}/commands"),
            QoS::AtLeastOnce,
            false,
            json.as_bytes().to_vec(),
        )
        .await
        .unwrap();
}

async fn commands_reach_devices_and_every_outcome_is_published(kind: BrokerKind) {
    let Some(broker) = TestBroker::start(kind).await else {
        return;
    };
    let sub = Subscriber::start(broker.port, "gateway/test-gw/#").await;
    let gw = TestGateway::start(bridged(broker.url())).await;
    let store = gateway::store::Store::open(&gw.db, gateway::config::Durability::ProcessCrash)
        .await
        .unwrap();
    for known in ["late-00000", "gone"] {
        gateway::store::devices::add(store.pool(), known, false)
            .await
            .unwrap();
    }
    let run = |prefix: &str, commands: firmware_sim::device::CommandBehaviour, secs: u64| {
        tokio::spawn(firmware_sim::run_fleet(firmware_sim::FleetConfig {
            devices: 1,
            rate: 5.0,
            readings: 1,
            duration: Duration::from_secs(secs),
            prefix: prefix.into(),
            commands,
            ..fleet(gw.addr)
        }))
    };
    use firmware_sim::device::CommandBehaviour;
    let ok = run("ok-", CommandBehaviour::default(), 4);
    let failing = run(
        "fail-",
        CommandBehaviour {
            failure_rate: 1.0,
            ..Default::default()
        },
        4,
    );
    let mute = run(
        "mute-",
        CommandBehaviour {
            ignore: true,
            ..Default::default()
        },
        4,
    );
    // The gateway announces itself after subscribing for commands; devices once connected.
    let online = |m: &[(String, Vec<u8>)], topic: &str| {
        m.iter().any(|(t, p)| {
            t == topic && (p.as_slice() == b"online" || p.starts_with(br#"{"status":"online""#))
        })
    };
    let ready = |m: &[(String, Vec<u8>)]| {
        online(m, "gateway/test-gw/status")
            && ["ok-00000", "fail-00000", "mute-00000"]
                .iter()
                .all(|d| online(m, &format!("gateway/test-gw/devices/{d}/status")))
    };
    let seen = sub.wait_until(Duration::from_secs(20), ready).await;
    assert!(
        ready(&seen),
        "the gateway and its devices came online: {:?}",
        seen.iter().map(|(t, _)| t).collect::<Vec<_>>()
    );

    command(
        &sub,
        "ok-00000",
        r#"{"id":"c-ok","name":"reboot","params":{"in_s":1}}"#,
    )
    .await;
    command(&sub, "fail-00000", r#"{"id":"c-err","name":"reboot"}"#).await;
    command(
        &sub,
        "mute-00000",
        r#"{"id":"c-mute","name":"reboot","timeout_ms":700}"#,
    )
    .await;
    command(&sub, "ghost", r#"{"id":"c-ghost","name":"reboot"}"#).await;
    command(&sub, "ok-00000", r#"{"id":"c-bad","params":1}"#).await;
    command(
        &sub,
        "gone",
        r#"{"id":"c-gone","name":"reboot","timeout_ms":300}"#,
    )
    .await;
    command(
        &sub,
        "late-00000",
        r#"{"id":"c-late","name":"reboot","timeout_ms":20000}"#,
    )
    .await;
    // A repeated delivery of the same id is not a second command.
    command(
        &sub,
        "ok-00000",
        r#"{"id":"c-ok","name":"reboot","params":{"in_s":1}}"#,
    )
    .await;

    assert_eq!(outcome(&sub, "c-ok").await["status"], "ok");
    assert_eq!(
        outcome(&sub, "c-ok").await["payload"],
        "b2s=",
        "the device's payload, base64"
    );
    assert_eq!(outcome(&sub, "c-err").await["status"], "error");
    assert_eq!(outcome(&sub, "c-mute").await["status"], "timeout");
    let ghost = outcome(&sub, "c-ghost").await;
    assert_eq!(
        (ghost["status"].as_str(), ghost["detail"].as_str()),
        (Some("rejected"), Some("unknown device"))
    );
    assert_eq!(outcome(&sub, "c-bad").await["status"], "rejected");
    assert_eq!(outcome(&sub, "c-gone").await["status"], "expired");

    // The offline device connects later and gets its waiting command.
    let late = run("late-", CommandBehaviour::default(), 2);
    assert_eq!(outcome(&sub, "c-late").await["status"], "ok");

    let ok = ok.await.unwrap();
    assert_eq!(ok.outcomes[0].commands_received, vec!["c-ok".to_owned()]);
    assert_eq!(ok.results_acked, 1);
    assert!(failing.await.unwrap().is_clean());
    assert_eq!(
        mute.await.unwrap().outcomes[0].commands_received,
        vec!["c-mute".to_owned()]
    );
    assert_eq!(
        late.await.unwrap().outcomes[0].commands_received,
        vec!["c-late".to_owned()]
    );
    let results: Vec<_> = sub
        .messages()
        .into_iter()
        .filter(|(t, p)| t.ends_with("/commands/results") && p.windows(6).any(|w| w == b"\"c-ok\""))
        .collect();
    assert_eq!(results.len(), 1, "one outcome per command id: {results:?}");
    gw.stop().await;
}
against_both_brokers!(commands_reach_devices_and_every_outcome_is_published);

async fn device_status_is_retained_online_then_offline(kind: BrokerKind) {
    let Some(broker) = TestBroker::start(kind).await else {
        return;
    };
    let gw = TestGateway::start(bridged(broker.url())).await;
    let report = firmware_sim::run_fleet(firmware_sim::FleetConfig {
        devices: 2,
        rate: 5.0,
        duration: Duration::from_secs(1),
        prefix: "st-".into(),
        ..fleet(gw.addr)
    })
    .await;
    assert!(report.is_clean());
    // A subscriber that arrives afterwards sees the retained state (once the gateway has
    // noticed the devices left: a fresh subscriber each time, so only retained messages count).
    let mut messages = Vec::new();
    for _ in 0..50 {
        let sub = Subscriber::start(broker.port, "gateway/test-gw/#").await;
        messages = sub
            .wait_until(Duration::from_secs(2), |m| {
                m.iter().filter(|(t, _)| t.ends_with("/status")).count() >= 3
            })
            .await;
        let offline = |id: &str| {
            messages.iter().any(|(t, p)| {
                t == &format!("gateway/test-gw/devices/{id}/status")
                    && String::from_utf8_lossy(p).contains("offline")
            })
        };
        if offline("st-00000") && offline("st-00001") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = |topic: &str| -> serde_json::Value {
        let (_, p) = messages
            .iter()
            .rev()
            .find(|(t, _)| t == topic)
            .unwrap_or_else(|| panic!("no {topic}"));
        serde_json::from_slice(p)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(p).into()))
    };
    assert_eq!(status("gateway/test-gw/status"), "online");
    let device = status("gateway/test-gw/devices/st-00000/status");
    assert_eq!(
        (device["status"].as_str(), device["link"].as_str()),
        (Some("offline"), Some("tcp"))
    );
    assert!(device["ts_ms"].as_i64().unwrap() > 0);
    gw.stop().await;
    let sub = Subscriber::start(broker.port, "gateway/test-gw/status").await;
    let m = sub
        .wait_until(Duration::from_secs(5), |m| !m.is_empty())
        .await;
    assert_eq!(
        m.last().map(|(_, p)| p.as_slice()),
        Some(&b"offline"[..]),
        "the gateway says offline when it stops"
    );
}
against_both_brokers!(device_status_is_retained_online_then_offline);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backlog_under_drop_oldest_drops_the_oldest_and_keeps_the_store() {
    let Some(broker) = TestBroker::start(BrokerKind::Embedded).await else {
        return;
    };
    let gate = Gate::start("127.0.0.1:0", &format!("127.0.0.1:{}", broker.port), false)
        .await
        .expect("start the gate");
    let url = gate.url();
    let gw = TestGateway::start(move |c| {
        bridged(url)(c);
        c.mqtt.backlog.max_bytes = 8 * 1024;
        c.mqtt.backlog.when_full = BacklogPolicy::DropOldest;
    })
    .await;
    let report = firmware_sim::run_fleet(firmware_sim::FleetConfig {
        devices: 5,
        rate: 20.0,
        readings: 4,
        duration: Duration::from_secs(2),
        ..fleet(gw.addr)
    })
    .await;
    assert!(
        report.is_clean(),
        "devices are never slowed under drop-oldest: {}",
        report.to_table()
    );
    assert_stored_exactly_once(&gw.db, &report, 4).await;
    let dropped = gw.metrics.uplink_dropped.get();
    assert!(dropped > 0, "frames were dropped from the uplink");
    assert!(gw.metrics.uplink_backlog_bytes.get() <= 8 * 1024);
    assert_eq!(gw.metrics.uplink_backlog_full.get(), 1);

    // Once the broker is reachable, what is left (the newest frames) goes out.
    let sub = Subscriber::start(broker.port, TELEMETRY).await;
    gate.open();
    let left = report.frames_acked - dropped;
    let messages = sub
        .wait_until(Duration::from_secs(20), |m| {
            published(m).len() as u64 >= left
        })
        .await;
    let seqs = published(&messages);
    assert_eq!(
        seqs.len() as u64,
        left,
        "exactly the frames not dropped are published"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backlog_under_slow_holds_acks_until_the_broker_returns() {
    let Some(broker) = TestBroker::start(BrokerKind::Embedded).await else {
        return;
    };
    let sub = Subscriber::start(broker.port, TELEMETRY).await;
    let gate = Gate::start("127.0.0.1:0", &format!("127.0.0.1:{}", broker.port), false)
        .await
        .expect("start the gate");
    let url = gate.url();
    let gw = TestGateway::start(move |c| {
        bridged(url)(c);
        c.mqtt.backlog.max_bytes = 8 * 1024;
        c.mqtt.backlog.when_full = BacklogPolicy::Slow;
    })
    .await;
    let fleet = tokio::spawn(firmware_sim::run_fleet(firmware_sim::FleetConfig {
        devices: 5,
        rate: 20.0,
        readings: 4,
        duration: Duration::from_secs(3),
        drain: Duration::from_secs(30),
        ..fleet(gw.addr)
    }));
    // Wait for the budget to be reached, then see ingest held.
    for _ in 0..200 {
        if gw.metrics.uplink_backlog_full.get() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        gw.metrics.uplink_backlog_full.get(),
        1,
        "the budget was reached"
    );
    let held = gw.metrics.frames_stored.get();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        gw.metrics.frames_stored.get(),
        held,
        "nothing is stored while the backlog is full"
    );

    gate.open();
    let report = fleet.await.unwrap();
    assert!(
        report.is_clean(),
        "every frame is acked once the broker is back: {}",
        report.to_table()
    );
    assert_eq!(gw.metrics.uplink_dropped.get(), 0, "slow never drops");
    assert!(
        report.config_updates >= 5,
        "every device was asked to report less often: {}",
        report.to_table()
    );
    assert_stored_exactly_once(&gw.db, &report, 4).await;
    // Caught up: the pacer lifts pacing by itself once the load is gone.
    for _ in 0..400 {
        if gw.metrics.pacing_interval.get() == 0.0 && gw.metrics.pacing_devices.get() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(gw.metrics.pacing_interval.get(), 0.0, "pacing lifted");
    assert_eq!(gw.metrics.pacing_devices.get(), 0);
    assert!(gw.metrics.pacing_episodes.get() >= 1);
    let stored = stored_frames(&gw.db).await;
    let messages = sub
        .wait_until(Duration::from_secs(20), |m| covers(m, &stored))
        .await;
    assert_complete_and_in_order(&messages, &stored);
    gw.stop().await;
}
