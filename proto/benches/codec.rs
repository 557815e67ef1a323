//! Frame encode and decode through the TCP codec (one Telemetry frame of 8 readings, and a
//! stream of frames fed in network-sized chunks) and the serial codec (COBS + CRC-32).

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use prost::Message;
use proto::v1::{device_message::Body, DeviceMessage, Reading, Telemetry};
use proto::DelimitedCodec;
use tokio_util::codec::{Decoder, Encoder};

fn frame(seq: u64) -> DeviceMessage {
    let readings = (0..8)
        .map(|i| Reading {
            sensor: format!("sensor_{i}"),
            value: 20.0 + i as f64,
            timestamp_ms: 1_800_000_000_000 + seq,
        })
        .collect();
    DeviceMessage {
        seq,
        body: Some(Body::Telemetry(Telemetry { readings })),
    }
}

fn codec(c: &mut Criterion) {
    let msg = frame(1);
    let mut encoded = BytesMut::new();
    DelimitedCodec::<DeviceMessage>::default()
        .encode(msg.clone(), &mut encoded)
        .unwrap();

    let mut g = c.benchmark_group("tcp_codec");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode_telemetry_8", |b| {
        let mut codec = DelimitedCodec::<DeviceMessage>::default();
        let mut buf = BytesMut::with_capacity(1024);
        b.iter(|| {
            buf.clear();
            codec.encode(msg.clone(), &mut buf).unwrap();
        })
    });
    g.bench_function("decode_telemetry_8", |b| {
        let mut codec = DelimitedCodec::<DeviceMessage>::default();
        b.iter_batched(
            || encoded.clone(),
            |mut buf| codec.decode(&mut buf).unwrap(),
            BatchSize::SmallInput,
        )
    });
    let stream: Vec<u8> = (0..1000)
        .flat_map(|s| frame(s).encode_length_delimited_to_vec())
        .collect();
    g.throughput(Throughput::Elements(1000));
    g.bench_function("decode_1000_frames_in_1460_byte_chunks", |b| {
        b.iter(|| {
            let mut codec = DelimitedCodec::<DeviceMessage>::default();
            let mut buf = BytesMut::new();
            let mut n = 0;
            for chunk in stream.chunks(1460) {
                buf.extend_from_slice(chunk);
                while let Some(_m) = codec.decode(&mut buf).unwrap() {
                    n += 1;
                }
            }
            assert_eq!(n, 1000);
        })
    });
    g.finish();

    let mut g = c.benchmark_group("serial_codec");
    g.throughput(Throughput::Elements(1));
    let mut serial = BytesMut::new();
    proto::serial::encode_frame(&msg, &mut serial);
    g.bench_function("encode_telemetry_8", |b| {
        let mut buf = BytesMut::with_capacity(1024);
        b.iter(|| {
            buf.clear();
            proto::serial::encode_frame(&msg, &mut buf);
        })
    });
    g.bench_function("decode_telemetry_8", |b| {
        let mut codec = proto::serial::SerialCodec::<DeviceMessage>::default();
        b.iter_batched(
            || serial.clone(),
            |mut buf| codec.decode(&mut buf).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
