"""Tests for greenrun.runtime.spot: metadata pollers against a fake server, signals, the deadline watchdog."""

import logging
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from greenrun.runtime import spot
from greenrun.runtime.spot import (
    EXIT_ABORTED,
    EXIT_PREEMPTED,
    PreemptionAbort,
    PreemptionWatcher,
    SpotConfig,
    validate,
)
from tests.fake_metadata import FakeMetadata

POLL_S = 0.1
REPO = Path(__file__).resolve().parents[1]
KIND = {"aws": "aws_spot", "gcp": "gcp", "azure": "azure"}  # FakeMetadata's request counter per provider


def wait_until(predicate, timeout: float = 2.0) -> bool:
    # Small sleeps rather than one long one: a signal delivered to another thread only runs its Python
    # handler once the main thread executes bytecode again.
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def fake():
    with FakeMetadata() as md:
        yield md


def watcher_for(provider: str, url: str, **kwargs) -> PreemptionWatcher:
    return PreemptionWatcher(
        SpotConfig(provider=provider, metadata_url=url, poll_interval_s=POLL_S), **kwargs
    )


# --- validate -------------------------------------------------------------------------------------------


def test_validate_accepts_defaults_and_every_provider():
    assert validate(SpotConfig()) == []
    for provider in spot.PROVIDERS:
        assert validate(SpotConfig(provider=provider)) == []


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        (SpotConfig(provider="asw"), "spot.provider: unknown value 'asw' (did you mean aws?)"),
        (SpotConfig(provider="AWS"), "spot.provider: unknown value 'AWS'"),
        (SpotConfig(provider="azur"), "did you mean azure?"),
        (SpotConfig(provider="digitalocean"), "choose one of none, aws, gcp, azure"),
        (SpotConfig(poll_interval_s=0), "spot.poll_interval_s must be > 0 seconds (got 0)"),
        (SpotConfig(poll_interval_s=math.nan), "spot.poll_interval_s must be > 0"),
        (SpotConfig(deadline_s=-1), "spot.deadline_s must be > 0 seconds (got -1)"),
        (SpotConfig(metadata_url="169.254.169.254"), "must start with http://"),
    ],
)
def test_validate_reports_problems(cfg, expected):
    problems = validate(cfg)
    assert len(problems) == 1 and expected in problems[0], problems


def test_validate_without_a_close_match_gives_no_hint():
    assert "did you mean" not in validate(SpotConfig(provider="digitalocean"))[0]


def test_watcher_refuses_invalid_config():
    with pytest.raises(ValueError, match="deadline_s"):
        PreemptionWatcher(SpotConfig(deadline_s=0))


def test_config_works_as_omegaconf_structured_config():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.structured(SpotConfig)
    cfg.metadata_url = "http://127.0.0.1:1"
    assert validate(cfg) == [] and cfg.provider == "none"


# --- metadata pollers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "reason"),
    [
        ("aws", "aws spot notice: terminate at 20"),
        ("gcp", "gcp preempted: TRUE"),
        ("azure", "azure scheduled event: Preempt not before "),
    ],
)
def test_poller_sees_notice_within_two_intervals_and_not_before(fake, provider, reason):
    with watcher_for(provider, fake.url) as watcher:
        assert fake.wait_for(KIND[provider], n=3, timeout=2)
        assert not watcher.requested and watcher.remaining_s() == math.inf
        fake.issue_notice()
        issued = time.monotonic()
        assert wait_until(lambda: watcher.requested)
        seen_after = time.monotonic() - issued
        assert seen_after <= 2 * POLL_S + 0.1, seen_after
        assert watcher.reason.startswith(reason), watcher.reason
        # The fake's AWS and Azure notices leave two minutes: their window (less 5 s) replaces the 25 s
        # deadline; GCP's notice states no time and its usual ~30 s is not longer than 25 s plus the margin.
        deadline = 25.0 if provider == "gcp" else 115.0
        assert watcher.notice_time is not None and watcher.remaining_s() <= watcher.deadline_s
        assert deadline - 2.0 < watcher.deadline_s <= deadline, watcher.deadline_s
        polls = fake.count(KIND[provider])
        time.sleep(3 * POLL_S)
        assert fake.count(KIND[provider]) == polls, "the poller should stop once it has its notice"
    assert fake.count("unauthorized") == 0


