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

USAGE = "python -m greenpatch [-h] [--version] SCRIPT|-m MODULE [args ...]"

DESCRIPTION = """\
Run a Python script or module with greenpatch.patch_all() applied first.

Inside greenpatch workers, PyMySQL's socket I/O then cooperates with the
Tornado IOLoop instead of blocking it.

environment:
  GREENPATCH=0             run the target with nothing patched
  GREENPATCH_DISABLE=a,b   skip the named patches
"""


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

    try:
        greenpatch.patch_all()
    except greenpatch.ConfigError as exc:
        parser.exit(2, f"python -m greenpatch: error: {exc}\n")

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
