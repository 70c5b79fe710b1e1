"""Statistics exposed three ways (Django view, periodic log lines, Prometheus), and
the blocking detector and stats logger wired into serve() and run_django()."""

from __future__ import annotations

import asyncio
import http.client
import importlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
from conftest import run_green, run_loop
from tornado.ioloop import IOLoop

import greenpatch
import greenpatch.hub
from greenpatch import monitor
from greenpatch.config import ConfigError
from greenpatch.pool import Pool, PoolTimeout

TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("GREENPATCH_BLOCKING_THRESHOLD", raising=False)
    monkeypatch.delenv("GREENPATCH_STATS_INTERVAL", raising=False)


class FakeConn:
    def ping(self, reconnect=False):
        pass

    def rollback(self):
        pass

    def close(self):
        pass


class FakeOps:
    """ConnectionOps for FakeConn (PyMySQLOps would find no socket)."""

    def ping(self, conn):
        return True

    def reset(self, conn, mode):
        return True

    def is_usable(self, conn):
        return True

    def close(self, conn):
        pass


def fake_pool(name, **kwargs):
    return Pool(FakeConn, name=name, ops=FakeOps(), **kwargs)


# -- (a) the Django view ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def django_ready():
    greenpatch.patch_all()
    from django_support import setup_django

    setup_django()
    yield
    greenpatch.unpatch_all()


def _green_query():
    from djangoapp.models import Counter

    return Counter.objects.count()


def test_stats_view_answers_pools_and_monitor_as_json(django_ready):
    from django.test import RequestFactory

    from greenpatch.django import views

    assert run_green(_green_query) >= 0  # the worker pool of "default" exists now
    # Earlier tests may have left workers parked on loops nobody runs.
    running = greenpatch.hub.stats()["running"]
    response = views.stats(RequestFactory().get("/greenpatch/stats/"))
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert "no-cache" in response["Cache-Control"]
    data = json.loads(response.content)
    assert set(data) == {"pid", "pools", "workers", "monitor"}
    assert data["pid"] == os.getpid()
    names = [p["name"] for p in data["pools"]]
    assert "default/green" in names
    green = next(p for p in data["pools"] if p["name"] == "default/green")
    assert green["checkouts"] >= 1 and green["max_size"] == 5
    assert {"size", "idle", "in_use", "waiting", "timeouts", "wait", "discards"} <= set(green)
    assert data["monitor"] == json.loads(json.dumps(monitor.stats()))
    assert set(data["workers"]) == {"running", "idle_greenlets", "started", "killed"}
    assert data["workers"]["started"] >= 1 and data["workers"]["running"] == running
    assert {"blocked", "max_block_seconds", "threshold"} <= set(data["monitor"])

    refused = views.stats(RequestFactory().post("/greenpatch/stats/"))
    assert refused.status_code == 405


def test_stats_view_through_the_test_client_in_a_urlconf(django_ready):
    from django.test import Client, override_settings
    from django.urls import path

    from greenpatch.django import views

    urls = types.ModuleType("gp_observability_urls")
    urls.urlpatterns = [path("internal/greenpatch/", views.stats)]

    def blocked_once():
        time.sleep(0.15)

    async def block_a_monitored_loop():
        m = monitor.start(threshold=0.05)
        await asyncio.sleep(0.02)
        await greenpatch.spawn(blocked_once)
        await asyncio.sleep(0.05)
        m.stop()

    before = monitor.stats()["blocked"]
    run_loop(block_a_monitored_loop)

    with override_settings(ROOT_URLCONF=urls, ALLOWED_HOSTS=["testserver"]):
        response = Client().get("/internal/greenpatch/")
        head = Client().head("/internal/greenpatch/")
    assert response.status_code == 200 and head.status_code == 200
    data = response.json()
    assert data["pid"] == os.getpid()
    assert data["monitor"]["blocked"] == before + 1
    assert data["monitor"]["max_block_seconds"] >= 0.1


