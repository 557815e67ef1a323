//! `mqtts://` against a real Mosquitto TLS listener that requires a client certificate, with
//! a CA and certificates made for the test.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::mqtt::Subscriber;
use common::pki::{pki, write};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_with_a_ca_file_and_client_certificate_reaches_mosquitto() {
    let Some(mosquitto) = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "mosquitto is not installed, and CI is set"
        );
        eprintln!("SKIPPED: mosquitto is not installed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let ca = write(dir.path(), "ca.pem", &pki.ca);
    let server_cert = write(dir.path(), "server.pem", &pki.server.0);
    let server_key = write(dir.path(), "server.key", &pki.server.1);
    let client_cert = write(dir.path(), "client.pem", &pki.client.0);
    let client_key = write(dir.path(), "client.key", &pki.client.1);
    let (plain, tls) = (free_port(), free_port());
    let conf = write(
        dir.path(),
        "mosquitto.conf",
        &format!(
            "per_listener_settings false\nallow_anonymous true\npersistence false\n\
             listener {plain} 127.0.0.1\n\
             listener {tls} 127.0.0.1\ncafile {ca}\ncertfile {server_cert}\nkeyfile {server_key}\nrequire_certificate true\n"
        ),
    );
    let _broker = tokio::process::Command::new(mosquitto)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(("127.0.0.1", tls))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sub = Subscriber::start(plain, "gateway/test-gw/#").await;

    // Without a client certificate the broker refuses the TLS session: the gateway keeps
    // storing and acknowledging, and never counts a connection.
    let (url, ca_path) = (format!("mqtts://127.0.0.1:{tls}"), ca.clone());
    let refused = TestGateway::start(move |c| {
        c.mqtt.enabled = true;
        c.mqtt.url = Some(url);
        c.mqtt.ca_file = Some(ca_path.into());
    })
    .await;
    let report = firmware_sim::run_fleet(firmware_sim::FleetConfig {
        devices: 1,
        duration: Duration::from_secs(1),
        rate: 10.0,
        ..fleet(refused.addr)
    })
    .await;
    assert!(report.is_clean(), "{}", report.to_table());
    assert_eq!(refused.metrics.mqtt_connects.get(), 0);
    refused.stop().await;

    let url = format!("mqtts://127.0.0.1:{tls}");
    let gw = TestGateway::start(move |c| {
        c.mqtt.enabled = true;
        c.mqtt.url = Some(url);
        c.mqtt.ca_file = Some(ca.into());
        c.mqtt.client_cert = Some(client_cert.into());
        c.mqtt.client_key = Some(client_key.into());
    })
    .await;
    let report = firmware_sim::run_fleet(firmware_sim::FleetConfig {
        devices: 2,
        duration: Duration::from_secs(1),
        rate: 10.0,
        ..fleet(gw.addr)
    })
    .await;
    assert!(report.is_clean(), "{}", report.to_table());
    let messages = sub
        .wait_until(Duration::from_secs(10), |m| {
            m.iter().filter(|(t, _)| t.ends_with("/telemetry")).count() as u64
                >= report.frames_acked
        })
        .await;
    let telemetry = messages
        .iter()
        .filter(|(t, _)| t.ends_with("/telemetry"))
        .count() as u64;
    assert!(
        telemetry >= report.frames_acked,
        "{telemetry} of {} frames over TLS",
        report.frames_acked
    );
    assert!(gw.metrics.mqtt_connects.get() >= 1);
    gw.stop().await;
}
