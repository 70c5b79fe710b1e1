"""Small WSGI applications served by the server tests (also in subprocesses)."""

from __future__ import annotations

import os

import greenpatch


def app(environ, start_response):
    """``/slow?SECONDS`` sleeps cooperatively; ``/pid`` answers the process id;
    ``/multiprocess`` answers ``wsgi.multiprocess``."""
    path = environ["PATH_INFO"]
    if path == "/slow":
        greenpatch.sleep(float(environ["QUERY_STRING"] or 1))
        body = b"slow done"
    elif path == "/pid":
        body = str(os.getpid()).encode()
    elif path == "/multiprocess":
        body = str(environ["wsgi.multiprocess"]).encode()
    else:
        body = b"hello"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


not_callable = 42


def gc_state(environ, start_response):
    """The garbage collector's state in the serving process, as JSON."""
    import gc
    import json

    body = json.dumps(
        {
            "pid": os.getpid(),
            "enabled": gc.isenabled(),
            "threshold": gc.get_threshold(),
            "frozen": gc.get_freeze_count(),
        }
    ).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
