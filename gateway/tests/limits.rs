//! `[limits]` over real TCP links: what is over a limit gets `LIMIT_EXCEEDED` (or waits its
//! turn), is counted, and costs nobody else; nothing acknowledged is touched.

mod common;

use std::time::Duration;

use common::{hello, telemetry, RawClient, TestGateway, SECRET};
use gateway::limits::Limit;
use proto::v1::{gateway_message, ErrorCode, GatewayMessage};

/// Sends `msg` and waits for the Ack of `seq`.
async fn acked(c: &mut RawClient, msg: proto::v1::DeviceMessage, seq: u64) {
    c.send(msg).await;
    loop {
        match c.recv().await {
            Some(GatewayMessage {
                body: Some(gateway_message::Body::Ack(a)),
            }) if a.seq >= seq => return,
            Some(_) => {}
            None => panic!("link closed before the ack of {seq}"),
        }
    }
}

async fn stored_readings(db: &std::path::Path) -> i64 {
    let mut conn = common::open_db(db).await;
    sqlx::query_scalar("SELECT count(*) FROM readings")
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_past_the_per_source_limit_are_refused_and_their_places_come_back() {
    let gw = TestGateway::start(|c| c.limits.max_connections_per_source = 2).await;
    let mut a = RawClient::connect(gw.addr).await;
    a.hello("a", 1).await;
    let mut b = RawClient::connect(gw.addr).await;
    b.hello("b", 1).await;

    let mut c = RawClient::connect(gw.addr).await;
    assert_eq!(c.expect_error_and_close().await, ErrorCode::LimitExceeded);
    assert_eq!(
        gw.metrics.limits_hit[Limit::ConnectionsPerSource as usize].get(),
        1
    );
    // The two admitted links are untouched.
    acked(&mut a, telemetry(1, &[("t", 1.0)]), 1).await;

    // A link that ends gives its place back.
    drop(b);
    let mut again = None;
    for _ in 0..50 {
        let mut d = RawClient::connect(gw.addr).await;
        d.send(hello(
            "d",
            &proto::token::fleet_token(SECRET.as_bytes(), "d"),
            1,
        ))
        .await;
        match d.recv().await {
            Some(GatewayMessage {
                body: Some(gateway_message::Body::HelloAck(_)),
            }) => {
                again = Some(d);
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(
        again.is_some(),
        "a place never came back after a link ended"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_devices_past_max_devices_are_refused_and_known_ones_still_connect() {
    let gw = TestGateway::start(|c| c.limits.max_devices = 2).await;
    for (i, id) in ["m1", "m2"].iter().enumerate() {
        let mut c = RawClient::connect(gw.addr).await;
        c.hello(id, 1).await;
        acked(&mut c, telemetry(1, &[("t", i as f64)]), 1).await;
    }
    let mut third = RawClient::connect(gw.addr).await;
    third
        .send(hello(
            "m3",
            &proto::token::fleet_token(SECRET.as_bytes(), "m3"),
            1,
        ))
        .await;
    assert_eq!(
        third.expect_error_and_close().await,
        ErrorCode::LimitExceeded
    );
    assert_eq!(gw.metrics.limits_hit[Limit::Devices as usize].get(), 1);

    // A device the store knows is not a new one: it reconnects (new epoch too).
    let mut known = RawClient::connect(gw.addr).await;
    known.hello("m1", 2).await;
    acked(&mut known, telemetry(1, &[("t", 9.0)]), 1).await;

    let mut conn = common::open_db(&gw.db).await;
    let ids: Vec<String> = sqlx::query_scalar("SELECT device_id FROM devices ORDER BY device_id")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(ids, ["m1", "m2"]);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_past_the_sensor_and_size_limits_are_refused_unstored() {
    let gw = TestGateway::start(|c| {
        c.limits.max_sensors_per_device = 3;
        c.limits.max_readings_per_frame = 5;
    })
    .await;
    let mut c = RawClient::connect(gw.addr).await;
    c.hello("s", 1).await;
    acked(&mut c, telemetry(1, &[("a", 1.0), ("b", 2.0)]), 1).await;
    acked(&mut c, telemetry(2, &[("c", 3.0), ("a", 4.0)]), 2).await;
    // A fourth sensor.
    c.send(telemetry(3, &[("a", 5.0), ("d", 6.0)])).await;
    assert_eq!(c.expect_error_and_close().await, ErrorCode::LimitExceeded);
    assert_eq!(
        gw.metrics.limits_hit[Limit::SensorsPerDevice as usize].get(),
        1
    );

    // After a reconnect the store's three names count, and they are still welcome.
    let mut c = RawClient::connect(gw.addr).await;
    assert_eq!(c.hello("s", 1).await, 2);
    acked(&mut c, telemetry(3, &[("b", 7.0)]), 3).await;
    c.send(telemetry(4, &[("e", 1.0)])).await;
    assert_eq!(c.expect_error_and_close().await, ErrorCode::LimitExceeded);

    let mut c = RawClient::connect(gw.addr).await;
    c.hello("s", 1).await;
    let six: Vec<(&str, f64)> = (0..6).map(|i| ("a", f64::from(i))).collect();
    c.send(telemetry(4, &six)).await;
    assert_eq!(c.expect_error_and_close().await, ErrorCode::LimitExceeded);
    assert_eq!(
        gw.metrics.limits_hit[Limit::ReadingsPerFrame as usize].get(),
        1
    );

    // Exactly the acknowledged frames are stored.
    assert_eq!(stored_readings(&gw.db).await, 5);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_over_its_rate_is_slowed_and_loses_nothing() {
    let gw = TestGateway::start(|c| c.limits.device_readings_per_second = 200).await;
    let mut c = RawClient::connect(gw.addr).await;
    c.hello("fast", 1).await;
    let batch: Vec<(&str, f64)> = (0..50).map(|i| ("v", f64::from(i))).collect();
    // 20 frames of 50 readings at once: five seconds' worth of its budget.
    for seq in 1..=20 {
        c.send(telemetry(seq, &batch)).await;
    }
    loop {
        match c.recv().await {
            Some(GatewayMessage {
                body: Some(gateway_message::Body::Ack(a)),
            }) if a.seq == 20 => break,
            Some(GatewayMessage {
                body: Some(gateway_message::Body::Ack(_)),
            }) => {}
            other => panic!("expected acks, got {other:?}"),
        }
    }
    assert!(gw.metrics.limits_hit[Limit::DeviceRate as usize].get() >= 1);
    assert_eq!(stored_readings(&gw.db).await, 1000);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hellos_past_the_source_rate_wait_then_are_refused() {
    let gw = TestGateway::start(|c| {
        c.limits.hellos_per_second_per_source = 1;
        c.session.hello_timeout = Duration::from_millis(1500);
    })
    .await;
    // One token a second, waits of up to 1.5 s: the first Hello at once, the second after
    // its wait, the third (two seconds' wait) refused.
    let mut links = Vec::new();
    for id in ["h1", "h2", "h3"] {
        let mut c = RawClient::connect(gw.addr).await;
        c.send(hello(
            id,
            &proto::token::fleet_token(SECRET.as_bytes(), id),
            1,
        ))
        .await;
        links.push(c);
    }
    let mut outcomes = Vec::new();
    for c in &mut links {
        outcomes.push(match c.recv().await {
            Some(GatewayMessage {
                body: Some(gateway_message::Body::HelloAck(_)),
            }) => "ack",
            Some(GatewayMessage {
                body: Some(gateway_message::Body::Error(e)),
            }) if e.code == ErrorCode::LimitExceeded as i32 => "limit",
            other => panic!("unexpected {other:?}"),
        });
    }
    outcomes.sort_unstable();
    assert_eq!(outcomes, ["ack", "ack", "limit"]);
    assert!(gw.metrics.limits_hit[Limit::HellosPerSource as usize].get() >= 2);
    gw.stop().await;
}
