"""greenpatch.monitor: the blocking detector (heartbeat on the loop, watchdog thread)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pymysql
import pytest
from conftest import run_loop
from tornado.ioloop import IOLoop

import greenpatch
from greenpatch import config, monitor
from greenpatch.config import ConfigError


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("GREENPATCH_BLOCKING_THRESHOLD", raising=False)
    monkeypatch.delenv("GREENPATCH_STATS_INTERVAL", raising=False)


@pytest.fixture
def warnings(caplog):
    """The WARNING records of greenpatch.monitor (caught from every thread)."""
    caplog.set_level(logging.INFO, logger="greenpatch.monitor")

    def get():
        return [r for r in caplog.records if r.name == "greenpatch.monitor" and r.levelno >= logging.WARNING]

    return get


def monitor_threads():
    return [t for t in threading.enumerate() if t.name == "greenpatch-monitor"]


def run_monitored(fn, threshold=0.1, settle=0.1):
    """Start a monitor in a fresh loop, run ``fn()`` (a coroutine function), stop it; return it."""
    box = {}

    async def main():
        m = box["m"] = monitor.start(threshold=threshold)
        await asyncio.sleep(0.05)  # heartbeat running
        try:
            box["result"] = await fn()
            await asyncio.sleep(settle)
        finally:
            m.stop()

    run_loop(main)
    return box["m"], box.get("result")


def test_time_sleep_in_a_worker_is_reported_once_with_its_stack(warnings):
    def blocker_in_worker():
        time.sleep(0.3)

    before = monitor.stats()

    async def main():
        await greenpatch.spawn(blocker_in_worker)

    m, _ = run_monitored(main)
    records = warnings()
    assert len(records) == 1, [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert "IOLoop blocked for 0." in message and "threshold 0.1 s" in message
    assert "in blocker_in_worker" in message
    assert "time.sleep(0.3)" in message
    assert "test_monitor.py" in message
    assert 0.2 <= records[0].blocked_seconds <= 0.45
    stats = m.stats()
    assert stats["blocked"] == 1
    assert 0.2 <= stats["max_block_seconds"] <= 0.45
    assert stats["threshold"] == 0.1
    after = monitor.stats()
    assert after["blocked"] == before["blocked"] + 1
    assert after["max_block_seconds"] >= stats["max_block_seconds"]
    assert set(after) >= {"blocked", "max_block_seconds", "threshold"}


def test_a_blocking_loop_callback_is_reported_too(warnings):
    def blocking_callback():
        time.sleep(0.25)

    async def main():
        asyncio.get_running_loop().call_soon(blocking_callback)
        await asyncio.sleep(0.3)

    m, _ = run_monitored(main)
    records = warnings()
    assert len(records) == 1
    assert "in blocking_callback" in records[0].getMessage()
    assert m.stats()["blocked"] == 1


def test_each_episode_is_reported_once(warnings):
    def first_block():
        time.sleep(0.25)

    def second_block():
        time.sleep(0.25)

    async def main():
        await greenpatch.spawn(first_block)
        await asyncio.sleep(0.1)
        await greenpatch.spawn(second_block)

    m, _ = run_monitored(main)
    messages = [r.getMessage() for r in warnings()]
    assert len(messages) == 2, messages
    assert "in first_block" in messages[0] and "in second_block" in messages[1]
    assert m.stats()["blocked"] == 2


def test_cooperative_sleep_is_not_reported(warnings):
    def cooperative():
        greenpatch.sleep(0.3)

    async def main():
        await asyncio.gather(*(greenpatch.spawn(cooperative) for _ in range(5)))

    m, _ = run_monitored(main)
    assert warnings() == []
    assert m.stats()["blocked"] == 0


def test_short_blocks_under_the_threshold_are_not_reported(warnings):
    def short():
        time.sleep(0.03)

    async def main():
        for _ in range(5):
            await greenpatch.spawn(short)
            await asyncio.sleep(0.01)

    m, _ = run_monitored(main, threshold=0.1)
    assert warnings() == []
    assert m.stats()["blocked"] == 0


def test_ten_concurrent_green_queries_are_not_reported(warnings, db, patched):
    def query():
        conn = pymysql.connect(**db)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT SLEEP(0.3)")
                return cur.fetchone()
        finally:
            conn.close()

    async def main():
        started = time.monotonic()
        rows = await asyncio.gather(*(greenpatch.spawn(query) for _ in range(10)))
        return rows, time.monotonic() - started

    m, (rows, elapsed) = run_monitored(main)
    assert rows == [(0,)] * 10
    assert elapsed < 1.5  # concurrent, not 3 s
    assert warnings() == [], [r.getMessage() for r in warnings()]
    assert m.stats()["blocked"] == 0


def test_a_query_waiting_in_place_on_an_idle_loop_is_not_reported(warnings, db, patched, in_place):
    # A worker the loop resumed waits for its reply in place while the loop
    # has nothing else to do; the heartbeat's timer still runs on time.
    def query():
        conn = pymysql.connect(**db)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")  # from here on, the loop resumes this worker
                cur.execute("SELECT SLEEP(0.5)")
                return cur.fetchone()
        finally:
            conn.close()

    async def main():
        return await greenpatch.spawn(query)

    m, row = run_monitored(main)
    assert row == (0,)
    assert any(result is False for result, _ in in_place)  # it waited in place, until a heartbeat was due
    assert warnings() == [], [r.getMessage() for r in warnings()]
    assert m.stats()["blocked"] == 0


def test_a_block_still_going_on_is_reported_with_its_duration_so_far(caplog, warnings):
    def stuck():
        time.sleep(monitor.LONG_BLOCK + 0.4)

    async def main():
        await greenpatch.spawn(stuck)

    m, _ = run_monitored(main)
    records = warnings()
    assert len(records) == 1
    message = records[0].getMessage()
    assert "so far, and is still blocked" in message and "in stuck" in message
    assert monitor.LONG_BLOCK <= records[0].blocked_seconds < monitor.LONG_BLOCK + 0.3
    ends = [r for r in caplog.records if "unblocked after" in r.getMessage()]
    assert len(ends) == 1 and ends[0].levelno == logging.INFO
    assert monitor.LONG_BLOCK + 0.2 <= ends[0].blocked_seconds <= monitor.LONG_BLOCK + 0.6
    assert m.stats()["blocked"] == 1


def test_code_holding_the_gil_is_reported(warnings):
    # sum() over a range runs in C without releasing the GIL: the watchdog
    # cannot look while it runs; the late heartbeat still reports it.
    started = time.perf_counter()
    sum(range(2_000_000))
    n = int(2_000_000 * 0.3 / max(time.perf_counter() - started, 1e-6))

    def hold_the_gil():
        sum(range(n))

    async def main():
        await greenpatch.spawn(hold_the_gil)

    m, _ = run_monitored(main)
    records = warnings()
    assert len(records) == 1, [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert "in hold_the_gil" in message or "stack could not be taken" in message
    assert m.stats()["blocked"] == 1


def test_a_stopped_loop_is_not_blocked(warnings):
    loop = IOLoop(make_current=False)
    try:
        m = monitor.start(loop, threshold=0.05)  # before the loop runs
        time.sleep(0.3)

        async def quick():
            await asyncio.sleep(0.05)

        loop.run_sync(quick)
        time.sleep(0.3)  # between two runs
        loop.run_sync(quick)
        assert warnings() == []
        assert m.stats()["blocked"] == 0

        def stalled():
            time.sleep(0.2)

        async def blocking():
            await greenpatch.spawn(stalled)
            await asyncio.sleep(0.05)

        loop.run_sync(blocking)
        m.stop()
        assert len(warnings()) == 1 and "in stalled" in warnings()[0].getMessage()
    finally:
        loop.close()


def test_disabled_with_zero(warnings, monkeypatch):
    def blocker():
        time.sleep(0.2)

    async def main():
        await greenpatch.spawn(blocker)

    threads = len(monitor_threads())
    m, _ = run_monitored(main, threshold=0)
    assert not m.enabled and not m.running
    assert len(monitor_threads()) == threads
    assert warnings() == []
    assert m.stats()["blocked"] == 0

    monkeypatch.setenv("GREENPATCH_BLOCKING_THRESHOLD", "0")

    async def from_env():
        m = monitor.start()
        assert not m.enabled and m._thread is None
        await greenpatch.spawn(blocker)
        m.stop()

    run_loop(from_env)
    assert warnings() == []


def test_threshold_from_the_environment(monkeypatch):
    monkeypatch.setenv("GREENPATCH_BLOCKING_THRESHOLD", " 0.05 ")

    async def main():
        m = monitor.start()
        try:
            assert m.threshold == 0.05 and m.period == 0.0125
            assert monitor.stats()["threshold"] <= 0.05
        finally:
            m.stop()

    run_loop(main)
    monkeypatch.delenv("GREENPATCH_BLOCKING_THRESHOLD")
    assert config.blocking_threshold() == config.DEFAULT_BLOCKING_THRESHOLD == 0.1
    assert config.blocking_threshold({"GREENPATCH_BLOCKING_THRESHOLD": ""}) == 0.1
    assert config.blocking_threshold({"GREENPATCH_BLOCKING_THRESHOLD": "2"}) == 2.0


@pytest.mark.parametrize("value", ["abc", "-1", "0.1s", "nan", "inf", "1e999", "true"])
def test_bad_threshold_values_are_errors_naming_the_setting(value, monkeypatch):
    with pytest.raises(ConfigError) as info:
        config.blocking_threshold({"GREENPATCH_BLOCKING_THRESHOLD": value})
    message = str(info.value)
    assert message.startswith(f"GREENPATCH_BLOCKING_THRESHOLD={value!r} is not accepted")
    assert "accepted values: a number of seconds >= 0" in message and "0 disables" in message
    monkeypatch.setenv("GREENPATCH_BLOCKING_THRESHOLD", value)
    with pytest.raises(ConfigError, match="GREENPATCH_BLOCKING_THRESHOLD"):
        monitor.start(IOLoop(make_current=False))
    with pytest.raises(ConfigError, match="GREENPATCH_BLOCKING_THRESHOLD"):
        monitor.settings_from_env()


@pytest.mark.parametrize("value", [-1, "0.1", float("nan"), float("inf"), True])
def test_bad_threshold_arguments(value):
    with pytest.raises(ValueError, match="threshold="):
        monitor.start(IOLoop(make_current=False), threshold=value)


def test_stop_ends_the_thread_and_forgets_the_loop():
    loop = IOLoop(make_current=False)
    try:

        async def main():
            m = monitor.start()
            assert m.running and m._thread.is_alive() and m._thread.daemon
            assert m._thread in monitor_threads()
            assert monitor.start() is m  # idempotent per loop
            assert monitor.start(threshold=0.5) is m
            assert monitor.stats()["loops"] >= 1
            await asyncio.sleep(0.05)
            m.stop()
            assert not m.running and not m._thread.is_alive()
            assert m._thread not in monitor_threads()
            assert m._handle is None
            m.stop()  # twice is fine
            again = monitor.start()
            assert again is not m
            again.stop()

        loop.run_sync(main)
    finally:
        loop.close()


def test_stop_from_another_thread_and_after_close():
    loop = IOLoop(make_current=False)
    m = monitor.start(loop, threshold=0.05)

    async def main():
        await asyncio.sleep(0.05)
        stopper = threading.Thread(target=m.stop)
        stopper.start()
        stopper.join(5)
        await asyncio.sleep(0.05)
        assert m._handle is None or m._handle.cancelled()

    loop.run_sync(main)
    assert not m._thread.is_alive()
    loop.close()
    m.stop()


def test_closing_the_loop_ends_the_watchdog():
    loop = IOLoop(make_current=False)
    m = monitor.start(loop, threshold=0.05)
    loop.run_sync(lambda: asyncio.sleep(0.05))
    loop.close()
    m._thread.join(2)
    assert not m._thread.is_alive() and not m.running
    assert monitor._monitors.get(id(loop)) is not m  # no stale registration
    m.stop()


def test_one_monitor_per_loop_in_several_threads(warnings):
    results = {}

    def run(name, block):
        def blocker_in_thread():
            time.sleep(block)

        async def main():
            m = monitor.start(threshold=0.1)
            await asyncio.sleep(0.05)
            await greenpatch.spawn(blocker_in_thread)
            await asyncio.sleep(0.1)
            m.stop()
            results[name] = m.stats()["blocked"]

        run_loop(main)

    threads = [threading.Thread(target=run, args=(n, b)) for n, b in (("a", 0.25), ("b", 0.01))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == {"a": 1, "b": 0}
    records = warnings()
    assert len(records) == 1 and "in blocker_in_thread" in records[0].getMessage()


def test_heartbeat_is_cheap():
    # One heartbeat: a clock read and a timer. Budget: 50 us, far above its
    # real cost (a few microseconds), so the test does not flake.
    async def main():
        m = monitor.start(threshold=0.1)
        try:
            await asyncio.sleep(0.02)
            n = 2000
            started = time.perf_counter()
            for _ in range(n):
                m._beat()
                m._handle.cancel()
            return (time.perf_counter() - started) / n
        finally:
            m.stop()

    per_beat = run_loop(main)
    assert per_beat < 50e-6, per_beat
