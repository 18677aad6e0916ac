"""One way to open a session, whatever its source: Socket.IO, a call (Twilio, FreeSWITCH) or a
file upload.

``open`` validates the id (one rule for every source), claims it — among this process's live and
recent sessions, then in the store that every node shares — builds one pipeline per analysed
track, and starts the session's runner. ``analyse_file`` runs a whole file through a runner of
its own that is never registered or stored, with bulk priority so live streams come first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from engine import SAMPLE_RATE
from engine.audio import AudioFormat
from engine.pipeline import FrameResult, StreamPipeline, timeline
from server.edges.protocol import ProtocolError, describe_id, valid_id
from server.runtime import ThreadRuntime
from server.sessions import wire
from server.sessions.analysis import WindowAnalyser
from server.sessions.claims import ClaimsUnavailable, RedisClaims
from server.sessions.events import Ended, Error, Event, Result, Started, UtteranceDone
from server.sessions.registry import SessionRegistry
from server.sessions.runner import FILE, SessionRunner, Track, WindowPolicy
from server.sessions.session import Session
from server.settings import Settings
from server.sinks.metrics import Load
from server.sinks.store import Store, StoreUnavailable

log = logging.getLogger(__name__)


def reader_hash(resume_token: str) -> str:
    """What the store keeps of a resume token: enough to check it, not to use it."""
    return hashlib.sha256(resume_token.encode()).hexdigest()


RETRY_AFTER_S = 10.0  # a refused client's retry hint: demand is measured over the last 10 s


class SessionFactory:
    def __init__(
        self,
        settings: Settings,
        *,
        registry: SessionRegistry,
        store: Store,
        analyser: WindowAnalyser,
        publish: Callable[[Event], None],
        runtime: ThreadRuntime,
        model_info: dict[str, Any],
        load: Callable[[], Load] | None = None,
        draining: Callable[[], bool] = lambda: False,
        claims: RedisClaims | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._load = load
        self._draining = draining
        self.claims = claims
        self.registry = registry
        self.store = store
        self.analyser = analyser
        self.publish = publish
        self.runtime = runtime
        self.model_info = model_info
        self.labels = tuple(model_info["labels"])
        self.random_weights = bool(model_info.get("random_weights"))
        self.live = WindowPolicy(
            latency_budget_s=settings.latency_budget_s,
            utterance_delay_s=settings.utterance_delay_s,
            utterance_wait_s=settings.utterance_wait_s,
        )
        self._clock = clock

    def config(self, fmt: AudioFormat) -> dict[str, Any]:
        """What a client is told about its session, and what is stored with it."""
        s = self.settings
        return {
            **s.pipeline_config().as_dict(),
            "sample_rate": fmt.sample_rate,
            "encoding": fmt.encoding,
            "channels": fmt.channels,
            "max_chunk_bytes": s.max_chunk_bytes,
            "max_realtime_factor": s.max_realtime_factor,
            "resume_ttl_s": s.resume_ttl_s,
        }

    def _tracks(
        self,
        fmt: AudioFormat,
        parties: list[str | None],
        narrowband: bool | None = None,
        utterances: bool = True,
    ) -> dict[str | None, Track]:
        config = self.settings.pipeline_config()
        if not utterances:  # the session turned them off
            config = dataclasses.replace(config, utterances=False)
        return {
            party: Track(
                party, StreamPipeline(config, fmt, labels=self.labels, narrowband=narrowband)
            )
            for party in parties
        }

    def open(
        self,
        *,
        source: str,
        fmt: AudioFormat,
        session_id: str | None = None,
        parties: list[str | None] | None = None,
        meta: dict[str, Any] | None = None,
        owner: str | None = None,
        client: str = "",
        connection: Any = None,
        embeddings: bool = False,
        utterances: bool = True,
    ) -> SessionRunner:
        """A new live session with its runner started. Raises ProtocolError (INVALID_MESSAGE,
        SESSION_EXISTS, SESSION_LIMIT) when it cannot be opened. ``owner`` and ``connection``
        are set before the session can be found, so a takeover can never miss them.
        ``utterances``: False turns utterances off for this session (``settings.utterances``
        turns them off for every one)."""
        self._admit()
        chosen = session_id is not None
        if session_id is None:
            session_id = self.registry.new_id()
        elif not valid_id(session_id):
            raise ProtocolError(
                "INVALID_MESSAGE",
                f"a session id is 1-128 letters, digits or ._:- (got {describe_id(session_id)})",
            )
        self.registry.reserve(session_id)
        if chosen and self.claims is not None:
            self._claim_across_nodes(session_id)
        try:
            now = self._clock()
            session = Session(
                id=session_id,
                source=source,
                format=fmt,
                results_kept=self.settings.results_kept,
                embeddings=embeddings,
                meta=dict(meta or {}),
                owner=owner,
                client=client,
                connection=connection,
                started=now,
                last_audio=now,
            )
            config = self.config(fmt)
            self._claim(session, config)
        except BaseException:
            self.registry.release(session_id)
            raise
        runner = self._runner(session, self._tracks(fmt, parties or [None], utterances=utterances))
        self.publish(Started(session, config))
        self.runtime.spawn(runner.run)
        log.info(
            "session started",
            extra={"session_id": session_id, "source": source, "format": fmt},
        )
        return runner

    def reopen(
        self,
        *,
        resume_token: str | None = None,
        session_id: str | None = None,
        source: str | None = None,
        fmt: AudioFormat | None = None,
        owner: str | None = None,
        client: str = "",
        connection: Any = None,
    ) -> SessionRunner | None:
        """Continue here a session a draining node handed off: found by the resume token its
        client presents (and the session id, when given), or by a rejoining call's id. The
        same id; ``seq`` goes on from the stored maximum; every track starts where it stopped,
        with its speaker baseline, smoothed index and totals. None if the store holds no such
        handoff (or another node took it first), or if its audio format is not ``fmt`` (a
        call's new connection must send what its tracks decode). A saturated node takes it
        anyway: it was running, and refusing it now would lose it."""
        if self._draining():
            self._admit()  # DRAINING: another node continues it
        try:
            row = self.runtime.offload(
                self.store.take_handoff,
                session_id=session_id,
                reader_sha256=None if resume_token is None else reader_hash(resume_token),
                source=source,
            )
        except StoreUnavailable:
            return None
        if row is None:
            return None
        session_id, state, config = row["session_id"], row["handoff"], row["config"]
        stored = AudioFormat(
            sample_rate=int(config.get("sample_rate", 16000)),
            encoding=str(config.get("encoding", "pcm_s16le")),
            channels=int(config.get("channels", 1)),
        )
        if fmt is not None and fmt != stored:  # leave it for a connection that sends it
            self.store.hand_off(session_id, state, at=time.time(), then=lambda: None)
            log.warning(
                "a call's new connection sends another format; not continued",
                extra={"session_id": session_id, "stored": stored, "offered": fmt},
            )
            return None
        try:
            self.registry.reserve(session_id)
        except ProtocolError:  # full (or the id is this node's own ended one): leave it be
            self.store.hand_off(session_id, state, at=time.time(), then=lambda: None)
            raise
        fmt = stored
        try:
            now = self._clock()
            audio_s = float(state["audio_s"])
            session = Session(
                id=session_id,
                source=row["source"],
                format=fmt,
                results_kept=self.settings.results_kept,
                embeddings=self.settings.embeddings,
                meta=row["meta"],
                owner=owner,
                client=client,
                connection=connection,
                started=now - audio_s,  # its audio so far counts as real time
                started_wall=float(row["started_at"]),
                last_audio=now,
                audio_s=audio_s,
                seq=int(state["seq"]),
                published_seq=int(state["seq"]),
            )
            if resume_token is not None:
                session.token = resume_token
            pipeline_config = self.settings.pipeline_config()
            if not state.get("utterances", True):  # the session had turned them off
                pipeline_config = dataclasses.replace(pipeline_config, utterances=False)
            tracks = {}
            for name, saved in state["tracks"].items():
                party = name or None
                track = Track(
                    party,
                    StreamPipeline(
                        pipeline_config, fmt, labels=self.labels, resume=saved["pipeline"]
                    ),
                )
                track.restore(saved)
                tracks[party] = track
        except (KeyError, TypeError, ValueError) as exc:  # a state this version cannot read
            self.registry.release(session_id)
            log.error(
                "a handed-off session's state cannot be read",
                extra={"session_id": session_id, "error": str(exc)[:200]},
            )
            self.store.close_session(session_id, state.get("summary", {}), ended_at=time.time())
            return None
        runner = self._runner(session, tracks)
        self.publish(Started(session, self.config(fmt), continued=True))
        self.runtime.spawn(runner.run)
        log.info(
            "session continued from another node",
            extra={"session_id": session_id, "seq": session.seq, "audio_s": round(audio_s, 1)},
        )
        return runner

    def _runner(self, session: Session, tracks: dict[str | None, Track]) -> SessionRunner:
        runner = SessionRunner(
            session,
            tracks,
            analyse=self.analyser,
            publish=self.publish,
            runtime=self.runtime,
            policy=self.live,
            random_weights=self.random_weights,
            inbox_max_bytes=self.settings.inbox_max_bytes,
            clock=self._clock,
            on_done=self.registry.remove,
            forget=self._forget,
        )
        self.registry.add(runner)
        return runner

    def _forget(self, track: Any) -> int:
        batcher = getattr(self.analyser, "batcher", None)
        return batcher.forget(track) if batcher is not None else 0

    def _admit(self) -> None:
        """A draining node refuses new sessions (DRAINING: start on another node; resumes and
        call takeovers of running sessions go on). With ``saturation_policy=refuse``, a
        saturated server refuses them too (OVERLOADED, retry later or elsewhere); with ``shed``
        it takes them and every stream thins evenly."""
        if self._draining():
            raise ProtocolError(
                "DRAINING",
                "this node is shutting down; start the session again (the load balancer sends "
                "it to another node)",
                retry_after_s=1,
            )
        if self.settings.saturation_policy != "refuse" or self._load is None:
            return
        load = self._load()
        if load.saturated:
            raise ProtocolError(
                "OVERLOADED",
                f"the server is saturated (demand {load.demand:.1f} windows/s, capacity "
                f"{load.capacity:.1f}); retry later or on another node",
                retry_after_s=RETRY_AFTER_S,
            )

    def _claim_across_nodes(self, session_id: str) -> None:
        assert self.claims is not None
        try:
            claimed = self.claims.claim(session_id)
        except ClaimsUnavailable as exc:
            self.registry.release(session_id)
            raise ProtocolError(
                "SESSION_EXISTS",
                "a chosen session id cannot be checked against the other nodes now "
                f"({exc}); start without a session_id",
                session_id,
            ) from None
        if not claimed:
            self.registry.release(session_id)
            raise ProtocolError(
                "SESSION_EXISTS",
                f"session {session_id} exists on a node sharing this message queue; start "
                "without a session_id for a new one",
                session_id,
            )

    def _claim(self, session: Session, config: dict[str, Any]) -> None:
        """Write the session's row now; an id the store already holds is refused."""
        row: dict[str, Any] = {
            "source": session.source,
            "started_at": session.started_wall,
            "config": config,
            "model": self.model_info,
            "meta": session.meta,
            "reader_sha256": reader_hash(session.token),
        }
        try:
            claimed = self.runtime.offload(self.store.claim, session.id, **row)
        except StoreUnavailable:  # live analysis goes on; the row is written when it can be
            self.store.open_session(session.id, **row)
            return
        if not claimed:
            raise ProtocolError(
                "SESSION_EXISTS",
                f"session {session.id} exists in the store; start without a session_id "
                "for a new one",
                session.id,
            )

    def analyse_file(self, blocks: Iterable[np.ndarray], narrowband: bool) -> dict[str, Any]:
        """The timeline of a mono 16 kHz signal given in blocks (engine.audio.file_blocks:
        decoded as they are taken, so a file is never whole in memory), analysed as a stream
        with bulk priority. AudioFormatError from the blocks ends the analysis and is raised."""
        session = Session(id="file", source="file", format=AudioFormat())
        frames: list[FrameResult] = []
        utterances: list[dict[str, Any]] = []
        errors: list[Error] = []
        ended: list[Ended] = []
        done = threading.Event()

        def collect(event: Event) -> None:
            if isinstance(event, Result):
                frames.append(event.frame)
            elif isinstance(event, UtteranceDone):
                if event.payload is not None:
                    utterances.append({k: v for k, v in event.payload.items() if k != "session_id"})
            elif isinstance(event, Error):
                errors.append(event)
            elif isinstance(event, Ended):
                ended.append(event)
                done.set()

        tracks = self._tracks(AudioFormat(), [None], narrowband=narrowband)
        runner = SessionRunner(
            session,
            tracks,
            analyse=self.analyser,
            publish=collect,
            runtime=self.runtime,
            policy=FILE,
            random_weights=self.random_weights,
            inbox_max_bytes=self.settings.inbox_max_bytes,
            clock=self._clock,
        )
        self.runtime.spawn(runner.run)
        step = SAMPLE_RATE  # one second of float32 per push
        source = iter(blocks)
        try:
            while (samples := self.runtime.offload(next, source, None)) is not None:
                for at in range(0, samples.shape[0], step):
                    runner.push(None, samples[at : at + step], block=True)
        finally:
            runner.end("file analysed")
            done.wait()
        if errors and not frames:
            first = errors[0]
            raise ProtocolError(
                first.code if first.code.startswith("INFERENCE") else "INFERENCE_FAILED",
                first.message,
            )
        track = tracks[None]
        summary = wire.track_summary(
            track.pipeline.summary_dict(),
            expired=track.expired,
            failed=track.failed,
            utterances_dropped=track.utterances_dropped,
        )
        out = timeline(
            self.model_info, track.pipeline.config, frames, summary, utterances=utterances
        )
        out["errors"] = [{"code": e.code, "message": e.message} for e in errors]
        return out
