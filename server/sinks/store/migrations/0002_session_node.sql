-- The server process that runs a session, so that after a crash it can close its own sessions
-- (and only those) as interrupted when it starts again.
ALTER TABLE sessions ADD COLUMN node VARCHAR(255);
CREATE INDEX IF NOT EXISTS sessions_open ON sessions(node, ended_at);
