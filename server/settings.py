"""The server's settings: one typed object, built once from CLI flags over ``VOXAFFECT_*`` env vars.

Every field can be set as ``--flag-name`` on ``voxaffect serve`` or as ``VOXAFFECT_FIELD_NAME`` in
the environment (a flag wins). ``Settings.from_sources`` validates everything at start, so nothing
deeper in the code reads the environment.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import DEFAULT_MODEL
from engine.pipeline import PipelineConfig
from server.sinks.store import database_url, redacted

ENV_PREFIX = "VOXAFFECT_"
MIN_TOKEN_CHARS = 16
PROJECT_DIR = Path(__file__).resolve().parent.parent


def _tuple(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


@dataclass(frozen=True)
class Settings:
    # network
    host: str = field(default="127.0.0.1", metadata={"help": "interface to listen on"})
    port: int = field(default=5000, metadata={"help": "TCP port"})
    api_tokens: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "supervisor tokens (comma-separated, 16+ characters): stream, read, "
            "subscribe, delete; none here or in ingest_tokens = no authentication"
        },
    )
    ingest_tokens: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "ingest tokens (16+ characters): start and stream their own sessions, "
            "analyse files; nothing else"
        },
    )
    token_signing_key: str = field(
        default="",
        metadata={
            "help": "key (32+ characters, the same on every node) that signs the short-lived "
            "tokens of POST /api/tokens; empty = a random key per process"
        },
    )
    scoped_token_max_s: float = field(
        default=900.0, metadata={"help": "longest life of a token from POST /api/tokens"}
    )
    cors_origins: tuple[str, ...] = field(
        default=(), metadata={"help": "extra allowed browser origins; empty = same origin only"}
    )
    trusted_proxies: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "proxy addresses or networks whose X-Forwarded-For/-Proto/-Host are believed "
            "(and which the per-address caps do not count)"
        },
    )
    allowed_hosts: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "Host names this server answers to besides its bind address and loopback "
            "(DNS rebinding); * = any"
        },
    )
    message_queue: str = field(
        default="", metadata={"help": "redis:// URL shared by several server processes"}
    )
    handshake_timeout_s: float = field(
        default=10.0,
        metadata={
            "help": "seconds a connection gets to send its request line and headers, in total "
            "(an idle keep-alive connection is closed after as long)"
        },
    )
    body_timeout_s: float = field(
        default=60.0, metadata={"help": "seconds a request body may take to arrive, in total"}
    )
    auth_timeout_s: float = field(
        default=10.0,
        metadata={
            "help": "seconds a Socket.IO transport gets to connect (and authenticate) once open"
        },
    )
    max_connections: int = field(
        default=1000, metadata={"help": "open connections at most; beyond, 503 at once"}
    )
    max_connections_per_ip: int = field(
        default=200,
        metadata={"help": "open connections from one address at most (trusted proxies exempt)"},
    )
    # model and inference
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "checkpoint directory or hub id"})
    hub: str = field(default="auto", metadata={"help": "auto, ms (ModelScope) or hf"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda[:N]"})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "auto (the fastest within 0.01 of fp32, measured), fp32, fp16, bf16, int8"
        },
    )
    retune: bool = field(
        default=False, metadata={"help": "measure dtype, batch and lanes again (not the cache)"}
    )
    tuning_cache: str = field(
        default="~/.cache/voxaffect/tuning.json",
        metadata={"help": "where measured choices are kept, per machine, torch and checkpoint"},
    )
    trust_checkpoint: bool = field(
        default=False,
        metadata={"help": "let torch unpickle a model.pt that holds more than tensors"},
    )
    cpu_threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 = all cores"})
    cpu_lanes: str = field(
        default="auto",
        metadata={"help": "concurrent CPU predict lanes per batch; auto = measured at start"},
    )
    cpu_fallback: bool = field(
        default=True, metadata={"help": "keep a CPU copy of the model for GPU timeouts and OOM"}
    )
    deadline_s: float = field(
        default=1.0, metadata={"help": "seconds the GPU gets per batch before the CPU takes over"}
    )
    max_batch: str = field(
        default="auto", metadata={"help": "windows per forward pass at most; auto = measured"}
    )
    max_wait_ms: float = field(default=10.0, metadata={"help": "how long a batch waits to fill"})
    latency_budget_s: float = field(
        default=1.5,
        metadata={
            "help": "a live window's result is due this long after its audio arrived; one that "
            "cannot make it is dropped unanalysed (expired), never sent late"
        },
    )
    saturation_margin: float = field(
        default=0.1,
        metadata={
            "help": "/readyz says saturated (503) once live demand exceeds capacity by this share"
        },
    )
    saturation_policy: str = field(
        default="shed",
        metadata={
            "help": "a new session on a saturated server: shed (accepted; every stream thins "
            "evenly) or refuse (OVERLOADED, with a retry hint)"
        },
    )
    inference_timeout_s: float = field(
        default=30.0, metadata={"help": "a window not answered in this long is INFERENCE_TIMEOUT"}
    )
    prosody_workers: int = field(
        default=1, metadata={"help": "processes measuring prosody (openSMILE, killable)"}
    )
    prosody_timeout_s: float = field(
        default=5.0,
        metadata={"help": "seconds a prosody worker gets per window before it is replaced"},
    )
    embeddings: bool = field(
        default=False, metadata={"help": "include each window's embedding in results"}
    )
    # analysis
    window_s: float = field(default=2.0, metadata={"help": "seconds of audio per analysed window"})
    hop_s: float = field(default=1.0, metadata={"help": "seconds between window starts"})
    min_speech_ratio: float = field(
        default=0.3, metadata={"help": "share of a window that must be speech"}
    )
    vad_aggressiveness: int = field(default=2, metadata={"help": "webrtcvad mode 0-3"})
    buffer_s: float = field(default=10.0, metadata={"help": "audio kept per session, seconds"})
    baseline_windows: int = field(
        default=3,
        metadata={
            "help": "a speaker's first windows of speech, taken as their calm baseline; later "
            "windows that are not elevated keep refining it"
        },
    )
    utterances: bool = field(
        default=True,
        metadata={
            "help": "also classify each utterance (speech between pauses) as one clip, in idle "
            "model time (utterance_result); a session can turn it off (options.utterances)"
        },
    )
    max_utterance_s: float = field(
        default=30.0, metadata={"help": "an utterance longer than this is split (1-60 s)"}
    )
    utterance_delay_s: float = field(
        default=60.0,
        metadata={
            "help": "an utterance that found no idle model time for this long after it ended "
            "is dropped, and counted"
        },
    )
    utterance_wait_s: float = field(
        default=10.0,
        metadata={"help": "a session's summary waits this long at most for its last utterances"},
    )
    # sessions and limits
    max_sessions: int = field(default=200, metadata={"help": "concurrent sessions at most"})
    max_sessions_per_connection: int = field(
        default=4, metadata={"help": "sessions one Socket.IO connection may hold open at most"}
    )
    max_sessions_per_ip: int = field(
        default=50,
        metadata={
            "help": "Socket.IO sessions one client address may hold open at most (trusted "
            "proxies: the forwarded client)"
        },
    )
    max_messages_per_s: float = field(
        default=200.0,
        metadata={
            "help": "messages a second one connection may send (twice that in a burst); beyond, "
            "RATE_LIMITED"
        },
    )
    resume_ttl_s: float = field(
        default=60.0, metadata={"help": "how long a disconnected session waits to be resumed"}
    )
    idle_timeout_s: float = field(
        default=300.0, metadata={"help": "a session with no audio this long is closed"}
    )
    drain_timeout_s: float = field(
        default=120.0,
        metadata={
            "help": "on SIGTERM, how long running sessions may go on (new ones are refused, "
            "DRAINING) before the rest are handed off to another node and the server stops; "
            "0 = at once; a second signal stops it at once"
        },
    )
    max_chunk_bytes: int = field(default=1_048_576, metadata={"help": "largest audio chunk"})
    max_realtime_factor: float = field(
        default=4.0, metadata={"help": "fastest accepted send rate, as a multiple of real time"}
    )
    rate_burst_s: float = field(
        default=5.0, metadata={"help": "seconds of audio a client may send ahead of that rate"}
    )
    inbox_max_bytes: int = field(
        default=4_194_304,
        metadata={"help": "audio bytes a session may have waiting; beyond, RATE_LIMITED"},
    )
    store_buffer_writes: int = field(
        default=50_000,
        metadata={
            "help": "store writes kept while the database is unreachable or slow; beyond, the "
            "oldest are dropped and counted"
        },
    )
    subscriber_queue: int = field(
        default=10_000,
        metadata={"help": "events waiting per subscriber (rooms, store, metrics) at most"},
    )
    results_kept: int = field(
        default=600, metadata={"help": "results per session kept in memory for resume"}
    )
    max_upload_mb: float = field(default=50.0, metadata={"help": "POST /api/analyze size limit"})
    max_upload_s: float = field(
        default=3600.0,
        metadata={
            "help": "longest audio POST /api/analyze takes, read from the file's header before "
            "decoding"
        },
    )
    max_concurrent_analyses: int = field(
        default=2, metadata={"help": "file analyses at once; beyond, 503 OVERLOADED"}
    )
    # telephony
    telephony_tracks: tuple[str, ...] = field(
        default=("customer",),
        metadata={"help": "call parties analysed: customer and/or agent (see README, EU AI Act)"},
    )
    hash_caller_ids: bool = field(
        default=False,
        metadata={"help": "store caller numbers from call metadata as HMAC-SHA256 pseudonyms"},
    )
    caller_id_key: str = field(
        default="", metadata={"help": "secret key of those pseudonyms (the same on every node)"}
    )
    call_rejoin_s: float = field(
        default=10.0,
        metadata={"help": "how long a call whose media connection dropped waits for it to rejoin"},
    )
    twilio_reorder_chunks: int = field(
        default=5,
        metadata={"help": "later Twilio chunks that arrive before a missing one is filled"},
    )
    telephony_max_frame_bytes: int = field(
        default=65_536, metadata={"help": "largest telephony media frame or payload"}
    )
    twilio_auth_token: str = field(
        default="",
        metadata={
            "help": "Twilio account auth token: /telephony/twilio then requires a valid "
            "X-Twilio-Signature (and no token)"
        },
    )
    audiohook_client_secret: str = field(
        default="",
        metadata={
            "help": "the AudioHook integration's client secret (base64): /telephony/audiohook "
            "then requires its request signature"
        },
    )
    audiosocket_port: int = field(
        default=0,
        metadata={"help": "TCP port for Asterisk AudioSocket; 0 = off (it has no authentication)"},
    )
    audiosocket_host: str = field(
        default="127.0.0.1",
        metadata={"help": "interface for AudioSocket: keep it private (see README, Asterisk)"},
    )
    # storage and ops
    db: str = field(
        default="voxaffect.db",
        metadata={"help": "SQLite file, or postgresql://user:pass@host/db shared by every node"},
    )
    node: str = field(
        default="", metadata={"help": "this process's name in the store; empty = hostname:port"}
    )
    alert_rules: str = field(
        default="", metadata={"help": "YAML file of alert rules (README: Alerts); empty = none"}
    )
    alert_webhook: tuple[str, ...] = field(
        default=(),
        metadata={"help": "URL(s) each alert is POSTed to, signed (repeat the flag or use commas)"},
    )
    alert_webhook_secret: str = field(
        default="", metadata={"help": "HMAC-SHA256 key of the webhook signature (16+ characters)"}
    )
    alert_webhook_timeout_s: float = field(
        default=5.0,
        metadata={"help": "seconds one webhook attempt may take in total (connect to last byte)"},
    )
    alert_webhook_allow_private: bool = field(
        default=False,
        metadata={"help": "let alert webhooks reach private and loopback addresses"},
    )
    alert_webhook_queue: int = field(
        default=1000, metadata={"help": "alert deliveries waiting per webhook at most"}
    )
    retention_days: float = field(
        default=30.0,
        metadata={"help": "stored sessions that ended longer ago are deleted hourly; 0 = keep"},
    )
    static_dir: str = field(
        default=str(PROJECT_DIR / "static"), metadata={"help": "directory of the web page"}
    )
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})
    json_logs: bool = field(
        default=False,
        metadata={"help": "log one JSON object per line (session id and node in each), not text"},
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        if self.retention_days < 0:
            raise ValueError(f"retention_days must be 0 (keep) or more, got {self.retention_days}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1-65535, got {self.port}")
        if self.max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        for name in ("max_batch", "cpu_lanes"):
            value = getattr(self, name)
            if value != "auto" and not (value.isdigit() and int(value) >= 1):
                raise ValueError(f"{name} must be auto or a whole number >= 1, got {value!r}")
        if self.dtype not in ("auto", "fp32", "fp16", "bf16", "int8"):
            raise ValueError(f"dtype must be auto, fp32, fp16, bf16 or int8, got {self.dtype!r}")
        for name in (
            "deadline_s",
            "max_realtime_factor",
            "inference_timeout_s",
            "prosody_timeout_s",
            "handshake_timeout_s",
            "call_rejoin_s",
            "latency_budget_s",
            "body_timeout_s",
            "auth_timeout_s",
            "scoped_token_max_s",
            "max_messages_per_s",
            "max_upload_mb",
            "max_upload_s",
            "utterance_delay_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in (
            "max_sessions_per_connection",
            "max_sessions_per_ip",
            "max_concurrent_analyses",
            "store_buffer_writes",
            "max_chunk_bytes",
            "inbox_max_bytes",
            "subscriber_queue",
            "twilio_reorder_chunks",
            "telephony_max_frame_bytes",
            "max_connections",
            "max_connections_per_ip",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.inbox_max_bytes < self.max_chunk_bytes:
            raise ValueError("inbox_max_bytes must hold at least one chunk of max_chunk_bytes")
        if self.saturation_policy not in ("shed", "refuse"):
            raise ValueError(
                f"saturation_policy must be shed or refuse, got {self.saturation_policy!r}"
            )
        if not 0.0 <= self.saturation_margin <= 10.0:
            raise ValueError(f"saturation_margin must be within 0-10, got {self.saturation_margin}")
        bad = set(self.telephony_tracks) - {"customer", "agent"}
        if bad:
            raise ValueError(f"telephony_tracks may hold customer and agent, not {sorted(bad)}")
        if self.token_signing_key and len(self.token_signing_key) < 32:
            raise ValueError("token_signing_key must be at least 32 characters")
        if self.utterance_wait_s < 0:
            raise ValueError(f"utterance_wait_s must be 0 or more, got {self.utterance_wait_s}")
        if not 0 <= self.drain_timeout_s < math.inf:
            raise ValueError(f"drain_timeout_s must be 0 or more, got {self.drain_timeout_s}")
        if not 0 <= self.audiosocket_port <= 65535:
            raise ValueError(f"audiosocket_port must be 0-65535, got {self.audiosocket_port}")
        if self.audiohook_client_secret:
            try:
                base64.b64decode(self.audiohook_client_secret, validate=True)
            except (ValueError, binascii.Error):
                raise ValueError(
                    "audiohook_client_secret must be base64, as Genesys shows it"
                ) from None
        if self.hash_caller_ids and len(self.caller_id_key) < 16:
            raise ValueError("hash_caller_ids needs caller_id_key: a secret of 16+ characters")
        if self.alert_webhook and len(self.alert_webhook_secret) < 16:
            raise ValueError("alert_webhook needs alert_webhook_secret: a secret of 16+ characters")
        for url in self.alert_webhook:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"alert_webhook {url[:60]!r} is not an http(s) URL")
        for name in ("api_tokens", "ingest_tokens"):
            short = [t for t in getattr(self, name) if len(t) < MIN_TOKEN_CHARS]
            if short:
                raise ValueError(
                    f"{name}: a token must be at least {MIN_TOKEN_CHARS} characters "
                    f"(one has {len(short[0])})"
                )
        both = set(self.api_tokens) & set(self.ingest_tokens)
        if both:
            raise ValueError("a token cannot be both in api_tokens and in ingest_tokens")
        from server.edges.listener import parse_networks  # (settings import nothing of the server)

        try:
            parse_networks(self.trusted_proxies)
        except ValueError as exc:
            raise ValueError(f"trusted_proxies: {exc}") from None
        self.pipeline_config()  # validates the analysis settings

    @property
    def node_name(self) -> str:
        """This process's name in the store and the log: ``node``, or hostname:port."""
        import socket

        return self.node or f"{socket.gethostname()}:{self.port}"

    def pipeline_config(self) -> PipelineConfig:
        return PipelineConfig(
            window_s=self.window_s,
            hop_s=self.hop_s,
            min_speech_ratio=self.min_speech_ratio,
            vad_aggressiveness=self.vad_aggressiveness,
            buffer_s=self.buffer_s,
            baseline_windows=self.baseline_windows,
            utterances=self.utterances,
            max_utterance_s=self.max_utterance_s,
        )

    @property
    def auth_required(self) -> bool:
        return bool(self.api_tokens or self.ingest_tokens)

    def public(self) -> dict[str, Any]:
        """Settings safe to show (no tokens)."""
        out = dataclasses.asdict(self)
        out["api_tokens"] = len(self.api_tokens)
        out["ingest_tokens"] = len(self.ingest_tokens)
        out["caller_id_key"] = bool(self.caller_id_key)
        out["alert_webhook"] = len(self.alert_webhook)  # URLs may carry tokens
        out["alert_webhook_secret"] = bool(self.alert_webhook_secret)
        out["twilio_auth_token"] = bool(self.twilio_auth_token)
        out["token_signing_key"] = bool(self.token_signing_key)
        out["audiohook_client_secret"] = bool(self.audiohook_client_secret)
        out.pop("message_queue")
        out["db"] = redacted(database_url(self.db)) if "://" in self.db else self.db
        return out

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            help_text = f.metadata.get("help", "") + f" (env {ENV_PREFIX}{f.name.upper()})"
            if f.type in ("bool", bool):
                parser.add_argument(
                    flag,
                    dest=f.name,
                    action=argparse.BooleanOptionalAction,
                    default=None,
                    help=help_text,
                )
            elif f.type == "tuple[str, ...]":  # repeatable, each value comma-separated too
                parser.add_argument(
                    flag, dest=f.name, action="append", default=None, help=help_text
                )
            else:
                parser.add_argument(flag, dest=f.name, default=None, help=help_text)

    @classmethod
    def from_sources(
        cls, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = getattr(args, f.name, None) if args is not None else None
            if raw is None:
                raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None:
                continue
            values[f.name] = _convert(f.name, f.type, raw)
        return cls(**values)


def _convert(name: str, kind: Any, raw: Any) -> Any:
    if isinstance(raw, list):  # a repeated flag
        values = tuple(v for item in raw for v in _tuple(item))
        if not values and any(item != "" for item in raw):
            raise ValueError(f"{name} is set to {raw!r}, which holds no value")
        return values
    if not isinstance(raw, str):
        return raw
    try:
        if kind in ("int", int):
            return int(raw)
        if kind in ("float", float):
            return float(raw)
        if kind in ("bool", bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
    except ValueError:
        raise ValueError(f"{name} must be a {kind}, got {raw!r}") from None
    if kind in ("tuple[str, ...]",):
        values = _tuple(raw)
        if not values and raw != "":  # "," or " ": a mistake that would turn a check off
            raise ValueError(f"{name} is set to {raw!r}, which holds no value")
        return values
    return raw


def parse(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="voxaffect serve")
    Settings.add_arguments(parser)
    return Settings.from_sources(parser.parse_args(argv), environ)


def markdown_table() -> str:
    """The README's settings table: ``python -m server.settings``."""
    rows = ["| env var | flag | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(Settings):
        default: Any = f.default
        if f.name == "static_dir":
            default = "static/"
        elif isinstance(default, tuple):
            default = ",".join(default) or "(empty)"
        elif default == "":
            default = "(empty)"
        flag = "--" + f.name.replace("_", "-")
        rows.append(
            f"| `{ENV_PREFIX}{f.name.upper()}` | `{flag}` | `{default}` | {f.metadata['help']} |"
        )
    return "\n".join(rows)


def rewrite_readme(path: str) -> None:
    """Replace the settings table in the README at ``path`` with :func:`markdown_table`."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("| env var |"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    lines[start:end] = markdown_table().split("\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":  # python -m server.settings [README.md]: print, or rewrite the README's
    import sys

    if len(sys.argv) > 1:
        rewrite_readme(sys.argv[1])
    else:
        print(markdown_table())
