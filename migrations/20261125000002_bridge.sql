-- The MQTT bridge: an outbox of frames still to publish, and commands for devices.

-- Every frame stored for publishing, in publish order. A row is deleted once the broker has
-- acknowledged it and everything before it (PUBACK), so "the smallest id left" is the durable
-- cursor. AUTOINCREMENT: ids are never reused, even when the table empties.
CREATE TABLE outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    -- 1 telemetry, 2 event, 3 command result
    kind        INTEGER NOT NULL,
    device_id   TEXT    NOT NULL,
    epoch       INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    -- Protobuf Telemetry or Event for kinds 1 and 2; the result's JSON for kind 3.
    body        BLOB    NOT NULL
);

-- Commands from MQTT, kept until they have an outcome, and after that as a record.
CREATE TABLE commands (
    id          INTEGER PRIMARY KEY,
    device      INTEGER NOT NULL REFERENCES devices (id),
    command_id  TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    -- The request's "params" as JSON text.
    params      BLOB    NOT NULL,
    created_ms  INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL,
    -- First time it was written to the device; NULL while never delivered.
    sent_ms     INTEGER,
    -- NULL while open; then ok, error, rejected, timeout or expired.
    outcome     TEXT,
    detail      TEXT,
    finished_ms INTEGER,
    UNIQUE (device, command_id)
);

CREATE INDEX commands_open_by_deadline ON commands (deadline_ms) WHERE outcome IS NULL;
CREATE INDEX commands_open_by_device ON commands (device) WHERE outcome IS NULL;
