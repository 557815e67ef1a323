-- The gateway's store. Names are interned into small integer keys so that the hot table,
-- `readings`, stays narrow (see README, "The store"). Users query the `telemetry` and
-- `events` views, which are the stable face of this schema.

-- Every device this gateway has provisioned or seen.
CREATE TABLE devices (
    id               INTEGER PRIMARY KEY,
    device_id        TEXT    NOT NULL UNIQUE,
    -- Lowercase hex SHA-256 of the token printed by `gateway devices add`; NULL when the
    -- device authenticates with a fleet token (or auth is off).
    token_hash       TEXT,
    -- Set by `gateway devices revoke`: the device is refused at Hello from then on.
    revoked_at_ms    INTEGER,
    created_at_ms    INTEGER NOT NULL
);

CREATE TABLE sensors (
    id   INTEGER PRIMARY KEY,
    name TEXT    NOT NULL UNIQUE
);

-- One (device, sensor) pair: the key readings are clustered by.
CREATE TABLE series (
    id     INTEGER PRIMARY KEY,
    device INTEGER NOT NULL REFERENCES devices (id),
    sensor INTEGER NOT NULL REFERENCES sensors (id),
    UNIQUE (device, sensor)
);

-- One (device, epoch) sequence space and the highest seq durably stored in it: the
-- deduplication point of "never stored twice" and the `last_seq` of HelloAck.
-- `epoch` holds the device's u64 epoch as the signed 64-bit integer with the same bits.
CREATE TABLE streams (
    id       INTEGER PRIMARY KEY,
    device   INTEGER NOT NULL REFERENCES devices (id),
    epoch    INTEGER NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0,
    UNIQUE (device, epoch)
);

-- One row per reading. `idx` is the reading's position in its Telemetry frame.
-- `value` is NULL where the device sent NaN.
CREATE TABLE readings (
    series INTEGER NOT NULL,
    ts_ms  INTEGER NOT NULL,
    stream INTEGER NOT NULL,
    seq    INTEGER NOT NULL,
    idx    INTEGER NOT NULL,
    value  REAL,
    PRIMARY KEY (series, ts_ms, stream, seq, idx)
) WITHOUT ROWID;

CREATE TABLE event_log (
    stream   INTEGER NOT NULL,
    seq      INTEGER NOT NULL,
    device   INTEGER NOT NULL,
    ts_ms    INTEGER NOT NULL,
    kind     TEXT    NOT NULL,
    message  TEXT    NOT NULL,
    severity INTEGER NOT NULL,
    PRIMARY KEY (stream, seq)
) WITHOUT ROWID;

CREATE INDEX event_log_by_device_time ON event_log (device, ts_ms);

CREATE VIEW telemetry AS
SELECT d.device_id AS device_id,
       st.epoch    AS epoch,
       r.seq       AS seq,
       s.name      AS sensor,
       r.ts_ms     AS ts_ms,
       r.value     AS value
FROM readings r
JOIN series se ON se.id = r.series
JOIN devices d ON d.id = se.device
JOIN sensors s ON s.id = se.sensor
JOIN streams st ON st.id = r.stream;

CREATE VIEW events AS
SELECT d.device_id AS device_id,
       st.epoch    AS epoch,
       e.seq       AS seq,
       e.kind      AS kind,
       e.message   AS message,
       e.severity  AS severity,
       e.ts_ms     AS ts_ms
FROM event_log e
JOIN devices d ON d.id = e.device
JOIN streams st ON st.id = e.stream;
