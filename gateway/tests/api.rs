//! The operator API against a real gateway (the binary, or the library on real sockets),
//! a real simulated fleet, and real HTTP and WebSocket clients (reqwest, tokio-tungstenite).

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use firmware_sim::FleetConfig;
use futures::{SinkExt, StreamExt};
use proto::v1::{gateway_message, ErrorCode, GatewayMessage};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("http client")
}

// GET with the test token: the status and the JSON body.
use common::api_get as get;

/// POST JSON with the test token; the status and the JSON body.
async fn post(http: SocketAddr, path: &str, body: Value) -> (u16, Value) {
    let r = client()
        .post(format!("http://{http}{path}"))
        .bearer_auth(API_TOKEN)
        .json(&body)
        .send()
        .await
        .expect("POST");
    let status = r.status().as_u16();
    (status, r.json().await.expect("JSON body"))
}

/// Asserts an error response: its status, its code, and that its message mentions `what`.
fn expect_error((status, body): (u16, Value), want: u16, code: &str, what: &str) {
    assert_eq!(status, want, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(what), "{message:?} should mention {what}");
}

/// Polls `path` until `done` says yes (or panics after 30 s).
async fn wait_for(http: SocketAddr, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..300 {
        let (status, body) = get(http, path).await;
        if status == 200 && done(&body) {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{path} never reached the expected state");
}

fn ids(page: &Value) -> Vec<String> {
    page["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect()
}

fn fleet_of(gw: SocketAddr, devices: usize, rate: f64, seconds: u64) -> FleetConfig {
    FleetConfig {
        devices,
        rate,
        readings: 4,
        duration: Duration::from_secs(seconds),
        ramp: Duration::from_millis(200),
        ..fleet(gw)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_fifty_shows_online_then_offline_and_its_readings_match_the_acks() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    let gw = GatewayProcess::start(&db, "127.0.0.1:0", &dir.path().join("gw.log"), &[]).await;
    let http = gw.http;
    let run = tokio::spawn(firmware_sim::run_fleet(fleet_of(gw.addr, 50, 20.0, 4)));

    let online = wait_for(http, "/api/v1/devices?online=true&limit=1000", |p| {
        ids(p).len() == 50
    })
    .await;
    for d in online["devices"].as_array().unwrap() {
        assert_eq!(d["online"], true);
        assert_eq!(d["link"], "tcp");
        assert_eq!(d["firmware_version"], "firmware-sim/0.1.0");
        assert!(d["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    }
    // Pages of 20 walk the same 50 ids, in order, each once.
    let mut walked = Vec::new();
    let mut after = String::new();
    loop {
        let (status, page) = get(http, &format!("/api/v1/devices?limit=20&after={after}")).await;
        assert_eq!(status, 200);
        walked.extend(ids(&page));
        match page["next"].as_str() {
            Some(next) => after = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(walked, ids(&online));

    let report = run.await.unwrap();
    assert!(report.is_clean(), "{}", report.to_table());
    wait_for(http, "/api/v1/devices?online=true", |p| ids(p).is_empty()).await;
    let (_, offline) = get(http, "/api/v1/devices?online=false&limit=1000").await;
    assert_eq!(ids(&offline).len(), 50);

    // One device: every reading the simulator saw acknowledged, through the pages.
    let outcome = &report.outcomes[7];
    let id = &outcome.device_id;
    let (_, device) = get(http, &format!("/api/v1/devices/{id}")).await;
    assert_eq!(device["frames_total"], outcome.frames_acked);
    assert_eq!(device["readings_total"], outcome.readings_acked);
    assert_eq!(device["last_seq"], outcome.last_acked_seq);
    assert_eq!(device["online"], false);
    assert_eq!(device["sensors"].as_array().unwrap().len(), 4);
    let mut readings = Vec::new();
    let mut after = String::new();
    loop {
        let (status, page) = get(
            http,
            &format!("/api/v1/devices/{id}/readings?order=asc&limit=37&after={after}"),
        )
        .await;
        assert_eq!(status, 200, "{page}");
        readings.extend(page["readings"].as_array().unwrap().iter().cloned());
        match page["next"].as_str() {
            Some(next) => after = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(readings.len() as u64, outcome.readings_acked);
    let mut distinct: Vec<(i64, u64, String)> = readings
        .iter()
        .map(|r| {
            (
                r["ts_ms"].as_i64().unwrap(),
                r["seq"].as_u64().unwrap(),
                r["sensor"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        distinct.windows(2).all(|w| w[0].0 <= w[1].0),
        "oldest first"
    );
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), readings.len(), "no reading twice");

    // Newest first gives the same readings reversed.
    let (_, newest) = get(http, &format!("/api/v1/devices/{id}/readings?limit=10000")).await;
    let mut newest: Vec<Value> = newest["readings"].as_array().unwrap().clone();
    newest.reverse();
    assert_eq!(newest, readings);

    // Step aggregates agree with the raw rows, per sensor and step.
    let (_, agg) = get(
        http,
        &format!("/api/v1/devices/{id}/readings?step=1s&order=asc&limit=10000"),
    )
    .await;
    let mut expected: BTreeMap<(String, i64), (f64, f64, f64, i64)> = BTreeMap::new();
    for r in &readings {
        let key = (
            r["sensor"].as_str().unwrap().to_owned(),
            r["ts_ms"].as_i64().unwrap() / 1000 * 1000,
        );
        let v = r["value"].as_f64().unwrap();
        let e = expected.entry(key).or_insert((f64::MAX, f64::MIN, 0.0, 0));
        e.0 = e.0.min(v);
        e.1 = e.1.max(v);
        e.2 += v;
        e.3 += 1;
    }
    let buckets = agg["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), expected.len());
    for b in buckets {
        let key = (
            b["sensor"].as_str().unwrap().to_owned(),
            b["ts_ms"].as_i64().unwrap(),
        );
        let (min, max, sum, count) = expected[&key];
        assert_eq!(b["count"].as_i64().unwrap(), count, "{key:?}");
        assert_eq!(b["min"].as_f64().unwrap(), min);
        assert_eq!(b["max"].as_f64().unwrap(), max);
        assert!((b["avg"].as_f64().unwrap() - sum / count as f64).abs() < 1e-9);
    }
    // Paged aggregates are the same buckets.
    let mut paged = Vec::new();
    let mut after = String::new();
    loop {
        let (_, page) = get(
            http,
            &format!("/api/v1/devices/{id}/readings?step=1s&order=asc&limit=3&after={after}"),
        )
        .await;
        paged.extend(page["buckets"].as_array().unwrap().iter().cloned());
        match page["next"].as_str() {
            Some(next) => after = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(&paged, buckets);

    // /metrics, read with a Prometheus parser: every acked frame stored once.
    let metrics = scrape(http).await;
    assert_eq!(
        metrics["gateway_frames_stored_total"] as u64,
        report.frames_acked
    );
    assert_eq!(
        metrics["gateway_readings_stored_total"] as u64,
        report.readings_acked
    );
    assert_eq!(metrics["gateway_connections_total{link=tcp}"], 50.0);
    assert_eq!(metrics["gateway_sessions_active"], 0.0);
    assert!(metrics["gateway_device_ack_latency_seconds_count"] > 0.0);
    // The stats saw the load.
    let (_, stats) = get(http, "/api/v1/stats?history=60").await;
    assert_eq!(stats["frames_total"], report.frames_acked);
    assert!(!stats["history"].as_array().unwrap().is_empty());
    assert_eq!(gw.terminate().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_coded_json_errors_naming_the_problem() {
    let gw = TestGateway::start(|_| {}).await;
    let http = gw.http;
    let c = client();
    for (token, path) in [
        (None, "/api/v1/devices"),
        (Some("wrong-token-0123456789"), "/api/v1/devices"),
        (None, "/api/v1/openapi.json"),
    ] {
        let mut req = c.get(format!("http://{http}{path}"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert!(r.headers().contains_key("www-authenticate"));
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    // Health and metrics are open by default.
    let r = c
        .get(format!("http://{http}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(format!("http://{http}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    expect_error(
        get(http, "/api/v1/devices?limit=0").await,
        400,
        "bad_parameter",
        "`limit`",
    );
    expect_error(
        get(http, "/api/v1/devices?onlin=true").await,
        400,
        "bad_parameter",
        "`onlin`",
    );
    expect_error(
        get(http, "/api/v1/devices/ghost").await,
        404,
        "not_found",
        "ghost",
    );
    expect_error(
        get(http, "/api/v1/devices/ghost/readings").await,
        404,
        "not_found",
        "ghost",
    );
    expect_error(
        get(http, "/api/v1/nothing-here").await,
        404,
        "not_found",
        "nothing-here",
    );

    // Provision, then the same id again: conflict; a bad body names its field.
    let (status, body) = post(http, "/api/v1/devices", json!({"id": "meter-9"})).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["token"].as_str().unwrap().len(), 48);
    let again = post(http, "/api/v1/devices", json!({"id": "meter-9"})).await;
    expect_error(again, 409, "conflict", "meter-9");
    let nameless = post(http, "/api/v1/devices", json!({"name": "x"})).await;
    expect_error(nameless, 400, "bad_body", "id");
    let soon = get(http, "/api/v1/devices/meter-9/readings?from=soon").await;
    expect_error(soon, 400, "bad_parameter", "`from`");
    let junk = get(http, "/api/v1/devices/meter-9/readings?after=xyz").await;
    expect_error(junk, 400, "bad_parameter", "`after`");
    let ghost = post(http, "/api/v1/devices/ghost/commands", json!({"name": "x"})).await;
    expect_error(ghost, 404, "not_found", "ghost");

    // A body without its content type is a 415, in the same JSON shape.
    let r = c
        .post(format!("http://{http}/api/v1/devices"))
        .bearer_auth(API_TOKEN)
        .body(r#"{"id":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "bad_body"
    );
    // Browsers on other origins may call it (the token still decides).
    let r = c
        .request(
            reqwest::Method::OPTIONS,
            format!("http://{http}/api/v1/stats"),
        )
        .header("origin", "http://grafana.site:3000")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    // HTTP/2 in the clear (prior knowledge) is served too.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2
        .get(format!("http://{http}/api/v1/stats"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.version()),
        (200, reqwest::Version::HTTP_2)
    );

    // The OpenAPI document lists the routes.
    let (status, doc) = get(http, "/api/v1/openapi.json").await;
    assert_eq!(status, 200);
    assert!(doc["paths"]["/api/v1/devices/{id}/readings"]["get"].is_object());
    gw.stop().await;
}

/// Streams telemetry on a raw link until the gateway closes it; returns the error code
/// and how many frames were acknowledged.
async fn stream_until_closed(mut link: RawClient) -> (Option<ErrorCode>, u64) {
    let mut seq = 0;
    let mut acked = 0;
    loop {
        seq += 1;
        link.send(telemetry(seq, &[("t", seq as f64)])).await;
        match link.recv().await {
            Some(GatewayMessage {
                body: Some(gateway_message::Body::Ack(a)),
            }) => acked = a.seq,
            Some(GatewayMessage {
                body: Some(gateway_message::Body::Error(e)),
            }) => return (ErrorCode::try_from(e.code).ok(), acked),
            Some(_) => {}
            None => return (None, acked),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_over_the_api_closes_the_live_link_at_once_and_keeps_its_data() {
    let gw = TestGateway::start(|_| {}).await;
    let http = gw.http;
    let others = tokio::spawn(firmware_sim::run_fleet(fleet_of(gw.addr, 5, 50.0, 3)));
    let mut link = RawClient::connect(gw.addr).await;
    link.hello("victim", 1).await;
    let streaming = tokio::spawn(stream_until_closed(link));
    wait_for(http, "/api/v1/devices/victim", |d| {
        d["frames_total"].as_u64().unwrap_or(0) >= 20
    })
    .await;

    let (status, body) = post(http, "/api/v1/devices/victim/revoke", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["link_closed"], true);
    // The link is closed at once (well within the promised second) with DEVICE_REVOKED.
    let (code, acked) = tokio::time::timeout(Duration::from_secs(1), streaming)
        .await
        .expect("the link closes within 1 s")
        .unwrap();
    assert_eq!(code, Some(ErrorCode::DeviceRevoked));
    assert_eq!(ErrorCode::DeviceRevoked as i32, 6);

    // A new Hello is refused.
    let mut again = RawClient::connect(gw.addr).await;
    again
        .send(hello(
            "victim",
            &proto::token::fleet_token(SECRET.as_bytes(), "victim"),
            2,
        ))
        .await;
    assert_eq!(
        again.expect_error_and_close().await,
        ErrorCode::DeviceRevoked
    );

    // What it had acknowledged stays; the others kept flowing.
    let (_, device) = get(http, "/api/v1/devices/victim").await;
    assert_eq!(device["revoked"], true);
    assert!(device["frames_total"].as_u64().unwrap() >= acked);
    let (_, page) = get(http, "/api/v1/devices/victim/readings?limit=10000").await;
    assert!(page["readings"].as_array().unwrap().len() as u64 >= acked);
    let report = others.await.unwrap();
    assert!(report.is_clean(), "{}", report.to_table());
    assert_stored_exactly_once_for(&gw, &report).await;
    gw.stop().await;
}

async fn assert_stored_exactly_once_for(gw: &TestGateway, report: &firmware_sim::Report) {
    let stored = firmware_sim::verify::verify_db(&gw.db, report).unwrap();
    assert!(stored.is_clean(), "{stored:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_from_the_cli_reaches_the_running_gateways_live_link() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    let gw = GatewayProcess::start(&db, "127.0.0.1:0", &dir.path().join("gw.log"), &[]).await;
    let mut link = RawClient::connect(gw.addr).await;
    link.hello("cli-victim", 1).await;
    let streaming = tokio::spawn(stream_until_closed(link));
    wait_for(gw.http, "/api/v1/devices/cli-victim", |d| {
        d["online"] == true
    })
    .await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["devices", "--db"])
        .arg(&db)
        .args(["revoke", "cli-victim"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, _) = tokio::time::timeout(Duration::from_secs(10), streaming)
        .await
        .expect("the running gateway closes the link")
        .unwrap();
    assert_eq!(code, Some(ErrorCode::DeviceRevoked));
    assert_eq!(gw.terminate().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_over_http_reach_devices_online_and_offline() {
    let gw = TestGateway::start(|_| {}).await;
    let http = gw.http;
    // A device that answers commands, online for the first part.
    let online = tokio::spawn(firmware_sim::run_fleet(FleetConfig {
        prefix: "cmd-".into(),
        ..fleet_of(gw.addr, 1, 5.0, 4)
    }));
    wait_for(http, "/api/v1/devices/cmd-00000", |d| d["online"] == true).await;
    let (status, command) = post(
        http,
        "/api/v1/devices/cmd-00000/commands?wait=true",
        json!({"name": "reboot", "params": {"delay": 5}, "timeout_ms": 10000}),
    )
    .await;
    assert_eq!(status, 200, "{command}");
    assert_eq!(command["status"], "ok");
    assert_eq!(command["params"], json!({"delay": 5}));
    let id = command["id"].as_str().unwrap().to_owned();
    let (status, again) = get(http, &format!("/api/v1/commands/{id}")).await;
    assert_eq!((status, &again["status"]), (200, &json!("ok")));
    // The same id twice is refused.
    let (status, _) = post(
        http,
        "/api/v1/devices/cmd-00000/commands",
        json!({"id": id, "name": "reboot"}),
    )
    .await;
    assert_eq!(status, 409);
    online.await.unwrap();
    wait_for(http, "/api/v1/devices/cmd-00000", |d| d["online"] == false).await;

    // Offline: accepted and stored, delivered when the device connects.
    let (status, pending) = post(
        http,
        "/api/v1/devices/cmd-00000/commands",
        json!({"id": "later-1", "name": "calibrate", "timeout_ms": 60000}),
    )
    .await;
    assert_eq!(status, 202, "{pending}");
    assert_eq!(pending["status"], "pending");
    let back = tokio::spawn(firmware_sim::run_fleet(FleetConfig {
        prefix: "cmd-".into(),
        ..fleet_of(gw.addr, 1, 5.0, 2)
    }));
    let done = wait_for(http, "/api/v1/commands/later-1", |c| c["status"] == "ok").await;
    assert!(done["sent_ms"].as_i64().is_some());
    let report = back.await.unwrap();
    assert!(report.commands_received >= 1, "{}", report.to_table());

    // A device that never answers: the wait ends with the gateway's `timeout`.
    let mut silent = RawClient::connect(gw.addr).await;
    silent.hello("silent", 1).await;
    let (status, timed_out) = post(
        http,
        "/api/v1/devices/silent/commands?wait=true",
        json!({"name": "ping", "timeout_ms": 300}),
    )
    .await;
    assert_eq!(
        (status, &timed_out["status"]),
        (200, &json!("timeout")),
        "{timed_out}"
    );
    assert!(gw.metrics.outcomes("timeout") >= 1);
    assert!(gw.metrics.outcomes("ok") >= 2);
    gw.stop().await;
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn live(http: SocketAddr) -> Ws {
    let mut req = format!("ws://{http}/api/v1/live")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {API_TOKEN}").parse().unwrap(),
    );
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("ws connect");
    ws
}

async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("a live message within 20 s")
            .expect("open")
            .expect("message");
        if let Message::Text(t) = msg {
            return serde_json::from_str(t.as_str()).expect("JSON");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_feed_shows_every_committed_frame_in_order_and_status() {
    let gw = TestGateway::start(|_| {}).await;
    let mut ws = live(gw.http).await;
    ws.send(Message::text(
        json!({"devices": ["wsdev"], "kinds": ["telemetry", "status"]}).to_string(),
    ))
    .await
    .unwrap();
    let ack = next_json(&mut ws).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    // A bad subscribe message gets an error and the feed stays.
    ws.send(Message::text(r#"{"kinds":["nope"]}"#))
        .await
        .unwrap();
    let err = next_json(&mut ws).await;
    assert_eq!(err["type"], "error");

    let mut link = RawClient::connect(gw.addr).await;
    link.hello("wsdev", 9).await;
    let mut other = RawClient::connect(gw.addr).await;
    other.hello("not-watched", 9).await;
    for seq in 1..=40u64 {
        link.send(telemetry(seq, &[("t", seq as f64), ("h", 1.0)]))
            .await;
        other.send(telemetry(seq, &[("t", 0.0)])).await;
    }
    let mut conn = open_db(&gw.db).await;
    let mut seqs = Vec::new();
    let mut statuses = 0;
    while seqs.len() < 40 {
        let msg = next_json(&mut ws).await;
        assert_eq!(msg["device_id"], "wsdev", "{msg}");
        match msg["type"].as_str() {
            Some("status") => {
                statuses += 1;
                assert_eq!(msg["status"], "online");
            }
            Some("telemetry") => {
                let seq = msg["seq"].as_u64().unwrap();
                // Shown only once committed: the store has it already.
                let rows: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM telemetry WHERE device_id = 'wsdev' AND seq = ?",
                )
                .bind(seq as i64)
                .fetch_one(&mut conn)
                .await
                .unwrap();
                assert_eq!(rows, 2, "seq {seq} on the feed before it was stored");
                assert_eq!(msg["epoch"], 9);
                assert_eq!(msg["readings"][0]["value"], seq as f64);
                seqs.push(seq);
            }
            other => panic!("unexpected {other:?}: {msg}"),
        }
    }
    assert_eq!(seqs, (1..=40).collect::<Vec<_>>(), "every frame, in order");
    assert_eq!(statuses, 1);
    drop(link);
    let gone = next_json(&mut ws).await;
    assert_eq!(
        (gone["type"].as_str(), gone["status"].as_str()),
        (Some("status"), Some("offline"))
    );

    // On shutdown the client gets a close frame.
    gw.shutdown.cancel();
    let mut closed = false;
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        if let Ok(Message::Close(Some(frame))) = msg {
            assert_eq!(u16::from(frame.code), 1001);
            closed = true;
            break;
        }
    }
    assert!(closed, "a close frame on shutdown");
    gw.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_client_that_stops_reading_is_told_it_lagged_and_ingest_loses_nothing() {
    // Ingest at full speed (no pacing), so the hub produces far more than the slow client
    // takes.
    let gw = TestGateway::start(|c| {
        c.http.live_buffer = 16;
        c.pacing.enabled = false;
    })
    .await;
    // A client with a tiny receive buffer that reads nothing during the load.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(gw.http).await.unwrap();
    let mut req = format!("ws://{}/api/v1/live?token={API_TOKEN}", gw.http)
        .into_client_request()
        .unwrap();
    req.headers_mut().remove("authorization");
    let (mut slow, _) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    // A second client that keeps reading.
    let mut fast = live(gw.http).await;
    let counting = tokio::spawn(async move {
        let mut frames = 0u64;
        let mut lagged = false;
        while let Ok(Some(Ok(msg))) =
            tokio::time::timeout(Duration::from_secs(5), fast.next()).await
        {
            if let Message::Text(t) = msg {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                match v["type"].as_str() {
                    Some("telemetry") => frames += 1,
                    Some("lagged") => lagged = true,
                    _ => {}
                }
            }
        }
        (frames, lagged)
    });

    let report = firmware_sim::run_fleet(FleetConfig {
        rate: 0.0,
        window: 64,
        readings: 8,
        ..fleet_of(gw.addr, 20, 0.0, 3)
    })
    .await;
    assert!(report.is_clean(), "{}", report.to_table());
    assert_stored_exactly_once(&gw.db, &report, 8).await;
    assert_eq!(gw.metrics.frames_stored.get(), report.frames_acked);

    // The slow client now reads: it was told it lagged, and then it is live again.
    let mut told = None;
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(10), slow.next()).await {
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["type"] == "lagged" {
                told = v["skipped"].as_u64();
                break;
            }
        }
    }
    assert!(told.is_some_and(|n| n > 0), "a lagged message with a count");
    assert!(gw.metrics.live_lagged.get() > 0);
    let (seen, _) = counting.await.unwrap();
    assert!(seen > 0, "the reading client saw frames");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_https_with_the_configured_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::pki();
    let cert_file = pki::write(dir.path(), "gw.pem", &pki.server.0);
    let key_file = pki::write(dir.path(), "gw.key", &pki.server.1);
    let gw = TestGateway::start(|c| {
        c.http.tls = Some(gateway::config::TcpTlsConfig {
            cert_file: cert_file.into(),
            key_file: key_file.into(),
        })
    })
    .await;
    let ca = reqwest::Certificate::from_pem(pki.ca.as_bytes()).unwrap();
    let https = reqwest::Client::builder()
        .add_root_certificate(ca)
        .resolve("localhost", gw.http)
        .build()
        .unwrap();
    let r = https
        .get(format!("https://localhost:{}/api/v1/stats", gw.http.port()))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .expect("HTTPS request");
    assert_eq!(r.status(), 200);
    // Plain HTTP on the TLS port gets nowhere.
    assert!(client()
        .get(format!("http://{}/healthz", gw.http))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .is_err());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_queries_seek_the_primary_key_instead_of_scanning() {
    use gateway::store::query::{buckets_sql, events_sql, readings_sql, Order};
    let dir = tempfile::tempdir().unwrap();
    let store = gateway::store::Store::open(
        &dir.path().join("plan.db"),
        gateway::config::Durability::ProcessCrash,
    )
    .await
    .unwrap();
    let plan = |sql: &str| {
        let pool = store.pool().clone();
        let sql = format!("EXPLAIN QUERY PLAN {sql}");
        async move {
            let rows: Vec<(i64, i64, i64, String)> =
                sqlx::query_as(&sql).fetch_all(&pool).await.unwrap();
            rows.into_iter().map(|r| r.3).collect::<Vec<_>>().join("\n")
        }
    };
    for order in [Order::Asc, Order::Desc] {
        let p = plan(readings_sql(order)).await;
        assert!(
            p.contains("SEARCH r USING PRIMARY KEY (device=? AND "),
            "{p}"
        );
        assert!(!p.contains("SCAN r"), "{p}");
        // Rows come in key order: no sort of the whole range before the LIMIT.
        assert!(!p.contains("TEMP B-TREE"), "{p}");
        let p = plan(buckets_sql(order)).await;
        assert!(
            p.contains("SEARCH readings USING PRIMARY KEY (device=? AND ts_ms>? AND ts_ms<?)"),
            "{p}"
        );
    }
    let p = plan(events_sql(true)).await;
    assert!(
        p.contains("SEARCH e USING INDEX event_log_by_device_time (device=?"),
        "{p}"
    );
    let p = plan(events_sql(false)).await;
    assert!(p.contains("SEARCH e USING INDEX event_log_by_time"), "{p}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_waiting_for_an_offline_device_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    let log = dir.path().join("gateway.log");
    let gw = GatewayProcess::start(&db, "127.0.0.1:0", &log, &[]).await;
    // Known to the gateway (it connected once), then offline.
    let mut device = RawClient::connect(gw.addr).await;
    device.hello("sleepy", 1).await;
    drop(device);
    let client = reqwest::Client::new();
    let response = client
        .post(format!("http://{}/api/v1/devices/sleepy/commands", gw.http))
        .bearer_auth(API_TOKEN)
        .json(&json!({"id": "wake-1", "name": "calibrate", "timeout_ms": 600000}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert!(gw.terminate().await.success());

    // After the restart the device connects and the command is the first thing it gets.
    let gw = GatewayProcess::start(&db, "127.0.0.1:0", &log, &[]).await;
    let mut device = RawClient::connect(gw.addr).await;
    device.hello("sleepy", 2).await;
    let command = loop {
        match device.recv().await.expect("the link stays open").body {
            Some(gateway_message::Body::Command(c)) => break c,
            _ => continue,
        }
    };
    assert_eq!(
        (command.id.as_str(), command.name.as_str()),
        ("wake-1", "calibrate")
    );
    assert!(gw.terminate().await.success());
}
