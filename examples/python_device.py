#!/usr/bin/env python3
"""A minimal device in Python, written from the README's protocol section and the .proto.

    python3 -m grpc_tools.protoc -I proto/proto --python_out=OUT proto/proto/gateway/v1/device.proto
    PYTHONPATH=OUT python3 examples/python_device.py HOST:PORT DEVICE_ID FLEET_SECRET FRAMES [CA_FILE]

With CA_FILE it connects with TLS, trusting that CA (the gateway runs with --tls-cert/--tls-key).
It says Hello with its fleet token, resends whatever HelloAck says is missing, sends FRAMES
Telemetry frames (seq 1..FRAMES, two readings each) and exits 0 once the cumulative Ack
covers them all. Exit 1 on an Error frame, 2 on a protocol surprise.
"""
import hashlib
import hmac
import socket
import ssl
import sys
import time

from gateway.v1 import device_pb2 as pb


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def send(sock: socket.socket, msg: pb.DeviceMessage) -> None:
    body = msg.SerializeToString()
    sock.sendall(varint(len(body)) + body)


def recv(sock: socket.socket, buf: bytearray) -> pb.GatewayMessage:
    while True:
        # Parse a varint length prefix, then the message.
        length, shift, i = 0, 0, 0
        while i < len(buf):
            b = buf[i]
            length |= (b & 0x7F) << shift
            shift += 7
            i += 1
            if not b & 0x80:
                break
        else:
            i = -1
        if i > 0 and len(buf) >= i + length:
            msg = pb.GatewayMessage()
            msg.ParseFromString(bytes(buf[i : i + length]))
            del buf[: i + length]
            return msg
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("gateway closed the link")
        buf.extend(chunk)


def main() -> int:
    addr, device_id, secret, frames = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    host, port = addr.rsplit(":", 1)
    token = hmac.new(secret.encode(), device_id.encode(), hashlib.sha256).hexdigest()
    epoch = int(time.time() * 1000)
    sock = socket.create_connection((host, int(port)), timeout=10)
    if len(sys.argv) > 5:
        tls = ssl.create_default_context(cafile=sys.argv[5])
        sock = tls.wrap_socket(sock, server_hostname=host)
    buf = bytearray()
    send(sock, pb.DeviceMessage(seq=0, hello=pb.Hello(device_id=device_id, token=token, firmware_version="py-1", epoch=epoch)))
    reply = recv(sock, buf)
    if reply.WhichOneof("body") != "hello_ack":
        print("expected HelloAck, got", reply, file=sys.stderr)
        return 1 if reply.WhichOneof("body") == "error" else 2
    for seq in range(reply.hello_ack.last_seq + 1, frames + 1):
        readings = [
            pb.Reading(sensor="temperature", value=20.0 + seq / 10, timestamp_ms=0),
            pb.Reading(sensor="humidity", value=40.0 + seq / 10, timestamp_ms=0),
        ]
        send(sock, pb.DeviceMessage(seq=seq, telemetry=pb.Telemetry(readings=readings)))
    acked = reply.hello_ack.last_seq
    while acked < frames:
        reply = recv(sock, buf)
        kind = reply.WhichOneof("body")
        if kind == "ack":
            acked = max(acked, reply.ack.seq)
        elif kind == "error":
            print("error", reply.error, file=sys.stderr)
            return 1
    print(f"acked {acked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