def test_stats_view_inside_a_worker(django_ready):
    from django.test import RequestFactory

    from greenpatch.django import views

    def call():
        _green_query()
        return views.stats(RequestFactory().get("/"))

    running = greenpatch.hub.stats()["running"]  # earlier tests may have left workers parked
    response = run_green(call)
    data = json.loads(response.content)
    green = next(p for p in data["pools"] if p["name"] == "default/green")
    assert green["in_use"] >= 1  # this worker still holds its connection
    assert data["workers"]["running"] == running + 1  # this one


# -- (b) the periodic log lines --------------------------------------------------------------------------


def stats_lines(caplog):
    return [r for r in caplog.records if r.name == "greenpatch.stats" and r.levelno == logging.INFO]


def test_stats_logger_writes_one_line_per_pool(caplog):
    caplog.set_level(logging.INFO, logger="greenpatch.stats")
    pool = fake_pool("gp-obs-lines", max_size=3, timeout=0.01)
    held = [pool.checkout() for _ in range(3)]
    with pytest.raises(PoolTimeout):
        pool.checkout()

    async def main():
        m = monitor.start(threshold=0.1)
        logger = monitor.start_stats_logger(interval=0.05)
        assert logger.enabled
        await asyncio.sleep(0.18)
        logger.stop()
        count = len(stats_lines(caplog))
        await asyncio.sleep(0.12)
        m.stop()
        return count

    running = greenpatch.hub.stats()["running"]  # earlier tests may have left workers parked
    count = run_loop(main)
    lines = [r.getMessage() for r in stats_lines(caplog)]
    assert len(lines) == count  # nothing after stop()
    ours = [line for line in lines if line.startswith("pool gp-obs-lines:")]
    assert 2 <= len(ours) <= 4, lines
    assert re.fullmatch(
        r"pool gp-obs-lines: size=3/3 idle=0 in_use=3 waiting=0 timeouts=1 wait_mean=\d+\.\dms waits=0"
        r" held_mean=0\.0ms",
        ours[-1],
    ), ours[-1]
    assert any(line.startswith("loop monitor: blocked=") for line in lines)
    workers = rf"workers: running={running} idle_greenlets=\d+ started=\d+ killed=\d+"
    assert any(re.fullmatch(workers, line) for line in lines), lines
    for line in lines:
        assert "\n" not in line
    for conn in held:
        pool.checkin(conn)
    pool.close()


def test_stats_logger_from_the_environment(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="greenpatch.stats")

    async def unset():
        logger = monitor.start_stats_logger()
        assert not logger.enabled
        logger.stop()

    run_loop(unset)
    monkeypatch.setenv("GREENPATCH_STATS_INTERVAL", "0")
    run_loop(unset)

    monkeypatch.setenv("GREENPATCH_STATS_INTERVAL", "0.05")

    async def from_env():
        observers = monitor.start_from_env(IOLoop.current())
        assert observers.stats_logger.interval == 0.05
        assert observers.monitor.threshold == 0.1
        await asyncio.sleep(0.12)
        observers.stop()
        assert not observers.monitor.running

    run_loop(from_env)
    assert stats_lines(caplog)


def test_stats_logger_warns_when_its_lines_would_not_be_seen(caplog):
    caplog.set_level(logging.INFO, logger="greenpatch.monitor")
    stats_logger = logging.getLogger("greenpatch.stats")
    saved = stats_logger.level
    stats_logger.setLevel(logging.WARNING)  # as under Django's default logging

    async def main():
        monitor.start_stats_logger(interval=5).stop()

    try:
        run_loop(main)
    finally:
        stats_logger.setLevel(saved)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'greenpatch.stats' logger at INFO, which is not enabled" in m for m in messages), messages


@pytest.mark.parametrize("value", ["soon", "-5", "nan", "1h"])
def test_bad_stats_interval_is_an_error_naming_the_setting(value, monkeypatch):
    monkeypatch.setenv("GREENPATCH_STATS_INTERVAL", value)
    with pytest.raises(ConfigError) as info:
        monitor.settings_from_env()
    message = str(info.value)
    assert message.startswith(f"GREENPATCH_STATS_INTERVAL={value!r} is not accepted")
    assert "accepted values: a number of seconds >= 0" in message and "0 logs no statistics" in message


