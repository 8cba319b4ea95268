"""Shared pytest helpers for tests that talk S3: an in-process moto server and a fault-injecting proxy.

Load them into a test module with

    pytest_plugins = ["tests.s3_fixtures"]

(importing the fixtures by name also works, but ruff then flags every test argument as F811) and ask for:

- ``moto_server``: one moto S3 server per test module, on a free port of 127.0.0.1;
- ``s3_bucket``: fake AWS credentials in the environment, a reset moto and a fresh empty bucket;
- ``faulty_proxy``: a factory of ``FaultyProxy`` instances in front of ``moto_server``, stopped at teardown;
- ``fast_backoff``: botocore's retry backoff divided by 20, so tests that inject faults wait less.

Import names from this module only under ``TYPE_CHECKING``: a runtime import loads it before pytest can
register it as a plugin, and pytest then warns that it cannot rewrite its asserts.
"""

from __future__ import annotations

import http.client
import logging
import random
import socket
import struct
import threading
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.retries.standard import ExponentialBackoff
from moto.server import ThreadedMotoServer

TEST_BUCKET = "greenrun-test"
FAULT_KINDS = ("slowdown", "reset", "lost_response")

# Headers that describe one hop of a connection, not the message, so the proxy must not pass them on.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade", "expect"}

_SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>FAULTYPROXY</RequestId></Error>"
)


class MotoServer:
    """moto's threaded S3 server bound to a free port of 127.0.0.1."""

    def __init__(self) -> None:
        # werkzeug logs one INFO line per request; that is noise in every captured test log.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()  # port=0 bound a free port; this reports it
        self.endpoint_url = f"http://{host}:{port}"

    def reset(self) -> None:
        """Forget every bucket, object and multipart upload."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def stop(self) -> None:
        self._server.stop()


@dataclass
class S3Bucket:
    """A fresh bucket on the moto server plus a client that talks to moto directly (no proxy)."""

    name: str  # bucket name
    endpoint_url: str  # moto's URL, http://127.0.0.1:PORT
    client: Any  # boto3 S3 client for assertions that must not go through a FaultyProxy

    def open_uploads(self) -> list[str]:
        """Keys of the multipart uploads still in progress in this bucket."""
        uploads = self.client.list_multipart_uploads(Bucket=self.name).get("Uploads", [])
        return sorted(upload["Key"] for upload in uploads)


@pytest.fixture(scope="module")
def moto_server() -> Iterator[MotoServer]:
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Fake credentials for boto3's default chain, and nothing from the developer's own AWS setup."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probing when creds miss
    missing = tmp_path_factory.mktemp("aws") / "absent"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(missing))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(missing))
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same retries, shorter sleeps: botocore waits up to 2**attempt s between tries, which adds up fast."""
    original = ExponentialBackoff.delay_amount
    monkeypatch.setattr(
        ExponentialBackoff, "delay_amount", lambda self, context: original(self, context) / 20
    )


@pytest.fixture
def s3_bucket(moto_server: MotoServer, aws_credentials: None) -> S3Bucket:
    moto_server.reset()
    client = boto3.session.Session().client("s3", endpoint_url=moto_server.endpoint_url)
    client.create_bucket(Bucket=TEST_BUCKET)
    return S3Bucket(name=TEST_BUCKET, endpoint_url=moto_server.endpoint_url, client=client)


class FaultyProxy:
    """HTTP reverse proxy on 127.0.0.1 that fails a seeded-random fraction of the requests it relays.

    Fault kinds, drawn uniformly from ``faults`` for each failed request:
    - "slowdown": answer 503 with S3's SlowDown error body (the request never reaches upstream);
    - "reset": read the request, then reset the connection without any answer (never reaches upstream);
    - "lost_response": relay the request, then reset the connection instead of answering, so upstream
      applied a change the client never heard about (its retry must cope with that).

    ``match(method, path_with_query)`` limits which requests may fail (default: all); ``max_faults`` caps
    the number of injected faults. ``requests`` and ``faults`` count what happened.
    """

    def __init__(
        self,
        upstream: str,
        *,
        fail_rate: float = 0.2,
        faults: tuple[str, ...] = ("slowdown", "reset"),
        seed: int = 0,
        match: Callable[[str, str], bool] | None = None,
        max_faults: int | None = None,
    ) -> None:
        unknown = set(faults) - set(FAULT_KINDS)
        if unknown or not faults:
            raise ValueError(f"faults must be a non-empty subset of {FAULT_KINDS}, got {faults}")
        self.upstream = urlsplit(upstream)
        self.fail_rate = fail_rate
        self.fault_kinds = faults
        self.match = match
        self.max_faults = max_faults
        self.requests = 0
        self.faults: Counter[str] = Counter()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultyProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> FaultyProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def pick_fault(self, method: str, path: str) -> str | None:
        with self._lock:
            self.requests += 1
            if self.match is not None and not self.match(method, path):
                return None
            if self.max_faults is not None and sum(self.faults.values()) >= self.max_faults:
                return None
            if self._random.random() >= self.fail_rate:
                return None
            fault = self._random.choice(self.fault_kinds)
            self.faults[fault] += 1
            return fault

    def forward(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, list, bytes]:
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=30)
        try:
            # Host stays as the client sent it: it is part of the SigV4 signature.
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers.items():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    conn.putheader(name, value)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive like a real endpoint; also answers Expect: 100-continue
    timeout = 10  # seconds an idle or stuck client may hold a handler thread

    def _relay(self) -> None:
        proxy: FaultyProxy = self.server.proxy  # type: ignore[attr-defined]
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._answer(501, [], b"FaultyProxy does not relay chunked request bodies")
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        fault = proxy.pick_fault(self.command, self.path)
        if fault == "slowdown":
            self._answer(503, [("Content-Type", "application/xml")], _SLOWDOWN_BODY)
            return
        if fault == "reset":
            self._reset()
            return
        status, headers, payload = proxy.forward(self.command, self.path, self.headers, body)
        if fault == "lost_response":
            self._reset()
            return
        self._answer(status, headers, payload)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _relay

    def _answer(self, status: int, headers: list, body: bytes) -> None:
        self.send_response_only(status)  # not send_response: upstream already sent Date and Server
        length = str(len(body))
        for name, value in headers:
            if name.lower() == "content-length" and self.command == "HEAD":
                length = value  # a HEAD answer describes the object but carries no body
            elif name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reset(self) -> None:
        # Linger 0 makes the close an RST, which the client sees as "connection reset by peer".
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would drown the test output


@pytest.fixture
def faulty_proxy(moto_server: MotoServer) -> Iterator[Callable[..., FaultyProxy]]:
    """Factory: ``faulty_proxy(fail_rate=..., faults=..., seed=..., match=...)`` -> a started proxy."""
    proxies: list[FaultyProxy] = []

    def make(**kwargs: Any) -> FaultyProxy:
        proxy = FaultyProxy(moto_server.endpoint_url, **kwargs).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()
