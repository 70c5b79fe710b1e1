"""The greenlet <-> IOLoop bridge, without a database."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import traceback
import weakref

import greenlet
import pytest
from conftest import park_on_a_closed_loop, run_green, run_loop
from tornado.ioloop import IOLoop

import greenpatch
from greenpatch import hub


def test_spawn_returns_result_and_runs_in_worker():
    def fn(a, b=0):
        assert greenpatch.is_worker()
        assert isinstance(greenpatch.current_worker(), greenpatch.Worker)
        return a + b

    async def main():
        return await greenpatch.spawn(fn, 1, b=2)

    assert run_loop(main) == 3
    assert not greenpatch.is_worker()
    assert greenpatch.current_worker() is None


def test_exception_lands_in_future_with_traceback():
    def fails():
        raise KeyError("boom")

    async def main():
        with pytest.raises(KeyError) as info:
            await greenpatch.spawn(fails)
        return info.value

    exc = run_loop(main)
    frames = [f.name for f in traceback.extract_tb(exc.__traceback__)]
    assert "fails" in frames


def test_green_decorator_returns_future():
    @greenpatch.green
    def double(x):
        greenpatch.sleep(0.01)
        return 2 * x

    async def main():
        fut = double(21)
        assert isinstance(fut, asyncio.Future)
        return await fut

    assert run_loop(main) == 42
    assert double.__name__ == "double"


def test_workers_run_concurrently_and_loop_keeps_ticking():
    ticks = []

    async def main():
        from tornado.ioloop import PeriodicCallback

        pc = PeriodicCallback(lambda: ticks.append(time.monotonic()), 10)
        pc.start()
        t0 = time.monotonic()
        await asyncio.gather(*(greenpatch.spawn(greenpatch.sleep, 0.3) for _ in range(20)))
        pc.stop()
        return time.monotonic() - t0

    elapsed = run_loop(main)
    assert elapsed < 0.6, elapsed
    assert len(ticks) >= 10


def test_wait_returns_future_result_and_times_out():
    def fn():
        loop = IOLoop.current()
        fut = loop.asyncio_loop.create_future()
        loop.call_later(0.05, fut.set_result, "done")
        assert greenpatch.wait(fut) == "done"
        never = loop.asyncio_loop.create_future()
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            greenpatch.wait(never, timeout=0.1)
        took = time.monotonic() - t0
        # A late result after the timeout is ignored: the worker is not resumed.
        never.set_result("late")
        greenpatch.sleep(0.05)
        return took

    took = run_green(fn)
    assert 0.09 <= took < 0.5


def test_timeouts_of_different_lengths_expire_in_order_behind_one_loop_timer():
    # Timed waits share one loop timer, armed for the earliest deadline: a
    # shorter timeout that comes later must re-arm it.
    expired = []

    def waiter(name, timeout):
        never = IOLoop.current().asyncio_loop.create_future()
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            greenpatch.wait(never, timeout=timeout)
        expired.append((name, time.monotonic() - t0))

    async def main():
        aloop = asyncio.get_running_loop()
        futures = [greenpatch.spawn(waiter, name, t) for name, t in (("c", 0.3), ("a", 0.1), ("b", 0.2))]
        await asyncio.sleep(0)
        # Three waits, one timer of greenpatch's on the loop (run_sync has one too).
        timers = [h for h in aloop._scheduled if not h.cancelled()]
        assert len(timers) == 2, timers
        ours = [h for h in timers if isinstance(getattr(h._callback, "__self__", None), hub._Deadlines)]
        assert len(ours) == 1, timers
        await asyncio.gather(*futures)

    run_loop(main)
    assert [name for name, _ in expired] == ["a", "b", "c"]
    for (_, took), want in zip(expired, (0.1, 0.2, 0.3), strict=True):
        assert want - 0.01 <= took < want + 0.25


def test_a_worker_that_waits_again_as_its_timeout_expires_gets_its_new_timeout():
    # The expired worker runs inside the timer's callback and arms a new
    # deadline there; a second worker's deadline, due at the same time,
    # still fires.
    log = []

    def fn(name):
        aloop = IOLoop.current().asyncio_loop
        for timeout in (0.05, 0.1):
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                greenpatch.wait(aloop.create_future(), timeout=timeout)
            log.append((name, timeout, time.monotonic() - t0))

    async def main():
        await asyncio.gather(greenpatch.spawn(fn, "x"), greenpatch.spawn(fn, "y"))

    run_loop(main)
    assert sorted((name, t) for name, t, _ in log) == [("x", 0.05), ("x", 0.1), ("y", 0.05), ("y", 0.1)]
    for _, timeout, took in log:
        assert timeout - 0.01 <= took < timeout + 0.25


def test_timed_waits_that_end_early_leave_no_timers_behind():
    # A pool checkout waits milliseconds with a 30 s timeout, thousands of
    # times: the cancelled deadlines must not pile up, in greenpatch's heap
    # or in the loop's.
    def fn():
        aloop = IOLoop.current().asyncio_loop
        deadlines = None
        for _ in range(3000):
            fut = aloop.create_future()
            aloop.call_soon(fut.set_result, None)
            greenpatch.wait(fut, timeout=30)
            deadlines = hub._by_loop.deadlines[aloop]
        return len(deadlines.heap), deadlines.dead, len(aloop._scheduled)

    heap, dead, scheduled = run_green(fn)
    assert heap <= 2 * hub._Deadlines.SWEEP_MIN + 2
    assert dead == heap  # every entry left is a cancelled one
    assert scheduled <= 3  # run_sync's timer, greenpatch's, and at most one it cancelled


def test_wait_accepts_coroutines():
    async def coro():
        await asyncio.sleep(0.01)
        return "coro"

    assert run_green(lambda: greenpatch.wait(coro())) == "coro"


def test_wait_outside_worker_is_a_clear_error():
    fut = asyncio.Future(loop=asyncio.new_event_loop())
    with pytest.raises(greenpatch.NotInWorkerError, match="inside a greenpatch worker"):
        greenpatch.wait(fut)
    with pytest.raises(greenpatch.NotInWorkerError):
        greenpatch.sleep(0.01)


def test_nested_spawn_resumes_the_right_greenlets():
    order = []

    def inner(n):
        greenpatch.sleep(0.02)
        order.append(f"inner{n}")
        return n

    def outer():
        futs = [greenpatch.spawn(inner, n) for n in range(3)]
        results = [greenpatch.wait(f) for f in futs]
        order.append("outer")
        return results

    async def main():
        return await greenpatch.spawn(outer)

    assert run_loop(main) == [0, 1, 2]
    assert order[-1] == "outer"
    assert sorted(order[:3]) == ["inner0", "inner1", "inner2"]


def test_worker_parent_is_the_hub():
    def child():
        return greenlet.getcurrent().parent

    def parent():
        return greenpatch.wait(greenpatch.spawn(child)), greenlet.getcurrent().parent

    async def main():
        return (await greenpatch.spawn(parent)), greenlet.getcurrent()

    (child_parent, parent_parent), hub_greenlet = run_loop(main)
    assert child_parent is hub_greenlet
    assert parent_parent is hub_greenlet


def test_cancel_kills_worker_and_runs_exit_hooks():
    released = []
    reached_end = []

    def hook(worker):
        released.append(worker)

    def slow():
        greenpatch.sleep(5)
        reached_end.append(True)

    hub.add_exit_hook(hook)
    try:

        async def main():
            fut = greenpatch.spawn(slow)
            worker_count = len(released)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(fut, 0.05)
            await asyncio.sleep(0.01)
            return fut, worker_count

        fut, before = run_loop(main)
    finally:
        hub.remove_exit_hook(hook)
    assert fut.cancelled()
    assert before == 0 and len(released) == 1
    assert released[0].dead
    assert not reached_end


def test_kill_from_another_worker_and_unstarted():
    log = []

    def victim():
        try:
            greenpatch.sleep(5)
        except greenlet.GreenletExit:
            log.append("killed")
            raise

    def killer(w):
        w.kill()  # scheduled: a worker cannot throw into another directly
        greenpatch.sleep(0.01)
        log.append("killer done")

    async def main():
        worker = hub.start_worker(victim)
        await greenpatch.spawn(killer, worker)
        return worker

    worker = run_loop(main)
    assert log == ["killed", "killer done"]
    assert worker.dead and worker.future.cancelled()

    # A worker spawned from a worker but killed before it started never runs.
    ran = []

    def outer():
        w = hub.start_worker(ran.append, 1)
        w.kill()
        greenpatch.sleep(0.02)
        return w.future.cancelled()

    assert run_green(outer) is True
    assert ran == []


def test_exit_hook_errors_are_logged_not_raised(caplog):
    def bad(worker):
        raise RuntimeError("hook broke")

    hub.add_exit_hook(bad)
    try:
        assert run_green(lambda: 7) == 7
    finally:
        hub.remove_exit_hook(bad)
    assert "hook broke" in caplog.text


def test_one_hub_per_thread():
    results = {}

    def in_thread(n):
        async def main():
            return await greenpatch.spawn(lambda: (greenpatch.sleep(0.05), threading.get_ident())[1])

        results[n] = run_loop(main)

    threads = [threading.Thread(target=in_thread, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results.values())) == 3


# -- worker greenlets are reused ------------------------------------------------


def test_a_worker_greenlet_runs_the_next_worker_and_hands_it_nothing():
    import contextvars

    from greenpatch.local import GreenletLocal

    request_id = contextvars.ContextVar("request_id", default=None)
    local = GreenletLocal()

    def first():
        request_id.set("first")
        local.user = "alice"
        greenpatch.sleep(0)  # parks and resumes in the same greenlet
        return greenlet.getcurrent(), greenpatch.current_worker()

    def second():
        return (
            greenlet.getcurrent(),
            greenpatch.current_worker(),
            request_id.get(),
            getattr(local, "user", None),
        )

    async def main():
        a = await greenpatch.spawn(first)
        b = await greenpatch.spawn(second)
        return a, b

    (g1, w1), (g2, w2, seen_id, seen_user) = run_loop(main)
    assert g1 is g2  # the same greenlet...
    assert isinstance(g1, hub.WorkerGreenlet)
    assert w1 is not w2 and w1.dead and w2.dead  # ...ran two distinct workers
    assert seen_id is None and seen_user is None  # nothing of the first leaked into the second


def test_a_stale_kill_does_not_reach_the_next_worker_on_the_same_greenlet():
    def quick():
        return greenlet.getcurrent()

    def sleeper():
        greenpatch.sleep(0.05)
        return greenlet.getcurrent()

    async def main():
        done = hub.start_worker(quick)
        g1 = await done.future
        later = hub.start_worker(sleeper)
        done.kill()  # the first worker ended long ago: nothing happens
        IOLoop.current().add_callback(done.kill)
        return g1, await later.future, later

    g1, g2, later = run_loop(main)
    assert g1 is g2 and later.dead and not later.future.cancelled()


def test_a_killed_workers_greenlet_is_not_reused():
    def victim():
        greenpatch.sleep(5)

    async def main():
        worker = hub.start_worker(victim)
        await asyncio.sleep(0.01)
        carrier = worker._greenlet
        worker.kill()
        after = await greenpatch.spawn(greenlet.getcurrent)
        return worker, carrier, after

    worker, carrier, after = run_loop(main)
    assert worker.dead and worker.future.cancelled()
    assert carrier.dead and after is not carrier


def test_greenlets_are_reused_only_while_a_thread_has_few(monkeypatch):
    # Workers of earlier tests may still be parked on loops nobody runs.
    others = hub._carriers.counts.busy
    monkeypatch.setattr(hub, "REUSED_GREENLETS", others + 3)

    def parked(seconds):
        greenpatch.sleep(seconds)
        return greenlet.getcurrent()

    async def burst(n):
        return await asyncio.gather(*[greenpatch.spawn(parked, 0.01 * (i + 1)) for i in range(n)])

    async def main():
        hub._carriers.idle.clear()
        few = await burst(2)
        kept_after_few = [g for g in hub._carriers.idle if not g.dead]
        many = await burst(10)
        return few, kept_after_few, many, list(hub._carriers.idle), hub._carriers.counts.busy

    few, kept_after_few, many, kept_after_many, busy = run_loop(main)
    assert set(kept_after_few) == set(few)  # 2 < 3: both kept, alive
    assert len(set(many)) == 10  # all ran at once, each in its own greenlet (2 of them reused)
    # Ending while 10 exist, greenlets end with their worker until fewer than 3 are left.
    assert len(kept_after_many) == 3 and sum(g.dead for g in many) == 7
    assert busy == others


def test_failing_workers_leave_their_greenlet_reusable():
    def fails():
        raise ValueError(greenlet.getcurrent())

    async def main():
        with pytest.raises(ValueError) as info:
            await greenpatch.spawn(fails)
        return info.value.args[0], await greenpatch.spawn(greenlet.getcurrent)

    g1, g2 = run_loop(main)
    assert g1 is g2


# -- hub.stats() ------------------------------------------------------------------------------


def test_stats_count_running_idle_started_and_killed_workers():
    # Earlier tests may have left workers parked on loops nobody runs: compare deltas.
    before = hub.stats()

    def parked(seconds):
        greenpatch.sleep(seconds)

    async def main():
        hub._carriers.idle.clear()
        quick = hub.start_worker(parked, 0.05)
        victim = hub.start_worker(parked, 5)
        await asyncio.sleep(0.01)
        during = hub.stats()
        victim.kill()
        await quick.future
        return during, hub.stats()

    during, after = run_loop(main)
    assert during["running"] - before["running"] == 2
    assert during["started"] - before["started"] == 2
    assert during["idle_greenlets"] == 0
    assert after["running"] == before["running"]
    assert after["started"] - before["started"] == 2
    assert after["killed"] - before["killed"] == 1
    assert after["idle_greenlets"] == 1  # the quick one's greenlet, kept; the killed one's ended


def test_stats_add_up_threads_and_keep_the_counts_of_ended_ones():
    before = hub.stats()
    seen = {}

    def in_a_thread():
        async def main():
            worker = hub.start_worker(greenpatch.sleep, 5)
            await greenpatch.spawn(lambda: None)  # its greenlet is then idle
            await asyncio.sleep(0.01)
            seen["during"] = hub.stats()
            worker.kill()
            await asyncio.sleep(0)

        IOLoop(make_current=False).run_sync(main)

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    after = hub.stats()
    assert seen["during"]["running"] - before["running"] == 1  # the parked one, in the other thread
    assert seen["during"]["idle_greenlets"] - before["idle_greenlets"] == 1
    # The thread has ended: its greenlets went with it, its counts stay.
    assert after["running"] == before["running"]
    assert after["idle_greenlets"] == before["idle_greenlets"]
    assert after["started"] - before["started"] == 2
    assert after["killed"] - before["killed"] == 1


def test_an_idle_greenlet_keeps_nothing_of_its_last_worker():
    class Payload:
        pass

    refs = []

    def work(arg):
        result = Payload()
        refs.extend([weakref.ref(arg), weakref.ref(result)])
        return result

    async def main():
        worker = hub.start_worker(work, Payload())
        await worker.future
        carrier = hub._carriers.idle[-1]
        return weakref.ref(worker), carrier

    worker_ref, carrier = run_loop(main)
    gc.collect()
    assert not carrier.dead  # idle, kept for the next worker...
    assert [r() for r in refs] == [None, None]  # ...without its argument or result
    assert worker_ref() is None


def test_the_idle_greenlets_of_a_thread_that_ended_are_freed():
    refs = []

    def in_a_thread():
        async def main():
            await greenpatch.spawn(lambda: refs.append(weakref.ref(greenlet.getcurrent())))
            assert hub._carriers.idle  # the greenlet is idle, kept for reuse

        loop = IOLoop(make_current=False)
        loop.run_sync(main)
        loop.close()

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    gc.collect()
    assert refs and refs[0]() is None


# -- workers left on a closed loop ---------------------------------------------------------


def _stuck(ended: list) -> None:
    try:
        greenpatch.sleep(60)
    finally:
        ended.append("finally")


def test_workers_left_waiting_on_a_closed_loop_are_killed_when_the_thread_starts_another(caplog):
    ended = []
    before = hub.stats()["running"]
    worker = park_on_a_closed_loop(lambda: _stuck(ended))
    assert hub.stats()["running"] == before + 1 and ended == []  # nothing could resume it
    caplog.set_level(logging.WARNING, logger="greenpatch.hub")
    assert run_green(lambda: 42) == 42  # a worker of another loop of this thread
    assert ended == ["finally"]
    assert worker.dead and worker.future.cancelled()
    assert hub.stats()["running"] <= before  # (earlier tests' leftovers may have gone too)
    assert any("left waiting on a closed IOLoop" in r.getMessage() for r in caplog.records)


def test_reap_closed_loops_kills_them_now_from_outside_a_worker():
    ended = []
    worker = park_on_a_closed_loop(lambda: _stuck(ended))
    assert not worker.dead
    hub.reap_closed_loops()
    assert ended == ["finally"] and worker.dead
    hub.reap_closed_loops()  # nothing left: harmless


def test_a_worker_stranded_on_a_closed_loop_before_it_started_can_be_taken_back():
    # What start_worker does from inside a worker: the worker starts on the
    # loop's next turn - here there is none.
    ran = []
    loop = IOLoop(make_current=False)
    worker = hub.Worker(ran.append, ("child",), {}, loop)
    loop.add_callback(worker._start, True)
    assert worker.pending and worker.take_back_if_stranded() is None  # its loop may still run
    loop.close(all_fds=False)
    fn, args, kwargs = worker.take_back_if_stranded()
    assert worker.dead and not worker.pending and worker.future.cancelled()
    assert worker.take_back_if_stranded() is None  # once only
    fn(*args, **kwargs)
    assert ran == ["child"]

    done = run_loop(lambda: _started_worker(lambda: None))
    assert not done.pending and done.take_back_if_stranded() is None  # it ran


async def _started_worker(fn):
    worker = hub.start_worker(fn)  # from loop code: starts at once
    await worker.future
    return worker


def test_a_killed_worker_whose_loop_is_closed_cannot_wait_again():
    # Its way out may want to wait (a rollback at checkin, a finally block):
    # that raises instead of parking it for good.
    seen = []

    def stuck():
        try:
            greenpatch.sleep(60)
        finally:
            try:
                greenpatch.sleep(0.01)
            except RuntimeError as exc:
                seen.append(str(exc))

    worker = park_on_a_closed_loop(stuck)
    run_green(lambda: None)
    assert worker.dead
    assert len(seen) == 1 and "its IOLoop is closed" in seen[0]


def test_workers_of_a_stopped_loop_that_is_not_closed_are_left_alone():
    loop = IOLoop(make_current=False)
    box = {}

    def parked():
        greenpatch.sleep(0.2)
        return "resumed"

    async def start():
        box["worker"] = hub.start_worker(parked)

    try:
        loop.run_sync(start)  # stopped, not closed: it may run again
        run_green(lambda: None)
        worker = box["worker"]
        assert not worker.dead

        async def finish():
            return await worker.future

        assert loop.run_sync(finish) == "resumed"
    finally:
        loop.close(all_fds=False)