def test_stats_logger_with_no_pools_says_so(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="greenpatch.stats")
    monkeypatch.setattr(greenpatch, "stats", lambda: [])

    async def main():
        monitor.StatsLogger(IOLoop.current(), 1).log_now()

    run_loop(main)
    assert [r.getMessage() for r in stats_lines(caplog)][:1] == ["no connection pools"]


# -- (c) Prometheus ---------------------------------------------------------------------------------------


@pytest.fixture
def registry():
    prometheus_client = pytest.importorskip("prometheus_client")
    return prometheus_client.CollectorRegistry()


def test_prometheus_collector(registry):
    import greenpatch.metrics

    pool = fake_pool("gp-obs-prom", max_size=2, timeout=0.01)
    a = pool.checkout()
    b = pool.checkout()
    time.sleep(0.02)
    pool.checkin(a)
    pool.discard(b, "error")
    held = [pool.checkout(), pool.checkout()]
    with pytest.raises(PoolTimeout):
        pool.checkout()

    collector = greenpatch.metrics.register(registry)
    assert greenpatch.metrics.register(registry) is collector  # idempotent

    def value(name, **labels):
        return registry.get_sample_value(name, labels)

    pool_label = {"pool": "gp-obs-prom"}
    assert value("greenpatch_pool_size", **pool_label) == 2
    assert value("greenpatch_pool_max_size", **pool_label) == 2
    assert value("greenpatch_pool_in_use", **pool_label) == 2
    assert value("greenpatch_pool_idle", **pool_label) == 0
    assert value("greenpatch_pool_waiting", **pool_label) == 0
    assert value("greenpatch_pool_connects_total", **pool_label) == 3
    assert value("greenpatch_pool_checkouts_total", **pool_label) == 4
    assert value("greenpatch_pool_checkins_total", **pool_label) == 1
    assert value("greenpatch_pool_timeouts_total", **pool_label) == 1
    assert value("greenpatch_pool_discards_total", pool="gp-obs-prom", reason="error") == 1
    for name in ("cancels_total", "cancelling", "recoveries_total", "recovering"):
        assert value(f"greenpatch_pool_{name}", **pool_label) == 0, name
    assert value("greenpatch_pool_wait_seconds_count", **pool_label) == 0
    assert value("greenpatch_pool_wait_seconds_sum", **pool_label) == 0
    assert value("greenpatch_pool_held_seconds_count", **pool_label) == 2  # a checked in, b discarded
    assert value("greenpatch_pool_held_seconds_sum", **pool_label) >= 0.04
    assert 0.02 <= value("greenpatch_pool_held_max_seconds", **pool_label) < 10

    w = greenpatch.hub.stats()
    assert value("greenpatch_workers_running") == w["running"]
    assert value("greenpatch_worker_greenlets_idle") == w["idle_greenlets"]
    assert value("greenpatch_workers_started_total") == w["started"]
    assert value("greenpatch_workers_killed_total") == w["killed"]

    m = monitor.stats()
    assert value("greenpatch_loop_blocked_total") == m["blocked"]
    assert value("greenpatch_loop_block_max_seconds") == m["max_block_seconds"]
    assert value("greenpatch_loop_blocked_seconds_total") == m["blocked_seconds"]

    # Live values: read at each scrape.
    for conn in held:
        pool.checkin(conn)
    assert value("greenpatch_pool_idle", **pool_label) == 2
    assert value("greenpatch_pool_in_use", **pool_label) == 0

    from prometheus_client import generate_latest

    text = generate_latest(registry).decode()
    assert "# TYPE greenpatch_pool_size gauge" in text
    assert "# TYPE greenpatch_pool_checkouts_total counter" in text
    assert "# TYPE greenpatch_loop_blocked_total counter" in text
    assert "# TYPE greenpatch_workers_running gauge" in text
    assert "# TYPE greenpatch_workers_started_total counter" in text

    greenpatch.metrics.unregister(registry)
    assert value("greenpatch_pool_size", **pool_label) is None
    pool.close()


