"""A representative slice of PyMySQL's own semantics, run through the green socket.

Every test opens its connections inside a greenpatch worker (and asserts
that they really use a `GreenSocket`), in a scratch database of the test
server. The last tests run the type round-trip on the blocking path too
(outside any worker, and from the main greenlet on a connection a worker
opened) and require identical results.

Server limits are read at runtime, never assumed: the shared server's
global variables are not changed. With MariaDB's default 16 MB
``max_allowed_packet`` (read-only per session), ``REPEAT()``/``CONCAT()``
cannot build a value above 16 MB and a statement can be at most 16 MB, but
the server does send rows larger than that; so the multi-packet paths are
covered by a row of two 10 MB columns, by a 20 MB LONGBLOB stored with
LOAD DATA LOCAL INFILE, and by packets exactly at the 0xFFFFFF boundary.
Only the literal 20 MB INSERT parameter needs a larger server setting and
is skipped, with the reason, when the server's value is too small.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
import time
import warnings
from datetime import date, datetime, timedelta
from decimal import Decimal

import pymysql
import pymysql.cursors
import pytest
from conftest import run_green, run_loop
from pymysql.constants import CLIENT, ER

import greenpatch
from greenpatch.socket import GreenSocket

MB = 1024 * 1024
MAX_PACKET_LEN = 0xFFFFFF  # largest payload of one MySQL protocol packet


# -- helpers ------------------------------------------------------------------

_opened: list[pymysql.connections.Connection] = []


@pytest.fixture(autouse=True)
def close_leftovers():
    """Close connections a failed test left open (from the main greenlet)."""
    yield
    while _opened:
        conn = _opened.pop()
        if conn.open:
            conn._force_close()


def green_connect(params: dict, **kwargs) -> pymysql.connections.Connection:
    """Open a PyMySQL connection; must be called inside a worker."""
    assert greenpatch.is_worker()
    conn = pymysql.connect(**params, **kwargs)
    _opened.append(conn)
    assert isinstance(conn._sock, GreenSocket), conn._sock
    return conn


def scalar(conn, sql: str, args=None):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()[0]


def seq_sql(n: int, select: str) -> str:
    """A query producing ``n`` rows numbered 1..n as column ``n``."""
    return (
        f"WITH RECURSIVE s (n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < {n:d}) "
        f"SELECT {select} FROM s ORDER BY n"
    )


def allow_deep_cte(conn) -> None:
    # Both servers cap recursive CTEs at about 1000 rows by default, each with
    # its own session variable (MariaDB silently truncates the result).
    for var in ("max_recursive_iterations", "cte_max_recursion_depth"):
        try:
            conn.query(f"SET SESSION {var} = 10000000")
        except pymysql.err.OperationalError as exc:
            assert exc.args[0] == ER.UNKNOWN_SYSTEM_VARIABLE, exc


def local_infile_or_skip(conn) -> None:
    """Skip (at runtime) when the server refuses LOAD DATA LOCAL INFILE."""
    if not scalar(conn, "SELECT @@GLOBAL.local_infile"):
        pytest.skip("server refuses LOAD DATA LOCAL INFILE: @@GLOBAL.local_infile is OFF")


def load_local(cur, sql: str) -> int:
    """Run a LOAD DATA LOCAL statement; skip if the server refuses the command."""
    try:
        return cur.execute(sql)
    except pymysql.MySQLError as exc:
        # 1148 ER_NOT_ALLOWED_COMMAND; 3948 (MySQL 8) local infile disabled.
        if exc.args[0] in (1148, 3948):
            pytest.skip(f"server refuses LOAD DATA LOCAL INFILE: {exc}")
        raise


# -- (1) type round-trips -----------------------------------------------------

TYPES_DDL = """
CREATE TABLE `{table}` (
    id INT PRIMARY KEY,
    ti TINYINT, i INT, iu INT UNSIGNED, bi BIGINT, bu BIGINT UNSIGNED,
    d DECIMAL(65, 30), f FLOAT, dbl DOUBLE,
    s VARCHAR(255), t MEDIUMTEXT,
    b BLOB, vb VARBINARY(300),
    dd DATE, dt DATETIME(6), tm TIME(6),
    j JSON, flag BOOL
) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin
"""

COLUMNS = (
    "id",
    "ti",
    "i",
    "iu",
    "bi",
    "bu",
    "d",
    "f",
    "dbl",
    "s",
    "t",
    "b",
    "vb",
    "dd",
    "dt",
    "tm",
    "j",
    "flag",
)

ALL_BYTES = bytes(range(256))
EMOJI_TEXT = "héllo wörld 😀🐍👍🏽 中文 ' \" \\ \x00 \n\r\t % %s end"
JSON_DOC = {"a": [1, 2.5, "😀", None, True], "nested": {"k": 'v "q"'}}

TYPE_ROWS = [
    (
        1,
        -128,
        -2147483648,
        4294967295,
        -9223372036854775808,
        18446744073709551615,
        Decimal("12345678901234567890123456789012345.123456789012345678901234567890"),
        1.5,
        3.141592653589793,
        EMOJI_TEXT,
        "🐍" * 20000 + EMOJI_TEXT,
        ALL_BYTES,
        ALL_BYTES[::-1],
        date(2024, 2, 29),
        datetime(2024, 2, 29, 23, 59, 58, 123456),
        timedelta(hours=838, minutes=59, seconds=59),
        json.dumps(JSON_DOC, ensure_ascii=False),
        True,
    ),
    (
        2,
        127,
        2147483647,
        0,
        9223372036854775807,
        0,
        Decimal("-0.000000000000000000000000000001"),
        -0.0,
        1e308,
        "",
        "",
        b"",
        b"\x00",
        date(1000, 1, 1),
        datetime(9999, 12, 31, 23, 59, 59, 999999),
        timedelta(hours=-5),
        "[]",
        False,
    ),
    (3, *([None] * (len(COLUMNS) - 1))),
    (
        4,
        0,
        0,
        1,
        0,
        1,
        Decimal("0E-30"),
        -2.5,
        0.1,
        "x" * 255,
        "plain ascii",
        b"\xff" * 1000,
        b"\x00\xff" * 150,
        date(1970, 1, 1),
        datetime(1970, 1, 1, 0, 0, 0),
        timedelta(days=1, hours=2, microseconds=5),
        "null",
        True,
    ),
]

# Parameters echoed back by a table-less SELECT: the literal path.
LITERALS = (
    None,
    True,
    False,
    0,
    -1,
    2**63 - 1,
    -(2**63),
    1.25,
    Decimal("-3.14159"),
    "😀 ünïcode",
    ALL_BYTES,
    date(2001, 2, 3),
    datetime(2001, 2, 3, 4, 5, 6, 7),
    timedelta(hours=1, minutes=2, seconds=3),
)


def expected_row(row: tuple) -> tuple:
    """What SELECT returns for a TYPE_ROWS row."""
    out = list(row)
    out[COLUMNS.index("flag")] = None if row[-1] is None else int(row[-1])  # BOOL is TINYINT(1)
    return tuple(out)


def roundtrip(conn, table: str) -> dict:
    """Insert TYPE_ROWS, read them back, echo LITERALS; return everything read."""
    with conn.cursor() as cur:
        cur.execute(TYPES_DDL.format(table=table))
        placeholders = ", ".join(["%s"] * len(COLUMNS))
        for row in TYPE_ROWS:
            cur.execute(f"INSERT INTO `{table}` VALUES ({placeholders})", row)
        conn.commit()
        cur.execute(f"SELECT * FROM `{table}` ORDER BY id")
        rows = cur.fetchall()
        description = [d[:2] for d in cur.description]
        cur.execute(
            "SELECT " + ", ".join(["%s"] * len(LITERALS)) + ", NULL, TRUE, CAST('1.10' AS DECIMAL(5, 3)), "
            "CAST(X'00FF' AS BINARY), JSON_OBJECT('e', '😀'), 18446744073709551615, "
            "CAST('12:34:56.5' AS TIME(1)), CAST('-00:00:01' AS TIME)",
            LITERALS,
        )
        literals = cur.fetchone()
        cur.execute(f"SELECT HEX(b), LENGTH(b), CHAR_LENGTH(s), HEX(s) FROM `{table}` WHERE id = 1")
        server_view = cur.fetchone()
    return {"rows": rows, "description": description, "literals": literals, "server_view": server_view}


def check_roundtrip(result: dict) -> None:
    assert result["rows"] == tuple(expected_row(r) for r in TYPE_ROWS)
    by_col = dict(zip(COLUMNS, result["rows"][0], strict=True))
    assert by_col["b"] == ALL_BYTES and isinstance(by_col["b"], bytes)
    assert by_col["s"] == EMOJI_TEXT and isinstance(by_col["s"], str)
    assert json.loads(by_col["j"]) == JSON_DOC
    assert isinstance(by_col["d"], Decimal) and isinstance(by_col["bu"], int)
    assert isinstance(by_col["dt"], datetime) and isinstance(by_col["tm"], timedelta)
    assert result["literals"][: len(LITERALS)] == (
        None,
        1,
        0,
        0,
        -1,
        2**63 - 1,
        -(2**63),
        1.25,
        Decimal("-3.14159"),
        "😀 ünïcode",
        ALL_BYTES,
        "2001-02-03",
        "2001-02-03 04:05:06.000007",
        "01:02:03",
    )
    assert result["literals"][len(LITERALS) :] == (
        None,
        1,
        Decimal("1.100"),
        b"\x00\xff",
        '{"e": "😀"}',
        18446744073709551615,
        timedelta(seconds=45296, microseconds=500000),
        -timedelta(seconds=1),
    )
    # The server stored the exact bytes and characters, not a re-encoding.
    assert result["server_view"] == (
        ALL_BYTES.hex().upper(),
        256,
        len(EMOJI_TEXT),
        EMOJI_TEXT.encode("utf-8").hex().upper(),
    )


def test_type_roundtrip_green(patched, scratch_db):
    def work():
        conn = green_connect(scratch_db)
        try:
            return roundtrip(conn, "types_green")
        finally:
            conn.close()

    check_roundtrip(run_green(work))


# -- (2) executemany ---------------------------------------------------------


def com_counter(conn, name: str) -> int:
    with conn.cursor() as cur:
        cur.execute("SHOW SESSION STATUS LIKE %s", (name,))
        return int(cur.fetchone()[1])


def test_executemany_batched_insert_1000_rows(patched, scratch_db):
    rows = [
        (i, f"row {i} ✓ {'😀' * (i % 7)}", bytes([i % 256]) * (i % 5000), Decimal(i) / 7) for i in range(1000)
    ]
    rows = [(i, s, b, d.quantize(Decimal("0.000001"))) for i, s, b, d in rows]

    def work():
        conn = green_connect(scratch_db, autocommit=True)
        with conn.cursor() as cur:
            cur.execute(
                "CREATE TABLE many (id INT PRIMARY KEY, s VARCHAR(100), b BLOB, d DECIMAL(12, 6)) "
                "CHARACTER SET utf8mb4"
            )
            before = com_counter(conn, "Com_insert")
            affected = cur.executemany("INSERT INTO many (id, s, b, d) VALUES (%s, %s, %s, %s)", rows)
            statements = com_counter(conn, "Com_insert") - before
            cur.execute("SELECT COUNT(*), SUM(id), SUM(LENGTH(b)) FROM many")
            totals = cur.fetchone()
            cur.execute("SELECT id, s, b, d FROM many ORDER BY id")
            back = cur.fetchall()
            # A non-INSERT statement takes the one-execute-per-row path.
            before = com_counter(conn, "Com_update")
            updated = cur.executemany(
                "UPDATE many SET s = %s WHERE id = %s", [("upd", i) for i in range(100)]
            )
            updates = com_counter(conn, "Com_update") - before
            cur.execute("SELECT COUNT(*) FROM many WHERE s = 'upd'")
            n_upd = cur.fetchone()[0]
        conn.close()
        return affected, statements, totals, back, updated, updates, n_upd

    affected, statements, totals, back, updated, updates, n_upd = run_green(work)
    assert affected == 1000
    # Batched: ~2.5 MB of values in multi-row INSERTs of at most ~1 MB each.
    assert 2 <= statements <= 10
    assert totals == (1000, sum(range(1000)), sum(len(r[2]) for r in rows))
    assert back == tuple(rows)
    assert (updated, updates, n_upd) == (100, 100, 100)


# -- (3) transactions --------------------------------------------------------


def test_transactions_commit_rollback_and_begin(patched, scratch_db):
    def work():
        conn = green_connect(scratch_db)  # PyMySQL's default: autocommit off
        observer = green_connect(scratch_db, autocommit=True)
        seen = {}

        def visible():
            return scalar(observer, "SELECT COUNT(*) FROM tx")

        assert conn.get_autocommit() is False
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE tx (id INT PRIMARY KEY) ENGINE=InnoDB")
            cur.execute("INSERT INTO tx VALUES (1), (2)")
            seen["uncommitted"] = visible()
            seen["own_view"] = scalar(conn, "SELECT COUNT(*) FROM tx")
            conn.commit()
            seen["committed"] = visible()
            cur.execute("INSERT INTO tx VALUES (3)")
            conn.rollback()
            seen["rolled_back"] = visible()

            conn.autocommit(True)
            seen["autocommit"] = conn.get_autocommit()
            cur.execute("INSERT INTO tx VALUES (4)")
            seen["autocommitted"] = visible()

            conn.begin()
            seen["in_trans_flag"] = bool(
                conn.server_status & pymysql.constants.SERVER_STATUS.SERVER_STATUS_IN_TRANS
            )
            cur.execute("INSERT INTO tx VALUES (5)")
            seen["begin_uncommitted"] = visible()
            conn.rollback()
            seen["begin_rolled_back"] = visible()
            conn.begin()
            cur.execute("INSERT INTO tx VALUES (6)")
            conn.commit()
            seen["begin_committed"] = visible()
            cur.execute("SELECT id FROM tx ORDER BY id")
            seen["ids"] = [r[0] for r in cur.fetchall()]
        conn.close()
        observer.close()
        return seen

    assert run_green(work) == {
        "uncommitted": 0,
        "own_view": 2,
        "committed": 2,
        "rolled_back": 2,
        "autocommit": True,
        "autocommitted": 3,
        "in_trans_flag": True,
        "begin_uncommitted": 3,
        "begin_rolled_back": 3,
        "begin_committed": 4,
        "ids": [1, 2, 4, 6],
    }


def test_row_lock_wait_in_one_worker_lets_the_holder_commit(patched, scratch_db):
    """Worker B waits on a row lock held by worker A on the same loop.

    With a blocking socket B's wait would freeze the loop, A could never
    commit, and B would fail with a lock wait timeout (1205).
    """
    setup = {}

    def waiter():
        conn = green_connect(scratch_db, autocommit=True)
        conn.query("SET SESSION innodb_lock_wait_timeout = 10")
        setup["b_thread"] = conn.thread_id()
        t0 = time.monotonic()
        with conn.cursor() as cur:
            cur.execute("UPDATE acct SET v = v + 1 WHERE id = 1")
        waited = time.monotonic() - t0
        value = scalar(conn, "SELECT v FROM acct WHERE id = 1")
        conn.close()
        return waited, value

    def holder():
        conn = green_connect(scratch_db)
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE acct (id INT PRIMARY KEY, v INT) ENGINE=InnoDB")
            cur.execute("INSERT INTO acct VALUES (1, 100)")
            conn.commit()
            cur.execute("SELECT v FROM acct WHERE id = 1 FOR UPDATE")
            future = greenpatch.spawn(waiter)
            # Wait until B's UPDATE is actually blocked inside the server.
            deadline = time.monotonic() + 5
            while True:
                greenpatch.sleep(0.02)
                if "b_thread" in setup:
                    cur.execute(
                        "SELECT INFO FROM information_schema.PROCESSLIST WHERE ID = %s", (setup["b_thread"],)
                    )
                    info = (cur.fetchone() or [None])[0]
                    if info and info.startswith("UPDATE acct"):
                        break
                assert time.monotonic() < deadline, "worker B never reached its UPDATE"
            greenpatch.sleep(0.1)
            cur.execute("UPDATE acct SET v = 200 WHERE id = 1")
            conn.commit()
        conn.close()
        return greenpatch.wait(future)

    waited, value = run_green(holder)
    assert value == 201
    assert waited >= 0.1


# -- (4) errors ----------------------------------------------------------------


def test_errors_map_to_pep249_classes_and_connection_survives(patched, scratch_db):
    def work():
        conn = green_connect(scratch_db, autocommit=True)
        caught = {}
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE u (id INT PRIMARY KEY, name VARCHAR(10) UNIQUE)")
            cur.execute("INSERT INTO u VALUES (1, 'a')")
            for label, sql in [
                ("syntax", "SELEKT 1"),
                ("duplicate", "INSERT INTO u VALUES (1, 'b')"),
                ("duplicate_unique", "INSERT INTO u VALUES (2, 'a')"),
                ("unknown_table", "SELECT * FROM no_such_table"),
                ("unknown_column", "SELECT nope FROM u"),
                ("too_long", "INSERT INTO u VALUES (3, 'waaaaaaaaaay too long')"),
            ]:
                try:
                    cur.execute(sql)
                except pymysql.MySQLError as exc:
                    caught[label] = (type(exc), exc.args[0])
                    # Still usable after every error.
                    cur.execute("SELECT 1 + 1")
                    assert cur.fetchone() == (2,)
                else:
                    caught[label] = None
            cur.execute("SELECT COUNT(*) FROM u")
            count = cur.fetchone()[0]
        assert isinstance(conn._sock, GreenSocket) and conn.open
        conn.close()
        return caught, count

    caught, count = run_green(work)
    assert caught == {
        "syntax": (pymysql.err.ProgrammingError, ER.PARSE_ERROR),  # 1064
        "duplicate": (pymysql.err.IntegrityError, ER.DUP_ENTRY),  # 1062
        "duplicate_unique": (pymysql.err.IntegrityError, ER.DUP_ENTRY),
        "unknown_table": (pymysql.err.ProgrammingError, ER.NO_SUCH_TABLE),  # 1146
        "unknown_column": (pymysql.err.OperationalError, ER.BAD_FIELD_ERROR),  # 1054
        "too_long": (pymysql.err.DataError, ER.DATA_TOO_LONG),  # 1406 (strict mode)
    }
    assert ER.PARSE_ERROR == 1064 and ER.DUP_ENTRY == 1062 and ER.NO_SUCH_TABLE == 1146
    assert count == 1


# -- (5) cursor classes --------------------------------------------------------

N_STREAM = 50_000


def test_dict_cursor(patched, scratch_db):
    def work():
        conn = green_connect(scratch_db, cursorclass=pymysql.cursors.DictCursor)
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE p (id INT PRIMARY KEY, name VARCHAR(20), parent INT)")
            cur.executemany("INSERT INTO p VALUES (%s, %s, %s)", [(1, "root", None), (2, "kid 😀", 1)])
            cur.execute("SELECT * FROM p ORDER BY id")
            rows = cur.fetchall()
            # Duplicate column names: the later one is qualified by its table.
            cur.execute("SELECT c.id, p.id, c.name FROM p AS c JOIN p ON p.id = c.parent")
            joined = cur.fetchall()
            cur.execute("SELECT %(a)s AS a, %(b)s AS b", {"a": "x", "b": None})
            named = cur.fetchone()
        conn.close()
        return rows, joined, named

    rows, joined, named = run_green(work)
    assert rows == [{"id": 1, "name": "root", "parent": None}, {"id": 2, "name": "kid 😀", "parent": 1}]
    assert joined == [{"id": 2, "p.id": 1, "name": "kid 😀"}]
    assert named == {"a": "x", "b": None}


def test_sscursor_streams_50000_rows(patched, scratch_db):
    def work():
        conn = green_connect(scratch_db)
        allow_deep_cte(conn)
        cur = conn.cursor(pymysql.cursors.SSCursor)
        cur.execute(seq_sql(N_STREAM, "n, CONCAT('row-', n), n * n"))
        assert conn._result.unbuffered_active  # nothing buffered yet
        first = cur.fetchone()
        some = cur.fetchmany(999)
        count, total, last = 1 + len(some), first[0] + sum(r[0] for r in some), None
        for row in cur:  # iterate the rest, row by row off the socket
            assert row[1] == f"row-{row[0]}" and row[2] == row[0] * row[0]
            count += 1
            total += row[0]
            last = row
        assert not conn._result.unbuffered_active
        cur.close()

        # An SSCursor closed half-way drains the rest; the connection goes on.
        cur = conn.cursor(pymysql.cursors.SSCursor)
        cur.execute(seq_sql(N_STREAM, "n"))
        head = cur.fetchmany(10)
        cur.close()
        after = scalar(conn, "SELECT 'still in sync'")
        conn.close()
        return first, count, total, last, head, after

    first, count, total, last, head, after = run_green(work)
    assert first == (1, "row-1", 1)
    assert count == N_STREAM and total == N_STREAM * (N_STREAM + 1) // 2
    assert last == (N_STREAM, f"row-{N_STREAM}", N_STREAM * N_STREAM)
    assert list(head) == [(i,) for i in range(1, 11)]
    assert after == "still in sync"


def test_ssdictcursor(patched, scratch_db):
    def work():
        conn = green_connect(scratch_db)
        allow_deep_cte(conn)
        with conn.cursor(pymysql.cursors.SSDictCursor) as cur:
            cur.execute(seq_sql(5000, "n AS id, REPEAT('é', n % 10) AS s"))
            rows = list(cur.fetchall_unbuffered())
            cur.execute("SELECT 1 AS one, NULL AS nothing")
            single = cur.fetchone()
            tail = cur.fetchone()
        conn.close()
        return rows, single, tail

    rows, single, tail = run_green(work)
    assert len(rows) == 5000
    assert rows[0] == {"id": 1, "s": "é"} and rows[-1] == {"id": 5000, "s": ""}
    assert all(r["s"] == "é" * (r["id"] % 10) for r in rows)
    assert single == {"one": 1, "nothing": None} and tail is None


# -- (6) results and statements beyond 16 MB -----------------------------------


def test_single_row_over_16mb_from_two_columns(patched, scratch_db):
    """One row of two 10 MB columns: a 20 MB row packet split in two."""

    def work():
        conn = green_connect(scratch_db)
        with conn.cursor() as cur:
            cur.execute("SELECT REPEAT('x', 10 * 1024 * 1024), REPEAT('y', 10 * 1024 * 1024), 'tail'")
            row = cur.fetchone()
        after = scalar(conn, "SELECT 42")
        conn.close()
        return row, after

    (x, y, tail), after = run_green(work)
    assert x == "x" * (10 * MB) and y == "y" * (10 * MB) and tail == "tail"
    assert after == 42


def test_packets_exactly_at_the_16mb_boundary(patched, scratch_db):
    """Row payloads of 0xFFFFFF - 1, 0xFFFFFF (+ an empty packet) and 0xFFFFFF + 1
    bytes; a COM_QUERY of exactly 0xFFFFFF bytes (a full packet + an empty one)."""

    def work():
        conn = green_connect(scratch_db, autocommit=True)
        server_max = scalar(conn, "SELECT @@GLOBAL.max_allowed_packet")
        if server_max < MAX_PACKET_LEN + 1:
            pytest.skip(f"server max_allowed_packet={server_max} is below 16 MB")
        got = {}
        with conn.cursor() as cur:
            # A one-column row is a 4-byte length prefix plus the value.
            for payload in (MAX_PACKET_LEN - 1, MAX_PACKET_LEN, MAX_PACKET_LEN + 1):
                cur.execute("SELECT REPEAT('z', %s)", (payload - 4,))
                value = cur.fetchone()[0]
                got[payload] = (len(value), value == "z" * (payload - 4))
            cur.execute("CREATE TABLE big (id INT PRIMARY KEY, b LONGBLOB)")
            # Size the statement so that command byte + SQL is exactly
            # 0xFFFFFF, whatever PyMySQL's literal for bytes looks like.
            template = "INSERT INTO big VALUES (1, %s)"
            overhead = len(cur.mogrify(template, (b"",)).encode())
            per_byte = len(cur.mogrify(template, (b"q",)).encode()) - overhead
            size, pad = divmod(MAX_PACKET_LEN - 1 - overhead, per_byte)
            sql = cur.mogrify(template, (b"q" * size,)) + " " * pad
            assert len(sql.encode()) + 1 == MAX_PACKET_LEN
            cur.execute(sql)
            cur.execute("SELECT LENGTH(b), b = REPEAT('q', %s) FROM big", (size,))
            stored = cur.fetchone()
        conn.close()
        return got, size, stored

    got, size, stored = run_green(work)
    assert got == {p: (p - 4, True) for p in (MAX_PACKET_LEN - 1, MAX_PACKET_LEN, MAX_PACKET_LEN + 1)}
    assert stored == (size, 1)


def test_20mb_longblob_via_load_data_and_select(patched, scratch_db, tmp_path):
    """A single 20 MB LONGBLOB value, stored without raising max_allowed_packet.

    REPEAT() would return NULL past max_allowed_packet and an INSERT statement
    cannot exceed it, but LOAD DATA LOCAL streams the file in small packets
    and the server sends the 20 MB row back regardless of the setting.
    """
    blob = (bytes(range(256)).replace(b"\t", b"").replace(b"\n", b"").replace(b"\\", b"") * 90_000)[: 20 * MB]
    path = tmp_path / "big.tsv"
    path.write_bytes(b"1\t" + blob + b"\n")

    def work():
        conn = green_connect(scratch_db, local_infile=True, autocommit=True)
        local_infile_or_skip(conn)
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE big (id INT PRIMARY KEY, b LONGBLOB)")
            loaded = load_local(cur, f"LOAD DATA LOCAL INFILE '{path}' INTO TABLE big CHARACTER SET binary")
            cur.execute("SELECT id, b, LENGTH(b) FROM big")
            row = cur.fetchone()
        with conn.cursor(pymysql.cursors.SSCursor) as cur:
            cur.execute("SELECT b FROM big")
            streamed = cur.fetchone()[0]
        conn.close()
        return loaded, row, streamed

    loaded, (id_, value, length), streamed = run_green(work)
    assert loaded == 1 and id_ == 1 and length == 20 * MB
    assert value == blob and streamed == blob


def test_20mb_insert_parameter(patched, scratch_db):
    value = bytes(range(256)) * (20 * MB // 256)

    def work():
        conn = green_connect(scratch_db, autocommit=True)
        server_max = scalar(conn, "SELECT @@GLOBAL.max_allowed_packet")
        needed = len(conn.escape(value)) + 64  # the INSERT's size, as sent
        if server_max <= needed:
            conn.close()
            pytest.skip(
                f"server max_allowed_packet={server_max} is not above {needed}: a 20 MB statement would "
                "be refused (error 1153); the global is not raised on a shared server (the session value "
                "is read-only)"
            )
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE big (id INT PRIMARY KEY, b LONGBLOB)")
            cur.execute("INSERT INTO big VALUES (1, %s)", (value,))
            cur.execute("SELECT b FROM big")
            back = cur.fetchone()[0]
        conn.close()
        return back

    assert run_green(work) == value


def test_many_rows_totalling_over_16mb(patched, scratch_db):
    n, width = 48, 512 * 1024  # 24 MB

    def work():
        conn = green_connect(scratch_db)
        allow_deep_cte(conn)
        sql = seq_sql(n, f"n, REPEAT(CHAR(64 + n % 26 USING ascii), {width})")
        with conn.cursor() as cur:
            cur.execute(sql)
            buffered = cur.fetchall()
        with conn.cursor(pymysql.cursors.SSCursor) as cur:
            cur.execute(sql)
            streamed = [(r[0], len(r[1]), r[1][:1]) for r in cur]
        conn.close()
        return buffered, streamed

    buffered, streamed = run_green(work)
    assert sum(len(r[1]) for r in buffered) > 16 * MB
    assert [r[0] for r in buffered] == list(range(1, n + 1))
    assert all(r[1] == chr(64 + r[0] % 26) * width for r in buffered)
    assert streamed == [(i, width, chr(64 + i % 26)) for i in range(1, n + 1)]


# -- (7) multi statements ------------------------------------------------------


def test_multi_statements_and_nextset(patched, scratch_db):
    def work():
        conn = green_connect(scratch_db, client_flag=CLIENT.MULTI_STATEMENTS, autocommit=True)
        sets = []
        with conn.cursor() as cur:
            cur.execute(
                "CREATE TABLE m (id INT); INSERT INTO m VALUES (1), (2), (3); "
                "SELECT id FROM m ORDER BY id; SELECT 'two', '😀'; UPDATE m SET id = id * 10; "
                "SELECT SUM(id) FROM m"
            )
            while True:
                sets.append((cur.rowcount, cur.fetchall() if cur.description else None))
                if not cur.nextset():
                    break
            assert cur.nextset() is None
            # An error in a later statement surfaces from nextset().
            cur.execute("SELECT 'first'; SELECT * FROM missing_table; SELECT 'never'")
            first = cur.fetchall()
            with pytest.raises(pymysql.err.ProgrammingError) as info:
                cur.nextset()
            errno_ = info.value.args[0]
            after = scalar(conn, "SELECT 'usable'")
        conn.close()
        return sets, first, errno_, after

    sets, first, errno_, after = run_green(work)
    assert sets == [
        (0, None),
        (3, None),
        (3, ((1,), (2,), (3,))),
        (1, (("two", "😀"),)),
        (3, None),
        (1, ((Decimal(60),),)),
    ]
    assert first == (("first",),) and errno_ == ER.NO_SUCH_TABLE and after == "usable"


# -- (8) stored procedures ----------------------------------------------------


def test_callproc_with_result_sets_and_out_params(patched, scratch_db):
    def work():
        conn = green_connect(scratch_db, autocommit=True)
        with conn.cursor() as cur:
            cur.execute(
                "CREATE PROCEDURE p (IN a INT, INOUT b INT, OUT c VARCHAR(40)) "
                "BEGIN "
                "  SELECT a AS x, b AS y; "
                "  SELECT CONCAT('😀', a) AS e UNION ALL SELECT 'second'; "
                "  SET b = a + b; SET c = CONCAT('got ', a); "
                "END"
            )
            returned = cur.callproc("p", (3, 4, None))
            sets = [tuple(cur.fetchall())]
            while cur.nextset():
                sets.append(tuple(cur.fetchall()))
            cur.execute("SELECT @_p_0, @_p_1, @_p_2")
            out = cur.fetchone()
            cur.callproc("p", (1, 1, None))  # left with pending result sets
            cur.execute("SELECT 'next query drains them'")
            after = cur.fetchone()
        conn.close()
        return returned, sets, out, after

    returned, sets, out, after = run_green(work)
    assert returned == (3, 4, None)
    assert sets == [((3, 4),), (("😀3",), ("second",)), ()]
    assert out == (3, 7, "got 3")
    assert after == ("next query drains them",)


# -- (9) ping, select_db, thread_id -----------------------------------------------


def test_ping_select_db_thread_id(patched, scratch_db):
    other_db = scratch_db["database"] + "_b"

    def work():
        conn = green_connect(scratch_db, autocommit=True)
        admin = green_connect(scratch_db, autocommit=True)
        res = {}
        try:
            res["thread_id"] = conn.thread_id() == scalar(conn, "SELECT CONNECTION_ID()")
            conn.ping()
            res["ping_ok"] = conn.open
            admin.query(f"CREATE DATABASE `{other_db}`")
            conn.select_db(other_db)
            res["db_after_select"] = scalar(conn, "SELECT DATABASE()") == other_db
            conn.select_db(scratch_db["database"])
            res["db_back"] = scalar(conn, "SELECT DATABASE()") == scratch_db["database"]
            with pytest.raises(pymysql.err.OperationalError) as info:
                conn.select_db("gp_no_such_database_xyz")
            res["select_db_error"] = info.value.args[0]
            conn.ping()

            # Killed from outside: ping() raises, ping(reconnect=True)
            # reconnects - again through a GreenSocket.
            old_id = conn.thread_id()
            admin.kill(old_id)
            deadline = time.monotonic() + 5
            while scalar(
                admin, "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = %s", (old_id,)
            ):
                assert time.monotonic() < deadline
                greenpatch.sleep(0.02)
            with pytest.raises(pymysql.err.OperationalError):
                conn.ping()
            res["closed_after_failed_ping"] = not conn.open
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                conn.ping(reconnect=True)
            res["reconnected_green"] = isinstance(conn._sock, GreenSocket)
            res["new_thread"] = conn.thread_id() != old_id
            res["new_thread_matches"] = conn.thread_id() == scalar(conn, "SELECT CONNECTION_ID()")
        finally:
            admin.query(f"DROP DATABASE IF EXISTS `{other_db}`")
            admin.close()
            conn.close()
        return res

    assert run_green(work) == {
        "thread_id": True,
        "ping_ok": True,
        "db_after_select": True,
        "db_back": True,
        "select_db_error": ER.BAD_DB_ERROR,  # 1049
        "closed_after_failed_ping": True,
        "reconnected_green": True,
        "new_thread": True,
        "new_thread_matches": True,
    }


# -- (10) LOAD DATA LOCAL INFILE ------------------------------------------------


def test_load_data_local_infile(patched, scratch_db, tmp_path):
    lines = [f"{i},name {i} 😀,{i * 1.5}" for i in range(20_000)]
    path = tmp_path / "rows.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def work():
        conn = green_connect(scratch_db, local_infile=True, autocommit=True)
        local_infile_or_skip(conn)
        with conn.cursor() as cur:
            cur.execute(
                "CREATE TABLE ld (id INT PRIMARY KEY, name VARCHAR(50), v DOUBLE) CHARACTER SET utf8mb4"
            )
            loaded = load_local(
                cur,
                f"LOAD DATA LOCAL INFILE '{path}' INTO TABLE ld CHARACTER SET utf8mb4 "
                "FIELDS TERMINATED BY ',' LINES TERMINATED BY '\\n'",
            )
            cur.execute("SELECT COUNT(*), SUM(id), SUM(v) FROM ld")
            totals = cur.fetchone()
            cur.execute("SELECT * FROM ld WHERE id IN (0, 19999) ORDER BY id")
            ends = cur.fetchall()
            # A missing local file is an error, and the connection stays in sync.
            with pytest.raises(pymysql.err.OperationalError) as info:
                cur.execute(f"LOAD DATA LOCAL INFILE '{tmp_path / 'missing.csv'}' INTO TABLE ld")
            missing = info.value.args[0]
            after = scalar(conn, "SELECT COUNT(*) FROM ld")
        conn.close()
        return loaded, totals, ends, missing, after

    loaded, totals, ends, missing, after = run_green(work)
    assert loaded == 20_000
    assert totals == (20_000, sum(range(20_000)), sum(i * 1.5 for i in range(20_000)))
    assert ends == ((0, "name 0 😀", 0.0), (19999, "name 19999 😀", 19999 * 1.5))
    assert missing == ER.FILE_NOT_FOUND and after == 20_000


def test_concurrent_workers_overlap_on_one_loop(patched, scratch_db):
    def query(i):
        conn = green_connect(scratch_db)
        try:
            return scalar(conn, "SELECT SLEEP(0.4) + %s", (i,))
        finally:
            conn.close()

    async def main():
        t0 = time.monotonic()
        results = await asyncio.gather(*(greenpatch.spawn(query, i) for i in range(5)))
        return time.monotonic() - t0, results

    elapsed, results = run_loop(main)
    assert results == [0, 1, 2, 3, 4]
    assert elapsed < 1.2  # serially it would take 2 s


# -- (11) the same round-trip on the blocking paths ------------------------------


def test_type_roundtrip_identical_on_blocking_paths(patched, scratch_db):
    def green_work():
        conn = green_connect(scratch_db)
        try:
            return roundtrip(conn, "types_green")
        finally:
            conn.close()

    green = run_green(green_work)

    # Outside any worker, after patching: PyMySQL's own blocking socket.
    conn = pymysql.connect(**scratch_db)
    assert type(conn._sock) is socket.socket
    try:
        blocking = roundtrip(conn, "types_blocking")
    finally:
        conn.close()

    # Opened by a worker, used from the main greenlet once its loop is gone:
    # the GreenSocket's blocking fallback.
    conn = run_green(green_connect, scratch_db)
    assert isinstance(conn._sock, GreenSocket)
    try:
        main_greenlet = roundtrip(conn, "types_main")
    finally:
        conn.close()

    # Opened by a worker of one loop, used by a worker of another loop.
    conn = run_green(green_connect, scratch_db)
    try:
        other_loop = run_green(roundtrip, conn, "types_other_loop")
        assert isinstance(conn._sock, GreenSocket)
    finally:
        conn.close()

    check_roundtrip(green)
    assert blocking == green
    assert main_greenlet == green
    assert other_loop == green


def test_green_connection_closed_from_main_greenlet_closes_its_socket(patched, scratch_db):
    """close() after the worker's loop is gone must close the socket itself, not
    leave it to the garbage collector (an fd leak and a ResourceWarning)."""
    conn = run_green(green_connect, scratch_db)
    fd = conn._sock.fileno()
    inode = os.fstat(fd).st_ino  # identifies this socket even if the fd number is reused
    laddr = repr(conn._sock.getsockname())
    assert scalar(conn, "SELECT 'used from main'") == "used from main"
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        conn.close()
        try:
            open_before_gc = os.fstat(fd).st_ino == inode
        except OSError:
            open_before_gc = False
        gc.collect()
    assert not conn.open
    leaked = [
        str(w.message) for w in caught if issubclass(w.category, ResourceWarning) and laddr in str(w.message)
    ]
    assert not open_before_gc and not leaked, f"socket {laddr} not closed by close(): {leaked}"
