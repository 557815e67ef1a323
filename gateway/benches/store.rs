//! The store writer's batch commit (readings, stream seqs, outbox rows) at several batch
//! sizes, on a real SQLite file: frames of 8 readings spread over 100 devices.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use gateway::config::Durability;
use gateway::store::batch::Batcher;
use gateway::store::writer::{Durable, FrameBody, WriteFrame};
use gateway::store::Store;
use proto::v1::{Reading, Telemetry};

fn batch(
    devices: &[Arc<str>],
    acks: &gateway::store::writer::AckSignal,
    first_seq: u64,
    frames: usize,
) -> Vec<WriteFrame> {
    (0..frames)
        .map(|i| {
            let seq = first_seq + (i / devices.len()) as u64;
            WriteFrame {
                device: devices[i % devices.len()].clone(),
                epoch: 1,
                seq,
                received_ms: 1_800_000_000_000,
                body: FrameBody::Telemetry(Telemetry {
                    readings: (0..8)
                        .map(|s| Reading {
                            sensor: format!("sensor_{s}"),
                            value: s as f64,
                            timestamp_ms: 1_800_000_000_000 + seq * 100,
                        })
                        .collect(),
                }),
                acks: acks.clone(),
            }
        })
        .collect()
}

fn store(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let devices: Vec<Arc<str>> = (0..100)
        .map(|d| Arc::from(format!("bench-{d:03}")))
        .collect();
    let acks = Arc::new(tokio::sync::watch::channel(Durable::default()).0);
    let mut g = c.benchmark_group("store_batch_commit");
    g.sample_size(10);
    for frames in [64usize, 512, 2048] {
        for uplink in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let store = rt
                .block_on(Store::open(
                    &dir.path().join("b.db"),
                    Durability::ProcessCrash,
                ))
                .unwrap();
            let mut batcher = Batcher::new(store.writer_connection().unwrap(), uplink);
            let mut seq = 1u64;
            g.throughput(Throughput::Elements((frames * 8) as u64));
            let name = format!(
                "{frames}_frames{}",
                if uplink { "_with_outbox" } else { "" }
            );
            g.bench_function(name, |b| {
                b.iter_batched(
                    || {
                        let frames_batch = batch(&devices, &acks, seq, frames);
                        seq += (frames / devices.len()).max(1) as u64 + 1;
                        frames_batch
                    },
                    |frames_batch| batcher.commit(&frames_batch).unwrap(),
                    BatchSize::LargeInput,
                )
            });
        }
    }
    g.finish();
}

criterion_group!(benches, store);
criterion_main!(benches);
