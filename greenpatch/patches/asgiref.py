"""``async_to_sync`` inside a worker: run the coroutine on the loop and wait.

asgiref's ``AsyncToSync`` refuses to run in a thread whose event loop is
running - which, for a greenpatch worker, is always. Django uses it under
WSGI to run async middleware and async views. Inside a worker the
coroutine is instead scheduled on the worker's own loop and the worker
parks until it finishes (`greenpatch.wait`); everywhere else ``AsyncToSync``
is unchanged.
"""

from __future__ import annotations

from typing import Any

import wrapt

from greenpatch import hub

TARGET = "asgiref.sync"


def _call(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    if not isinstance(hub.getcurrent(), hub.WorkerGreenlet):
        return wrapped(*args, **kwargs)
    return hub.wait(instance.awaitable(*args, **kwargs))


def patch() -> None:
    if is_patched():
        return
    from asgiref.sync import AsyncToSync

    wrapt.wrap_function_wrapper(AsyncToSync, "__call__", _call)


def unpatch() -> None:
    if not is_patched():
        return
    from asgiref.sync import AsyncToSync

    AsyncToSync.__call__ = AsyncToSync.__dict__["__call__"].__wrapped__


def is_patched() -> bool:
    import sys

    mod = sys.modules.get("asgiref.sync")
    return mod is not None and isinstance(mod.AsyncToSync.__dict__.get("__call__"), wrapt.FunctionWrapper)
