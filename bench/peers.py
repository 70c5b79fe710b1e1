"""greenpatch against its peers: one Django app, several servers, one load generator.

Serves ``bench/tfb`` (TechEmpower-style ``/plain``, ``/db``, ``/queries``,
``/updates``, plus ``/slow``: ``SELECT SLEEP(0.05)`` then a row) with each
configuration in turn and loads it with ``wrk`` on loopback. Rounds are
interleaved (A B C ... then ... C B A), each measurement is a fresh ``wrk``
run after a warm-up, and the tables report medians over rounds.

For every configuration and scenario: requests/s, p50/p99 latency, errors
(non-2xx answers and socket errors), the most MySQL sessions the app held
(sampled server-side), the server's RSS (all its processes, sampled), and
CPU time per request of the server (all its processes) and of ``mariadbd``:
on a shared machine req/s move with whatever else runs, CPU per request much
less.
Then greenpatch's memory for 1,000 in-flight ``/slow`` requests, the
targets of issue 6 with PASS/MISS, ``bench/results.md`` and a PNG chart.

By default the database is a private ``mariadbd`` started for the run (in
a temporary directory, ``max_connections=2000``, so no peer is refused for
lack of connections); ``--db-url`` uses an existing server instead.

Run ``scripts/bench`` (it installs what this needs), or see ``--help``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from urllib.parse import quote

import pymysql

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # for query_overhead, when loaded by path (tests)
    sys.path.insert(0, str(HERE))
ROOT = HERE.parent
APP_DIR = HERE / "tfb"
DB_NAME = "gp_peers"  # each configuration has its own copy: DB_NAME + "_" + its name
ROWS = 10_000
SLOW_SECONDS = 0.05


# -- configurations -----------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    name: str
    label: str
    processes: int
    engine: str
    pool: int | None = None  # connections per process, for pooled configs
    conn_max_age: int = 0
    kind: str = "greenpatch"  # greenpatch | runserver | gthread | gevent
    greenpatch: bool = False
    settings: tuple[tuple[str, str], ...] = ()  # greenpatch settings (environment) of its own

    @property
    def database(self) -> str:
        """Its own copy of the World table: the sessions column counts only its own."""
        return f"{DB_NAME}_{self.name.replace('-', '_')}"

    def command(self, port: int) -> list[str]:
        py = sys.executable
        if self.kind == "greenpatch":
            return [
                py,
                "-m",
                "greenpatch",
                "serve",
                "tfb.wsgi:application",
                "--port",
                str(port),
                "--processes",
                str(self.processes),
                "--no-access-log",
                "--log-level",
                "WARNING",
                "--graceful-timeout",
                "5",
            ]
        if self.kind == "runserver":
            return [py, str(APP_DIR / "manage.py"), "runserver", f"127.0.0.1:{port}", "--noreload"]
        worker = ["-k", "gthread", "--threads", "16"] if self.kind == "gthread" else ["-k", "gevent"]
        return [
            py,
            "-m",
            "gunicorn",
            "tfb.wsgi:application",
            "-b",
            f"127.0.0.1:{port}",
            "-w",
            str(self.processes),
            *worker,
            "--graceful-timeout",
            "5",
            "--log-level",
            "warning",
        ]

    def env(self, db: dict) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BENCH_", "GREENPATCH", "DJANGO_"))}
        env.update(
            PYTHONPATH=os.pathsep.join([str(APP_DIR), str(ROOT)]),
            DJANGO_SETTINGS_MODULE="tfb.settings",
            BENCH_ENGINE=self.engine,
            BENCH_POOL_SIZE=str(self.pool or 0),
            BENCH_CONN_MAX_AGE=str(self.conn_max_age),
            BENCH_SLOW_SECONDS=str(SLOW_SECONDS),
            BENCH_DB_HOST=db["host"],
            BENCH_DB_PORT=str(db["port"]),
            BENCH_DB_USER=db["user"],
            BENCH_DB_PASSWORD=db["password"],
            BENCH_DB_NAME=self.database,
        )
        if not self.greenpatch:
            env["GREENPATCH"] = "0"
        env.update(self.settings)
        return env


def gp2_with(name: str, what: str, setting: str, value: str) -> Config:
    """``gp2`` with one greenpatch setting of its own."""
    return Config(
        name, f"gp2 with {what}: {setting}={value}", 2, "greenpatch", pool=20, greenpatch=True,
        settings=((setting, value),),
    )  # fmt: skip


CONFIGS = [
    Config("gp1", "greenpatch, 1 process, pool 40", 1, "greenpatch", pool=40, greenpatch=True),
    Config("gp2", "greenpatch, 2 processes x pool 20", 2, "greenpatch", pool=20, greenpatch=True),
    gp2_with("gp2-t5", "a turn budget", "GREENPATCH_TURN_BUDGET", "0.005"),
    gp2_with("gp2-pygc", "Python's own garbage collector settings", "GREENPATCH_GC", "python"),
    Config(
        "gthread",
        "gunicorn gthread 2x16, PyMySQL, CONN_MAX_AGE=60",
        2,
        "pymysql",
        conn_max_age=60,
        kind="gthread",
    ),
    Config(
        "gthread-c",
        "gunicorn gthread 2x16, mysqlclient, CONN_MAX_AGE=60",
        2,
        "mysqlclient",
        conn_max_age=60,
        kind="gthread",
    ),
    Config(
        "gevent", "gunicorn gevent x2, PyMySQL, SQLAlchemy pool 20", 2, "sqla-pool", pool=20, kind="gevent"
    ),
    Config("runserver", "Django runserver (threaded), PyMySQL", 1, "pymysql", kind="runserver"),
]
BY_NAME = {c.name: c for c in CONFIGS}


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    concurrency: int


SCENARIOS = [
    Scenario("plain", "/plain", 64),
    Scenario("db", "/db", 64),
    Scenario("queries", "/queries?q=20", 64),
    Scenario("updates", "/updates?q=5", 64),
    Scenario("slow", "/slow", 64),
    Scenario("slow-256", "/slow", 256),
]
SCENARIO_BY_NAME = {s.name: s for s in SCENARIOS}


# -- measuring -------------------------------------------------------------------------


@dataclass
class Result:
    config: str
    scenario: str
    round: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    db_sessions: int
    rss_mb: float
    cpu_us: float | None = None  # server CPU time per request (all its processes)
    db_cpu_us: float | None = None  # mariadbd CPU time per request (None: pid unknown)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict:
    """Requests/s, p50/p99 (ms), requests and errors from ``wrk --latency`` output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not (rps and total and p50 and p99):
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors += sum(int(x) for x in sock.groups())
    return {
        "rps": float(rps.group(1)),
        "requests": int(total.group(1)),
        "p50_ms": _ms(p50.group(1)),
        "p99_ms": _ms(p99.group(1)),
        "errors": errors,
    }


