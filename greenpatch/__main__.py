"""``python -m greenpatch [options] SCRIPT|-m MODULE [args...]``

Applies `greenpatch.patch_all` and then runs the target as ``__main__``,
like ``python SCRIPT args`` or ``python -m MODULE args``: ``sys.argv`` is
the target's, its exit code and traceback pass through unchanged.
``GREENPATCH=0`` runs the same command with nothing patched.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

import greenpatch

USAGE = (
    "python -m greenpatch [-h] [--version] SCRIPT|-m MODULE [args ...]\n"
    "       python -m greenpatch serve [serve options] MODULE:APP"
)

DESCRIPTION = """\
Run a Python script or module with greenpatch.patch_all() applied first.

Inside greenpatch workers, PyMySQL's socket I/O then cooperates with the
Tornado IOLoop instead of blocking it.

`python -m greenpatch serve --help` lists the options of the production
server (any WSGI application, e.g. a Django project's `project.wsgi`).

environment:
  GREENPATCH=0             run the target with nothing patched
  GREENPATCH_DISABLE=a,b   skip the named patches
"""


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m greenpatch serve",
        description=(
            "Serve a WSGI application on Tornado, each request in its own greenpatch "
            "worker greenlet. SIGTERM or SIGINT stop it gracefully."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "app", metavar="MODULE:APP", help="the WSGI application, e.g. mysite.wsgi:application"
    )
    parser.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    parser.add_argument("--address", default="127.0.0.1", help="address to listen on ('' for all)")
    parser.add_argument("--unix-socket", metavar="PATH", help="listen on this unix socket instead of TCP")
    parser.add_argument("--processes", type=int, default=1, help="worker processes to fork (0: one per CPU)")
    parser.add_argument(
        "--access-log", action=argparse.BooleanOptionalAction, default=True, help="log one line per request"
    )
    parser.add_argument(
        "--max-body-size",
        type=int,
        default=10 * 1024 * 1024,
        help="largest request body in bytes (413 beyond)",
    )
    parser.add_argument(
        "--graceful-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish after SIGTERM/SIGINT",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level"
    )
    return parser


def _serve(argv: list[str]) -> None:
    import logging

    parser = _serve_parser()
    opts = parser.parse_args(argv)
    if opts.processes < 0:
        parser.error(f"--processes={opts.processes}: use 0 (one per CPU) or a positive number")
    if opts.max_body_size <= 0:
        parser.error(f"--max-body-size={opts.max_body_size}: use a positive number of bytes")
    if opts.graceful_timeout < 0:
        parser.error(f"--graceful-timeout={opts.graceful_timeout}: use 0 or more seconds")
    if ":" in opts.app and not opts.app.split(":", 1)[1].isidentifier():
        parser.error(f"MODULE:APP {opts.app!r}: APP must be a Python name")
    logging.basicConfig(
        level=opts.log_level, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"
    )
    try:
        greenpatch.patch_all()
    except greenpatch.ConfigError as exc:
        parser.exit(2, f"python -m greenpatch serve: error: {exc}\n")
    sys.path.insert(0, os.getcwd())
    from greenpatch.server import serve

    sys.exit(
        serve(
            opts.app,
            port=opts.port,
            address=opts.address,
            unix_socket=opts.unix_socket,
            processes=opts.processes,
            access_log=opts.access_log,
            max_body_size=opts.max_body_size,
            graceful_timeout=opts.graceful_timeout,
        )
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m greenpatch",
        usage=USAGE,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"greenpatch {greenpatch.__version__}")
    parser.add_argument("-m", dest="module", metavar="MODULE", help="run library module as a script")
    return parser


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split greenpatch's own options from the target and its arguments."""
    for i, arg in enumerate(argv):
        if arg == "-m":
            return argv[: i + 2], argv[i + 1 :]
        if arg.startswith("-m") and len(arg) > 2:
            return argv[: i + 1], [arg[2:], *argv[i + 1 :]]
        if not arg.startswith("-"):
            return argv[:i], argv[i:]
        if arg == "--":
            return argv[:i], argv[i + 1 :]
    return argv, []


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, target = _split(argv)
    parser = _parser()
    opts = parser.parse_args(own)
    if not target:
        parser.error("nothing to run: give a SCRIPT or -m MODULE")
    if not opts.module and target[0] == "serve":
        _serve(target[1:])
        return

    try:
        greenpatch.patch_all()
    except greenpatch.ConfigError as exc:
        parser.exit(2, f"python -m greenpatch: error: {exc}\n")
    # Django's autoreloader re-executes the target: keep it under greenpatch.
    from greenpatch.patches import runserver

    runserver.LAUNCHER_ARGS = ["-m", "greenpatch"]

    if opts.module:
        sys.argv = [opts.module, *target[1:]]
        runpy.run_module(opts.module, run_name="__main__", alter_sys=True)
    else:
        script = target[0]
        sys.argv = list(target)
        # Like `python SCRIPT`: the script's directory comes first on sys.path.
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
