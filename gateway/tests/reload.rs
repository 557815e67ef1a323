//! SIGHUP on the real binary: a renewed certificate, new limits and a new log level are taken
//! without dropping the links that are open; a broken file is refused and the running
//! settings stay.

mod common;

use std::path::Path;
use std::time::Duration;

use common::pki::{pki, write};
use common::{hello, telemetry};
use firmware_sim::tls::TlsClient;
use futures::{SinkExt, StreamExt};
use proto::v1::{gateway_message, ErrorCode, GatewayMessage};
use proto::DelimitedCodec;
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

type Link = Framed<tokio_rustls::client::TlsStream<TcpStream>, DelimitedCodec<GatewayMessage>>;

async fn connect(addr: std::net::SocketAddr, ca: &Path) -> std::io::Result<Link> {
    let tcp = TcpStream::connect(addr).await?;
    let tls = TlsClient::new(ca, "localhost")
        .unwrap()
        .connect(tcp)
        .await?;
    Ok(Framed::new(tls, DelimitedCodec::default()))
}

async fn next(link: &mut Link) -> Option<gateway_message::Body> {
    match tokio::time::timeout(Duration::from_secs(10), link.next()).await {
        Ok(Some(Ok(m))) => m.body,
        Ok(_) => None,
        Err(_) => panic!("no message within 10 s"),
    }
}

/// Hello as `id` (`--auth none`); the HelloAck or the Error code.
async fn say_hello(link: &mut Link, id: &str) -> Result<(), ErrorCode> {
    link.send(hello(id, "t", 1)).await.unwrap();
    match next(link).await {
        Some(gateway_message::Body::HelloAck(_)) => Ok(()),
        Some(gateway_message::Body::Error(e)) => Err(ErrorCode::try_from(e.code).unwrap()),
        other => panic!("unexpected {other:?}"),
    }
}

async fn acked(link: &mut Link, seq: u64) {
    link.send(telemetry(seq, &[("t", seq as f64)]))
        .await
        .unwrap();
    loop {
        match next(link).await {
            Some(gateway_message::Body::Ack(a)) if a.seq == seq => return,
            Some(_) => {}
            None => panic!("the link closed before the ack of {seq}"),
        }
    }
}

fn config(dir: &Path, max_devices: u32, level: &str) -> String {
    format!(
        "data_dir = {:?}\n[log]\nlevel = {level:?}\n[tcp.tls]\ncert_file = {:?}\nkey_file = {:?}\n[limits]\nmax_devices = {max_devices}\n",
        dir.join("data"),
        dir.join("gateway.pem"),
        dir.join("gateway.key"),
    )
}

fn hup(child: &tokio::process::Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
}

async fn log_has(log: &Path, what: &str) -> bool {
    for _ in 0..100 {
        if std::fs::read_to_string(log).is_ok_and(|t| t.contains(what)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_takes_new_certificates_and_limits_without_dropping_links() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b) = (pki(), pki());
    let ca_a = write(d, "ca-a.pem", &a.ca);
    let ca_b = write(d, "ca-b.pem", &b.ca);
    write(d, "gateway.pem", &a.server.0);
    write(d, "gateway.key", &a.server.1);
    let conf = d.join("gateway.toml");
    std::fs::write(&conf, config(d, 2, "info")).unwrap();
    let log = d.join("gateway.log");
    let (mut child, addr) = common::spawn_gateway(
        &["--config".as_ref(), conf.as_os_str()],
        &[("RUST_LOG", None)],
        &log,
    )
    .await;

    // Two devices under certificate A fill max_devices = 2; a third is refused.
    let mut first = connect(addr, Path::new(&ca_a)).await.unwrap();
    say_hello(&mut first, "d1").await.unwrap();
    acked(&mut first, 1).await;
    let mut second = connect(addr, Path::new(&ca_a)).await.unwrap();
    say_hello(&mut second, "d2").await.unwrap();
    let mut third = connect(addr, Path::new(&ca_a)).await.unwrap();
    assert_eq!(
        say_hello(&mut third, "d3").await,
        Err(ErrorCode::LimitExceeded)
    );

    // A broken file is refused; everything keeps running as it was.
    std::fs::write(&conf, "[limits]\nmax_devices = \"many\"\n").unwrap();
    hup(&child);
    assert!(log_has(&log, "reload refused").await, "no refusal logged");
    acked(&mut first, 2).await;

    // Renewed certificate (another CA) and a higher device limit, same paths.
    write(d, "gateway.pem", &b.server.0);
    write(d, "gateway.key", &b.server.1);
    std::fs::write(&conf, config(d, 10, "debug")).unwrap();
    hup(&child);
    assert!(log_has(&log, "reload: limits").await, "no reload logged");
    assert!(log_has(&log, "reload: tcp.tls").await);
    assert!(log_has(&log, "reload: log.level").await);

    // The links opened under certificate A are still up and acknowledged.
    acked(&mut first, 3).await;
    acked(&mut second, 1).await;
    // New links use certificate B: A's CA no longer verifies it, B's does.
    assert!(connect(addr, Path::new(&ca_a)).await.is_err());
    let mut fourth = connect(addr, Path::new(&ca_b)).await.unwrap();
    say_hello(&mut fourth, "d3").await.unwrap();
    acked(&mut fourth, 1).await;
    // debug is on now: a link's life is logged.
    assert!(log_has(&log, "device said hello").await);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}
