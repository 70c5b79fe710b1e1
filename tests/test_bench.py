"""The peer benchmark's own logic (bench/peers.py): reading wrk, choosing what to run.

The benchmark itself is not a test (it needs wrk, gunicorn, gevent...); these
check the parts whose mistakes would silently publish wrong figures.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

PEERS = Path(__file__).resolve().parent.parent / "bench" / "peers.py"


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("greenpatch_bench_peers", PEERS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


WRK_OUTPUT = """\
Running 5s test @ http://127.0.0.1:41234/db
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    25.12ms    5.01ms   1.20s    80.00%
    Req/Sec     2.50k   100.00     2.60k    70.00%
  Latency Distribution
     50%  850.00us
     75%   27.00ms
     90%   30.00ms
     99%    1.20s
  12650 requests in 5.00s, 2.50MB read
  Socket errors: connect 0, read 3, write 1, timeout 2
  Non-2xx or 3xx responses: 4
Requests/sec:   2530.12
Transfer/sec:    500.00KB
"""


def test_parse_wrk_reads_rate_latencies_and_every_kind_of_error(peers):
    figures = peers.parse_wrk(WRK_OUTPUT)
    assert figures == {"rps": 2530.12, "requests": 12650, "p50_ms": 0.85, "p99_ms": 1200.0, "errors": 10}


def test_parse_wrk_without_errors_and_refuses_what_it_cannot_read(peers):
    lines = WRK_OUTPUT.splitlines()
    clean = "\n".join(line for line in lines if "errors" not in line and "Non-2xx" not in line)
    assert peers.parse_wrk(clean)["errors"] == 0
    with pytest.raises(RuntimeError, match="cannot read wrk"):
        peers.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused")


def test_bad_command_line_choices_are_named(peers, capsys):
    with pytest.raises(SystemExit):
        peers.parse_args(["--configs", "gp2,nginx"])
    err = capsys.readouterr().err
    assert "nginx" in err and "accepted: gp1, gp2, gp2-t5, gp2-pygc, gthread" in err
    args = peers.parse_args(["--configs", "gp2,gthread", "--scenarios", "slow-256"])
    assert [c.name for c in args.configs] == ["gp2", "gthread"]
    assert [(s.path, s.concurrency) for s in args.scenarios] == [("/slow", 256)]


def test_greenpatch_configs_serve_without_access_log_and_peers_run_unpatched(peers):
    gp2 = peers.BY_NAME["gp2"]
    cmd = gp2.command(8123)
    assert cmd[1:4] == ["-m", "greenpatch", "serve"] and "--no-access-log" in cmd
    assert cmd[cmd.index("--processes") + 1] == "2"
    env = gp2.env({"host": "h", "port": 1, "user": "u", "password": "p"})
    assert env["BENCH_ENGINE"] == "greenpatch" and env["BENCH_POOL_SIZE"] == "20" and "GREENPATCH" not in env
    assert "GREENPATCH_TURN_BUDGET" not in env and "GREENPATCH_GC" not in env  # the defaults
    t5 = peers.BY_NAME["gp2-t5"].env({"host": "h", "port": 1, "user": "u", "password": "p"})
    assert t5["GREENPATCH_TURN_BUDGET"] == "0.005" and t5["BENCH_POOL_SIZE"] == "20"
    pygc = peers.BY_NAME["gp2-pygc"].env({"host": "h", "port": 1, "user": "u", "password": "p"})
    assert pygc["GREENPATCH_GC"] == "python" and pygc["BENCH_POOL_SIZE"] == "20"
    assert peers.BY_NAME["gp2-pygc"].command(8123) == cmd
    gthread = peers.BY_NAME["gthread"]
    assert gthread.env({"host": "h", "port": 1, "user": "u", "password": "p"})["GREENPATCH"] == "0"
    assert "gthread" in gthread.command(8123)


def test_each_configuration_has_its_own_database(peers):
    # All servers run at once; the sessions column counts each one's own.
    configs = [*peers.CONFIGS, *peers.MEMORY_CONFIGS]
    names = {c.database for c in configs}
    assert len(names) == len({c.name for c in configs})
    assert all(re.fullmatch(r"gp_peers_\w+", n) for n in names)
    gp1 = peers.BY_NAME["gp1"]
    assert gp1.env({"host": "h", "port": 1, "user": "u", "password": "p"})["BENCH_DB_NAME"] == gp1.database


def test_schedule_turns_the_order_around_at_every_step_and_every_round(peers):
    a, b, c = (peers.BY_NAME[n] for n in ("gp2", "gthread", "gevent"))
    s1, s2 = (peers.SCENARIO_BY_NAME[n] for n in ("db", "queries"))
    run = peers.Run([a, b, c], [s1, s2], 2, 5, 1)
    got = [(rnd, s.name, cfg.name) for rnd, s, cfg in peers.schedule(run)]
    forward, backward = ["gp2", "gthread", "gevent"], ["gevent", "gthread", "gp2"]
    expected = [
        *[(0, "db", n) for n in forward],
        *[(0, "queries", n) for n in backward],
        *[(1, "db", n) for n in backward],  # not forward again: db's order turns too
        *[(1, "queries", n) for n in forward],
    ]
    assert got == expected
    # With the full set (an even number of scenarios), every configuration is
    # at mirrored positions of each scenario in consecutive rounds.
    run = peers.Run(peers.CONFIGS, peers.SCENARIOS, 4, 5, 1)
    positions: dict[tuple[int, str], list[str]] = {}
    for rnd, s, cfg in peers.schedule(run):
        positions.setdefault((rnd, s.name), []).append(cfg.name)
    last = len(peers.CONFIGS) - 1
    for s in peers.SCENARIOS:
        for cfg in peers.CONFIGS:
            seen = [positions[(rnd, s.name)].index(cfg.name) for rnd in range(4)]
            assert seen[0] + seen[1] == last and seen == seen[:2] * 2, (s.name, cfg.name, seen)


def fake_run(peers):
    """A complete run with made-up figures: gp2 twice as fast as every peer."""
    run = peers.Run(peers.CONFIGS, peers.SCENARIOS, 2, 5, 1)
    for rnd in range(2):
        for c in peers.CONFIGS:
            for s in peers.SCENARIOS:
                rps = 1000.0 * (2 if c.greenpatch else 1) + rnd
                run.results.append(peers.Result(c.name, s.name, rnd, rps, 10.0, 50.0, 5000, 0, 40, 100.0))
    for name in ("gp1", "gevent-1"):
        run.memory[name] = {
            "label": name, "clients": 1000, "idle_mb": 50.0, "loaded_mb": 75.0, "delta_mb": 25.0,
            "rps": 700.0, "p50_ms": 1400.0, "p99_ms": 2000.0, "errors": 0, "db_sessions": 40,
        }  # fmt: skip
    stock = {"us": 100.0, "ratio": 1.0, "paired": 1.0, "cpu_us": 90.0}
    run.overhead = {
        "rounds": 21,
        "queries": 500,
        "figures": {
            "select1": {"stock": stock, "green": {"us": 105.0, "ratio": 1.05, "paired": 1.04, "cpu_us": 99}},
            "pk": {"stock": stock, "green": {"us": 125.0, "ratio": 1.25, "paired": 1.2, "cpu_us": 120.0}},
        },
    }
    return run


def test_report_has_every_table_and_judges_the_targets(peers):
    run = fake_run(peers)
    text = peers.report(run, ["machine"], "2026-11-25 10:00 UTC", ["--rounds", "2"])
    for heading in ("## Results", "## greenpatch / peer", "## Memory", "## Targets (issue 6)"):
        assert heading in text
    assert "`python bench/peers.py --rounds 2`" in text
    targets = {t.what: t.ok for t in peers.targets(run)}
    assert targets["gp2 /db >= 1.2x gthread"] is True  # 2x
    assert targets["gp2 /slow c=256 >= 705 req/s, 0 errors"] is True
    assert targets["1000 in-flight /slow <= 30 MB above idle (1 process)"] is True
    assert targets["per-query overhead <= 1.1x stock PyMySQL (SELECT 1)"] is True
    assert targets["per-query overhead <= 1.1x stock PyMySQL (primary-key select)"] is False
    assert "## Per-query overhead" in text and "| 1.04x" in text
    # The median of rounds 0 and 1 of gp2 /db: (2000 + 2001) / 2.
    assert peers.median(run, "gp2", "db", "rps") == 2000.5
    assert "| 2.00x" in text


def test_ratio_targets_show_how_each_round_compared(peers):
    # Judged on the medians, as before; the spread of the per-round ratios
    # says how close the call was. Round 2 lacks gevent: it is left out.
    run = peers.Run(
        [peers.BY_NAME["gp2"], peers.BY_NAME["gevent"]], [peers.SCENARIO_BY_NAME["queries"]], 4, 5, 1
    )
    for rnd, (ours, theirs) in enumerate([(180.0, 200.0), (210.0, 200.0), (230.0, None), (220.0, 200.0)]):
        run.results.append(peers.Result("gp2", "queries", rnd, ours, 200.0, 500.0, 1000, 0, 40, 130.0))
        if theirs is not None:
            run.results.append(
                peers.Result("gevent", "queries", rnd, theirs, 10.0, 3000.0, 1000, 0, 40, 190.0)
            )
    assert peers.round_ratios(run, "gp2", "gevent", "queries") == [0.9, 1.05, 1.1]
    target = {t.what: t for t in peers.targets(run)}["gp2 /queries?q=20 >= 1x gevent"]
    assert target.ok is True  # medians: 215 vs 200
    assert target.measured == "1.07x (215 vs 200); rounds 0.90-1.10x, 2 of 3 >= 1x"
    assert peers.ratio_text(run, "gp2", "gevent", "queries", 1.2) == (
        "1.07x (215 vs 200); rounds 0.90-1.10x, 0 of 3 >= 1.2x",
        False,
    )
    # One round: no spread to show.
    one = peers.Run(run.configs, run.scenarios, 1, 5, 1, run.results[:2])
    assert peers.ratio_text(one, "gp2", "gevent", "queries", 1.0) == ("0.90x (180 vs 200)", False)
    assert peers.ratio_text(one, "gp2", "gthread", "queries", 1.0) is None


def test_ratio_targets_show_the_cpu_per_request_of_both(peers):
    # CPU/req: the peer's server + mariadbd CPU per request over ours, from
    # the medians of the two CPU columns; left out without the figures.
    run = peers.Run([peers.BY_NAME["gp2"], peers.BY_NAME["gthread"]], [peers.SCENARIO_BY_NAME["db"]], 3, 5, 1)
    for rnd, (ours, theirs) in enumerate([((700.0, 100.0), (900.0, 120.0)), ((760.0, 110.0), (1000.0, 110.0)),
                                          ((800.0, 100.0), (950.0, None))]):  # fmt: skip
        run.results.append(peers.Result("gp2", "db", rnd, 2000.0, 30.0, 70.0, 1000, 0, 40, 130.0, *ours))
        run.results.append(
            peers.Result("gthread", "db", rnd, 1600.0, 38.0, 98.0, 1000, 0, 32, 145.0, *theirs)
        )
    # gp2: 760 + 100 = 860; gthread: 950 + median of 120 and 110 = 1065.
    assert peers.cpu_ratio(run, "gp2", "gthread", "db") == pytest.approx(1065 / 860)
    text, ok = peers.ratio_text(run, "gp2", "gthread", "db", 1.2)
    assert text == "1.25x (2,000 vs 1,600); rounds 1.25-1.25x, 3 of 3 >= 1.2x; CPU/req 1.24x"
    assert ok is True
    for r in run.results:
        if r.config == "gthread":
            r.db_cpu_us = None
    assert peers.cpu_ratio(run, "gp2", "gthread", "db") is None
    assert "CPU/req" not in peers.ratio_text(run, "gp2", "gthread", "db", 1.2)[0]


def test_a_saved_run_gives_the_same_report(peers, tmp_path):
    run = fake_run(peers)
    path = tmp_path / "run.json"
    peers.save(str(path), run, ["machine"], "2026-11-25 10:00 UTC", ["--rounds", "2"])
    loaded, env, started, argv = peers.load(str(path))
    expected = peers.report(run, ["machine"], started, ["--rounds", "2"])
    assert peers.report(loaded, env, started, argv) == expected


def test_db_url_is_parsed_by_the_shared_helper_and_errors_name_the_option(peers):
    assert peers.server_params("mysql://app:p%40ss@db.example:3307/ignored") == {
        "host": "db.example",
        "port": 3307,
        "user": "app",
        "password": "p@ss",
    }
    with pytest.raises(SystemExit, match="--db-url: scheme 'postgres' unsupported"):
        peers.server_params("postgres://x@h/db")


def test_cpu_time_is_read_per_process_tree_and_reported_per_request(peers):
    import os
    import time

    before = peers.cpu_seconds([os.getpid()])
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    assert peers.cpu_seconds([os.getpid()]) - before >= 0.2
    assert peers.cpu_seconds([]) == 0.0
    assert peers.per_request(4000, 2.0, 0.4) == (500.0, 100.0)
    assert peers.per_request(4000, 2.0, None) == (500.0, None)
    assert peers.per_request(0, 2.0, 0.4) == (None, None)


def test_the_database_process_is_found_by_its_listening_port(peers):
    import os
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert peers.listening_pid(port) == os.getpid()
    assert peers.listening_pid(port) is None  # closed: nobody listens


def test_cpu_columns_show_medians_and_a_dash_for_runs_without_them(peers):
    run = peers.Run([peers.BY_NAME["gp2"], peers.BY_NAME["gthread"]], [peers.SCENARIO_BY_NAME["db"]], 3, 5, 1)
    for rnd, cpu in enumerate((400.0, 900.0, 500.0)):
        run.results.append(peers.Result("gp2", "db", rnd, 2000.0, 20.0, 60.0, 10000, 0, 40, 120.0, cpu, 80.0))
        run.results.append(peers.Result("gthread", "db", rnd, 1800.0, 25.0, 60.0, 9000, 0, 32, 140.0))
    rows = {line.split("|")[2].strip(): line for line in peers.results_table(run).splitlines()[2:]}
    assert rows["gp2"].rstrip(" |").endswith("| 500        | 80")
    assert rows["gthread"].rstrip(" |").endswith("| -          | -")


def test_request_cost_measures_both_configurations_and_drops_its_database():
    # bench/request_cost.py end to end, tiny: Django alone, then greenpatch,
    # each in its own process, against the test server.
    import re
    import subprocess

    import pymysql
    from conftest import DEFAULT_URL, db_params

    script = PEERS.parent / "request_cost.py"
    url = os.environ.get("GREENPATCH_TEST_DB_URL", DEFAULT_URL)
    out = subprocess.run(
        [sys.executable, str(script), "--paths", "/plain,/db", "--requests", "20", "--rounds", "2"]
        + ["--db-url", url],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    rows = re.findall(r"^\| `(/\w+)` \| (\d+) / (\d+) \| (\d+) / (\d+) \| ([+-]\d+) \|$", out.stdout, re.M)
    assert [row[0] for row in rows] == ["/plain", "/db"], out.stdout
    for _, *figures in rows:
        stock_min, stock_median, green_min, green_median = map(int, figures[:4])
        assert 0 < stock_min <= stock_median and 0 < green_min <= green_median
    params = {k: v for k, v in db_params().items() if k != "database"}
    conn = pymysql.connect(**params)
    try:
        with conn.cursor() as cur:
            assert cur.execute("SHOW DATABASES LIKE 'gp_peers'") == 0
    finally:
        conn.close()
