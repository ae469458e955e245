"""The TLS front under abuse (issue #20): a real nginx from server/front.py on 127.0.0.1 in front of an upstream stub.

The stub stands where the SuperLink would and records every request that reaches it, so "refused before the
SuperLink" is proven by the stub never seeing the request. Covered: the exact Fleet URI rule against encoded,
dot-segment, double-slash, case and query tricks; the body limit (Content-Length and chunked) sized to Flower's chunk;
slow headers and slow bodies cut by the (shortened) timeouts; per-address connection and rate limits; the TLS
versions and suites offered, read back by handshakes. bench/front_abuse.py measures the same front in front of a real
SuperLink under the 6 x 250 MB and slow-body attacks.
"""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from common.errors import SpineFedError
from common.processes import free_port
from server.flwrctl import wait_port
from server.front import FRONT_LIMITS, TLS12_CIPHERS, Front, _size, find_nginx
from tests.deployhelpers import make_certs

try:
    find_nginx()
except SpineFedError:  # no nginx here: deploy/install.sh --with-nginx
    pytest.skip("nginx not installed (bash deploy/install.sh --with-nginx)", allow_module_level=True)

MB = 1024 * 1024


class Stub:
    """An HTTPS upstream on 127.0.0.1 that records (method, raw path, body length) and answers 200."""

    def __init__(self, crt: Path, key: Path):
        seen = self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                seen.append((self.command, self.path, len(body)))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_GET = do_POST  # noqa: N815

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(crt, key)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Harness:
    def __init__(self, root: Path, limits: dict | None = None):
        self.ca, crt, key = make_certs(root / "certs")
        self.stub = Stub(crt, key)
        self.port = free_port()
        self.front = Front(nginx="nginx", prefix=root / "front", log_dir=root / "logs", listen_host="127.0.0.1",
                           listen_port=self.port, certificate=crt, key=key, upstream_port=self.stub.port,
                           upstream_ca=self.ca, limits=limits)  # fmt: skip
        self.front.start()
        wait_port("127.0.0.1", self.port, self.front.proc, timeout=20, what="nginx")

    def tls(self, timeout: float = 10.0) -> ssl.SSLSocket:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return ctx.wrap_socket(sock, server_hostname="localhost")

    def request(self, raw: bytes, timeout: float = 10.0) -> int:
        """Send raw bytes (a whole request), return the status code of the reply (0: closed without one)."""
        with self.tls(timeout) as sock:
            sock.sendall(raw)
            return _status(_read_head(sock))

    def post(self, path: str, body: bytes = b"x", extra: str = "") -> int:
        head = f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
        return self.request(head.encode() + body)

    def close(self):
        self.front.stop()
        self.stub.close()


def _read_head(sock) -> bytes:
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            part = sock.recv(65536)
            if not part:
                break
            data += part
    except (ConnectionError, ssl.SSLError, TimeoutError):
        pass
    return data


def _status(head: bytes) -> int:
    return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    h = Harness(tmp_path_factory.mktemp("front"), limits={"header_timeout": "2s", "body_timeout": "2s"})
    try:
        yield h
    finally:
        h.close()


def test_body_limit_is_a_few_mb_above_flowers_chunk():
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE as chunk

    assert (
        chunk + MB <= _size(FRONT_LIMITS["max_body"]) <= chunk + 4 * MB
    )  # a Flower upgrade that grows chunks fails here


def test_legitimate_fleet_request_reaches_the_stub(front):
    before = len(front.stub.seen)
    assert front.post("/v1/fleet/pull-messages", b"hello") == 200
    assert front.stub.seen[before:] == [("POST", "/v1/fleet/pull-messages", 5)]


TRICKS = (
    "/v1/fleet/%2e%2e/control/start-run",  # encoded dot segment to a Control path
    "/v1/fleet/..%2fcontrol/list-runs",
    "/v1/fleet/../control/list-runs",
    "/v1/fleet/../fleet/pull-messages",  # dot segments that resolve to a Fleet path still differ from it
    "/v1/fleet/./pull-messages",
    "/v1/fleet//pull-messages",
    "//v1/fleet/pull-messages",
    "/v1//fleet/pull-messages",
    "/v1/fleet/pull-messages/",
    "/v1/fleet/pull-messages/.",
    "/v1/fleet/pull%2Dmessages",  # an encoded character of a Fleet path
    "/v1/fleet/pull-message%73",
    "/v1/fleet%2Fpull-messages",
    "/V1/FLEET/PULL-MESSAGES",
    "/v1/fleet/pull-messages?x=1",  # a SuperNode sends no query string
    "/v1/fleet/pull-messages?",
    "/v1/fleet/pull-messages;x=1",
    "/v1/fleet/pull-messages%00",
    "/v1/fleet/pull-messages#x",
    "/v1/fleet\\pull-messages",
    "/v1/fleet/pull-messages%20",
    "/v1/control/list-runs",
    "/v1/control/start-run",
    "/v1/runtime/get-nodes",
    "/health",
    "/",
)


@pytest.mark.parametrize("path", TRICKS)
def test_uri_tricks_are_refused_before_the_superlink(front, path):
    before = len(front.stub.seen)
    code = front.post(path)
    assert code in (400, 404), (path, code)
    assert front.stub.seen[before:] == [], path


