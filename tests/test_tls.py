"""Cooperative TLS against a private MariaDB that has a certificate we made.

The CA and the server certificate (SAN: IP 127.0.0.1 only) are
generated with ``cryptography`` (a test extra), so no ``openssl`` binary is
needed. Everything runs through `greenpatch.patch_all()` (``patched``).
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
import time

import pymysql
import pytest
from conftest import run_green, run_loop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from private_mariadb import MariaDBUnavailable, PrivateMariaDB, skip_or_fail

import greenpatch
from greenpatch.socket import GreenSocket

pytestmark = pytest.mark.private_server


# -- certificates ---------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "greenpatch test server")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            # IP only: "localhost" is deliberately not a valid name for it.
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


# -- fixtures -------------------------------------------------------------------


class TLSServer:
    def __init__(self, server: PrivateMariaDB, ca: str, wrong_ca: str) -> None:
        self.server = server
        self.ca = ca
        self.wrong_ca = wrong_ca
        self.params = server.params


@pytest.fixture(scope="module")
def tls_server():
    try:
        server = PrivateMariaDB()
    except MariaDBUnavailable as exc:
        skip_or_fail(exc)
    try:
        ca_key, ca_cert = make_ca("greenpatch test CA")
        key, cert = make_server_cert(ca_key, ca_cert)
        _, other_ca = make_ca("some other CA")
        ca = server.write_file("ca.pem", _pem_cert(ca_cert))
        wrong_ca = server.write_file("wrong-ca.pem", _pem_cert(other_ca))
        server_cert = server.write_file("server-cert.pem", _pem_cert(cert))
        server_key = server.write_file("server-key.pem", _pem_key(key))
        server.options.update(ssl_ca=ca, ssl_cert=server_cert, ssl_key=server_key)
    except BaseException:
        server.close()
        raise
    with server:
        yield TLSServer(server, str(ca), str(wrong_ca))


def _cipher(conn) -> str:
    with conn.cursor() as cur:
        cur.execute("SHOW STATUS LIKE 'Ssl_cipher'")
        row = cur.fetchone()
    return row[1] if row else ""


def _scalar(conn, sql: str, args=None):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()[0]


# -- tests ----------------------------------------------------------------------


def test_server_really_has_tls(tls_server):
    # Sanity check outside greenpatch: the stock client verifies our CA.
    conn = pymysql.connect(**tls_server.params, ssl={"ca": tls_server.ca})
    try:
        assert _cipher(conn)
        assert _scalar(conn, "SELECT @@have_ssl") == "YES"
    finally:
        conn.close()


def test_verified_tls_in_worker(patched, tls_server):
    def work():
        conn = pymysql.connect(**tls_server.params, ssl={"ca": tls_server.ca})
        try:
            assert isinstance(conn._sock, GreenSocket)
            cipher = _cipher(conn)
            with conn.cursor() as cur:
                cur.execute("CREATE TEMPORARY TABLE t (id INT PRIMARY KEY, v TEXT)")
                cur.executemany("INSERT INTO t VALUES (%s, %s)", [(i, "x" * (i * 1000)) for i in range(50)])
                cur.execute("SELECT SUM(LENGTH(v)), COUNT(*) FROM t")
                total = cur.fetchone()
                # A result far larger than one TLS record / one socket read.
                cur.execute("SELECT REPEAT('a', 1000000)")
                big = cur.fetchone()[0]
            return cipher, total, len(big), conn._secure
        finally:
            conn.close()

    cipher, total, big, secure = run_green(work)
    assert cipher
    assert total == (sum(i * 1000 for i in range(50)), 50)
    assert big == 1_000_000
    assert secure


def test_verify_identity_in_worker(patched, tls_server):
    # ssl_verify_identity checks the SAN against host=127.0.0.1 (an IP SAN).
    def work():
        conn = pymysql.connect(
            **tls_server.params, ssl_ca=tls_server.ca, ssl_verify_cert=True, ssl_verify_identity=True
        )
        try:
            return _cipher(conn), isinstance(conn._sock, GreenSocket)
        finally:
            conn.close()

    cipher, green = run_green(work)
    assert cipher and green


def test_wrong_ca_fails_and_loop_continues(patched, tls_server):
    ticks = []

    async def main():
        from tornado.ioloop import PeriodicCallback

        pc = PeriodicCallback(lambda: ticks.append(time.monotonic()), 10)
        pc.start()

        def bad():
            with pytest.raises(pymysql.err.OperationalError) as info:
                pymysql.connect(
                    **tls_server.params, ssl_ca=tls_server.wrong_ca, ssl_verify_cert=True, connect_timeout=5
                )
            return info.value

        def good():
            conn = pymysql.connect(**tls_server.params, ssl={"ca": tls_server.ca})
            try:
                return _cipher(conn)
            finally:
                conn.close()

        try:
            error = await greenpatch.spawn(bad)
            # The same loop and more workers are fine afterwards.
            cipher = await greenpatch.spawn(good)
            await greenpatch.spawn(greenpatch.sleep, 0.05)
        finally:
            pc.stop()
        return error, cipher

    error, cipher = run_loop(main, timeout=30)
    assert error.args[0] == 2003
    assert "CERTIFICATE_VERIFY_FAILED" in str(error) or "certificate verify failed" in str(error)
    assert isinstance(error.original_exception, ssl.SSLError)
    assert cipher
    assert len(ticks) >= 3


def test_verify_identity_rejects_name_not_in_certificate(patched, tls_server):
    # The certificate names only IP 127.0.0.1: "localhost" reaches the same
    # server but must fail hostname checking, exactly as in stock PyMySQL.
    def work():
        with pytest.raises(pymysql.err.OperationalError) as info:
            pymysql.connect(
                **dict(tls_server.params, host="localhost"),
                ssl_ca=tls_server.ca,
                ssl_verify_identity=True,
                connect_timeout=5,
            )
        return info.value

    error = run_green(work)
    assert error.args[0] == 2003
    assert isinstance(error.original_exception, ssl.SSLCertVerificationError)
    assert "localhost" in str(error.original_exception)


def test_verify_cert_without_identity_accepts_other_name(patched, tls_server):
    # ssl_verify_cert without ssl_verify_identity: the chain is checked, the
    # name is not (ctx.check_hostname is False), so "localhost" is fine.
    def work():
        conn = pymysql.connect(
            **dict(tls_server.params, host="localhost"), ssl_ca=tls_server.ca, ssl_verify_cert=True
        )
        try:
            return _cipher(conn), isinstance(conn._sock, GreenSocket)
        finally:
            conn.close()

    cipher, green = run_green(work)
    assert cipher and green


def test_parallel_tls_workers_overlap(patched, tls_server):
    n = 5

    def work(i):
        conn = pymysql.connect(**tls_server.params, ssl={"ca": tls_server.ca})
        try:
            assert _cipher(conn)
            started = time.monotonic()
            value = _scalar(conn, "SELECT SLEEP(0.3) + %s", (i,))
            return value, started, time.monotonic()
        finally:
            conn.close()

    async def main():
        import asyncio

        begin = time.monotonic()
        results = await asyncio.gather(*(greenpatch.spawn(work, i) for i in range(n)))
        return results, time.monotonic() - begin

    results, elapsed = run_loop(main, timeout=30)
    assert sorted(int(r[0]) for r in results) == list(range(n))
    # Serialised this would take n * 0.3 = 1.5 s plus handshakes.
    assert elapsed < 0.3 * n / 2, elapsed
    latest_start = max(r[1] for r in results)
    earliest_end = min(r[2] for r in results)
    assert latest_start < earliest_end  # all sleeps were in flight at once


def test_preferred_tls_negotiated_in_worker(patched, tls_server):
    # No ssl arguments at all: PyMySQL's default "preferred" mode upgrades
    # when the server offers TLS, without verifying the certificate.
    def work():
        conn = pymysql.connect(**tls_server.params)
        try:
            return _cipher(conn), isinstance(conn._sock, GreenSocket), conn._secure
        finally:
            conn.close()

    cipher, green, secure = run_green(work)
    assert cipher
    assert green
    assert secure


def test_ssl_disabled_in_worker(patched, tls_server):
    def work():
        conn = pymysql.connect(**tls_server.params, ssl_disabled=True)
        try:
            return _cipher(conn)
        finally:
            conn.close()

    assert run_green(work) == ""


def test_tls_connection_used_after_loop_stopped(patched, tls_server):
    def open_conn():
        conn = pymysql.connect(**tls_server.params, ssl={"ca": tls_server.ca})
        assert _cipher(conn)
        return conn

    conn = run_green(open_conn)
    try:
        assert isinstance(conn._sock, GreenSocket)
        assert not greenpatch.is_worker()
        # Blocking fallback on the (non-blocking) SSL socket of a closed loop.
        assert _cipher(conn)
        assert _scalar(conn, "SELECT SLEEP(0.1) + 41") == 41
        assert len(_scalar(conn, "SELECT REPEAT('b', 500000)")) == 500000
        conn.ping(reconnect=False)
    finally:
        conn.close()
    assert conn._sock is None


# -- a server that stalls the TLS handshake ---------------------------------------


class StallingServer:
    """Accepts one client, sends a real MariaDB greeting (offering TLS),
    reads the client's SSL request and then never answers its ClientHello.
    Records when the client's side of the connection is closed."""

    def __init__(self, greeting: bytes) -> None:
        self.greeting = greeting
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.got_client_hello = threading.Event()
        self.client_closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.sendall(self.greeting)
            conn.settimeout(10)
            received = b""
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    received += data
                    # 4-byte header + 32-byte SSL request, then a TLS record (0x16).
                    if len(received) > 36 and received[36] == 0x16:
                        self.got_client_hello.set()
            except OSError:
                pass
            self.client_closed.set()

    def close(self) -> None:
        self.listener.close()


