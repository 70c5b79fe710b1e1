"""(7) Property: a GreenSocket delivers exactly the bytes sent, however they arrive.

A writer thread sends a payload through a socketpair in chunks of random
sizes with random pauses; the reader asks for random amounts, as PyMySQL
does (``makefile("rb").read(n)``: exactly n bytes or end of stream), or
calls ``recv_into`` directly. Checked inside greenpatch workers (several
sockets read concurrently on one IOLoop) and outside any worker (the
blocking path), and for ``sendall`` against a slow random-sized reader.

Needs ``hypothesis`` (not yet in setup.py's "test" extra: skipped without it).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import random
import shutil
import socket
import tempfile
import threading
import time

import pytest

hypothesis = pytest.importorskip("hypothesis")
from conftest import run_loop  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402

import greenpatch  # noqa: E402
from greenpatch.socket import GreenSocket  # noqa: E402

if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    # Hypothesis caches things in ./.hypothesis even without a database: not in the work tree.
    _storage = tempfile.mkdtemp(prefix="gp-hypothesis-")
    set_hypothesis_home_dir(_storage)
    atexit.register(shutil.rmtree, _storage, ignore_errors=True)

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the work tree
    suppress_health_check=[HealthCheck.too_slow],
    # No shrinking: a failure is reported at once with the example that
    # failed (shrinking sockets and threads can take minutes in CI).
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
TIMEOUT = 10.0  # every socket wait is bounded: a lost byte fails the example, never hangs it

# Every example moves at most ~0.5 MB, and every reader drains at a rate
# that keeps each wait far below TIMEOUT: the property is about how bytes
# arrive, not about how slowly.
chunk_sizes = st.lists(st.integers(1, 40_000), min_size=1, max_size=12)
read_sizes = st.lists(st.integers(1, 100_000), min_size=1, max_size=24)
pauses = st.lists(st.sampled_from([0.0, 0.0, 0.0, 0.0002, 0.001, 0.003]), min_size=1, max_size=8)


def payload_for(sizes: list[int], seed: int) -> bytes:
    return random.Random(seed).randbytes(sum(sizes))


def start_writer(sock: socket.socket, data: bytes, sizes: list[int], delays: list[float]) -> threading.Thread:
    """Send ``data`` cut at ``sizes``, pausing between chunks; then close the socket."""

    def write() -> None:
        try:
            view = memoryview(data)
            for i, size in enumerate(sizes):
                sock.sendall(view[:size])
                view = view[size:]
                delay = delays[i % len(delays)]
                if delay:
                    time.sleep(delay)
        finally:
            sock.close()

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def read_exactly(green: GreenSocket, total: int, sizes: list[int]) -> bytes:
    """Read like PyMySQL: ``read(n)`` of random n on makefile("rb"); then expect end of stream."""
    rfile = green.makefile("rb")
    got = bytearray()
    i = 0
    while len(got) < total:
        n = min(sizes[i % len(sizes)], total - len(got))
        data = rfile.read(n)
        assert len(data) == n, f"short read: {len(data)} of {n} at offset {len(got)}"
        got += data
        i += 1
    assert rfile.read(1) == b""
    assert green.fileno() == -1, "end of stream closes the GreenSocket"
    return bytes(got)


def read_into(green: GreenSocket, sizes: list[int]) -> bytes:
    """``recv_into`` with random buffer sizes until end of stream."""
    got = bytearray()
    i = 0
    while True:
        buf = bytearray(sizes[i % len(sizes)])
        n = green.recv_into(buf, len(buf))
        assert 0 <= n <= len(buf)
        if n == 0:
            return bytes(got)
        got += buf[:n]
        i += 1


def green_pair() -> tuple[GreenSocket, socket.socket]:
    a, b = socket.socketpair()
    green = GreenSocket(a)
    green.settimeout(TIMEOUT)
    b.settimeout(TIMEOUT)
    return green, b


@SETTINGS
@given(
    streams=st.lists(st.tuples(chunk_sizes, read_sizes, pauses, st.booleans()), min_size=1, max_size=4),
    seed=st.integers(0, 2**32),
)
def test_concurrent_workers_read_exactly_what_was_sent(streams, seed):
    pairs = [green_pair() for _ in streams]
    payloads = [payload_for(writes, seed + i) for i, (writes, _, _, _) in enumerate(streams)]

    async def main():
        futures = []
        for (green, _), data, (_, reads, _, use_makefile) in zip(pairs, payloads, streams, strict=True):
            if use_makefile:
                futures.append(greenpatch.spawn(read_exactly, green, len(data), reads))
            else:
                futures.append(greenpatch.spawn(read_into, green, reads))
        writers = [
            start_writer(peer, data, writes, delays)
            for (_, peer), data, (writes, _, delays, _) in zip(pairs, payloads, streams, strict=True)
        ]
        try:
            return await asyncio.wait_for(asyncio.gather(*futures), TIMEOUT * 2)
        finally:
            for writer in writers:
                writer.join(TIMEOUT)

    try:
        results = run_loop(main, timeout=TIMEOUT * 3)
    finally:
        for green, peer in pairs:
            green.close()
            peer.close()
    assert [len(r) for r in results] == [len(p) for p in payloads]
    assert results == payloads


@SETTINGS
@given(writes=chunk_sizes, reads=read_sizes, delays=pauses, seed=st.integers(0, 2**32))
def test_blocking_reader_outside_workers_reads_exactly_what_was_sent(writes, reads, delays, seed):
    green, peer = green_pair()
    data = payload_for(writes, seed)
    writer = start_writer(peer, data, writes, delays)
    try:
        assert read_exactly(green, len(data), reads) == data
    finally:
        writer.join(TIMEOUT)
        green.close()
        peer.close()


@SETTINGS
@given(
    size=st.integers(1, 500_000),
    reads=st.lists(st.integers(64, 50_000), min_size=1, max_size=16),
    delays=pauses,
    seed=st.integers(0, 2**32),
)
def test_sendall_from_a_worker_against_a_slow_random_reader(size, reads, delays, seed):
    green, peer = green_pair()
    data = random.Random(seed).randbytes(size)
    received = bytearray()

    def reader() -> None:
        i = 0
        while True:
            try:
                chunk = peer.recv(reads[i % len(reads)])
            except OSError:  # the example failed and closed the socket
                return
            if not chunk:
                return
            received.extend(chunk)
            delay = delays[i % len(delays)]
            if delay and i % 64 == 0:  # a slow reader, not a stalled one
                time.sleep(delay)
            i += 1

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()

    def send() -> None:
        green.sendall(data)
        green.close()

    async def main():
        await greenpatch.spawn(send)

    try:
        run_loop(main, timeout=TIMEOUT * 3)
        thread.join(TIMEOUT)
    finally:
        green.close()
        peer.close()
    assert not thread.is_alive()
    assert bytes(received) == data
