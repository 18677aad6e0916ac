"""Escalation alerts: rules over the live results, evaluated per session and track.

A rules file (``--alert-rules``, YAML) holds a list of rules. The expression language is tiny
and parsed here, never evaluated as code: a field path into a result, then either a comparison
with a number or a rise within a span of audio time::

    rules:
      - name: high_stress
        when: stress.index >= 50      # any numeric result field: scores.angry, confidence, ...
        for_s: 3                      # held over this much audio before it fires (default 0)
        tracks: [customer]            # default: every analysed track
        severity: warning             # info | warning | critical (default warning)
      - name: stress_rising
        when: stress.index rises by 30 within 60

An alert fires once when its condition has held ``for_s`` seconds of audio (from the start of
the first window that met it to the end of the latest), and resolves once the value has been
past the clear level for ``clear_s`` (default: ``for_s``, at least three hops): the threshold
back by ``hysteresis`` (default 10 % of it) for a comparison, half the rise for a rise. A
value flapping around the threshold therefore fires once and stays active.

:class:`AlertEngine` is pure (no I/O, clock injected): the server's :class:`AlertPublisher`
subscribes it to session events and delivers what it returns — stored, emitted to the session's
room and the monitor, counted, and sent to webhooks (server/sinks/webhooks.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

SEVERITIES = ("info", "warning", "critical")
_PATH = r"[a-z_]+(?:\.[a-z0-9_]+)*"
_NUMBER = r"-?\d+(?:\.\d+)?"
_COMPARE = re.compile(rf"\s*({_PATH})\s*(>=|<=|>|<)\s*({_NUMBER})\s*")
_RISE = re.compile(rf"\s*({_PATH})\s+rises\s+by\s+({_NUMBER})\s+within\s+({_NUMBER})\s*s?\s*")
# result fields a rule may read; ``scores.<label>`` for the model's labels
_FIELDS = {
    "stress.index",
    "stress.raw_index",
    "stress.prosodic_index",
    "stress.confidence",
    "confidence",
    "speech_ratio",
}
# fields with no emotion-model output in them (an alert on them is not marked random_weights)
_NO_EMOTION = ("stress.prosodic_index", "stress.confidence", "speech_ratio", "stress.components.")
_RULE_KEYS = {"name", "when", "for_s", "clear_s", "hysteresis", "tracks", "severity"}


class RuleError(ValueError):
    """A rules file that cannot be used; the message names the rule and the field."""


@dataclass(frozen=True)
class Rule:
    name: str
    path: str
    op: str  # >=, >, <=, <, or "rise"
    threshold: float  # the comparison's number, or the rise
    for_s: float = 0.0
    clear_s: float | None = None
    hysteresis: float | None = None
    within_s: float = 0.0  # rise rules: the span of audio the rise happens in
    tracks: tuple[str, ...] | None = None
    severity: str = "warning"

    @property
    def when(self) -> str:
        if self.op == "rise":
            return f"{self.path} rises by {self.threshold:g} within {self.within_s:g}"
        return f"{self.path} {self.op} {self.threshold:g}"

    @property
    def reads_emotion(self) -> bool:
        """Whether the value comes (in part) from the emotion model."""
        if self.path.startswith("stress.components.emotion_"):
            return True
        return not self.path.startswith(_NO_EMOTION)

    def band(self) -> float:
        """How far back past the threshold a value must go to clear."""
        if self.op == "rise":
            return self.threshold / 2.0
        if self.hysteresis is not None:
            return self.hysteresis
        return abs(self.threshold) * 0.1

    def holds(self, value: float) -> bool:
        t = self.threshold
        return {">=": value >= t, ">": value > t, "<=": value <= t, "<": value < t}[self.op]

    def cleared(self, value: float) -> bool:
        band = self.band()
        if self.op in (">=", ">"):
            return value < self.threshold - band
        return value > self.threshold + band


def load_rules(path: str | Path, labels: Sequence[str] | None) -> list[Rule]:
    """Read and check a rules file; RuleError says which rule and which field is wrong.
    ``labels``: the model's, to check ``scores.<label>`` (None: before the model is loaded)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise RuleError(f"alert rules {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise RuleError(f"alert rules {path}: not YAML: {exc}") from None
    return parse_rules(data, labels, source=str(path))