def test_aws_token_is_requested_once_cached_and_sent(fake):
    with watcher_for("aws", fake.url):
        assert fake.wait_for("aws_spot", n=5)
    assert fake.count("aws_token") == 1
    assert fake.token_ttls == [spot._AWS_TOKEN_TTL_S]
    assert fake.count("unauthorized") == 0  # the fake 401s any spot request without a valid token


def test_aws_token_is_refreshed_before_it_expires(fake, monkeypatch):
    monkeypatch.setattr(spot, "_AWS_TOKEN_TTL_S", 1)
    with watcher_for("aws", fake.url) as watcher:
        assert fake.wait_for("aws_token", n=2, timeout=3)
        time.sleep(0.3)
        assert not watcher.requested
    assert fake.count("unauthorized") == 0


def test_aws_token_revoked_early_is_replaced_at_once(fake):
    with watcher_for("aws", fake.url) as watcher:
        assert fake.wait_for("aws_spot", n=2)
        fake.revoke_tokens()
        assert fake.wait_for("unauthorized", n=1)
        assert fake.wait_for("aws_token", n=2)
        fake.issue_notice()
        assert wait_until(lambda: watcher.requested)
    assert fake.count("unauthorized") == 1


def test_azure_events_other_than_preempt_are_ignored(fake):
    fake.issue_notice(azure_event_type="Freeze")
    with watcher_for("azure", fake.url) as watcher:
        assert fake.wait_for("azure", n=3)
        assert not watcher.requested


@pytest.mark.parametrize("provider", ["aws", "gcp", "azure"])
def test_unreachable_metadata_service_is_logged_once_and_never_sets_the_flag(provider, caplog):
    down = FakeMetadata()
    url = down.url
    down._server.server_close()  # bound once to get a free port, then closed: connections are refused
    caplog.set_level(logging.DEBUG, logger="greenrun.runtime.spot")
    with watcher_for(provider, url) as watcher:
        time.sleep(5 * POLL_S)
        assert not watcher.requested
        assert all(t.is_alive() for t in watcher._threads), "the poller must keep polling"
    failures = [r for r in caplog.records if "metadata poll failed" in r.getMessage()]
    assert len(failures) >= 3
    assert [r.levelno for r in failures].count(logging.INFO) == 1
    if provider == "aws":
        assert "HttpPutResponseHopLimit" in failures[0].getMessage()


def test_hanging_metadata_service_does_not_block_close():
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        watcher = watcher_for("gcp", url).start()
        time.sleep(0.2)
        started = time.monotonic()
        watcher.close()
        assert time.monotonic() - started < 2.5
        assert not watcher.requested


# --- signals --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_first_signal_sets_the_flag_without_raising(sig):
    with PreemptionWatcher(SpotConfig()) as watcher:
        os.kill(os.getpid(), sig)
        assert wait_until(lambda: watcher.requested)
        assert watcher.reason == sig.name
        assert 24.0 < watcher.remaining_s() <= 25.0


def test_second_signal_raises_preemption_abort_and_calls_on_abort(monkeypatch):
    monkeypatch.setattr(spot, "_DUPLICATE_WINDOW_S", 0.0)
    aborts = []
    with PreemptionWatcher(SpotConfig(), on_abort=aborts.append) as watcher:
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_until(lambda: watcher.requested)
        with pytest.raises(PreemptionAbort, match="second signal SIGINT while stopping for SIGTERM"):
            os.kill(os.getpid(), signal.SIGINT)
            wait_until(lambda: False, timeout=1.0)
    assert aborts == ["second signal SIGINT while stopping for SIGTERM"]


def test_preemption_abort_escapes_except_exception():
    with pytest.raises(PreemptionAbort):
        try:
            raise PreemptionAbort("second signal")
        except Exception:  # what training code may do around a step
            pytest.fail("except Exception swallowed PreemptionAbort")


