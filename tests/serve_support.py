"""Helpers of the tests that run `greenpatch.server.serve` in subprocesses."""

from __future__ import annotations

import http.client
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def wait_until(predicate, timeout=5.0, interval=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


SERVE_SCRIPT = """\
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(process)d %(name)s %(levelname)s %(message)s")
sys.path.insert(0, {tests!r})
from greenpatch.server import serve
code = serve({app!r}, on_ready=lambda: print("READY", flush=True), **{kwargs!r})
print("EXIT", code, flush=True)
sys.exit(code)
"""


class ServeProcess:
    """``serve(app, **kwargs)`` in a subprocess; ``env``: variables set on top of ours."""

    def __init__(self, app="wsgi_apps:app", script=SERVE_SCRIPT, env=None, **kwargs):
        code = script.format(tests=str(TESTS), app=app, kwargs=kwargs)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=None if env is None else {**os.environ, **env},
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, lines):
        for line in stream:
            lines.append(line)

    def wait_ready(self, timeout=30):
        assert wait_until(lambda: "READY\n" in self.stdout or self.proc.poll() is not None, timeout)
        assert "READY\n" in self.stdout, self.output()

        def port():
            for line in self.stderr:
                m = re.search(r"serving on (?:http://[\d.]+:(\d+)|unix:)", line)
                if m:
                    return int(m.group(1) or 0)
            return None

        assert wait_until(lambda: port() is not None, 5), self.output()
        return port()

    def output(self):
        return "".join(self.stdout) + "".join(self.stderr)

    def wait(self, timeout=30):
        try:
            code = self.proc.wait(timeout)
        finally:
            for t in self._threads:
                t.join(5)
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def fetch(port, path="/", timeout=10):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()
