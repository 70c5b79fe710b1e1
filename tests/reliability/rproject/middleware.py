"""Database errors become a 500 whose body says what failed.

Django's own 500 page says nothing; a client (and the tests) should see
which error it was, e.g. the pool's timeout naming the pool. The traceback
still goes to the server log through django.request.
"""

import logging

from django.db import DatabaseError, InterfaceError
from django.http import HttpResponse

log = logging.getLogger("django.request")


class DatabaseErrorMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exc):
        if not isinstance(exc, DatabaseError | InterfaceError):
            return None
        cause = exc.__cause__
        text = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
        if cause is not None:
            text += f"\ncause: {type(cause).__module__}.{type(cause).__name__}"
        log.error("Internal Server Error: %s: %s", request.path, text, exc_info=exc)
        return HttpResponse(text + "\n", status=500, content_type="text/plain; charset=utf-8")
