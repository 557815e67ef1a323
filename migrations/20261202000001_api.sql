-- The operator API: what `GET /api/v1/devices` shows of each device without scanning
-- readings, command result payloads, and a time index for `GET /api/v1/events?since=`.

-- Per (device, epoch): frames and readings stored and when the last frame was received
-- (gateway clock, Unix ms). The writer sets them in the `UPDATE streams` it already runs per
-- stream per batch, so they cost no extra statement.
ALTER TABLE streams ADD COLUMN frames INTEGER NOT NULL DEFAULT 0;
ALTER TABLE streams ADD COLUMN readings INTEGER NOT NULL DEFAULT 0;
ALTER TABLE streams ADD COLUMN last_ms INTEGER;

-- The device's latest Hello: its firmware, link kind (tcp, tls, serial), peer address and
-- when (Unix ms). Written once per authenticated connection.
ALTER TABLE devices ADD COLUMN firmware_version TEXT;
ALTER TABLE devices ADD COLUMN last_link TEXT;
ALTER TABLE devices ADD COLUMN last_peer TEXT;
ALTER TABLE devices ADD COLUMN last_hello_ms INTEGER;

-- A device's result payload (bytes), as the API returns it base64-encoded.
ALTER TABLE commands ADD COLUMN result BLOB;

CREATE INDEX event_log_by_time ON event_log (ts_ms);