def test_prometheus_counts_blocked_loops_and_the_threshold(registry):
    import greenpatch.metrics

    greenpatch.metrics.register(registry)

    def block():
        time.sleep(0.15)

    async def main():
        m = monitor.start(threshold=0.05)
        await asyncio.sleep(0.02)
        threshold = registry.get_sample_value("greenpatch_loop_blocking_threshold_seconds")
        before = registry.get_sample_value("greenpatch_loop_blocked_total")
        await greenpatch.spawn(block)
        await asyncio.sleep(0.05)
        m.stop()
        return threshold, before

    threshold, before = run_loop(main)
    assert threshold is not None and threshold <= 0.05
    assert registry.get_sample_value("greenpatch_loop_blocked_total") == before + 1
    assert registry.get_sample_value("greenpatch_loop_block_max_seconds") >= 0.1


def test_pools_sharing_a_name_are_added_up(registry):
    import greenpatch.metrics

    greenpatch.metrics.register(registry)
    one, two = fake_pool("gp-obs-twin"), fake_pool("gp-obs-twin")
    held = [one.checkout(), two.checkout(), two.checkout()]
    assert registry.get_sample_value("greenpatch_pool_in_use", {"pool": "gp-obs-twin"}) == 3
    assert registry.get_sample_value("greenpatch_pool_max_size", {"pool": "gp-obs-twin"}) == 20
    one.checkin(held[0])
    two.checkin(held[1])
    two.checkin(held[2])
    one.close()
    two.close()


def test_metrics_without_prometheus_client_says_what_to_install(monkeypatch):
    for name in list(sys.modules):
        if name == "prometheus_client" or name.startswith("prometheus_client."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "greenpatch.metrics", raising=False)
    with pytest.raises(ImportError) as info:
        importlib.import_module("greenpatch.metrics")
    message = str(info.value)
    assert "greenpatch.metrics needs the prometheus_client package" in message
    assert "pip install 'greenpatch[prometheus]'" in message


# -- serve() and run_django() -------------------------------------------------------------------------------


SERVE_SCRIPT = """\
import logging, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(process)d %(name)s %(levelname)s %(message)s")
import greenpatch
from greenpatch.pool import ConnectionOps, Pool

class Conn:
    def rollback(self):
        pass

    def close(self):
        pass

pool = Pool(Conn, name="gp-serve-pool", max_size=4, ops=ConnectionOps())

def app(environ, start_response):
    if environ["PATH_INFO"] == "/block":
        time.sleep(0.3)
    else:
        pool.checkin(pool.checkout())
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"done"]

from greenpatch.server import serve
code = serve(app, port=0, on_ready=lambda: print("READY", flush=True))
print("EXIT", code, flush=True)
sys.exit(code)
"""

RUN_DJANGO_SCRIPT = """\
import logging, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(process)d %(name)s %(levelname)s %(message)s")
from greenpatch.server import run_django

def app(environ, start_response):
    if environ["PATH_INFO"] == "/block":
        time.sleep(0.3)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"done"]

try:
    run_django("127.0.0.1", 0, app, on_bind=lambda port: print("PORT", port, flush=True))
except KeyboardInterrupt:
    print("EXIT interrupted", flush=True)
"""


