"""``robustedge app``: the Streamlit attack demo (robustedge/app/), started in its own process."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from robustedge import options
from robustedge.cli.common import SOURCE_HELP, Defaults, add_model_facts, facts, typed
from robustedge.errors import RobustEdgeError


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("app", help="the Streamlit attack demo in the browser",
                       description="Start the Streamlit demo: pick a checkpoint or exported ONNX model from the models "
                                   "folder, or a foreign model named with --model, an image and an attack, and see "
                                   "clean vs adversarial predictions.",
                       formatter_class=Defaults)
    p.add_argument("--models", default=None,
                   help="folder with checkpoints / export bundles (default: runs/quickstart; with --model, only "
                        "when that folder exists)")
    p.add_argument("--model", dest="sources", action="append", default=[], metavar="SRC",
                   help=SOURCE_HELP + "; repeat for several (the facts below apply to each)")
    p.add_argument("--data-root", default=None,
                   help="dataset folder for test images of models that do not record one (not needed for digits)")
    p.add_argument("--port", type=typed(options.parse_port, "--port"), default=8501, help="port to serve on (1-65535)")
    p.add_argument("--host", default="localhost", help="address to bind (localhost keeps it private)")
    add_model_facts(p, dataset_and_eps=True)
    p.set_defaults(func=cmd_app)


def _check_host(host: str, port: int) -> None:
    """An address the server can bind: resolved now, so a typo is one line rather than Streamlit's traceback."""
    import socket

    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise RobustEdgeError(f"--host {host!r} cannot be resolved to an address ({exc}); use localhost, 0.0.0.0 "
                              f"or an address of this machine") from None


def cmd_app(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from robustedge.app import PAGE_SCRIPT
    from robustedge.app.logic import DATA_ROOT_ENV, MODELS_ENV, SOURCES_ENV, foreign_sources
    from robustedge.loading import ROBUSTBENCH_PREFIX, ModelFacts

    given = [f.name for f in fields(ModelFacts) if f.name != "cli" and getattr(args, f.name) != f.default]
    if given and not args.sources:
        raise RobustEdgeError(f"--{given[0].replace('_', '-')} describes a foreign model: name it with --model SRC")
    if len(set(args.sources)) != len(args.sources):
        raise RobustEdgeError("a --model source is given twice")
    folder = Path(args.models or "runs/quickstart")
    if args.models is None and args.sources and not folder.is_dir():
        folder = None  # only the named models
    elif not folder.is_dir():
        raise RobustEdgeError(f"models folder {folder} does not exist; run `robustedge quickstart` first or pass --models")
    if args.data_root is not None and not Path(args.data_root).is_dir():
        raise RobustEdgeError(f"--data-root {args.data_root} is not a folder")
    _check_host(args.host, args.port)
    # files go to the page as absolute paths: it runs in another process
    sources = [(s, s if s.startswith(ROBUSTBENCH_PREFIX) else str(Path(s).resolve())) for s in args.sources]
    env = {**os.environ, MODELS_ENV: str(folder.resolve()) if folder else "",
           SOURCES_ENV: foreign_sources(sources, facts(args)) if sources else "",
           DATA_ROOT_ENV: str(Path(args.data_root).resolve()) if args.data_root else ""}
    cmd = [sys.executable, "-m", "streamlit", "run", str(PAGE_SCRIPT), "--server.port", str(args.port),
           "--server.address", args.host, "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    shown = ([f"models: {folder.resolve()}"] if folder else []) + [f"--model {name}" for name, _ in sources]
    print(f"RobustEdge demo on http://{args.host}:{args.port}  ({'; '.join(shown)}; Ctrl+C to stop)")
    return serve(cmd, env)


STOP_GRACE_S = 10.0  # how long the server may take to stop once told to, before it is killed


def _die_with_parent():
    """On Linux, a function for the server's process to run before it starts: the kernel sends it SIGTERM
    when this process dies, so even a SIGKILL here (which no handler sees) does not leave the server
    serving, orphaned. It only calls a libc function resolved here, as code between fork and exec must.
    None elsewhere, where only the signals :func:`serve` passes on stop the server."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent, set_death_signal, term = os.getpid(), 1, int(signal.SIGTERM)  # 1: PR_SET_PDEATHSIG

    def arm() -> None:
        prctl(set_death_signal, term)
        if os.getppid() != parent:  # this process died before the signal was armed
            os.kill(os.getpid(), term)

    return arm


def serve(cmd: list[str], env: dict[str, str]) -> int:
    """Run the server until it exits; its exit status (128 + N when signal N ended it).

    The server runs in a session of its own and this process is its only way in: Ctrl+C, SIGTERM (a
    supervisor, ``kill``) and SIGHUP (a closed terminal) sent here are passed on once, and this process
    waits for the server to stop. Without that a SIGTERM ended this process alone, and the orphaned server
    went on serving and holding the port. A server that has not stopped after :data:`STOP_GRACE_S` is killed.
    On Linux the server also gets SIGTERM from the kernel when this process dies of a SIGKILL."""
    import signal
    import subprocess
    import time

    server = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent())
    told_at: float | None = None  # when the server was first told to stop

    def pass_on(signum, frame) -> None:
        nonlocal told_at
        told_at = told_at or time.monotonic()
        server.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, pass_on) for signum in signums}
    try:
        while True:
            try:
                code = server.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if told_at is not None and time.monotonic() - told_at > STOP_GRACE_S:
                    server.kill()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if server.poll() is None:  # this process is failing: never leave the server behind
            server.kill()
            server.wait()
    return 128 - code if code < 0 else code
