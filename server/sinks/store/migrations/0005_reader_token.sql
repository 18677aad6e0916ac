-- The SHA-256 of a session's resume token: its own client may read its stored timeline with it
-- (GET /api/sessions/<id> with X-Resume-Token), without a supervisor token.
ALTER TABLE sessions ADD COLUMN reader_sha256 VARCHAR(64);
