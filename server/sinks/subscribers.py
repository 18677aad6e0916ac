"""The subscribers to session events: each small, each with a mailbox of its own (events.py).

- ``StoreRecorder`` writes sessions, results and summaries, then hands each room event to the
  ``RoomPublisher`` once what came before it is committed: a client never sees a result the
  database does not hold (unless the database is down: then live analysis goes on, degraded).
- ``RoomPublisher`` emits to the session's Socket.IO room: its owner and its supervisors
  (``emotion_result``, ``utterance_result``, ``vad``, ``error``, ``session_summary``).
- ``MonitorPublisher`` tells supervisors (the monitor room) how every session is doing.
- ``MetricsRecorder`` counts.
- ``AlertPublisher`` runs the alert rules over results; each alert that fires or resolves is
  stored, then emitted to the session's room and the monitor, counted, and sent to webhooks.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

from server.sessions import wire
from server.sessions.events import (
    Disconnected,
    Ended,
    Error,
    Event,
    HandedOff,
    Result,
    Skipped,
    Started,
    UtteranceDone,
    VadChange,
)
from server.sinks.alerts import AlertEngine
from server.sinks.metrics import Metrics
from server.sinks.store import Store
from server.sinks.webhooks import WebhookSender

log = logging.getLogger(__name__)

MONITOR_ROOM = "monitor"
Emit = Callable[..., None]


class RoomPublisher:
    name = "room"

    def __init__(
        self,
        emit: Emit,
        close_room: Callable[[str], None],
        disconnect: Callable[[str], None] = lambda sid: None,
    ) -> None:
        self._emit = emit
        self._close_room = close_room
        self._disconnect = disconnect

    def handle(self, event: Event) -> None:
        session = getattr(event, "session", None)
        if session is None:
            return
        room = session.room
        if isinstance(event, Result):  # ordered with a resuming client's catch-up
            session.publish(event.result, lambda r: self._emit("emotion_result", r, to=room))
            call = session.connection  # a call's media connection may want results back
            if call is not None:
                call.result(event.result)
        elif isinstance(event, UtteranceDone):
            if event.payload is not None:
                self._emit("utterance_result", event.payload, to=room)
        elif isinstance(event, VadChange):
            self._emit("vad", event.payload, to=room)
        elif isinstance(event, Error):
            self._emit("error", wire.error(event.code, event.message, session.id), to=room)
        elif isinstance(event, Ended):
            self._emit("session_summary", event.summary, to=room)
            self._close_room(room)  # nobody hears a later session that reuses nothing of it
            session.summarised.set()
        elif isinstance(event, HandedOff):  # committed: another node can continue it now
            if session.owner is not None:  # told to hold its audio (App.end_all): it
                self._disconnect(session.owner)  # reconnects, through the balancer, and resumes
            call = session.connection
            if call is not None:
                call.hand_off()
            session.summarised.set()  # the room stays: the session's results go on elsewhere


class MonitorPublisher:
    name = "monitor"

    def __init__(self, emit: Emit) -> None:
        self._emit = emit

    def handle(self, event: Event) -> None:
        kind = {
            Started: "started",
            Result: "result",
            Ended: "ended",
            HandedOff: "handed_off",
            Disconnected: "disconnected",
        }.get(type(event))
        if isinstance(event, VadChange) and not event.payload["speech"]:
            kind = "paused"  # a party paused: the call's dynamics changed
        if kind is not None:
            state = wire.session_state(event.session)
            self._emit("session_update", {"event": kind, **state}, to=MONITOR_ROOM)


class MetricsRecorder:
    name = "metrics"

    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._m = metrics
        self._clock = clock

    def handle(self, event: Event) -> None:
        m = self._m
        if isinstance(event, Result):
            m.end_to_end_seconds.observe(max(0.0, self._clock() - event.received_at))
            m.emotion_results.labels(event.result["emotion"]).inc()
            m.stress_index.observe(event.result["stress"]["index"])
        elif isinstance(event, UtteranceDone):
            m.utterances.labels(event.outcome).inc()
            if event.payload is not None:
                m.utterance_delay_seconds.observe(event.delay_s)
        elif isinstance(event, Skipped):
            m.windows_skipped.labels(event.reason).inc(event.count)
        elif isinstance(event, Error):
            m.errors.labels(event.code).inc()
        elif isinstance(event, Started):
            m.active_sessions.labels(event.session.source).inc()
            if event.continued:
                m.handoffs.labels("continued").inc()
        elif isinstance(event, HandedOff):
            m.active_sessions.labels(event.session.source).dec()
            m.handoffs.labels("handed_off").inc()
        elif isinstance(event, Ended):
            m.active_sessions.labels(event.session.source).dec()
            dynamics = event.summary.get("dynamics")
            if dynamics:
                m.record_dynamics(event.session.source, dynamics)


class StoreRecorder:
    """Results and summaries to the store; each room event goes on to ``room`` once what came
    before it is committed. (The session's row is written when it opens: SessionFactory.)"""

    name = "store"

    def __init__(self, store: Store, room: RoomPublisher) -> None:
        self._store = store
        self._room = room

    def handle(self, event: Event) -> None:
        store = self._store
        then = functools.partial(self._room.handle, event)
        if isinstance(event, Result):
            store.add_result(event.session.id, event.result, then=then)
        elif isinstance(event, UtteranceDone):
            if event.payload is not None:
                store.add_utterance(event.session.id, event.payload, then=then)
        elif isinstance(event, Ended):
            store.close_session(event.session.id, event.summary, ended_at=time.time(), then=then)
        elif isinstance(event, HandedOff):
            store.hand_off(event.session.id, event.state, at=time.time(), then=then)
        elif isinstance(event, VadChange | Error):
            store.hand_on(then)


class AlertPublisher:
    name = "alerts"

    def __init__(
        self,
        engine: AlertEngine,
        store: Store,
        emit: Emit,
        metrics: Metrics,
        webhooks: WebhookSender | None = None,
    ) -> None:
        self._engine = engine
        self._store = store
        self._emit = emit
        self._metrics = metrics
        self._webhooks = webhooks

    def handle(self, event: Event) -> None:
        if isinstance(event, Result):
            changed = self._engine.on_result(event.result)
        elif isinstance(event, Ended):
            changed = self._engine.on_end(event.session.id)
        elif isinstance(event, HandedOff):  # the node that continues it rings them again
            changed = self._engine.on_end(event.session.id, "session moved to another node")
        else:
            return
        for alert in changed:
            payload = alert.as_dict()
            if alert.state == "firing":
                self._metrics.alerts.labels(alert.rule, alert.severity).inc()
            room = event.session.room
            self._store.save_alert(payload, then=functools.partial(self._deliver, payload, room))

    def _deliver(self, payload: dict, room: str) -> None:
        self._emit("alert", payload, to=room)
        self._emit("alert", payload, to=MONITOR_ROOM)
        if self._webhooks is not None:
            self._webhooks.submit(f"alert.{payload['state']}", {"alert": payload})
