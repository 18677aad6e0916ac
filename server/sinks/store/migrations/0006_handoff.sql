-- A session a draining node handed over for another node to continue: its state (JSON: seq,
-- each track's position, speaker baseline and totals) and when. The row's node is cleared
-- meanwhile; the node that continues it takes it (node set, handoff cleared) in one UPDATE.
ALTER TABLE sessions ADD COLUMN handoff TEXT;
ALTER TABLE sessions ADD COLUMN handed_off_at DOUBLE PRECISION;
