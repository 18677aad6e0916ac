"""The ``voxaffect`` command: serve, stream, analyze, random-model, download.

``serve`` monkey-patches eventlet before anything else is imported, so this module imports only
the standard library at the top; each command imports what it needs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

RANDOM_WEIGHTS_BANNER = (
    "WARNING: this model has RANDOM WEIGHTS (made by `voxaffect random-model`). "
    "Its labels are noise, not emotions."
)


def _settings(args: argparse.Namespace) -> Any:
    """The same Settings as ``voxaffect serve``: flags over ``VOXAFFECT_*`` over defaults."""
    from server.settings import Settings

    return Settings.from_sources(args)


def cmd_analyze(args: argparse.Namespace) -> int:
    from engine.audio import AudioFormatError, load_file
    from engine.hub import ModelLoadError
    from engine.model import load_model
    from engine.pipeline import analyze
    from server.sessions import wire

    try:
        settings = _settings(args)
        samples, rate = load_file(args.file, max_seconds=None)
        model = load_model(
            settings.model,
            device=settings.device,
            hub=settings.hub,
            threads=settings.cpu_threads or None,
            trusted=settings.trust_checkpoint,
        )
        if settings.dtype not in ("auto", "fp32"):
            model = model.converted(settings.dtype)
    except (AudioFormatError, ModelLoadError, ValueError) as exc:
        print(f"voxaffect analyze: {exc}", file=sys.stderr)
        return 2
    timeline = analyze(
        samples,
        model,
        settings.pipeline_config(),
        narrowband=rate < 16000,
        embeddings=settings.embeddings,
    )
    timeline["summary"] = wire.track_summary(timeline["summary"], expired=0, failed=0)
    timeline["file"] = str(args.file)
    if timeline["model"].get("random_weights"):
        timeline["warning"] = RANDOM_WEIGHTS_BANNER
    if args.json:
        json.dump(timeline, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
        return 0
    print(format_timeline(timeline))
    return 0


def format_timeline(timeline: dict[str, Any]) -> str:
    lines = []
    model = timeline["model"]
    if model.get("random_weights"):
        lines.append(RANDOM_WEIGHTS_BANNER)
    lines.append(f"model {model['source']} on {model['device']} ({model['dtype']})")
    lines.append(f"{'start':>7} {'end':>7}  {'emotion':<10} {'conf':>5}  {'stress':>6} level")
    for f in timeline["frames"]:
        s = f["stress"]
        lines.append(
            f"{f['start_s']:7.2f} {f['end_s']:7.2f}  {f['emotion']:<10} {f['confidence']:5.2f}  "
            f"{s['index']:6.1f} {s['level']}{' (calibrating)' if s['calibrating'] else ''}"
        )
    if timeline.get("utterances"):
        lines.append("utterances (each classified whole):")
        for u in timeline["utterances"]:
            s = u["stress"]
            lines.append(
                f"{u['start_s']:7.2f} {u['end_s']:7.2f}  {u['emotion']:<10} {u['confidence']:5.2f}"
                f"  {s['index']:6.1f} {s['level']}"
            )
    summary = timeline["summary"]
    lines.append(
        f"{summary['windows']} windows over {summary['duration_s']:.1f} s "
        f"({summary['speech_s']:.1f} s speech, {summary['skipped_silence']} silent windows skipped)"
    )
    if summary["windows"]:
        lines.append(
            f"dominant emotion {summary['dominant_emotion']}; "
            f"stress mean {summary['stress']['mean']}, max {summary['stress']['max']}"
        )
    return "\n".join(lines)


def cmd_random_model(args: argparse.Namespace) -> int:
    from engine.checkpoint import write_random_checkpoint

    out = write_random_checkpoint(args.dir, args.size, seed=args.seed)
    print(f"wrote a random-weight {args.size} checkpoint to {out} (outputs are not emotions)")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    import shutil

    from engine.hub import ModelLoadError, resolve_checkpoint

    settings = _settings(args)
    try:
        cached = resolve_checkpoint(args.model_id or settings.model, settings.hub)
    except ModelLoadError as exc:
        print(f"voxaffect download: {exc}", file=sys.stderr)
        return 2
    if args.dir:
        shutil.copytree(cached, args.dir, dirs_exist_ok=True)
        print(args.dir)
    else:
        print(cached)
    return 0


def cmd_stream(args: argparse.Namespace) -> int:
    from client.stream import ServerError, stream_file
    from engine.audio import AudioFormatError

    warned: list[bool] = []  # the random-weight banner goes first, and once

    def show_line(line: str) -> None:
        try:
            print(line, flush=True)
        except BrokenPipeError:  # `voxaffect stream ... | head`: stop printing quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

    def show(result: dict[str, Any]) -> None:
        if args.json:
            show_line(json.dumps(result, ensure_ascii=False))
            return
        if result.get("random_weights") and not warned:
            warned.append(True)
            print(RANDOM_WEIGHTS_BANNER, file=sys.stderr, flush=True)
        s = result["stress"]
        warn = "  [random weights]" if result.get("random_weights") else ""
        show_line(
            f"#{result['seq']:<4} {result['start_s']:7.2f}-{result['end_s']:7.2f}s  "
            f"{result['emotion']:<10} {result['confidence']:.2f}  stress {s['index']:5.1f} "
            f"{s['level']:<9} {result['latency_ms']:6.0f} ms{warn}"
        )

    def said(utterance: dict[str, Any]) -> None:
        if args.json:
            show_line(json.dumps({"utterance": utterance}, ensure_ascii=False))
            return
        s = utterance["stress"]
        show_line(
            f"utt{utterance['utterance_seq']:<3} {utterance['start_s']:7.2f}-"
            f"{utterance['end_s']:7.2f}s  {utterance['emotion']:<10} "
            f"{utterance['confidence']:.2f}  stress {s['index']:5.1f} {s['level']:<9} "
            f"(whole utterance){'  [random weights]' if utterance.get('random_weights') else ''}"
        )

    def problem(error: dict[str, Any]) -> None:
        print(f"server error {error.get('code')}: {error.get('message')}", file=sys.stderr)

    try:
        _, summary = stream_file(
            args.file,
            args.url,
            speed=args.speed,
            token=args.token,
            on_result=show,
            on_error=problem,
            on_utterance=said,
        )
    except (AudioFormatError, ServerError, TimeoutError, OSError) as exc:
        print(f"voxaffect stream: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # socketio.exceptions.ConnectionError and friends
        print(f"voxaffect stream: cannot stream to {args.url}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"summary": summary}, ensure_ascii=False))
    else:
        if summary.get("random_weights"):
            print(RANDOM_WEIGHTS_BANNER)
        print(
            f"session {summary['session_id']}: {summary['results']} results, "
            f"dominant {summary.get('dominant_emotion')}, stress mean "
            f"{summary.get('stress', {}).get('mean')}"
        )
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    import datetime

    from server.runtime import ThreadRuntime
    from server.sinks.store import Store, redacted

    try:
        before = datetime.datetime.fromisoformat(args.before).timestamp()
    except ValueError:
        print(f"voxaffect purge: --before {args.before!r} is not an ISO date", file=sys.stderr)
        return 2
    try:
        settings = _settings(args)
    except ValueError as exc:
        print(f"voxaffect purge: {exc}", file=sys.stderr)
        return 2
    store = Store(settings.db, runtime=ThreadRuntime())
    try:
        store.start()
        deleted = store.purge(before)
    except Exception as exc:  # sqlalchemy's errors: unreachable, no such database, ...
        print(f"voxaffect purge: {redacted(store.url)}: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    print(f"deleted {deleted} sessions that ended before {args.before} from {redacted(store.url)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voxaffect", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    from server.settings import Settings

    p = sub.add_parser(
        "analyze",
        help="analyse an audio file and print its timeline (the settings of `serve`)",
    )
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print the timeline as JSON")
    Settings.add_arguments(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("stream", help="stream a file to a server and print results as they come")
    p.add_argument("file")
    p.add_argument("--url", default=os.environ.get("VOXAFFECT_URL", "http://127.0.0.1:5000"))
    p.add_argument("--speed", type=float, default=1.0, help="times real time (default 1)")
    p.add_argument("--token", default=os.environ.get("VOXAFFECT_TOKEN"), help="API token")
    p.add_argument("--json", action="store_true", help="one JSON result per line")
    p.set_defaults(func=cmd_stream)

    sub.add_parser("serve", help="run the server (see `voxaffect serve --help`)", add_help=False)

    p = sub.add_parser("random-model", help="write a random-weight checkpoint (tests, benchmarks)")
    p.add_argument("dir")
    p.add_argument("--size", choices=("tiny", "large"), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_random_model)

    p = sub.add_parser("purge", help="delete stored sessions that ended before a date")
    p.add_argument("--before", required=True, help="a date or time, ISO 8601 (local unless +HH:MM)")
    p.add_argument("--db", help="the store (env VOXAFFECT_DB; default as for serve)")
    p.set_defaults(func=cmd_purge)

    p = sub.add_parser("download", help="fetch a model into the hub cache (and copy it to DIR)")
    p.add_argument("model_id", nargs="?", help="hub id (default: the model setting)")
    p.add_argument("dir", nargs="?")
    p.add_argument("--hub", help="auto, ms or hf (env VOXAFFECT_HUB)")
    p.set_defaults(func=cmd_download)
    return parser


TEST_WRAP_PREDICTOR = "VOXAFFECT_TEST_WRAP_PREDICTOR"  # tests only: "module:callable"


def _predictor_wrapper() -> Any:
    """A test's hook around the model (``module:callable`` taking and returning a predictor),
    e.g. one that holds each batch until the test releases it. Never set in production."""
    spec = os.environ.get(TEST_WRAP_PREDICTOR)
    if not spec:
        return None
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def serve(argv: list[str]) -> int:
    """Monkey-patch eventlet before anything else imports threading or sockets."""
    import warnings

    warnings.filterwarnings(
        "ignore",
        message=r"\s*Eventlet is deprecated",  # EventletDeprecationWarning(Warning)
    )
    import eventlet

    eventlet.monkey_patch()
    from server.app import serve as run
    from server.runtime import EventletRuntime
    from server.settings import parse

    try:
        settings = parse(argv)
    except ValueError as exc:
        print(f"voxaffect serve: {exc}", file=sys.stderr)
        return 2
    from engine.hub import ModelLoadError
    from server.sinks.alerts import RuleError, load_rules

    try:
        if settings.alert_rules:  # before the model loads: a typo fails in a second
            load_rules(settings.alert_rules, labels=None)
        runtime = EventletRuntime()
        runtime.install()
        run(settings, runtime, wrap_predictor=_predictor_wrapper())
    except (ModelLoadError, RuleError) as exc:
        print(f"voxaffect serve: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `voxaffect analyze ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
