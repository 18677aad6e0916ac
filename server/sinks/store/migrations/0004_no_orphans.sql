-- Results and alerts whose session row is gone (SQLite did not enforce foreign keys before):
-- nothing can read or delete them, so they go. Foreign keys are enforced from now on.
DELETE FROM results WHERE session_id NOT IN (SELECT id FROM sessions);
DELETE FROM alerts WHERE session_id NOT IN (SELECT id FROM sessions);
