-- Utterances: each a track's speech between two pauses, classified as one clip. A track's
-- utterance_seq counts from 0; track is '' for a session's only track (a primary key holds no
-- NULL). payload: the utterance_result exactly as it was sent.
CREATE TABLE IF NOT EXISTS utterances (
    session_id VARCHAR(128) NOT NULL REFERENCES sessions(id),
    track VARCHAR(32) NOT NULL,
    utterance_seq INTEGER NOT NULL,
    start_s DOUBLE PRECISION NOT NULL,
    end_s DOUBLE PRECISION NOT NULL,
    emotion VARCHAR(32) NOT NULL,
    stress DOUBLE PRECISION,
    payload TEXT NOT NULL,
    PRIMARY KEY (session_id, track, utterance_seq)
);
