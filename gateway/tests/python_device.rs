//! The protocol is a contract for other languages: a Python device written from the README
//! and the .proto (examples/python_device.py, with the official protobuf runtime) gets every
//! frame acknowledged and stored. With `CI` set a missing Python toolchain fails; otherwise
//! the test is skipped.

mod common;

use std::process::Command;

use common::*;

fn python_ready() -> bool {
    Command::new("python3")
        .args(["-c", "import grpc_tools.protoc, google.protobuf"])
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_device_built_from_the_readme_is_acked_and_stored() {
    let gw = TestGateway::start(|_| {}).await;
    run_python_device(&gw, "py-meter-1", &[]).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_device_over_tls_is_acked_and_stored() {
    let dir = tempfile::tempdir().unwrap();
    let pki = common::pki::pki();
    let ca = common::pki::write(dir.path(), "ca.pem", &pki.ca);
    let tls = gateway::config::TcpTlsConfig {
        cert_file: common::pki::write(dir.path(), "gw.pem", &pki.server.0).into(),
        key_file: common::pki::write(dir.path(), "gw.key", &pki.server.1).into(),
    };
    let gw = TestGateway::start(move |c| c.tcp.tls = Some(tls)).await;
    run_python_device(&gw, "py-tls-1", &[&ca]).await;
    gw.stop().await;
}

/// Runs `examples/python_device.py` against `gw` (with `extra` arguments) for 25 frames and
/// checks they are acked and stored; skips (outside CI) without python3 and grpcio-tools.
async fn run_python_device(gw: &TestGateway, device_id: &str, extra: &[&str]) {
    if !python_ready() {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 with grpcio-tools is missing, and CI is set (.ci/run installs it)"
        );
        eprintln!("SKIPPED: python3 -m pip install grpcio-tools");
        return;
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = tempfile::tempdir().unwrap();
    let generated = Command::new("python3")
        .args([
            "-m",
            "grpc_tools.protoc",
            "-I",
            &format!("{root}/proto/proto"),
        ])
        .arg(format!("--python_out={}", out.path().display()))
        .arg(format!("{root}/proto/proto/gateway/v1/device.proto"))
        .status()
        .unwrap();
    assert!(generated.success(), "protoc for Python");

    // "localhost": the name on the test certificate (and where the listener is).
    let addr = format!("localhost:{}", gw.addr.port());
    let device = tokio::process::Command::new("python3")
        .arg(format!("{root}/examples/python_device.py"))
        .args([addr.as_str(), device_id, SECRET, "25"])
        .args(extra)
        .env("PYTHONPATH", out.path())
        .output()
        .await
        .unwrap();
    assert!(
        device.status.success(),
        "python device: {}{}",
        String::from_utf8_lossy(&device.stdout),
        String::from_utf8_lossy(&device.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&device.stdout).trim(), "acked 25");

    let mut conn = open_db(&gw.db).await;
    let (rows, frames): (i64, i64) =
        sqlx::query_as("SELECT COUNT(*), COUNT(DISTINCT seq) FROM telemetry WHERE device_id = ?")
            .bind(device_id)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!((rows, frames), (50, 25));
}