def parse_rules(data: Any, labels: Sequence[str] | None, source: str = "alert rules") -> list[Rule]:
    if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
        raise RuleError(f"{source}: expected a mapping with a list under 'rules'")
    rules: list[Rule] = []
    for i, raw in enumerate(data["rules"], start=1):
        rule = _parse_rule(raw, labels, f"{source}: rule {i}")
        if any(r.name == rule.name for r in rules):
            raise RuleError(f"{source}: rule {i}: name {rule.name!r} is used twice")
        rules.append(rule)
    return rules


def _parse_rule(raw: Any, labels: Sequence[str] | None, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise RuleError(f"{where}: expected a mapping, got {type(raw).__name__}")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise RuleError(f"{where}: name: 1-64 letters, digits, '_', '.' or '-' required")
    where = f"{where} ({name})"
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise RuleError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(_RULE_KEYS)}")
    when = raw.get("when")
    if not isinstance(when, str):
        raise RuleError(f"{where}: when: expected e.g. 'stress.index >= 50'")
    fields: dict[str, Any] = {}
    if m := _COMPARE.fullmatch(when):
        path, fields["op"], threshold = m.group(1), m.group(2), float(m.group(3))
    elif m := _RISE.fullmatch(when):
        path, fields["op"], threshold = m.group(1), "rise", float(m.group(2))
        fields["within_s"] = float(m.group(3))
        if threshold <= 0 or fields["within_s"] <= 0:
            raise RuleError(f"{where}: when: the rise and its span must be positive")
    else:
        raise RuleError(
            f"{where}: when: {when[:80]!r} is neither 'FIELD OP NUMBER' (OP: >=, >, <=, <) nor "
            "'FIELD rises by NUMBER within SECONDS'"
        )
    _check_path(path, labels, where)
    for key in ("for_s", "clear_s", "hysteresis"):
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise RuleError(f"{where}: {key}: expected a number >= 0, got {value!r}")
            if not math.isfinite(value) or value > 86_400:
                raise RuleError(f"{where}: {key}: {value!r} is out of range")
            fields[key] = float(value)
    tracks = raw.get("tracks")
    if tracks is not None:
        if not isinstance(tracks, list) or not all(isinstance(t, str) for t in tracks):
            raise RuleError(f"{where}: tracks: expected a list of track names")
        fields["tracks"] = tuple(tracks)
    severity = raw.get("severity", "warning")
    if severity not in SEVERITIES:
        raise RuleError(f"{where}: severity: {severity!r} is not one of {', '.join(SEVERITIES)}")
    return Rule(name=name, path=path, threshold=threshold, severity=severity, **fields)


def _check_path(path: str, labels: Sequence[str] | None, where: str) -> None:
    if path in _FIELDS:
        return
    head, _, rest = path.partition(".")
    if head == "scores":
        syntax_only = labels is None and re.fullmatch(r"[a-z0-9_]+", rest)
        if syntax_only or (labels and rest in labels):
            return
        raise RuleError(
            f"{where}: when: no score {rest!r}; the model's labels: {', '.join(labels or ())}"
        )
    if head == "stress" and rest.startswith("components.") and rest.count(".") == 2:
        return  # e.g. stress.components.loudness_phon.z
    known = [*sorted(_FIELDS), "scores.<label>", "stress.components.<measure>.<z|value|points>"]
    raise RuleError(f"{where}: when: unknown field {path!r}; known: {', '.join(known)}")


def value_at(result: dict[str, Any], path: str) -> float | None:
    node: Any = result
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, int | float) or not math.isfinite(node):
        return None
    return float(node)


@dataclass
class Alert:
    id: str
    session_id: str
    track: str | None
    rule: str
    severity: str
    when: str
    state: str  # firing | resolved
    fired_at: float  # wall clock, epoch s
    fired_audio_s: float  # the session's audio time (end of the window that fired it)
    value: float  # when it fired
    peak: float  # the most extreme value while active
    seqs: list[int]  # the results that made it fire
    random_weights: bool = False  # it reads emotion outputs of a random-weight model
    resolved_at: float | None = None
    resolved_audio_s: float | None = None
    resolved_by: str | None = None  # "cleared" or "session ended"
    held_s: float = 0.0

    @property
    def evidence(self) -> str:
        """A line a supervisor reads at a glance: 'stress.index 68 for 5 s'."""
        return f"{self.when.split(' ')[0]} {self.peak:g} for {self.held_s:.0f} s"

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["evidence"] = self.evidence
        if not self.random_weights:
            out.pop("random_weights")
        return out


MAX_SEQS = 50  # evidence kept per alert


