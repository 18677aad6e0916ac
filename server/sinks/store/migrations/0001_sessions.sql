-- Sessions and their results. Portable SQL: SQLite and PostgreSQL run it as it is.
-- JSON columns are TEXT: the server reads them whole and never queries inside them.
CREATE TABLE IF NOT EXISTS sessions (
    id VARCHAR(128) PRIMARY KEY,
    source VARCHAR(32) NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    ended_at DOUBLE PRECISION,
    config TEXT,
    model TEXT,
    meta TEXT,
    summary TEXT
);
CREATE TABLE IF NOT EXISTS results (
    session_id VARCHAR(128) NOT NULL REFERENCES sessions(id),
    seq INTEGER NOT NULL,
    track VARCHAR(32),
    start_s DOUBLE PRECISION NOT NULL,
    end_s DOUBLE PRECISION NOT NULL,
    emotion VARCHAR(32) NOT NULL,
    stress DOUBLE PRECISION,
    payload TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
);
CREATE INDEX IF NOT EXISTS sessions_started ON sessions(started_at);
