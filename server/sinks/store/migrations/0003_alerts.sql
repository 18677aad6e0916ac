-- Escalation alerts (server/alerts.py), stored with their session and deleted with it.
CREATE TABLE IF NOT EXISTS alerts (
    id VARCHAR(32) PRIMARY KEY,
    session_id VARCHAR(128) NOT NULL REFERENCES sessions(id),
    track VARCHAR(32),
    rule VARCHAR(64) NOT NULL,
    severity VARCHAR(16) NOT NULL,
    state VARCHAR(16) NOT NULL,
    fired_at DOUBLE PRECISION NOT NULL,
    resolved_at DOUBLE PRECISION,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alerts_fired ON alerts(fired_at);
CREATE INDEX IF NOT EXISTS alerts_session ON alerts(session_id);