def test_other_methods_on_fleet_paths_are_refused(front):
    before = len(front.stub.seen)
    for method in ("GET", "PUT", "DELETE"):
        raw = f"{method} /v1/fleet/pull-messages HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        assert front.request(raw.encode()) in (403, 405), method
    assert front.stub.seen[before:] == []


def test_body_over_the_limit_is_refused_with_413_and_one_just_under_passes(front):
    limit = _size(FRONT_LIMITS["max_body"])
    before = len(front.stub.seen)
    # declared too large: 413 before a byte of the body is read
    head = f"POST /v1/fleet/push-object HTTP/1.1\r\nHost: localhost\r\nContent-Length: {250 * MB}\r\n\r\n"
    assert front.request(head.encode()) == 413
    # chunked, no length declared: 413 once the limit is passed
    with front.tls() as sock:
        sock.sendall(b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"%x\r\n" % MB + b"\0" * MB + b"\r\n"
        try:
            for _ in range(limit // MB + 2):
                sock.sendall(piece)
        except (ConnectionError, ssl.SSLError):
            pass
        assert _status(_read_head(sock)) == 413
    assert front.stub.seen[before:] == []
    assert front.post("/v1/fleet/push-object", b"\0" * (limit - 1024)) == 200
    assert front.stub.seen[before:] == [("POST", "/v1/fleet/push-object", limit - 1024)]


def _cut_after(front, raw: bytes) -> float:
    """Seconds until the front closes a connection that sent `raw` and then stalled."""
    t0 = time.monotonic()
    with front.tls(timeout=30) as sock:
        sock.sendall(raw)
        try:
            while sock.recv(4096):
                pass
        except (ConnectionError, ssl.SSLError, TimeoutError):
            pass
    return time.monotonic() - t0


def test_slow_header_and_slow_body_are_cut_by_the_timeouts(front):
    before = len(front.stub.seen)
    assert _cut_after(front, b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: loc") < 8  # header_timeout 2 s here
    body = b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n" + b"\0" * 100
    assert _cut_after(front, body) < 8  # body_timeout 2 s here
    assert front.stub.seen[before:] == []  # the partial body never reached the upstream


def test_connection_and_rate_limits_per_address(tmp_path):
    h = Harness(tmp_path, limits={"conn_per_addr": 2, "rate_per_addr": "1r/s", "burst_per_addr": 3})
    try:
        # Two requests whose bodies are still arriving hold the address's two connections: a third gets 503.
        held = [h.tls() for _ in range(2)]
        for sock in held:
            sock.sendall(b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\nx")
        time.sleep(0.5)
        assert h.post("/v1/fleet/pull-messages") == 503
        for sock in held:
            sock.close()
        time.sleep(0.5)
        # 1 r/s with a burst of 3 (partly spent above): of ten quick requests at most 1 + 3 (+1 for the clock) pass.
        before = len(h.stub.seen)
        codes = [h.post("/v1/fleet/pull-messages") for _ in range(10)]
        assert set(codes) <= {200, 503} and 1 <= codes.count(200) <= 5 and codes.count(503) >= 5, codes
        assert len(h.stub.seen) - before == codes.count(200)
    finally:
        h.close()


def _handshake(front, *, version: ssl.TLSVersion, ciphers: str | None = None) -> str | None:
    """The suite the front chose, or None when it refused the handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(front.ca)
    ctx.minimum_version = ctx.maximum_version = version
    if ciphers:
        ctx.set_ciphers(ciphers + ":@SECLEVEL=0")
    try:
        with (
            socket.create_connection(("127.0.0.1", front.port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as sock,
        ):
            return sock.cipher()[0]
    except (ssl.SSLError, ConnectionError):
        return None


def test_tls_offers_1_3_and_1_2_ecdhe_aead_only(front):
    assert _handshake(front, version=ssl.TLSVersion.TLSv1_3) is not None
    assert _handshake(front, version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
    assert _handshake(front, version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-CHACHA20-POLY1305")
    for refused in ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA256",
                    "ECDHE-ECDSA-AES128-CCM8", "ECDHE-ECDSA-AES128-CCM", "ECDHE-ECDSA-ARIA128-GCM-SHA256",
                    "ECDHE-ECDSA-CAMELLIA128-SHA256", "AES128-GCM-SHA256", "DHE-RSA-AES128-GCM-SHA256"):  # fmt: skip
        assert _handshake(front, version=ssl.TLSVersion.TLSv1_2, ciphers=refused) is None, refused
    # Read every TLS 1.2 suite back: each one this client's OpenSSL knows, offered alone.
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    names = {c["name"] for c in probe.get_ciphers() if c["protocol"] == "TLSv1.2"}
    accepted = {n for n in names if _handshake(front, version=ssl.TLSVersion.TLSv1_2, ciphers=n)}
    assert accepted and accepted <= set(TLS12_CIPHERS), accepted
    assert all(("GCM" in n or "CHACHA20" in n) and n.startswith("ECDHE-") for n in accepted)
    # Older protocols refused.
    for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        assert _handshake(front, version=old, ciphers="ALL") is None
