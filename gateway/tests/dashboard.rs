//! The web dashboard in a real headless Chromium (Debian's `chromium`, driven over the
//! DevTools protocol with chromiumoxide) against the real gateway binary and a simulated
//! fleet: what a person sees on the overview, the device table and a device page, the
//! command form, reconnection after a gateway restart, screenshots, and no JavaScript errors.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chromiumoxide::cdp::js_protocol::runtime::{
    ConsoleApiCalledType, EventConsoleApiCalled, EventExceptionThrown,
};
use chromiumoxide::page::ScreenshotParams;
use chromiumoxide::{Browser, BrowserConfig, Page};
use common::*;
use firmware_sim::FleetConfig;
use futures::StreamExt;
use serde_json::Value;

const DEVICES: usize = 6;
/// Provisioned devices that never connect, to fill the table.
const SPARES: usize = 3000;

fn chromium() -> Option<PathBuf> {
    let found = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium is not installed, and CI is set"
        );
        eprintln!("SKIPPED: chromium is not installed (apt-get install chromium)");
    }
    found
}

async fn launch(bin: &Path, profile: &Path) -> Browser {
    let config = BrowserConfig::builder()
        .chrome_executable(bin)
        .no_sandbox()
        .user_data_dir(profile)
        .window_size(1280, 1000)
        .viewport(chromiumoxide::handler::viewport::Viewport {
            width: 1200,
            height: 900,
            ..Default::default()
        })
        .args([
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .build()
        .expect("browser config");
    let (browser, mut handler) = Browser::launch(config).await.expect("launch chromium");
    // The protocol's messages flow only while the handler is polled; messages this crate
    // does not know (a newer Chromium) are skipped.
    tokio::spawn(async move { while handler.next().await.is_some() {} });
    browser
}

/// Evaluates `js` in the page and returns its JSON value.
async fn eval(page: &Page, js: &str) -> Value {
    page.evaluate(js)
        .await
        .unwrap_or_else(|e| panic!("evaluating {js}: {e}"))
        .into_value::<Value>()
        .unwrap_or(Value::Null)
}

/// Polls `js` until it is true (panics after 30 s, naming it and what the page shows).
async fn wait_true(page: &Page, js: &str) {
    for _ in 0..300 {
        if eval(page, js).await == Value::Bool(true) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let shown = eval(page, "document.querySelector('main').innerText").await;
    panic!(
        "never true in the page: {js}\nthe page shows:\n{}",
        shown.as_str().unwrap_or_default()
    );
}

/// Clicks the element at `selector`.
async fn click(page: &Page, selector: &str) {
    page.find_element(selector)
        .await
        .unwrap_or_else(|e| panic!("{selector}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("clicking {selector}: {e}"));
}

/// Clicks the field at `selector` and types `text` into it, as a person would.
async fn type_into(page: &Page, selector: &str, text: &str) {
    page.find_element(selector)
        .await
        .unwrap_or_else(|e| panic!("{selector}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("clicking {selector}: {e}"))
        .type_str(text)
        .await
        .unwrap_or_else(|e| panic!("typing into {selector}: {e}"));
}

async fn text(page: &Page, selector: &str) -> String {
    eval(
        page,
        &format!("document.querySelector('{selector}').textContent"),
    )
    .await
    .as_str()
    .unwrap_or_default()
    .to_owned()
}

async fn screenshot(page: &Page, name: &str) -> PathBuf {
    let png = page
        .screenshot(ScreenshotParams::builder().full_page(true).build())
        .await
        .expect("screenshot");
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("dashboard-{name}.png"));
    std::fs::write(&path, png).expect("write screenshot");
    println!("screenshot: {}", path.display());
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet_live_and_survives_a_gateway_restart() {
    let Some(bin) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    let log = dir.path().join("gateway.log");
    let listen = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let args = ["--no-mqtt", "--http", &http];
    let gw = GatewayProcess::start(&db, &listen, &log, &args).await;

    let fleet = tokio::spawn(firmware_sim::run_fleet(FleetConfig {
        devices: DEVICES,
        rate: 5.0,
        readings: 2,
        duration: Duration::from_secs(120),
        drain: Duration::from_secs(1),
        ramp: Duration::from_millis(200),
        ..fleet(gw.addr)
    }));

    let browser = launch(&bin, &dir.path().join("profile")).await;
    let page = browser.new_page("about:blank").await.expect("page");
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut console = page
        .event_listener::<EventConsoleApiCalled>()
        .await
        .unwrap();
    let mut exceptions = page.event_listener::<EventExceptionThrown>().await.unwrap();
    let seen = errors.clone();
    tokio::spawn(async move {
        while let Some(e) = console.next().await {
            if matches!(
                e.r#type,
                ConsoleApiCalledType::Error | ConsoleApiCalledType::Assert
            ) {
                let args: Vec<String> = e
                    .args
                    .iter()
                    .map(|a| {
                        format!(
                            "{:?}",
                            a.value.clone().or(a.description.clone().map(Value::String))
                        )
                    })
                    .collect();
                seen.lock()
                    .unwrap()
                    .push(format!("console.error: {}", args.join(" ")));
            }
        }
    });
    let seen = errors.clone();
    tokio::spawn(async move {
        while let Some(e) = exceptions.next().await {
            seen.lock()
                .unwrap()
                .push(format!("exception: {:?}", e.exception_details));
        }
    });
    page.goto(format!("http://{http}/"))
        .await
        .expect("open the dashboard");

    // It asks for the token once.
    wait_true(&page, "!document.querySelector('#login').hidden").await;
    type_into(&page, "#token", API_TOKEN).await;
    click(&page, "#login-form button").await;

    // The overview: the fleet online, readings flowing.
    wait_true(
        &page,
        &format!("document.querySelector('#online').textContent === '{DEVICES}'"),
    )
    .await;
    wait_true(
        &page,
        "parseFloat(document.querySelector('#rate').textContent.replace(/,/g, '')) > 0",
    )
    .await;
    wait_true(
        &page,
        "document.querySelector('#conn').textContent === 'live'",
    )
    .await;
    // The device table lists every device; filtering narrows it.
    wait_true(
        &page,
        &format!("document.querySelectorAll('#devices tbody a').length === {DEVICES}"),
    )
    .await;
    let ids = eval(
        &page,
        "[...document.querySelectorAll('#devices tbody a')].map(a => a.textContent)",
    )
    .await;
    let expected: Vec<String> = (0..DEVICES).map(|i| format!("sim-{i:05}")).collect();
    assert_eq!(ids, serde_json::json!(expected));
    // Each device shows its readings over the last minute (5 frames/s x 2 readings: 600),
    // estimated from what the page has seen so far: not 0, nor the few seconds' count, while
    // the page has watched for less than a minute (the count alone would reach 400 only
    // after 40 s, past wait_true's 30).
    wait_true(
        &page,
        "[...document.querySelectorAll('#devices tbody tr')].filter(tr => tr.querySelector('a'))
           .every(tr => parseFloat(tr.cells[5].textContent.replace(/,/g, '')) >= 400)",
    )
    .await;
    assert_eq!(
        eval(&page, "localStorage.getItem('gatewayToken')").await,
        API_TOKEN,
        "the token is kept in the browser"
    );
    let overview = screenshot(&page, "overview").await;

    // Thousands of devices: only the rows in view are in the page, and scrolling shows the
    // rest.
    let client = reqwest::Client::new();
    futures::stream::iter(0..SPARES)
        .map(|i| {
            let client = client.clone();
            let url = format!("http://{http}/api/v1/devices");
            async move {
                let r = client
                    .post(url)
                    .bearer_auth(API_TOKEN)
                    .json(&serde_json::json!({ "id": format!("spare-{i:05}") }))
                    .send()
                    .await
                    .expect("provision");
                assert_eq!(r.status(), 201);
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    let all = DEVICES + SPARES;
    wait_true(
        &page,
        &format!("document.querySelector('#shown').textContent === '{all} of {all} devices'"),
    )
    .await;
    screenshot(&page, "overview-thousands").await;
    let in_page = eval(
        &page,
        "document.querySelectorAll('#devices tbody a').length",
    )
    .await;
    assert!(
        in_page.as_u64().unwrap() < 100,
        "{in_page} rows in the page for {all} devices"
    );
    eval(
        &page,
        "(() => { const s = document.querySelector('#table-scroll'); s.scrollTop = s.scrollHeight; })()",
    )
    .await;
    wait_true(
        &page,
        &format!(
            "[...document.querySelectorAll('#devices tbody a')].some(a => a.textContent === 'spare-{:05}')",
            SPARES - 1
        ),
    )
    .await;

    type_into(&page, "#filter", "sim-00003").await;
    wait_true(
        &page,
        "document.querySelectorAll('#devices tbody a').length === 1",
    )
    .await;
    assert_eq!(text(&page, "#devices tbody a").await, "sim-00003");

    // A device page: live charts over the history from the readings API.
    click(&page, "#devices tbody a").await;
    wait_true(&page, "location.hash === '#/device/sim-00003'").await;
    wait_true(
        &page,
        "window.dashboard.historyUrl !== null && Object.values(window.dashboard.charts).some(p => p.length > 0)",
    )
    .await;
    let before = eval(&page, "JSON.stringify(window.dashboard.charts)").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = eval(&page, "JSON.stringify(window.dashboard.charts)").await;
    assert_ne!(before, after, "new points arrive while the device sends");
    // The history it drew is what the readings API says.
    let url = eval(&page, "window.dashboard.historyUrl").await;
    let history = eval(&page, "window.dashboard.history").await;
    let api: Value = api_get(http.parse().unwrap(), url.as_str().unwrap())
        .await
        .1;
    let mut from_api = serde_json::Map::new();
    for b in api["buckets"].as_array().unwrap() {
        from_api
            .entry(b["sensor"].as_str().unwrap())
            .or_insert_with(|| Value::Array(Vec::new()))
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!([b["ts_ms"], b["avg"]]));
    }
    assert!(!from_api.is_empty());
    // The API was read after the page: its newest step may have been filling when the page
    // read it, and a newer step may have begun since. Every step the page had finished is
    // the API's, exactly, in order; the page's newest step is there too.
    let page_history = history.as_object().expect("history per sensor");
    assert_eq!(
        page_history.keys().collect::<Vec<_>>(),
        from_api.keys().collect::<Vec<_>>()
    );
    for (sensor, points) in page_history {
        let points = points.as_array().unwrap();
        let api_points = from_api[sensor].as_array().unwrap();
        let (newest, finished) = points.split_last().expect("history points");
        assert_eq!(
            &api_points[..finished.len()],
            finished,
            "{sensor}: chart history = readings API"
        );
        assert_eq!(
            api_points[finished.len()][0],
            newest[0],
            "{sensor}: newest step"
        );
    }

    // The command form reaches the device and shows the outcome.
    type_into(&page, "#cmd-name", "ping").await;
    click(&page, "#command-form button").await;
    wait_true(
        &page,
        "document.querySelector('#cmd-outcome').textContent === 'ok'",
    )
    .await;
    let device = screenshot(&page, "device").await;

    // The gateway restarts: the page says it is offline, then reconnects by itself and keeps
    // updating.
    assert_eq!(gw.terminate().await.code(), Some(0));
    wait_true(
        &page,
        "document.querySelector('#conn').textContent.startsWith('offline')",
    )
    .await;
    let gw = GatewayProcess::start(&db, &listen, &log, &args).await;
    wait_true(
        &page,
        "document.querySelector('#conn').textContent === 'live'",
    )
    .await;
    let before = eval(&page, "JSON.stringify(window.dashboard.charts)").await;
    wait_true(
        &page,
        &format!(
            "JSON.stringify(window.dashboard.charts) !== {}",
            serde_json::to_string(before.as_str().unwrap()).unwrap()
        ),
    )
    .await;

    // A pump whose pressure spikes: the detector's finding is counted on the overview,
    // shaded on its chart and listed on its page.
    let mut pump = RawClient::connect(gw.addr).await;
    pump.hello("pump-9", 1).await;
    // Readings every 5 s over the last few minutes (its own timestamps), like a device
    // uploading what it sampled.
    let values: Vec<f64> = (0..60)
        .map(|i| 4.0 + f64::from(i % 5) * 0.2)
        .chain([9.0, 4.2, 4.4])
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for (seq, v) in (1u64..).zip(values.iter().copied()) {
        let mut frame = telemetry(seq, &[("pressure", v)]);
        if let Some(proto::v1::device_message::Body::Telemetry(t)) = &mut frame.body {
            t.readings[0].timestamp_ms = now - (values.len() as u64 - seq) * 5_000;
        }
        pump.send(frame).await;
    }
    eval(&page, "location.hash = '#/device/pump-9'").await;
    wait_true(
        &page,
        "window.dashboard.anomalies.some(a => a.kind === 'spike' && a.sensor === 'pressure')",
    )
    .await;
    wait_true(
        &page,
        "document.querySelector('#anomaly-list tbody').textContent.includes('spike')",
    )
    .await;
    screenshot(&page, "device-anomaly").await;
    eval(&page, "location.hash = '#/'").await;
    wait_true(
        &page,
        "parseInt(document.querySelector('#anomalies').textContent) >= 1",
    )
    .await;

    let errors = errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "errors in the browser: {errors:#?}");
    assert!(std::fs::metadata(&overview).unwrap().len() > 10_000);
    assert!(std::fs::metadata(&device).unwrap().len() > 10_000);
    fleet.abort();
    drop(browser);
    assert_eq!(gw.terminate().await.code(), Some(0));
}
