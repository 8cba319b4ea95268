"""Survive spot/preemptible GPUs: turn a preemption into a flag the trainer checks between steps.

Signals (SIGTERM from torchrun/Kubernetes/systemd, SIGINT from a terminal, SIGUSR1 from SLURM's
`--signal=USR1@90`) and cloud metadata notices (AWS, GCP, Azure) all end up in one place: the first one
sets `requested`; the trainer sees it at the next step boundary, writes an emergency checkpoint, calls
`finished()` and exits with EXIT_PREEMPTED (committed in the bucket) or EXIT_LOCAL_ONLY (only on this disk).
A second signal raises PreemptionAbort (exit EXIT_ABORTED), and a watchdog ends the process with EXIT_ABORTED
if no checkpoint is committed by the deadline: `spot.deadline_s` after a signal, or the notice's own window
when a metadata notice gave a longer one (AWS: about 120 s).

Each cloud is one MetadataProvider class registered in PROVIDERS under its `spot.provider` name.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from greenrun.core.fields import plain
from greenrun.core.registry import Registry

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the emergency checkpoint is committed in the run's storage: resume it
EXIT_ABORTED = 76  # the deadline passed or a second signal came: the newest checkpoint may be an older one
# The newest checkpoint is committed on this machine's disk only (its upload failed or missed the deadline):
# resume here if the disk survives, else from the newest checkpoint in the bucket, which the log names.
EXIT_LOCAL_ONLY = 77

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# One slow request must not hold up the next poll or close(); the metadata services answer in milliseconds.
_HTTP_TIMEOUT_S = 1.0
_AWS_TOKEN_TTL_S = 21600  # the IMDSv2 maximum (6 h); the token is refreshed at 80 % of it
# Ctrl-C under torchrun reaches a worker twice (from the terminal and forwarded by torchrun) within
# milliseconds; that is one request to stop, not an impatient second one.
_DUPLICATE_WINDOW_S = 1.0
_ON_ABORT_TIMEOUT_S = 2.0  # a hung on_abort must not eat the slack left before the platform's SIGKILL
_WATCHDOG_TICK_S = 0.05
_NOTICE_MARGIN_S = 5.0  # of a notice's window: the platform's own shutdown starts at its stated time


@dataclass
class SpotConfig:
    provider: str = plain("none")  # none | aws | gcp | azure: metadata service to poll; signals always work
    metadata_url: str | None = plain(None, local=True)  # base URL override (tests); None = provider's default
    poll_interval_s: float = plain(5.0)  # seconds between polls, > 0 (AWS warns 120 s ahead, GCP ~30 s)
    deadline_s: float = plain(25.0)  # seconds from notice/signal to a committed emergency checkpoint, > 0


# (method, path, headers) -> (HTTP status, body): a GET or PUT against the provider's metadata service.
Http = Callable[[str, str, dict[str, str]], tuple[int, str]]


@dataclass
class Notice:
    """A preemption notice with the time it leaves, when the provider says (a plain str notice does not)."""

    reason: str
    window_s: float | None = None  # seconds from now until the platform reclaims the machine


class MetadataProvider:
    """One cloud's preemption notice: where its metadata service answers and how a notice reads.

    The watcher makes one instance per run and calls `check` every poll_interval_s; an instance may keep
    state between polls (AWS's session token). `check` returns the notice (a reason, or a Notice that also
    says how long is left), None when there is none, and raises when the service cannot tell (the watcher
    logs it and keeps polling).
    """

    default_url = ""  # the metadata service's base URL; spot.metadata_url overrides it
    polls = True  # False: no metadata service at all, only signals
    window_s: float | None = None  # the notice's usual lead time, when a notice does not state its own

    def check(self, http: Http) -> str | Notice | None:
        raise NotImplementedError


PROVIDERS: Registry[type[MetadataProvider]] = Registry("spot.provider")


def validate(cfg: SpotConfig) -> list[str]:
    """Return human-readable problems with `cfg` (empty when it is usable)."""
    problems = PROVIDERS.problems(str(cfg.provider))
    if not cfg.poll_interval_s > 0:  # written this way so NaN is rejected too
        problems.append(f"spot.poll_interval_s must be > 0 seconds (got {cfg.poll_interval_s})")
    if not cfg.deadline_s > 0:
        problems.append(f"spot.deadline_s must be > 0 seconds (got {cfg.deadline_s})")
    if cfg.metadata_url is not None and not str(cfg.metadata_url).startswith(("http://", "https://")):
        problems.append(f"spot.metadata_url must start with http:// or https:// (got {cfg.metadata_url!r})")
    return problems


class PreemptionAbort(SystemExit):
    """Raised in the main thread by a second signal while stopping; uncaught, it exits with EXIT_ABORTED.

    A SystemExit so that `except Exception` in training code cannot swallow it, while `finally` blocks
    still run and remove half-written checkpoint files.
    """

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.code = EXIT_ABORTED  # the interpreter's exit status; str(self) stays the reason


class PreemptionWatcher:
    """Collects preemption signals and metadata notices into `requested`; enforces the checkpoint deadline."""

    def __init__(self, cfg: SpotConfig, on_abort: Callable[[str], None] | None = None) -> None:
        problems = validate(cfg)
        if problems:
            raise ValueError("invalid spot config: " + "; ".join(problems))
        self.cfg = cfg
        self.on_abort = on_abort  # called once, with the reason, right before the run is aborted
        self.requested = False
        self.reason = ""
        self.notice_time: float | None = None  # time.monotonic() of the first signal or notice
        self.deadline_s = cfg.deadline_s  # for this preemption: the notice's window when it is longer
        self._provider = PROVIDERS.get(cfg.provider)()
        self._base_url = (cfg.metadata_url or self._provider.default_url).rstrip("/")
        # Metadata addresses are link-local: an http_proxy from the environment would only break them.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        # Re-entrant: a signal handler can interrupt the main thread while it holds the lock.
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._previous_handlers: dict[int, Any] = {}
        self._first_signal_at: float | None = None
        self._finished = False
        self._aborting = False

    def start(self) -> PreemptionWatcher:
        """Install the signal handlers (main thread only) and start the watchdog and the poller."""
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
        else:
            log.warning("PreemptionWatcher started off the main thread: only metadata notices are watched")
        self._spawn(self._watchdog, "greenrun-spot-watchdog")
        if self._provider.polls:
            self._spawn(self._poll_loop, f"greenrun-spot-{self.cfg.provider}")
        return self

    def close(self) -> None:
        """Stop the threads and put the previous signal handlers back."""
        self._stop.set()
        for sig, previous in self._previous_handlers.items():
            # None means the handler was not installed from Python; the default is the closest thing.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous_handlers.clear()
        for thread in self._threads:
            thread.join(timeout=2 * _HTTP_TIMEOUT_S)  # a poll may be mid-request; they are daemons anyway
        self._threads.clear()

    def __enter__(self) -> PreemptionWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def finished(self) -> None:
        """Declare the emergency save over (committed, or given up before the deadline): the watchdog stands down."""
        self._finished = True

    def remaining_s(self) -> float:
        """Seconds left before the deadline (may reach 0); inf while no preemption was requested."""
        if self.notice_time is None:
            return math.inf
        return max(0.0, self.deadline_s - (time.monotonic() - self.notice_time))

    # --- signals and the deadline ---------------------------------------------------------------------

    def _request(self, reason: str, window_s: float | None = None) -> None:
        with self._lock:
            if self.requested:
                return
            # A notice that leaves longer than spot.deadline_s gets its own window, less a margin.
            longer = window_s is not None and window_s - _NOTICE_MARGIN_S > self.cfg.deadline_s
            self.deadline_s = window_s - _NOTICE_MARGIN_S if longer else self.cfg.deadline_s
            self.notice_time = time.monotonic()  # before `requested`, so readers of the flag see a time
            self.reason = reason
            self.requested = True
        source = "the notice's window" if longer else "spot.deadline_s"
        log.warning(
            "preemption (%s): emergency checkpoint due within %.0f s (%s)", reason, self.deadline_s, source
        )

    def _on_signal(self, signum: int, frame: object) -> None:
        # Never raise on the first signal: an exception in the middle of a step or an optimizer update
        # would leave nothing consistent to checkpoint.
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self._first_signal_at is None:
            self._first_signal_at = now
            self._request(name)  # a no-op when a metadata notice came first: it is the same preemption
            return
        since_first = now - self._first_signal_at
        if since_first < _DUPLICATE_WINDOW_S:
            log.info("ignoring %s %.3f s after the first signal (duplicate delivery)", name, since_first)
            return
        why = f"second signal {name} while stopping for {self.reason}"
        log.error("%s: aborting", why)
        self._call_on_abort(why)
        raise PreemptionAbort(why)

    def _call_on_abort(self, why: str) -> None:
        with self._lock:
            if self._aborting:
                return
            self._aborting = True
        if self.on_abort is None:
            return
        try:
            self.on_abort(why)
        except Exception:
            log.exception("on_abort callback failed")

    def _watchdog(self) -> None:
        while not self._stop.wait(_WATCHDOG_TICK_S):
            if self._finished or self.notice_time is None or self.remaining_s() > 0:
                continue
            why = f"no checkpoint committed {self.deadline_s:g} s after {self.reason}"
            log.error("%s: exiting with %d before the platform kills the process", why, EXIT_ABORTED)
            helper = threading.Thread(target=self._call_on_abort, args=(why,), daemon=True)
            helper.start()
            helper.join(_ON_ABORT_TIMEOUT_S)
            for stream in (sys.stdout, sys.stderr):  # os._exit skips this, and the last words matter
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            # os._exit, not sys.exit: the main thread is stuck (that is why we are here) and would never
            # get to unwind; the exit code tells the launcher to resume from the previous checkpoint.
            os._exit(EXIT_ABORTED)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # --- metadata polling -----------------------------------------------------------------------------

    def _poll_loop(self) -> None:
        failures = 0
        while not self.requested and not self._stop.is_set():
            try:
                notice = self._provider.check(self._http)
            except Exception as exc:  # a poller problem must never take the training run down with it
                failures += 1
                level = logging.INFO if failures == 1 else logging.DEBUG
                log.log(level, "%s metadata poll failed (will keep trying): %s", self.cfg.provider, exc)
            else:
                if failures:
                    log.info("%s metadata reachable again after %d failures", self.cfg.provider, failures)
                    failures = 0
                if notice:
                    if isinstance(notice, Notice):
                        self._request(notice.reason, notice.window_s)
                    else:
                        self._request(notice, self._provider.window_s)
                    return
            self._stop.wait(self.cfg.poll_interval_s)

    def _http(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
        request = urllib.request.Request(self._base_url + path, method=method, headers=headers)
        try:
            with self._opener.open(request, timeout=_HTTP_TIMEOUT_S) as response:
                return response.status, response.read(65536).decode("utf-8", "replace")
        except urllib.error.HTTPError as err:  # 404 and 401 carry meaning here, so return them
            err.close()
            return err.code, ""


# --- the providers: one class each, registered under its spot.provider name ---------------------------


@PROVIDERS.register("none")
class NoMetadata(MetadataProvider):
    """Signals only: SIGTERM/SIGINT/SIGUSR1 still trigger an emergency checkpoint."""

    polls = False

    def check(self, http: Http) -> str | None:
        return None


@PROVIDERS.register("aws")
class AwsImds(MetadataProvider):
    """EC2 spot: IMDSv2's spot/instance-action, about 120 s before the instance is reclaimed."""

    default_url = "http://169.254.169.254"
    window_s = 120.0  # "two minutes before": the notice's `time` says it exactly

    def __init__(self) -> None:
        self._token: str | None = None
        self._refresh_at = 0.0

    def _token_now(self, http: Http) -> str:
        if self._token is None or time.monotonic() >= self._refresh_at:
            ttl = {"X-aws-ec2-metadata-token-ttl-seconds": str(_AWS_TOKEN_TTL_S)}
            try:
                status, token = http("PUT", "/latest/api/token", ttl)
            except OSError as exc:
                # The PUT reply is dropped after one network hop: the classic symptom inside a container.
                raise OSError(
                    f"IMDSv2 token request failed ({exc}); in a container the instance needs "
                    "HttpPutResponseHopLimit >= 2"
                ) from exc
            if status != 200:
                raise OSError(f"IMDSv2 token request returned HTTP {status}")
            self._token = token.strip()
            self._refresh_at = time.monotonic() + 0.8 * _AWS_TOKEN_TTL_S
        return self._token

    def check(self, http: Http) -> str | Notice | None:
        for _ in range(2):
            headers = {"X-aws-ec2-metadata-token": self._token_now(http)}
            status, body = http("GET", "/latest/meta-data/spot/instance-action", headers)
            if status != 401:
                break
            self._token = None  # invalidated early (e.g. by a stop/start): retry once with a fresh token
        if status == 404:  # IMDS's way of saying "no interruption scheduled"
            return None
        if status != 200:
            raise OSError(f"spot/instance-action returned HTTP {status}")
        action = json.loads(body)
        reason = f"aws spot notice: {action.get('action', '?')} at {action.get('time', '?')}"
        return Notice(reason, _seconds_until(action.get("time"), self.window_s))


