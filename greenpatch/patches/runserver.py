"""Django's ``runserver`` served by Tornado, one worker greenlet per request.

``runserver`` imports ``run`` by name, so the name in
``django.core.management.commands.runserver`` is replaced (not
``basehttp.run``) by `greenpatch.server.run_django`. Django's banner,
request log lines, static files handler, ``--noreload``, ``--ipv6`` and
Ctrl-C behaviour are kept; ``--nothreading`` is accepted and irrelevant.

Autoreload re-executes ``python manage.py ...``: under the launcher
(``python -m greenpatch manage.py runserver``) the reloaded child would lose
``-m greenpatch``, so ``django.utils.autoreload.get_child_arguments`` puts
it back.
"""

from __future__ import annotations

from typing import Any

import wrapt

TARGET = "django.core.management.commands.runserver"

#: Set by the launcher: the arguments that re-run a child under greenpatch.
LAUNCHER_ARGS: list[str] | None = None

_originals: dict[str, Any] = {}


def _run(
    addr: str,
    port: int,
    wsgi_handler: Any,
    ipv6: bool = False,
    threading: bool = False,
    on_bind: Any = None,
    server_cls: Any = None,
) -> None:
    from greenpatch.server import run_django

    run_django(addr, port, wsgi_handler, ipv6=ipv6, on_bind=on_bind)


def _child_arguments(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> list:
    argv = list(wrapped(*args, **kwargs))
    if not LAUNCHER_ARGS:
        return argv
    # [python, -W..., -X..., target...] -> [python, -W..., -X..., -m greenpatch, target...]
    i = 1
    while i < len(argv) and str(argv[i]).startswith(("-W", "-X")):
        i += 1
    return [*argv[:i], *LAUNCHER_ARGS, *argv[i:]]


def patch() -> None:
    if is_patched():
        return
    import django.utils.autoreload
    from django.core.management.commands import runserver

    _originals["run"] = runserver.run
    runserver.run = _run
    wrapt.wrap_function_wrapper(django.utils.autoreload, "get_child_arguments", _child_arguments)


def unpatch() -> None:
    if not is_patched():
        return
    import django.utils.autoreload
    from django.core.management.commands import runserver

    runserver.run = _originals.pop("run")
    django.utils.autoreload.get_child_arguments = django.utils.autoreload.get_child_arguments.__wrapped__


def is_patched() -> bool:
    return "run" in _originals
