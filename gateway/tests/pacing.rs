//! Pacing, end to end: the gateway's controller slows the heaviest senders, simulated
//! devices keep sampling and batch their samples into fewer, bigger frames, every sample is
//! either acknowledged or counted as dropped at its device, and pacing lifts once the load
//! ends. Counts, not durations: the targets are set so that any queue at all is pressure.

mod common;

use std::time::Duration;

use common::{assert_stored_exactly_once, fleet, RawClient, TestGateway};
use futures::SinkExt;
use proto::v1::{device_message, DeviceMessage, Reading, Telemetry};

/// A gateway whose pacer treats any queued reading as over its targets.
async fn touchy_gateway() -> TestGateway {
    TestGateway::start(|c| {
        c.pacing.target_queue_fill = 0.0001;
        c.pacing.target_ack_latency = Duration::from_millis(1);
        c.pacing.max_interval = Duration::from_millis(200);
    })
    .await
}

async fn wait_for_pacing_to_lift(gw: &TestGateway) {
    for _ in 0..400 {
        if gw.metrics.pacing_interval.get() == 0.0 && gw.metrics.pacing_devices.get() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "pacing did not lift: interval {} s, {} devices paced",
        gw.metrics.pacing_interval.get(),
        gw.metrics.pacing_devices.get()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_devices_batch_their_samples_and_account_for_every_one() {
    let gw = touchy_gateway().await;
    // Sensors sampling far faster than any gateway stores (640 000 readings/s offered), so
    // the pacer engages on any machine.
    let report = firmware_sim::run_fleet(firmware_sim::FleetConfig {
        devices: 8,
        rate: 20_000.0,
        readings: 4,
        window: 8,
        duration: Duration::from_secs(3),
        drain: Duration::from_secs(30),
        ..fleet(gw.addr)
    })
    .await;
    assert!(report.is_clean(), "{}", report.to_table());
    assert!(
        gw.metrics.pacing_episodes.get() >= 1,
        "the pacer engaged: {}",
        report.to_table()
    );
    assert!(
        report.config_updates > 0,
        "devices were told an interval: {}",
        report.to_table()
    );
    // Every sample the sensors took is acked or counted as dropped at its device.
    assert!(report.readings_accounted(), "{}", report.to_table());
    assert_eq!(
        report.readings_produced,
        report.readings_acked + report.readings_dropped,
        "nothing is left unacknowledged after the drain"
    );
    // Paced devices put several samples into a frame.
    let batched: usize = report.outcomes.iter().map(|o| o.frame_sizes.len()).sum();
    assert!(batched > 0, "some frames carried batched samples");
    assert!(
        report.readings_per_frame() > 4.0,
        "frames carry more readings than one sample: {:.1}",
        report.readings_per_frame()
    );
    // The store holds each frame once, with exactly the readings it carried.
    assert_stored_exactly_once(&gw.db, &report, 4).await;
    // The load is over: pacing lifts by itself.
    wait_for_pacing_to_lift(&gw).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_ignores_pacing_is_held_by_backpressure_and_starves_nobody() {
    let gw = TestGateway::start(|c| {
        c.pacing.target_queue_fill = 0.0001;
        c.pacing.target_ack_latency = Duration::from_millis(1);
        c.store.queue_readings = 1024;
        c.store.queue_frames = 16;
    })
    .await;
    // A flooding device that never reads its socket: it ignores ConfigUpdate and acks
    // alike, so the gateway can only stop reading it.
    let mut flood = RawClient::connect(gw.addr).await;
    flood.hello("flood-00000", 1).await;
    let flooder = tokio::spawn(async move {
        let readings: Vec<Reading> = (0..64)
            .map(|i| Reading {
                sensor: format!("s{i}"),
                value: i as f64,
                timestamp_ms: 0,
            })
            .collect();
        let mut sent = 0u64;
        for seq in 1..=5_000u64 {
            let msg = DeviceMessage {
                seq,
                body: Some(device_message::Body::Telemetry(Telemetry {
                    readings: readings.clone(),
                })),
            };
            match tokio::time::timeout(Duration::from_secs(5), flood.framed.send(msg)).await {
                Ok(Ok(())) => {}
                // The gateway stopped reading (backpressure reached the device) or closed.
                Err(_) | Ok(Err(_)) => break,
            }
            sent = seq;
        }
        sent
    });
    let report = firmware_sim::run_fleet(firmware_sim::FleetConfig {
        devices: 5,
        rate: 20.0,
        readings: 4,
        duration: Duration::from_secs(3),
        drain: Duration::from_secs(30),
        prefix: "quiet-".into(),
        ..fleet(gw.addr)
    })
    .await;
    assert!(
        report.is_clean(),
        "the quiet devices are all acknowledged: {}",
        report.to_table()
    );
    assert!(report.readings_accounted(), "{}", report.to_table());
    let sent = flooder.await.unwrap();
    assert!(sent > 0, "the flooder sent frames");
    assert!(
        gw.metrics.store_queue_full.get() > 0,
        "the flooder met a full queue (backpressure)"
    );
    // Every quiet reading is stored once (the flooder's rows are its own business).
    let mut conn = common::open_db(&gw.db).await;
    for o in &report.outcomes {
        let rows: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM telemetry WHERE device_id = ? AND epoch = ?")
                .bind(&o.device_id)
                .bind(o.epoch as i64)
                .fetch_one(&mut conn)
                .await
                .unwrap();
        assert_eq!(rows as u64, o.readings_acked, "{}", o.device_id);
    }
    gw.stop().await;
}