class Proc:
    def __init__(self, script, env):
        # A file, not -c: the warning's stack then shows the source lines.
        self.proc = subprocess.Popen(
            [sys.executable, str(script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
            cwd=str(TESTS),
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self.threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self.threads:
            t.start()

    @staticmethod
    def _pump(stream, lines):
        for line in stream:
            lines.append(line)

    def text(self):
        return "".join(self.out) + "".join(self.err)

    def wait_for(self, pattern, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text())
            if m:
                return m
            if self.proc.poll() is not None:
                time.sleep(0.2)
                m = re.search(pattern, self.text())
                if m:
                    return m
                break
            time.sleep(0.02)
        raise AssertionError(f"{pattern!r} not in the output:\n{self.text()}")

    def finish(self, sig=signal.SIGTERM, timeout=20):
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        finally:
            for t in self.threads:
                t.join(5)
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def processes(tmp_path):
    procs = []

    def start(script, **env):
        path = tmp_path / f"server_{len(procs)}.py"
        path.write_text(script)
        proc = Proc(path, env)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()


def blocking_warnings(output, culprit):
    """The blocking warnings in a server's log whose stack shows ``culprit``.

    A loaded test machine may starve a server for longer than the
    threshold too; such episodes (no ``culprit`` in their stack) are left out.
    """
    records = re.split(r"\n(?=\d+ \S+ [A-Z]+ )", output)
    warnings = [r for r in records if "greenpatch.monitor WARNING IOLoop blocked for" in r]
    return [r for r in warnings if culprit in r]


def get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_serve_logs_a_blocking_app_and_pool_stats(processes):
    proc = processes(SERVE_SCRIPT, GREENPATCH_STATS_INTERVAL="0.2")
    port = int(proc.wait_for(r"serving on http://[\d.]+:(\d+)").group(1))
    proc.wait_for("READY")
    assert get(port, "/") == (200, b"done")
    assert get(port, "/block") == (200, b"done")
    assert get(port, "/") == (200, b"done")
    proc.wait_for(r"greenpatch.monitor WARNING IOLoop blocked for 0\.\d+ s \(threshold 0.1 s\)")
    proc.wait_for(r"greenpatch.stats INFO pool gp-serve-pool: size=1/4 idle=1 in_use=0 waiting=0")
    proc.wait_for(r"greenpatch.stats INFO loop monitor: blocked=1 ")
    assert proc.finish() == 0, proc.text()
    output = proc.text()
    warnings = blocking_warnings(output, "time.sleep(0.3)")
    assert len(warnings) == 1, output
    warning = warnings[0]
    assert "server_0.py" in warning and "in app\n" in warning
    assert "EXIT 0" in output
    assert "Traceback" not in output


def test_serve_with_the_detector_off(processes):
    proc = processes(SERVE_SCRIPT, GREENPATCH_BLOCKING_THRESHOLD="0")
    port = int(proc.wait_for(r"serving on http://[\d.]+:(\d+)").group(1))
    proc.wait_for("READY")
    assert get(port, "/block") == (200, b"done")
    time.sleep(0.3)
    assert proc.finish() == 0, proc.text()
    assert "IOLoop blocked" not in proc.text()
    assert "greenpatch.stats" not in proc.text()  # GREENPATCH_STATS_INTERVAL unset


def test_serve_with_a_bad_setting_exits_2_naming_it(processes):
    proc = processes(SERVE_SCRIPT, GREENPATCH_BLOCKING_THRESHOLD="fast")
    assert proc.finish(sig=None, timeout=20) == 2, proc.text()
    output = proc.text()
    assert "greenpatch.server ERROR GREENPATCH_BLOCKING_THRESHOLD='fast' is not accepted" in output
    assert "accepted values" in output and "Traceback" not in output
    assert "READY" not in output


def test_run_django_logs_a_blocking_app(processes):
    proc = processes(RUN_DJANGO_SCRIPT, GREENPATCH_STATS_INTERVAL="0.2")
    port = int(proc.wait_for(r"PORT (\d+)").group(1))
    assert get(port, "/") == (200, b"done")
    assert get(port, "/block") == (200, b"done")
    proc.wait_for(r"greenpatch.monitor WARNING IOLoop blocked for 0\.\d+ s")
    proc.wait_for(r"greenpatch.stats INFO ")
    assert proc.finish(signal.SIGINT) == 0, proc.text()
    output = proc.text()
    warnings = blocking_warnings(output, "time.sleep(0.3)")
    assert len(warnings) == 1, output
    warning = warnings[0]
    assert "server_0.py" in warning and "in app\n" in warning
    assert "EXIT interrupted" in output
    assert "Traceback" not in output


def test_run_django_with_a_bad_setting_raises_before_binding(monkeypatch):
    from greenpatch.server import run_django

    monkeypatch.setenv("GREENPATCH_STATS_INTERVAL", "often")
    with pytest.raises(ConfigError, match="GREENPATCH_STATS_INTERVAL='often'"):
        run_django("127.0.0.1", 0, lambda environ, start_response: [])
