"""`functional-llm serve`: the OpenAI-compatible server on uvicorn.

The LLM's options are generated from `LLM.__init__`'s signature and type hints, so an option
added there appears here without an edit. The engine runs in a child process
(--engine-mode process, engine_process.py) or a thread of this one. SIGINT / SIGTERM (uvicorn's handlers) start a
graceful shutdown: new requests get 503, those in flight run for up to --shutdown-timeout and
are then aborted (streams end with an error event), then the engine is shut down. As uvicorn
does, the signal is raised again at the end: after SIGINT the command returns 0, SIGTERM ends
the process as SIGTERM does (exit status 143)."""
from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
import typing

from functional_llm.errors import FunctionalLLMError

UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def byte_size(text: str) -> int:
    """'4MiB', '500kB', '1048576' -> bytes (argparse type)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmg]i?)?b?\s*", text, re.I)
    if not m or int(m.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 4MiB, 500kB or 1048576")
    return int(m.group(1)) * UNITS[(m.group(2) or "").lower()]


def _engine_options(parser: argparse.ArgumentParser) -> list:
    """One option per LLM.__init__ parameter (bool ones as --x / --no-x); returns the names."""
    from functional_llm.cli import _model_folder
    from functional_llm.llm import LLM

    hints, names = typing.get_type_hints(LLM.__init__), []
    group = parser.add_argument_group("engine (LLM's arguments)")
    for name, p in inspect.signature(LLM.__init__).parameters.items():
        if name == "self" or p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            continue
        kind = next((a for a in typing.get_args(hints[name]) if a is not type(None)), hints[name])
        flag, names = "--" + name.replace("_", "-"), names + [name]
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=p.default)
        else:
            group.add_argument(flag, type=_model_folder if name == "model" else kind, default=p.default,
                               help="default: the embedded model" if name == "model" else f"default: {p.default}")
    return names


def parser() -> tuple[argparse.ArgumentParser, list]:
    ap = argparse.ArgumentParser(prog="functional-llm serve",
                                 description="An OpenAI-compatible HTTP server over one AsyncLLM.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=os.environ.get("FUNCTIONAL_LLM_API_KEY"),
                    help="required as 'Authorization: Bearer KEY' (default: $FUNCTIONAL_LLM_API_KEY; "
                         "/health and /metrics stay open)")
    ap.add_argument("--served-model-name", default=None, help="default: the model folder's name")
    ap.add_argument("--max-waiting", type=int, default=None,
                    help="answer 429 while this many requests wait to start")
    ap.add_argument("--max-body-bytes", type=byte_size, default=4 << 20, help="default: 4MiB (413 past it)")
    ap.add_argument("--shutdown-timeout", type=float, default=10.0,
                    help="seconds in-flight requests may run after SIGINT/SIGTERM")
    ap.add_argument("--engine-mode", choices=("process", "thread"), default="process",
                    help="process (default): the LLM runs in a child process, so the HTTP side "
                         "never takes the engine's GIL; thread: in a thread of the server's process")
    return ap, _engine_options(ap)


def main(argv=None) -> int:
    ap, engine_names = parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return e.code
    try:
        import uvicorn
        from functional_llm.serve.app import ServeConfig, build_app
    except ImportError as e:
        print(f"error: serve needs the serve extra (pip install 'functional_llm[serve]'): {e}", file=sys.stderr)
        return 2
    from pathlib import Path

    from functional_llm.llm import _tokenizer
    from functional_llm.model.gguf import ensure_default_model

    options = {name: getattr(args, name) for name in engine_names}
    options["model"] = options["model"] or ensure_default_model()
    if args.engine_mode == "process":
        from functional_llm.serve.engine_process import EngineProcess as Engine
    else:
        from functional_llm import AsyncLLM as Engine
    try:
        engine = Engine(**options, max_waiting=args.max_waiting)
    except FunctionalLLMError as e:   # a bad option or model: a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        name = args.served_model_name or Path(options["model"]).name
        app = build_app(engine, _tokenizer(Path(options["model"])), ServeConfig(
            model_name=name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
            shutdown_timeout=args.shutdown_timeout), owns_engine=True)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                timeout_graceful_shutdown=args.shutdown_timeout + 2)
        make_server(config, app).run()
    except KeyboardInterrupt:   # uvicorn re-raises the signal once it has shut down (SIGTERM
        pass                    # then ends the process as the signal does)
    finally:
        engine.shutdown()       # idempotent: normally the app has done it
    return 0


def make_server(config, app):
    """A uvicorn Server whose exit signal first puts the app in draining mode (503 for new
    requests, in-flight ones aborted after shutdown_timeout); uvicorn then stops listening and
    waits for the open requests (its own limit a little later, as a backstop)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            loop = app.state.loop
            if loop is not None:
                loop.call_soon_threadsafe(app.state.server.begin_shutdown)
            super().handle_exit(sig, frame)

    return Server(config)