def test_duplicate_delivery_of_one_stop_is_not_a_second_signal():
    with PreemptionWatcher(SpotConfig()) as watcher:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C under torchrun: from the terminal ...
        os.kill(os.getpid(), signal.SIGINT)  # ... and forwarded by torchrun a moment later
        assert wait_until(lambda: watcher.requested)
        time.sleep(0.05)
        assert watcher.reason == "SIGINT"


def test_signal_after_a_metadata_notice_is_the_same_preemption(fake, monkeypatch):
    monkeypatch.setattr(spot, "_DUPLICATE_WINDOW_S", 0.0)
    fake.issue_notice()
    with watcher_for("gcp", fake.url) as watcher:
        assert wait_until(lambda: watcher.requested)
        os.kill(os.getpid(), signal.SIGTERM)  # GCP also shuts the guest down when it preempts
        time.sleep(0.05)
        assert watcher.reason == "gcp preempted: TRUE"


def test_previous_handlers_are_restored_on_close():
    seen = []
    previous = {sig: signal.signal(sig, lambda s, f: seen.append(s)) for sig in spot._SIGNALS}
    try:
        with PreemptionWatcher(SpotConfig()) as watcher:
            assert all(signal.getsignal(sig) == watcher._on_signal for sig in spot._SIGNALS)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert wait_until(lambda: seen == [signal.SIGUSR1])
        assert not watcher.requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --- the deadline watchdog (it os._exit()s, so it runs in a child process) ------------------------------

CHILD = """
import os, signal, sys, time
from greenrun.runtime.spot import EXIT_PREEMPTED, PreemptionWatcher, SpotConfig

def on_abort(why):
    print(f"ABORT {{time.monotonic() - watcher.notice_time:.3f}} {{why}}", flush=True)
    time.sleep({on_abort_sleep})

with PreemptionWatcher(SpotConfig(deadline_s={deadline}), on_abort=on_abort) as watcher:
    os.kill(os.getpid(), signal.SIGTERM)
    while not watcher.requested:
        time.sleep(0.001)
    if {finish}:
        watcher.finished()  # the emergency checkpoint made it in time
    time.sleep({deadline} + 0.5)  # a save that is still running, or an idle wait after a finished one
sys.exit(EXIT_PREEMPTED)
"""


def run_child(deadline: float, finish: bool = False, on_abort_sleep: float = 0.0):
    code = CHILD.format(deadline=deadline, finish=finish, on_abort_sleep=on_abort_sleep)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=20
    )
    return proc, time.monotonic() - started


SECOND_SIGNAL_CHILD = """
import os, signal, time
from greenrun.runtime import spot
spot._DUPLICATE_WINDOW_S = 0.0
with spot.PreemptionWatcher(spot.SpotConfig(deadline_s=10)) as watcher:
    os.kill(os.getpid(), signal.SIGTERM)
    while not watcher.requested:
        time.sleep(0.001)
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the impatient second Ctrl-C
        time.sleep(5)
    except Exception:
        print("SWALLOWED", flush=True)
print("UNREACHED", flush=True)
"""


def test_uncaught_second_signal_exits_76_without_a_traceback():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", SECOND_SIGNAL_CHILD], env=env, capture_output=True, text=True, timeout=20
    )
    assert proc.returncode == EXIT_ABORTED, proc.stderr
    assert "SWALLOWED" not in proc.stdout and "UNREACHED" not in proc.stdout
    assert "Traceback" not in proc.stderr


def test_watchdog_calls_on_abort_and_exits_76_at_the_deadline():
    proc, _ = run_child(deadline=0.5)
    assert proc.returncode == EXIT_ABORTED, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ABORT")]
    assert len(lines) == 1, proc.stdout
    after_notice = float(lines[0].split()[1])
    assert 0.5 <= after_notice < 0.5 + 0.3, after_notice
    assert "no checkpoint committed 0.5 s after SIGTERM" in lines[0]


def test_watchdog_exits_even_when_on_abort_hangs():
    proc, took = run_child(deadline=0.3, on_abort_sleep=60)
    assert proc.returncode == EXIT_ABORTED, proc.stderr
    assert took < 0.3 + spot._ON_ABORT_TIMEOUT_S + 2.0, took


def test_watchdog_stands_down_after_finished():
    proc, _ = run_child(deadline=0.3, finish=True)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr
    assert "ABORT" not in proc.stdout