@PROVIDERS.register("gcp")
class GcpMetadata(MetadataProvider):
    """GCE spot/preemptible VMs: instance/preempted turns TRUE about 30 s before the stop."""

    default_url = "http://metadata.google.internal"
    window_s = 30.0  # GCE stops a preempted VM about 30 s after instance/preempted turns TRUE

    def check(self, http: Http) -> str | None:
        status, body = http("GET", "/computeMetadata/v1/instance/preempted", {"Metadata-Flavor": "Google"})
        if status != 200:
            raise OSError(f"instance/preempted returned HTTP {status}")
        return "gcp preempted: TRUE" if body.strip().upper() == "TRUE" else None


@PROVIDERS.register("azure")
class AzureScheduledEvents(MetadataProvider):
    """Azure spot VMs: a Preempt scheduled event, at least 30 s ahead; other event types are not ours."""

    default_url = "http://169.254.169.254"
    window_s = 30.0  # Preempt events are scheduled at least 30 s ahead; NotBefore says exactly

    def check(self, http: Http) -> str | Notice | None:
        path = "/metadata/scheduledevents?api-version=2020-07-01"
        status, body = http("GET", path, {"Metadata": "true"})
        if status != 200:
            raise OSError(f"scheduledevents returned HTTP {status}")
        for event in json.loads(body).get("Events", []):
            if event.get("EventType") == "Preempt":
                reason = f"azure scheduled event: Preempt not before {event.get('NotBefore', '?')}"
                return Notice(reason, _seconds_until(event.get("NotBefore"), self.window_s))
        return None


def _seconds_until(when: object, default: float | None) -> float | None:
    """Seconds from now to a notice's time (ISO 8601 like AWS's, or RFC 1123 like Azure's); else default."""
    if not isinstance(when, str):
        return default
    try:
        at = datetime.fromisoformat(when.replace("Z", "+00:00"))
    except ValueError:
        try:
            at = email.utils.parsedate_to_datetime(when)
        except (TypeError, ValueError):
            return default
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    return max(0.0, (at - datetime.now(timezone.utc)).total_seconds())
