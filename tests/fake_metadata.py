"""A fake cloud metadata service on 127.0.0.1 that plays AWS IMDSv2, GCP and Azure Scheduled Events at once.

    with FakeMetadata() as md:  # then: spot.provider=aws spot.metadata_url=<md.url>
        md.wait_for("aws_spot")  # the poller is live
        md.issue_notice()  # every provider now reports a preemption

It is strict where the real services are strict, so a client that works here has its headers right:
AWS spot requests without a valid, unexpired session token get 401; GCP needs `Metadata-Flavor: Google`
(else 403); Azure needs `Metadata: true` and an api-version (else 400).
"""

import collections
import json
import secrets
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class FakeMetadata:
    """Threaded HTTP server; `counts` tallies requests by kind: aws_token, aws_spot, gcp, azure,
    unauthorized (401s) and other (unknown paths)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.token_ttls: list[int] = []  # the TTL header of every token issued, in seconds
        self.notice: dict | None = None
        self._tokens: dict[str, float] = {}  # token -> monotonic expiry
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.fake = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeMetadata":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "FakeMetadata":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def issue_notice(self, action: str = "terminate", azure_event_type: str = "Preempt") -> None:
        """From now on every provider reports a reclaim; AWS's `time` is two minutes ahead, as on EC2."""
        at = datetime.now(timezone.utc) + timedelta(minutes=2)
        with self._lock:
            self.notice = {"action": action, "azure_event_type": azure_event_type, "time": at}

    def revoke_tokens(self) -> None:
        """Invalidate every IMDSv2 token early, as a stop/start of the instance does."""
        with self._lock:
            self._tokens.clear()

    def count(self, kind: str) -> int:
        with self._lock:
            return self.counts[kind]

    def wait_for(self, kind: str, n: int = 1, timeout: float = 10.0) -> bool:
        """Block until `n` requests of `kind` arrived (e.g. to know a subprocess's poller is live)."""
        deadline = time.monotonic() + timeout
        while self.count(kind) < n:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    # --- called from the handler threads ---

    def _tally(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1

    def _new_token(self, ttl: int) -> str:
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[token] = time.monotonic() + ttl
            self.token_ttls.append(ttl)
        return token

    def _token_valid(self, token: str | None) -> bool:
        with self._lock:
            return token is not None and self._tokens.get(token, 0.0) > time.monotonic()


class _Handler(BaseHTTPRequestHandler):
    server_version = "FakeMetadata/1.0"

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output quiet
        pass

    def _reply(self, status: int, body: str = "", content_type: str = "text/plain", **headers: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():  # header names arrive as keywords: Metadata_Flavor=...
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:
        fake: FakeMetadata = self.server.fake  # type: ignore[attr-defined]
        if urlsplit(self.path).path != "/latest/api/token":
            fake._tally("other")
            return self._reply(404)
        fake._tally("aws_token")
        ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return self._reply(400, "missing or invalid X-aws-ec2-metadata-token-ttl-seconds")
        self._reply(200, fake._new_token(int(ttl)), X_aws_ec2_metadata_token_ttl_seconds=ttl)

    def do_GET(self) -> None:
        fake: FakeMetadata = self.server.fake  # type: ignore[attr-defined]
        parts = urlsplit(self.path)
        with fake._lock:
            notice = fake.notice
        if parts.path == "/latest/meta-data/spot/instance-action":
            fake._tally("aws_spot")
            if not fake._token_valid(self.headers.get("X-aws-ec2-metadata-token")):
                fake._tally("unauthorized")
                return self._reply(401)
            if notice is None:
                return self._reply(404)
            body = {"action": notice["action"], "time": notice["time"].strftime("%Y-%m-%dT%H:%M:%SZ")}
            return self._reply(200, json.dumps(body), "application/json")
        if parts.path == "/computeMetadata/v1/instance/preempted":
            fake._tally("gcp")
            if self.headers.get("Metadata-Flavor") != "Google":
                return self._reply(403, "Missing Metadata-Flavor:Google header.")
            return self._reply(200, "TRUE" if notice else "FALSE", Metadata_Flavor="Google")
        if parts.path == "/metadata/scheduledevents":
            fake._tally("azure")
            if self.headers.get("Metadata") != "true" or "api-version" not in parse_qs(parts.query):
                return self._reply(400, json.dumps({"error": "Bad request"}), "application/json")
            events = []
            if notice is not None:
                events.append(
                    {
                        "EventId": "C7061BAC-AFDC-4513-B24B-AA5F13A16123",
                        "EventType": notice["azure_event_type"],
                        "ResourceType": "VirtualMachine",
                        "Resources": ["greenrun-vm"],
                        "EventStatus": "Scheduled",
                        "NotBefore": notice["time"].strftime("%a, %d %b %Y %H:%M:%S GMT"),
                        "Description": "",
                        "EventSource": "Platform",
                        "DurationInSeconds": -1,
                    }
                )
            body = {"DocumentIncarnation": len(events), "Events": events}
            return self._reply(200, json.dumps(body), "application/json")
        fake._tally("other")
        self._reply(404)