@dataclass
class _State:
    since_start_s: float | None = None  # the first window (start) of the current holding run
    seqs: deque[int] = field(default_factory=lambda: deque(maxlen=MAX_SEQS))
    history: deque[tuple[float, float]] = field(default_factory=deque)  # rise: (end_s, value)
    active: Alert | None = None
    clear_since_s: float | None = None
    base: float = 0.0  # rise: the low the rise was measured from
    last_end_s: float = 0.0


class AlertEngine:
    def __init__(
        self,
        rules: Sequence[Rule],
        *,
        random_weights: bool = False,
        hop_s: float = 1.0,
        clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex[:16],
    ) -> None:
        self.rules = list(rules)
        self.random_weights = random_weights
        self.hop_s = hop_s
        self._clock = clock
        self._new_id = new_id
        self._states: dict[tuple[str, str | None, str], _State] = {}

    def on_result(self, result: dict[str, Any]) -> list[Alert]:
        """Feed one result; the alerts that fired or resolved on it."""
        changed: list[Alert] = []
        track = result.get("track")
        for rule in self.rules:
            if rule.tracks is not None and (track or "main") not in rule.tracks:
                continue
            value = value_at(result, rule.path)
            if value is None:
                continue
            key = (result["session_id"], track, rule.name)
            state = self._states.setdefault(key, _State())
            alert = self._step(rule, state, result, value)
            if alert is not None:
                changed.append(alert)
        return changed

    def on_end(self, session_id: str, reason: str = "session ended") -> list[Alert]:
        """A session ended (or moved to another node): its active alerts resolve, its state
        goes."""
        changed = []
        for key in [k for k in self._states if k[0] == session_id]:
            state = self._states.pop(key)
            alert = state.active
            if alert is not None:
                self._resolve(alert, state.last_end_s, reason)
                changed.append(alert)
        return changed

    def _step(
        self, rule: Rule, state: _State, result: dict[str, Any], value: float
    ) -> Alert | None:
        start_s, end_s, seq = float(result["start_s"]), float(result["end_s"]), int(result["seq"])
        state.last_end_s = end_s
        if rule.op == "rise":
            history = state.history
            history.append((end_s, value))
            while history and history[0][0] < end_s - rule.within_s:
                history.popleft()
            low = min(v for _, v in history)
            holding = value - low >= rule.threshold
        else:
            low = 0.0
            holding = rule.holds(value)
        if state.active is not None:
            return self._while_active(rule, state, value, end_s)
        if not holding:
            state.since_start_s = None
            state.seqs.clear()
            return None
        if state.since_start_s is None:
            state.since_start_s = start_s
        state.seqs.append(seq)
        held = end_s - state.since_start_s
        if held + 1e-9 < rule.for_s:
            return None
        state.base = low
        state.active = Alert(
            id=self._new_id(),
            session_id=result["session_id"],
            track=result.get("track"),
            rule=rule.name,
            severity=rule.severity,
            when=rule.when,
            state="firing",
            fired_at=self._clock(),
            fired_audio_s=end_s,
            value=round(value, 4),
            peak=round(value, 4),
            seqs=list(state.seqs),
            random_weights=self.random_weights and rule.reads_emotion,
            held_s=round(held, 2),
        )
        return state.active

    def _while_active(self, rule: Rule, state: _State, value: float, end_s: float) -> Alert | None:
        alert = state.active
        assert alert is not None
        rising = rule.op in (">=", ">", "rise")
        if (value > alert.peak) if rising else (value < alert.peak):
            alert.peak = round(value, 4)
        cleared = value <= state.base + rule.band() if rule.op == "rise" else rule.cleared(value)
        if not cleared:
            state.clear_since_s = None
            alert.held_s = round(end_s - (state.since_start_s or alert.fired_audio_s), 2)
            return None
        if state.clear_since_s is None:
            state.clear_since_s = end_s
        clear_s = rule.clear_s if rule.clear_s is not None else max(rule.for_s, 3 * self.hop_s)
        if end_s - state.clear_since_s + self.hop_s + 1e-9 < clear_s:
            return None
        self._resolve(alert, end_s, "cleared")
        state.active = None
        state.since_start_s = None
        state.clear_since_s = None
        state.seqs.clear()
        state.history.clear()
        return alert

    def _resolve(self, alert: Alert, audio_s: float, why: str) -> None:
        alert.state = "resolved"
        alert.resolved_at = self._clock()
        alert.resolved_audio_s = audio_s
        alert.resolved_by = why
