"""greenpatch.gc_tuning: how serve() sets up Python's garbage collector.

The collector's state is global to a process (and a freeze cannot be
undone), so every case runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from serve_support import ServeProcess, fetch

from greenpatch import config, gc_tuning
from greenpatch.config import ConfigError

TESTS = Path(__file__).resolve().parent


def run_python(code: str, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last."""
    environ = {k: v for k, v in os.environ.items() if k != "GREENPATCH_GC"}
    environ.update(env)
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=environ,
        cwd=str(TESTS),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


STATE = """
import gc, json
def state(**extra):
    print(json.dumps({"enabled": gc.isenabled(), "threshold": gc.get_threshold(),
                      "frozen": gc.get_freeze_count(), **extra}))
"""


def test_tuned_by_default_freezes_what_is_loaded_and_raises_threshold0():
    got = run_python(
        STATE
        + """
import gc
before = gc.get_threshold()
import greenpatch.gc_tuning
loaded = [[i] for i in range(1000)]  # "the application": survives, gets frozen
frozen = gc.get_freeze_count()
tuned = greenpatch.gc_tuning.tune()
state(tuned=tuned, before=before, frozen_before=frozen)
"""
    )
    assert got["tuned"] is True and got["enabled"] is True
    before = got["before"]
    assert got["threshold"] == [max(before[0], gc_tuning.GEN0_THRESHOLD), *before[1:]]
    assert got["frozen"] > got["frozen_before"] + 1000


def test_python_policy_leaves_the_collector_alone():
    got = run_python(
        STATE
        + """
import gc
before = gc.get_threshold()
import greenpatch.gc_tuning
frozen = gc.get_freeze_count()  # not 0 on Python 3.12: objects the interpreter keeps there
state(tuned=greenpatch.gc_tuning.tune(), before=before, frozen_before=frozen)
""",
        GREENPATCH_GC="python",
    )
    assert got["tuned"] is False
    assert got["threshold"] == got["before"] and got["frozen"] == got["frozen_before"]


@pytest.mark.parametrize(
    "change",
    ["gc.disable()", "gc.set_threshold(1234, 7, 7)"],
    ids=["disabled", "thresholds-set"],
)
def test_an_application_that_set_up_the_collector_itself_keeps_its_choice(change):
    got = run_python(
        STATE
        + f"""
import gc
import greenpatch.gc_tuning
{change}  # by the application, as it loads
before = gc.get_threshold()
frozen = gc.get_freeze_count()
state(tuned=greenpatch.gc_tuning.tune(), before=before, frozen_before=frozen)
"""
    )
    assert got["tuned"] is False
    assert got["threshold"] == got["before"] and got["frozen"] == got["frozen_before"]


def test_tuning_twice_changes_nothing_more():
    got = run_python(
        STATE
        + """
import gc
import greenpatch.gc_tuning
first = greenpatch.gc_tuning.tune()
after_first = (gc.get_threshold(), gc.get_freeze_count())
second = greenpatch.gc_tuning.tune()
state(first=first, second=second, after_first=after_first)
"""
    )
    assert got["first"] is True and got["second"] is False
    assert got["after_first"] == [got["threshold"], got["frozen"]]


def test_cyclic_garbage_is_still_collected_once_threshold0_is_reached():
    # The tuned collector runs later, not never: a reference cycle dropped
    # after tuning is freed once GEN0_THRESHOLD more containers are alive.
    got = run_python(
        STATE
        + """
import gc, weakref
import greenpatch.gc_tuning
assert greenpatch.gc_tuning.tune()

class Node:
    __slots__ = ("other", "__weakref__")

def drop_a_cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a, lambda ref: freed.append(len(kept)))

# Watched through the weakref's callback: calling the weakref would put the
# object on the stack, where a collection running at that moment sees it.
freed = []
kept = []
ref = drop_a_cycle()
while not freed and len(kept) < 3 * greenpatch.gc_tuning.GEN0_THRESHOLD:
    kept.append([len(kept)])
freed_after = freed[0] if freed else None
state(freed_after=freed_after)
"""
    )
    assert got["freed_after"] is not None
    assert got["freed_after"] <= gc_tuning.GEN0_THRESHOLD + 10