def _greeting(params: dict) -> bytes:
    with socket.create_connection((params["host"], params["port"]), timeout=5) as s:
        header = s.recv(4, socket.MSG_WAITALL)
        length = int.from_bytes(header[:3], "little")
        return header + s.recv(length, socket.MSG_WAITALL)


def _stalled_connect(tls_server, **kwargs):
    params = dict(tls_server.params, port=kwargs.pop("port"))
    return pymysql.connect(**params, ssl={"ca": tls_server.ca}, **kwargs)


def test_tls_handshake_timeout_closes_socket(patched, tls_server):
    stall = StallingServer(_greeting(tls_server.params))
    try:

        async def main():
            import asyncio

            # PyMySQL writes the SSL request just before the handshake, so the
            # handshake runs under write_timeout (the same with stock sockets).
            future = greenpatch.spawn(
                _stalled_connect, tls_server, port=stall.port, read_timeout=0.3, write_timeout=0.3
            )
            with pytest.raises(pymysql.err.OperationalError) as info:
                await future
            # The loop keeps running after the failed handshake: give the
            # close a few iterations to reach the peer.
            for _ in range(50):
                if stall.client_closed.is_set():
                    break
                await asyncio.sleep(0.01)
            return info.value

        error = run_loop(main, timeout=30)
        assert stall.got_client_hello.is_set()
        assert isinstance(error.original_exception, TimeoutError)
        assert stall.client_closed.is_set(), "socket left open after the TLS handshake timed out"
    finally:
        stall.close()


def test_worker_killed_during_tls_handshake_closes_socket(patched, tls_server):
    stall = StallingServer(_greeting(tls_server.params))
    try:

        async def main():
            import asyncio

            future = greenpatch.spawn(_stalled_connect, tls_server, port=stall.port)
            for _ in range(500):
                if stall.got_client_hello.is_set():
                    break
                await asyncio.sleep(0.01)
            assert stall.got_client_hello.is_set()
            future.cancel()  # kills the worker, parked in the TLS handshake
            for _ in range(100):
                if stall.client_closed.is_set():
                    break
                await asyncio.sleep(0.01)
            # Still inside the loop: nothing else will close the socket.
            return stall.client_closed.is_set()

        closed = run_loop(main, timeout=30)
        assert closed, "socket of a worker killed during the TLS handshake was left open"
    finally:
        stall.close()
