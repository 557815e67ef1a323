-- Streaming anomaly detection: what the detector decided, one row per anomaly. An ongoing
-- anomaly (stuck, dropout, traffic) is written when raised and updated when it ends.
-- Users query the `anomalies` view, the stable face of this table.
CREATE TABLE anomaly_log (
    -- Assigned by the detector, in the order it decided.
    id           INTEGER PRIMARY KEY,
    -- NULL for a `security` anomaly about a source address that named no device.
    device_id    TEXT,
    -- NULL for device-level kinds (dropout, traffic, security).
    sensor       TEXT,
    -- spike, drift, stuck, dropout, traffic, security
    kind         TEXT    NOT NULL,
    -- Which detector decided: robust-z, level-shift, cusum-slope, cusum-level, repeat,
    -- gap, silence, frame-rate, failures.
    detector     TEXT    NOT NULL,
    -- 0..1: 0.5 at the detector's threshold, towards 1 far beyond.
    score        REAL    NOT NULL,
    -- Timestamps of the first and last anomalous reading (device clock, Unix ms).
    ts_ms        INTEGER NOT NULL,
    to_ms        INTEGER NOT NULL,
    -- Timestamp of the reading at which the detector decided.
    raised_ts_ms INTEGER NOT NULL,
    value        REAL,
    detail       TEXT    NOT NULL,
    -- The gateway's clock when it decided (Unix ms).
    detected_ms  INTEGER NOT NULL,
    -- Source address, for `security`.
    peer         TEXT,
    -- 1 while under way (to_ms moves when it ends).
    ongoing      INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX anomaly_log_by_time ON anomaly_log (detected_ms);
CREATE INDEX anomaly_log_by_device ON anomaly_log (device_id, ts_ms);

CREATE VIEW anomalies AS
SELECT device_id, sensor, kind, detector, score, ts_ms, to_ms, raised_ts_ms, value, detail,
       detected_ms, peer, ongoing, id
FROM anomaly_log;