@pytest.mark.parametrize("value", ["", "  ", "tuned", "TUNED", " Python "])
def test_policy_setting_accepts(value):
    expected = value.strip().lower() or "tuned"
    assert config.gc_policy({"GREENPATCH_GC": value}) == expected
    assert config.gc_policy({}) == "tuned"


@pytest.mark.parametrize("value", ["0", "off", "freeze", "10000"])
def test_policy_setting_rejects_with_the_name_and_the_accepted_values(value):
    with pytest.raises(ConfigError, match=r"GREENPATCH_GC=.*accepted values: tuned, python"):
        config.gc_policy({"GREENPATCH_GC": value})


def test_tune_rejects_an_unknown_policy():
    with pytest.raises(ConfigError, match=r"'fast'.*accepted values: tuned, python"):
        gc_tuning.tune("fast")


# -- serve() -------------------------------------------------------------------------------------------


@pytest.fixture
def default_policy(monkeypatch):
    # The serving subprocesses inherit the environment.
    monkeypatch.delenv("GREENPATCH_GC", raising=False)


def served_states(app: str, processes: int = 1, **env: str) -> dict[int, dict]:
    """``serve(app)`` in a subprocess, stopped with SIGTERM: the JSON of each
    serving process (by pid) that answered ``GET /``."""
    proc = ServeProcess(app, env=env, port=0, processes=processes)
    try:
        port = proc.wait_ready()
        seen: dict[int, dict] = {}
        for _ in range(40):
            status, _, body = fetch(port)
            assert status == 200
            got = json.loads(body)
            seen[got["pid"]] = got
            if len(seen) == processes:
                break
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.wait() == 0, proc.output()
    finally:
        proc.kill()
    return seen


def served_state(app: str, **env: str) -> dict:
    (got,) = served_states(app, **env).values()
    return got


@pytest.mark.parametrize("processes", [1, 2])
def test_serve_tunes_each_serving_process_once_the_app_is_loaded(default_policy, processes):
    untuned = served_state("wsgi_apps:gc_state", GREENPATCH_GC="python")
    seen = served_states("wsgi_apps:gc_state", processes=processes)
    assert len(seen) == processes  # SO_REUSEPORT: both children answered
    for got in seen.values():
        assert got["enabled"] is True
        assert got["threshold"][0] >= gc_tuning.GEN0_THRESHOLD
        # The app's modules, Tornado's, greenpatch's... loaded in this process.
        assert got["frozen"] > untuned["frozen"] + 10_000


def test_serve_with_python_policy_leaves_the_collector_alone():
    default = run_python(STATE + "state()")
    got = served_state("wsgi_apps:gc_state", GREENPATCH_GC="python")
    assert got["threshold"] == default["threshold"]
    assert got["frozen"] < default["frozen"] + 1000  # nothing of what serve() loaded


def test_serve_keeps_the_thresholds_an_application_set_as_it_loaded(default_policy):
    untuned = served_state("wsgi_apps:gc_state", GREENPATCH_GC="python")
    got = served_state("wsgi_gc_custom:gc_state")
    assert got["threshold"] == [1234, 7, 7]
    assert got["frozen"] == untuned["frozen"]


def test_serve_refuses_a_bad_policy_before_listening():
    proc = ServeProcess("wsgi_apps:gc_state", env={"GREENPATCH_GC": "fast"}, port=0)
    try:
        code = proc.wait()
    finally:
        proc.kill()
    output = proc.output()
    assert code == 2, output
    assert "GREENPATCH_GC='fast' is not accepted; accepted values: tuned, python" in output
    assert "serving on" not in output and "READY" not in output