def wrk(url: str, concurrency: int, seconds: int) -> dict:
    cmd = [
        "wrk",
        "-t",
        "1",
        "-c",
        str(concurrency),
        "-d",
        f"{seconds:d}s",
        "--timeout",
        "30s",
        "--latency",
        url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    return parse_wrk(out)


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def rss_mb(root: int) -> float:
    total = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes ``pids`` (all their threads) used so far."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICKS


def listening_pid(port: int) -> int | None:
    """The process listening on TCP ``port`` (of this machine), if it can be seen."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in list(f)[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                    inodes.add(f"socket:[{cols[9]}]")
    if not inodes:
        return None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(fd.path) in inodes:
                        return int(entry.name)
    return None


class Sampler:
    """Samples the server's RSS and the app's MySQL sessions while a run lasts,
    and takes the CPU time of the server and of the database server."""

    def __init__(self, pid: int, db: dict, database: str, interval: float = 0.1) -> None:
        self.pid, self.database, self.interval = pid, database, interval
        self.db_pid = db.get("pid")
        self.conn = pymysql.connect(**connect_params(db), database=None, autocommit=True)
        self.max_rss = 0.0
        self.max_sessions = 0
        self.cpu = 0.0
        self.db_cpu: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.conn.cursor() as cur:
            while not self._stop.is_set():
                sql = "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = %s"
                cur.execute(sql, (self.database,))
                self.max_sessions = max(self.max_sessions, cur.fetchone()[0])
                self.max_rss = max(self.max_rss, rss_mb(self.pid))
                self._stop.wait(self.interval)

    def _cpu(self) -> tuple[float, float | None]:
        db = cpu_seconds([self.db_pid]) if self.db_pid else None
        return cpu_seconds(process_tree(self.pid)), db

    def __enter__(self) -> Sampler:
        self._cpu0 = self._cpu()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        cpu, db_cpu = self._cpu()
        self.cpu = cpu - self._cpu0[0]
        if db_cpu is not None and self._cpu0[1] is not None:
            self.db_cpu = db_cpu - self._cpu0[1]
        self._stop.set()
        self._thread.join()
        self.conn.close()


# -- servers ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, config: Config, db: dict, logdir: Path) -> None:
        self.config = config
        self.port = free_port()
        self.log = logdir / f"{config.name}.log"
        self._log = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            config.command(self.port),
            env=config.env(db),
            cwd=APP_DIR,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(self.url("/db"), timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.config.name} did not start; its log:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.terminate()
        self.finish()

    def terminate(self) -> None:
        """Ask the server to stop (SIGTERM to its process group); `finish` waits."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)

    def finish(self) -> None:
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()


def stop_all(servers: list[Server]) -> None:
    """Stop servers at once (each has a graceful timeout to sit out)."""
    for server in servers:
        server.terminate()
    for server in servers:
        server.finish()


# -- database --------------------------------------------------------------------------


def server_params(url: str) -> dict:
    """host, port, user and password of ``--db-url`` (its database, if any, is not used)."""
    from query_overhead import parse_db_url  # bench/ is on sys.path (see the top)

    params = parse_db_url(url, setting="--db-url")
    del params["database"]
    return params


def connect_params(db: dict) -> dict:
    """What `pymysql.connect` takes of a `database` dict."""
    return {k: db[k] for k in ("host", "port", "user", "password")}


@contextlib.contextmanager
def database(url: str | None):
    """Connection params of the server to use, and its ``pid`` when it runs on
    this machine (None if not seen); a private mariadbd unless ``url``."""
    if url:
        params = server_params(url)
        local = params["host"] in ("127.0.0.1", "localhost", "::1")
        yield {**params, "pid": listening_pid(params["port"]) if local else None}
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from private_mariadb import PrivateMariaDB

    with PrivateMariaDB(
        max_connections=2000,
        innodb_buffer_pool_size="256M",
        innodb_log_file_size="64M",
        thread_cache_size=256,
    ) as server:
        yield {**connect_params(server.params), "pid": server.pid}


def create_world(db: dict, name: str = DB_NAME) -> None:
    conn = pymysql.connect(**connect_params(db), autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
            cur.execute(f"CREATE DATABASE `{name}`")
            cur.execute(
                f"CREATE TABLE `{name}`.World (id INT PRIMARY KEY AUTO_INCREMENT,"
                " randomnumber INT NOT NULL) ENGINE=InnoDB"
            )
            rng = random.Random(1)
            rows = [(i, rng.randint(1, ROWS)) for i in range(1, ROWS + 1)]
            cur.executemany(f"INSERT INTO `{name}`.World (id, randomnumber) VALUES (%s, %s)", rows)
    finally:
        conn.close()


def drop_world(db: dict, name: str = DB_NAME) -> None:
    with contextlib.suppress(pymysql.MySQLError):
        conn = pymysql.connect(**connect_params(db), autocommit=True)
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


# -- the run -----------------------------------------------------------------------------


@dataclass
class Run:
    configs: list[Config]
    scenarios: list[Scenario]
    rounds: int
    duration: int
    warmup: int
    results: list[Result] = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    overhead: dict = field(default_factory=dict)  # query_overhead.py's figures


def measure(server: Server, db: dict, scenario: Scenario, run: Run, rnd: int) -> Result:
    url = server.url(scenario.path)
    if run.warmup:
        wrk(url, scenario.concurrency, run.warmup)
    with Sampler(server.proc.pid, db, server.config.database) as sampler:
        figures = wrk(url, scenario.concurrency, run.duration)
    return Result(
        server.config.name,
        scenario.name,
        rnd,
        figures["rps"],
        figures["p50_ms"],
        figures["p99_ms"],
        figures["requests"],
        figures["errors"],
        sampler.max_sessions,
        sampler.max_rss,
        *per_request(figures["requests"], sampler.cpu, sampler.db_cpu),
    )


def per_request(requests: int, cpu: float, db_cpu: float | None) -> tuple[float | None, float | None]:
    """CPU seconds of the server and of the database as microseconds per request."""
    if not requests:
        return None, None
    return cpu / requests * 1e6, None if db_cpu is None else db_cpu / requests * 1e6


def schedule(run: Run) -> Iterator[tuple[int, Scenario, Config]]:
    """(round, scenario, configuration) in the order they are measured.

    Each scenario is measured on every configuration back to back, in an
    order that turns around at every step (A B C, C B A, ...) and, for the
    same scenario, from one round to the next.
    """
    for rnd in range(run.rounds):
        for i, scenario in enumerate(run.scenarios):
            for config in run.configs if (rnd + i) % 2 == 0 else run.configs[::-1]:
                yield rnd, scenario, config


def run_benchmark(run: Run, db: dict, logdir: Path, memory_clients: int, overhead_rounds: int) -> None:
    total = run.rounds * len(run.configs) * len(run.scenarios) + bool(memory_clients) + bool(overhead_rounds)
    from tqdm import tqdm

    progress = tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True)
    try:
        # Every configuration's server runs on its own database, measured in the
        # order of schedule(): what drifts within a round hits every
        # configuration alike, and no configuration is always first (or last)
        # of a scenario. Every server is started afresh for each round: a
        # server's speed stays with its processes (the same configuration
        # started three times in one run served /db at 1,553, 1,880 and 2,030
        # req/s over the same rounds, and in the next run the three ranked the
        # other way round), a spread larger than the ratios judged here. New
        # processes each round make it one more round-to-round variation,
        # which the medians over rounds absorb.
        servers: list[Server] = []
        try:
            by_name: dict[str, Server] = {}
            current = -1
            for rnd, scenario, config in schedule(run):
                if rnd != current:
                    current = rnd
                    progress.set_description(f"round {rnd + 1}/{run.rounds}: starting the servers")
                    stop_all(servers)
                    servers = []
                    for c in run.configs:
                        servers.append(Server(c, db, logdir))
                    for server in servers:
                        server.wait_ready()
                    by_name = {server.config.name: server for server in servers}
                where = f"round {rnd + 1}/{run.rounds} {scenario.name}"
                progress.set_description(f"{where} {config.name}")
                run.results.append(measure(by_name[config.name], db, scenario, run, rnd))
                progress.update(1)
        finally:
            stop_all(servers)
        if memory_clients:
            progress.set_description(f"memory: {memory_clients} in-flight /slow, 1 process")
            run.memory = measure_memory(db, logdir, memory_clients, run.duration)
            progress.update(1)
        if overhead_rounds:
            progress.set_description(f"per-query overhead: query_overhead.py, {overhead_rounds} rounds")
            run.overhead = measure_query_overhead(db, overhead_rounds, logdir)
            progress.update(1)
    finally:
        progress.close()


MEMORY_HEADER = ["config", "what", "idle", "loaded", "delta", "req/s", "p50 ms", "p99 ms", "errors",
                 "MySQL sessions"]  # fmt: skip

# One process each, 40 connections: what 1,000 in-flight requests cost.
MEMORY_CONFIGS = [
    BY_NAME["gp1"],
    Config(
        "gevent-1", "gunicorn gevent x1, PyMySQL, SQLAlchemy pool 40", 1, "sqla-pool", pool=40, kind="gevent"
    ),
]


def measure_memory(db: dict, logdir: Path, clients: int, seconds: int) -> dict:
    """RSS of one process (greenpatch, and gevent for comparison): warm and idle,
    then at most while ``clients`` ``/slow`` requests are in flight."""
    out = {}
    for config in MEMORY_CONFIGS:
        server = Server(config, db, logdir)
        try:
            server.wait_ready()
            wrk(server.url("/db"), 64, 1)  # fill the pool, warm every code path
            wrk(server.url("/slow"), 64, 1)
            time.sleep(1.0)
            idle = rss_mb(server.proc.pid)
            with Sampler(server.proc.pid, db, config.database) as sampler:
                figures = wrk(server.url("/slow"), clients, max(seconds, 5))
            out[config.name] = {
                "label": config.label,
                "clients": clients,
                "idle_mb": idle,
                "loaded_mb": sampler.max_rss,
                "delta_mb": sampler.max_rss - idle,
                "rps": figures["rps"],
                "p50_ms": figures["p50_ms"],
                "p99_ms": figures["p99_ms"],
                "errors": figures["errors"],
                "db_sessions": sampler.max_sessions,
            }
        finally:
            server.stop()
    return out


def measure_query_overhead(db: dict, rounds: int, logdir: Path) -> dict:
    """Run bench/query_overhead.py (green vs stock PyMySQL, one connection) on the same server."""
    out = logdir / "query_overhead.json"
    url = f"mysql://{quote(db['user'])}:{quote(db['password'])}@{db['host']}:{db['port']}/test"
    cmd = [
        sys.executable, str(HERE / "query_overhead.py"), "--rounds", str(rounds), "--queries", "500",
        "--connects", "0", "--idle-workers", "0", "--periodic-ms", "0", "--json", str(out),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREENPATCH")}
    env["GREENPATCH_TEST_DB_URL"] = url
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
    return json.loads(out.read_text())


# -- reporting ---------------------------------------------------------------------------


def median(run: Run, config: str, scenario: str, attr: str) -> float | None:
    """Median over rounds (rounds without the figure, e.g. an older run's JSON, left out)."""
    values = [
        v
        for r in run.results
        if r.config == config and r.scenario == scenario and (v := getattr(r, attr)) is not None
    ]
    return statistics.median(values) if values else None


def round_ratios(run: Run, ours: str, theirs: str, scenario: str) -> list[float]:
    """req/s of ``ours`` over ``theirs`` in each round that measured both.

    Configurations run one after the other within a round, so a ratio of
    one round compares two measurements a few seconds apart: how far these
    spread says how close a call the ratio of medians is.
    """
    by_round: dict[int, dict[str, float]] = {}
    for r in run.results:
        if r.scenario == scenario and r.config in (ours, theirs) and r.rps:
            by_round.setdefault(r.round, {})[r.config] = r.rps
    return [v[ours] / v[theirs] for _, v in sorted(by_round.items()) if len(v) == 2]


def cpu_ratio(run: Run, ours: str, theirs: str, scenario: str) -> float | None:
    """CPU per request of ``theirs`` over that of ``ours``: server plus ``mariadbd``.

    From the medians of the results table's two CPU columns; None when
    either is missing (an older run's JSON, an unknown ``mariadbd`` pid).
    Above 1: ``ours`` costs the machine less per request.
    """
    cost = {}
    for config in (ours, theirs):
        server, db = median(run, config, scenario, "cpu_us"), median(run, config, scenario, "db_cpu_us")
        if server is None or db is None:
            return None
        cost[config] = server + db
    return cost[theirs] / cost[ours]


def ratio_text(run: Run, ours: str, theirs: str, scenario: str, need: float) -> tuple[str, bool] | None:
    """A target's "measured" cell for a req/s ratio, and whether it is met
    (on the ratio of the medians); None when either was not measured."""
    a, b = median(run, ours, scenario, "rps"), median(run, theirs, scenario, "rps")
    if a is None or b is None:
        return None
    text = f"{a / b:.2f}x ({a:,.0f} vs {b:,.0f})"
    per_round = round_ratios(run, ours, theirs, scenario)
    if len(per_round) > 1:
        met = sum(r >= need for r in per_round)
        text += f"; rounds {min(per_round):.2f}-{max(per_round):.2f}x, {met} of {len(per_round)} >= {need:g}x"
    cpu = cpu_ratio(run, ours, theirs, scenario)
    if cpu is not None:
        text += f"; CPU/req {cpu:.2f}x"
    return text, a >= need * b


def total_errors(run: Run, config: str, scenario: str) -> int:
    return sum(r.errors for r in run.results if r.config == config and r.scenario == scenario)


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (also readable as plain text)."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def results_table(run: Run) -> str:
    header = ["scenario", "config", "req/s", "p50 ms", "p99 ms", "errors", "MySQL sessions", "RSS MB",
              "CPU us/req", "DB CPU us/req"]  # fmt: skip

    def us(config: str, scenario: str, attr: str) -> str:
        value = median(run, config, scenario, attr)
        return "-" if value is None else f"{value:,.0f}"

    rows = []
    for s in run.scenarios:
        for c in run.configs:
            rps = median(run, c.name, s.name, "rps")
            if rps is None:
                continue
            rows.append(
                [
                    f"{s.path} c={s.concurrency}",
                    c.name,
                    f"{rps:,.0f}",
                    f"{median(run, c.name, s.name, 'p50_ms'):.1f}",
                    f"{median(run, c.name, s.name, 'p99_ms'):.1f}",
                    str(total_errors(run, c.name, s.name)),
                    f"{median(run, c.name, s.name, 'db_sessions'):.0f}",
                    f"{median(run, c.name, s.name, 'rss_mb'):.0f}",
                    us(c.name, s.name, "cpu_us"),
                    us(c.name, s.name, "db_cpu_us"),
                ]
            )
    return table(header, rows)


def ratio_table(run: Run) -> str:
    peers = [c for c in run.configs if not c.greenpatch]
    ours = [c for c in run.configs if c.greenpatch]
    header = ["scenario", *(f"{g.name}/{p.name}" for g in ours for p in peers)]
    rows = []
    for s in run.scenarios:
        row = [f"{s.path} c={s.concurrency}"]
        for g in ours:
            for p in peers:
                a, b = median(run, g.name, s.name, "rps"), median(run, p.name, s.name, "rps")
                row.append(f"{a / b:.2f}x" if a and b else "-")
        rows.append(row)
    return table(header, rows)


@dataclass
class Target:
    what: str
    measured: str
    ok: bool | None  # None: not measured in this run


def targets(run: Run) -> list[Target]:
    out: list[Target] = []

    def rps(c: str, s: str) -> float | None:
        return median(run, c, s, "rps")

    for g in ("gp2", "gp1"):
        r, p99 = rps(g, "slow-256"), median(run, g, "slow-256", "p99_ms")
        peer_p99 = median(run, "gthread", "slow-256", "p99_ms")
        if r is None:
            out.append(Target(f"{g} /slow c=256 >= 705 req/s, 0 errors", "not measured", None))
            continue
        errors = total_errors(run, g, "slow-256")
        out.append(
            Target(
                f"{g} /slow c=256 >= 705 req/s, 0 errors",
                f"{r:,.0f} req/s, {errors} errors",
                r >= 705 and errors == 0,
            )
        )
        if peer_p99 is not None:
            out.append(
                Target(
                    f"{g} /slow c=256 p99 <= gthread's", f"{p99:.0f} ms vs {peer_p99:.0f} ms", p99 <= peer_p99
                )
            )
    for s, factor in (("plain", 1.2), ("db", 1.2), ("queries", 1.0), ("updates", 1.0)):
        for peer, need in (("gthread", factor), ("gevent", 1.0)):
            what = f"gp2 {SCENARIO_BY_NAME[s].path} >= {need:g}x {peer}"
            judged = ratio_text(run, "gp2", peer, s, need)
            out.append(Target(what, *judged) if judged else Target(what, "not measured", None))
    for kind, label in (("select1", "SELECT 1"), ("pk", "primary-key select")):
        f = run.overhead.get("figures", {}).get(kind)
        if f:
            paired = f["green"]["paired"]
            out.append(
                Target(
                    f"per-query overhead <= 1.1x stock PyMySQL ({label})",
                    f"{paired:.2f}x ({f['green']['us']:.0f} vs {f['stock']['us']:.0f} us)",
                    paired <= 1.1,
                )
            )
    if "gp1" in run.memory:
        m = run.memory["gp1"]
        measured = f"{m['delta_mb']:.1f} MB ({m['idle_mb']:.0f} -> {m['loaded_mb']:.0f} MB)"
        if m["clients"] != 1000:
            measured += f" with {m['clients']} in flight"
        ok = m["delta_mb"] <= 30 if m["clients"] == 1000 else None
        out.append(Target("1000 in-flight /slow <= 30 MB above idle (1 process)", measured, ok))
    return out


def targets_table(items: list[Target]) -> str:
    mark = {True: "PASS", False: "MISS", None: "-"}
    return table(["target", "measured", ""], [[t.what, t.measured, mark[t.ok]] for t in items])


def environment(db: dict) -> list[str]:
    def ver(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "-"

    conn = pymysql.connect(**connect_params(db))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT VERSION()")
            server = cur.fetchone()[0]
    finally:
        conn.close()
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    return [
        f"{platform.python_implementation()} {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "greenpatch "
        + ver("greenpatch")
        + ", Django "
        + ver("Django")
        + ", PyMySQL "
        + ver("PyMySQL")
        + ", mysqlclient "
        + ver("mysqlclient")
        + ", Tornado "
        + ver("tornado")
        + ", greenlet "
        + ver("greenlet")
        + ", gunicorn "
        + ver("gunicorn")
        + ", gevent "
        + ver("gevent")
        + ", SQLAlchemy "
        + ver("SQLAlchemy"),
        f"server {server}; load: {wrk_version.strip()} (1 thread) on the same machine",
    ]


def report(run: Run, env: list[str], started: str, argv: list[str]) -> str:
    cfgs = table(
        ["config", "what", "processes", "connections"],
        [
            [
                c.name,
                c.label,
                str(c.processes),
                f"pool {c.pool} per process"
                if c.pool
                else ("1 per thread, kept 60 s" if c.conn_max_age else "1 per request"),
            ]
            for c in run.configs
        ],
    )
    parts = [
        "# greenpatch vs peers",
        "",
        f"Run {started}, `python bench/peers.py {' '.join(argv)}`: {run.rounds} interleaved rounds, "
        f"{run.duration:g} s per measurement after a {run.warmup:g} s warm-up; medians over rounds "
        "(errors: summed).",
        "",
        *(f"- {line}" for line in env),
        "",
        "## Configurations",
        "",
        cfgs,
        "",
        "## Results",
        "",
        "CPU us/req: CPU time (user + system) of the server's processes during the measurement, per "
        "request served; DB CPU us/req: the same for `mariadbd`. The CPU is the limit here: req/s follow "
        "CPU per request, and both drift with the machine's speed.",
        "",
        results_table(run),
        "",
        "## greenpatch / peer, requests per second",
        "",
        ratio_table(run),
        "",
    ]
    if run.memory:
        clients = next(iter(run.memory.values()))["clients"]
        rows = [
            [name, m["label"], f"{m['idle_mb']:.1f}", f"{m['loaded_mb']:.1f}", f"+{m['delta_mb']:.1f}",
             f"{m['rps']:,.0f}", f"{m['p50_ms']:.0f}", f"{m['p99_ms']:.0f}", str(m["errors"]),
             str(m["db_sessions"])]
            for name, m in run.memory.items()
        ]  # fmt: skip
        parts += [
            "## Memory",
            "",
            f"One process, {clients} concurrent `/slow` requests (RSS of the whole process, MB; idle: "
            "warm, after a 64-client warm-up):",
            "",
            table(MEMORY_HEADER, rows),
            "",
        ]
    if run.overhead:
        rows = []
        for kind, label in (("select1", "`SELECT 1`"), ("pk", "primary-key select")):
            f = run.overhead["figures"].get(kind)
            if f:
                rows.append([label, f"{f['stock']['us']:.1f}", f"{f['green']['us']:.1f}",
                             f"{f['green']['paired']:.2f}x", f"{f['stock']['cpu_us']:.0f}",
                             f"{f['green']['cpu_us']:.0f}"])  # fmt: skip
        parts += [
            "## Per-query overhead",
            "",
            f"`bench/query_overhead.py`, one connection, {run.overhead['rounds']} interleaved rounds of "
            f"{run.overhead['queries']} queries: stock blocking PyMySQL vs the same inside a worker.",
            "",
            table(["query", "stock us", "green us", "paired ratio", "stock CPU us", "green CPU us"], rows),
            "",
        ]
    parts += [
        "## Targets (issue 6)",
        "",
        "Ratios of requests/s are judged on the medians. Beside them: the range of the per-round "
        "ratios, and CPU/req, the peer's CPU time per request (its server's and `mariadbd`'s) over "
        "greenpatch's, medians: what a request costs the machine, without idle time or the load "
        "generator's share.",
        "",
        targets_table(targets(run)),
        "",
    ]
    return "\n".join(parts)


def chart(run: Run, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = run.scenarios
    configs = run.configs
    cols = min(3, len(scenarios))
    rows = -(-len(scenarios) // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.6 * rows), squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(scenarios) :]:
        ax.set_visible(False)
    colors = plt.get_cmap("tab10").colors
    for ax, s in zip(axes, scenarios, strict=False):
        values = [median(run, c.name, s.name, "rps") or 0 for c in configs]
        bars = ax.bar(range(len(configs)), values, color=[colors[i % 10] for i in range(len(configs))])
        ax.set_title(f"{s.path}  c={s.concurrency}", fontsize=9)
        ax.set_xticks(range(len(configs)), [c.name for c in configs], rotation=45, fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
        for bar, c in zip(bars, configs, strict=True):
            p99 = median(run, c.name, s.name, "p99_ms")
            if p99 is not None:
                ax.annotate(
                    f"{p99:.0f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=6,
                )
    for row in grid:
        row[0].set_ylabel("requests/s (median)", fontsize=8)
    fig.suptitle("greenpatch vs peers (bench/peers.py); the number on a bar: p99 latency, ms", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line ------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark greenpatch against gunicorn (gthread, gevent) and runserver with wrk.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--db-url",
        help="use this server (mysql://user:password@host:port) instead of a "
        "private mariadbd; the user must be able to create the databases gp_peers_*",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--duration", type=int, default=5, help="seconds per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of warm-up before each (0: none)")
    parser.add_argument(
        "--configs", default=",".join(BY_NAME), help="comma-separated subset of: " + ", ".join(BY_NAME)
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIO_BY_NAME),
        help="comma-separated subset of: " + ", ".join(SCENARIO_BY_NAME),
    )
    parser.add_argument(
        "--memory-clients",
        type=int,
        default=1000,
        help="in-flight /slow requests for the memory figure (0: skip it)",
    )
    parser.add_argument(
        "--overhead-rounds",
        type=int,
        default=21,
        help="rounds of bench/query_overhead.py for the per-query figure (0: skip it)",
    )
    parser.add_argument("--out", default=str(HERE / "results.md"), help="Markdown report ('' to skip)")
    parser.add_argument("--chart", default=str(HERE / "results.png"), help="PNG chart ('' to skip)")
    parser.add_argument(
        "--json", default=str(HERE / "results.json"), help="raw measurements, written as soon as measured"
    )
    parser.add_argument(
        "--report-only",
        metavar="JSON",
        help="measure nothing: rebuild the report and chart from a --json file of an earlier run",
    )
    args = parser.parse_args(argv)

    def pick(text: str, known: dict, what: str) -> list:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            parser.error(f"--{what}={text!r}: unknown {unknown or 'empty'}; accepted: {', '.join(known)}")
        return [known[n] for n in names]

    args.configs = pick(args.configs, BY_NAME, "configs")
    args.scenarios = pick(args.scenarios, SCENARIO_BY_NAME, "scenarios")
    for name in ("rounds", "duration"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name}={getattr(args, name)}: use an integer > 0")
    if args.warmup < 0 or args.memory_clients < 0 or args.overhead_rounds < 0:
        parser.error("--warmup, --memory-clients and --overhead-rounds: use an integer >= 0")
    return args


def raise_fd_limit(need: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


def save(path: str, run: Run, env: list[str], started: str, argv: list[str]) -> None:
    data = {
        "started": started,
        "argv": argv,
        "environment": env,
        "rounds": run.rounds,
        "duration": run.duration,
        "warmup": run.warmup,
        "configs": [c.name for c in run.configs],
        "scenarios": [s.name for s in run.scenarios],
        "results": [r.__dict__ for r in run.results],
        "memory": run.memory,
        "overhead": run.overhead,
    }
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def load(path: str) -> tuple[Run, list[str], str, list[str]]:
    data = json.loads(Path(path).read_text())
    run = Run(
        [BY_NAME[n] for n in data["configs"]],
        [SCENARIO_BY_NAME[n] for n in data["scenarios"]],
        data["rounds"],
        data["duration"],
        data["warmup"],
        [Result(**r) for r in data["results"]],
        data["memory"],
        data.get("overhead", {}),
    )
    return run, data["environment"], data["started"], data["argv"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        run, env, started, run_argv = load(args.report_only)
    else:
        if shutil.which("wrk") is None:
            raise SystemExit(
                "wrk not found: install it (Debian/Ubuntu: apt-get install wrk), or run scripts/bench"
            )
        raise_fd_limit(8192)  # wrk and the servers inherit it
        started = time.strftime("%Y-%m-%d %H:%M %Z")
        run_argv = sys.argv[1:] if argv is None else list(argv)
        run = Run(args.configs, args.scenarios, args.rounds, args.duration, args.warmup)
        with tempfile.TemporaryDirectory(prefix="gp-peers-") as tmp, database(args.db_url) as db:
            names = sorted({c.database for c in [*run.configs, *MEMORY_CONFIGS]})
            try:
                for name in names:
                    create_world(db, name)
                env = environment(db)
                print("\n".join(env), flush=True)
                run_benchmark(run, db, Path(tmp), args.memory_clients, args.overhead_rounds)
            finally:
                for name in names:
                    drop_world(db, name)
        if args.json:
            save(args.json, run, env, started, run_argv)
            print(f"written: {args.json}")
    text = report(run, env, started, run_argv)
    print()
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        print(f"written: {args.out}")
    if args.chart:
        chart(run, Path(args.chart))
        print(f"written: {args.chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
