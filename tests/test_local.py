"""GreenletLocal on its own."""

from __future__ import annotations

import gc
import threading
import weakref

import greenlet
import pytest
from conftest import run_loop

import greenpatch
from greenpatch.local import GreenletLocal


def test_each_greenlet_sees_its_own_attributes():
    local = GreenletLocal()
    local.x = "main"
    seen = {}

    def child(name):
        assert not hasattr(local, "x")
        local.x = name
        greenlet.getcurrent().parent.switch()
        seen[name] = local.x

    a, b = greenlet.greenlet(child), greenlet.greenlet(child)
    a.switch("a")
    b.switch("b")
    a.switch()
    b.switch()
    assert seen == {"a": "a", "b": "b"}
    assert local.x == "main"


def test_workers_interleaving_keep_their_values():
    local = GreenletLocal()

    def fn(n):
        local.value = n
        greenpatch.sleep(0.01 * (5 - n))
        assert local.value == n
        local.value += 100
        greenpatch.sleep(0.01)
        return local.value

    async def main():
        import asyncio

        return await asyncio.gather(*(greenpatch.spawn(fn, n) for n in range(5)))

    assert run_loop(main) == [100, 101, 102, 103, 104]


def test_threads_are_separate_too():
    local = GreenletLocal()
    local.v = 1
    out = []
    t = threading.Thread(target=lambda: out.append(getattr(local, "v", None)))
    t.start()
    t.join()
    assert out == [None]


def test_delattr_items_clear():
    local = GreenletLocal()
    with pytest.raises(AttributeError, match="no attribute 'missing' in this greenlet"):
        local.missing  # noqa: B018
    with pytest.raises(AttributeError):
        del local.missing
    local.a, local.b = 1, 2
    del local.a
    assert dict(local.items()) == {"b": 2}
    assert local.clear() == {"b": 2}
    assert not hasattr(local, "b")


def test_items_and_clear_of_another_greenlet():
    local = GreenletLocal()

    def child():
        local.conn = "c"
        greenlet.getcurrent().parent.switch()

    g = greenlet.greenlet(child)
    g.switch()
    assert dict(local.items(g)) == {"conn": "c"}
    assert dict(local.items()) == {}
    assert local.clear(g) == {"conn": "c"}
    assert dict(local.items(g)) == {}
    g.switch()


def test_values_released_with_the_greenlet():
    local = GreenletLocal()

    class Payload:
        pass

    refs = []

    def child():
        p = Payload()
        refs.append(weakref.ref(p))
        local.p = p

    g = greenlet.greenlet(child)
    g.switch()
    del g
    gc.collect()
    assert refs[0]() is None


def test_two_locals_do_not_collide():
    a, b = GreenletLocal(), GreenletLocal()
    a.x = 1
    assert not hasattr(b, "x")
    del a
    gc.collect()
    c = GreenletLocal()  # may reuse a's id(); must not see a's values
    assert not hasattr(c, "x")
