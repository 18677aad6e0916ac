"""What goes over the wire and into storage: results, summaries, VAD changes, errors, session
states and the CSV export, each built in one function here.

A window's own fields come from the engine (``FrameResult.as_dict``); the server adds who and when
(session, seq, track, latency, the hop since the track's previous result). The store keeps each
result exactly as it was sent, so adding a field touches this module (or the engine's
``FrameResult``) and its test, nothing else.
"""

from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING, Any

from engine.pipeline import FrameResult, Summary, UtteranceResult

if TYPE_CHECKING:
    from server.sessions.session import Session


def result(
    session_id: str,
    seq: int,
    frame: FrameResult,
    *,
    track: str | None,
    latency_ms: float,
    hop_s: float | None,
    expired: int = 0,
    random_weights: bool,
) -> dict[str, Any]:
    """One analysed window. ``hop_s``: seconds since the previous result of the same track
    started (None for the first); more than the configured hop means results were thinned.
    ``expired``: the track's windows dropped unanalysed since its previous result, because they
    could not be answered within the latency budget."""
    out: dict[str, Any] = {"session_id": session_id, "seq": seq, **frame.as_dict()}
    out["latency_ms"] = round(latency_ms, 1)
    out["hop_s"] = None if hop_s is None else round(hop_s, 3)
    out["expired"] = expired
    if track:
        out["track"] = track
    if random_weights:
        out["random_weights"] = True
    return out


def utterance(
    session_id: str, result: UtteranceResult, *, track: str | None, random_weights: bool
) -> dict[str, Any]:
    """One utterance, classified as a whole clip (``utterance_result``). ``utterance_seq``
    counts a track's utterances from 0."""
    out: dict[str, Any] = {"session_id": session_id, **result.as_dict()}
    if track:
        out["track"] = track
    if random_weights:
        out["random_weights"] = True
    return out


def track_summary(
    pipeline_summary: dict[str, Any],
    *,
    expired: int,
    failed: int,
    utterances_dropped: dict[str, int] | None = None,
) -> dict:
    """A track's totals; ``utterances_dropped``: its utterances not analysed, by outcome."""
    out = {**pipeline_summary, "expired": expired, "failed": failed}
    if "utterances" in out:
        out["utterances"] = {**out["utterances"], "dropped": dict(utterances_dropped or {})}
    return out


def summary(
    session: Session, reason: str, tracks: dict[str | None, dict[str, Any]], random_weights: bool
) -> dict[str, Any]:
    """A session's totals; one track's fields at the top level, several under ``tracks``."""
    out: dict[str, Any] = {
        "session_id": session.id,
        "reason": reason,
        "results": session.seq,
        "audio_received_s": round(session.audio_s, 3),
        "random_weights": random_weights,
    }
    if list(tracks) == [None]:
        out.update(tracks[None])
    else:
        out["tracks"] = {name or "main": t for name, t in tracks.items()}
    return out


def summary_of_stored(stored: dict[str, Any], reason: str) -> dict[str, Any]:
    """A summary rebuilt from a stored timeline (a session its server never closed)."""
    frames = stored["frames"]
    labels = tuple(stored.get("model", {}).get("labels") or (frames[0]["scores"] if frames else ()))
    per_track: dict[str | None, Summary] = {}
    for f in frames:
        summary_ = per_track.setdefault(f.get("track"), Summary(labels))
        summary_.add_values(
            f["scores"], f["emotion"], f["stress"]["index"], f["start_s"], f["end_s"]
        )
    tracks = {name: t.as_dict() for name, t in per_track.items()} or {
        None: Summary(labels).as_dict()
    }
    out: dict[str, Any] = {
        "session_id": stored["session_id"],
        "reason": reason,
        "results": len(frames),
        "random_weights": bool(stored.get("model", {}).get("random_weights")),
    }
    if list(tracks) == [None]:
        out.update(tracks[None])
    else:
        out["tracks"] = {name or "main": t for name, t in tracks.items()}
    return out


def vad(session_id: str, track: str | None, speech: bool, at_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {"session_id": session_id, "speech": speech, "at_s": round(at_s, 3)}
    if track:
        out["track"] = track
    return out


def error(code: str, message: str, session_id: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"code": code, "message": message}
    if session_id:
        out["session_id"] = session_id
    return out


def hand_off_notice(session_id: str) -> dict[str, Any]:
    """What a client hears when its node drains: hold the audio, then (once disconnected)
    reconnect and resume; another node continues the session."""
    message = (
        "this node is shutting down; the session continues on another node: hold your audio, "
        "then reconnect and resume (start_session with the resume_token and the last seq you have)"
    )
    return {**error("DRAINING", message, session_id), "retry_after_s": 1, "resume": True}


def session_state(session: Session) -> dict[str, Any]:
    """What the monitor shows of a session."""
    return {
        "session_id": session.id,
        "source": session.source,
        "connected": session.connected,
        "started_at": session.started_wall,
        "audio_s": round(session.audio_s, 1),
        "results": session.seq,
        "meta": session.meta,
        "last": session.results[-1] if session.results else None,
        "dynamics": session.dynamics,
    }


_CLASSIFIED_COLUMNS = (  # what a window's and an utterance's rows share, after their number
    ("track", lambda r: r.get("track", "")),
    ("start_s", lambda r: r["start_s"]),
    ("end_s", lambda r: r["end_s"]),
    ("emotion", lambda r: r["emotion"]),
    ("confidence", lambda r: r["confidence"]),
    ("stress_index", lambda r: r["stress"]["index"]),
    ("stress_level", lambda r: r["stress"]["level"]),
    ("stress_confidence", lambda r: r["stress"]["confidence"]),
)
_TAIL_COLUMNS = (
    ("valence_derived", lambda r: r.get("circumplex", {}).get("valence")),
    ("arousal_derived", lambda r: r.get("circumplex", {}).get("arousal")),
    ("device", lambda r: r["device"]),
)
CSV_COLUMNS = (
    ("seq", lambda f: f.get("seq")),
    *_CLASSIFIED_COLUMNS,
    ("speech_ratio", lambda f: f["speech_ratio"]),
    *_TAIL_COLUMNS,
)
UTTERANCE_CSV_COLUMNS = (
    ("utterance_seq", lambda u: u["utterance_seq"]),
    *_CLASSIFIED_COLUMNS,
    ("speech_s", lambda u: u["speech_s"]),
    ("voiced_s", lambda u: u["voiced_s"]),
    ("split", lambda u: u["split"]),
    *_TAIL_COLUMNS,
)


def timeline_csv(timeline: dict[str, Any], rows: str = "frames") -> str:
    """A stored timeline as CSV: one row per result (``rows="frames"``) or per utterance
    (``rows="utterances"``), one column per emotion label."""
    items = timeline.get(rows) or []
    columns = CSV_COLUMNS if rows == "frames" else UTTERANCE_CSV_COLUMNS
    labels = list(timeline.get("model", {}).get("labels") or (items[0]["scores"] if items else []))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([name for name, _ in columns] + labels)
    for item in items:
        writer.writerow(
            [get(item) for _, get in columns] + [item["scores"].get(k, "") for k in labels]
        )
    return out.getvalue()
