"""How the poll loop recovers: an unexpected exception in a pass, a reload after the initial
sync gave up, installed certificates whose refresh fails during the initial sync."""
from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from akvvm_ext.model import CertResult, Outcome
from tests.test_service import (
    FakeSync,
    Recorder,
    _prompt_reloads,
    fail,
    run_until,
    running,
    service,
    settings,
    wait_until,
)

__all__ = ["_prompt_reloads"]  # the fixture, shared with test_service


def thread_limit(n: int) -> CertResult | None:
    """A script whose second attempt dies like a thread pool under a process limit."""
    if n == 2:
        raise RuntimeError("can't start new thread")
    return None


def test_exception_in_a_poll_pass_is_reported_and_retried(
        caplog: pytest.LogCaptureFixture) -> None:
    """A pass that raises marks its certificate failed (still serving v1), logs it, polls on."""
    fake, recorder = FakeSync(scripts={"a": thread_limit}), Recorder()
    with caplog.at_level(logging.ERROR, logger="akvvm.service"):
        run_until(service(lambda: settings("a", interval=1), fake, recorder, scale=0.01),
                  fake, 4)
    failed = [r for _, results, _ in recorder.reports for r in results
              if r.outcome is Outcome.FAILED]
    assert [(r.error_kind, r.version, r.retryable) for r in failed] == [("INTERNAL", "v1", True)]
    assert "RuntimeError" in (failed[0].error or "")
    assert set(recorder.phases) == {"success"}
    assert recorder.reports[-1][1][0].outcome is Outcome.UNCHANGED
    assert any(r.exc_info and "failed unexpectedly" in r.message for r in caplog.records)


def test_exception_in_the_first_initial_attempt_is_retried() -> None:
    """requireInitialSync: a first attempt that raises is transitioning, then retried to success."""
    fake = FakeSync(scripts={"a": lambda n: thread_limit(n + 1)})
    recorder = Recorder()
    run_until(service(lambda: settings("a", "b", initial=True), fake, recorder), fake, 3)
    assert [names for _, names in fake.calls[:2]] == [("a", "b"), ("a", "b")]
    assert recorder.phases[:2] == ["transitioning", "success"]


def serving(url: str, *, retryable: bool = True) -> CertResult:
    """A failed refresh of a certificate whose version v1 stays installed and served."""
    return CertResult(url=url, outcome=Outcome.FAILED, version="v1",
                      path="/store/vault.a.v1", link="/store/vault.a",
                      error="HTTP 503 ServiceUnavailable.", error_kind="FETCH",
                      retryable=retryable)


A = "https://vault.localhost/secrets/a"
B = "https://vault.localhost/secrets/b"


def test_installed_certificate_failing_at_restart_keeps_success_and_gets_retry_passes() -> None:
    """requireInitialSync after a restart: an installed cert whose refresh fails is success
    (its substatus failing) and is retried in backed-off passes of its own, not initial retries."""
    fake = FakeSync(scripts={"a": lambda n: serving(A)})
    recorder = Recorder()
    run_until(service(lambda: settings("a", "b", initial=True, interval=100), fake, recorder,
                      scale=0.01),
              fake, 3)
    assert [names for _, names in fake.calls] == [("a", "b"), ("a",), ("a",)]
    assert set(recorder.phases) == {"success"}
    assert recorder.reports[0][1][0].outcome is Outcome.FAILED


def test_initial_sync_waits_only_for_the_uninstalled_certificate() -> None:
    """requireInitialSync: transitioning retries only the cert with nothing installed; success
    once it is, though an installed one still fails its refresh."""
    fake = FakeSync(scripts={"a": lambda n: serving(A, retryable=False),
                             "b": lambda n: fail(B) if n <= 2 else None})
    recorder = Recorder()
    run_until(service(lambda: settings("a", "b", initial=True), fake, recorder), fake, 4)
    assert [names for _, names in fake.calls[:3]] == [("a", "b"), ("b",), ("b",)]
    assert recorder.phases[:3] == ["transitioning", "transitioning", "success"]
    assert recorder.reports[2][1][0].outcome is Outcome.FAILED


def test_initial_error_recovers_once_all_are_installed_though_one_still_fails() -> None:
    """After the initial sync gave up, installing the missing cert turns error into success even
    while an installed cert keeps failing its refresh."""
    fake = FakeSync(scripts={"a": lambda n: serving(A, retryable=False),
                             "b": lambda n: fail(B, retryable=False) if n <= 26 else None})
    recorder = Recorder()
    run_until(service(lambda: settings("a", "b", initial=True), fake, recorder), fake, 28)
    assert recorder.phases[:26] == ["transitioning"] * 25 + ["error"]
    assert recorder.phases[-1] == "success"
    assert [r.outcome for r in recorder.reports[-1][1]] == [Outcome.FAILED, Outcome.UNCHANGED]


def gave_up_then_reloaded(still_broken: bool) -> tuple[FakeSync, Recorder, int, int]:
    """requireInitialSync: b's 403 uses up the initial retries; then (b fixed unless
    `still_broken`) a reload, the new goal state; returns the reports and calls before it."""
    broken = [True]
    fake = FakeSync(scripts={"b": lambda n: fail(B, retryable=False, error="HTTP 403 Forbidden.")
                             if broken[0] else None})
    recorder = Recorder()
    svc = service(lambda: settings("b", initial=True, interval=10_000_000), fake, recorder,
                  scale=1e-6, monotonic=lambda: 0.0)  # no poll cycle within the test
    with running(svc):
        wait_until(lambda: "error" in recorder.phases)
        reports, calls = len(recorder.reports), len(fake.calls)
        broken[0] = still_broken
        svc.request_reload()
        wait_until(lambda: len(fake.calls) > calls and recorder.phases[-1] != "transitioning")
    return fake, recorder, reports, calls


def test_reload_after_initial_error_retries_before_reporting() -> None:
    """After the initial sync gave up, a new goal state (reload) is transitioning and retried
    at once: success once access is fixed, never the old error."""
    fake, recorder, reports, calls = gave_up_then_reloaded(still_broken=False)
    assert recorder.phases[reports:] == ["transitioning", "success"]
    assert len(fake.calls) == calls + 1


def test_reload_after_initial_error_gets_fresh_retries() -> None:
    """A new goal state while the certificate still fails gets 25 new retries, then error."""
    fake, recorder, reports, calls = gave_up_then_reloaded(still_broken=True)
    assert recorder.phases[reports:] == ["transitioning"] * 26 + ["error"]
    assert len(fake.calls) == calls + 26
    assert recorder.reports[-1][2].startswith("Gave up after 25 retries")


def test_a_pinned_version_not_yet_installed_is_waited_for_though_an_older_one_is_served() -> None:
    """requireInitialSync, `a` pinned to v2: a failure that still serves v1 keeps the status
    transitioning and is retried as an initial attempt; success comes with v2 installed."""
    pinned = replace(settings("a", initial=True).observed[0], version="V2")  # any case
    wanted = replace(settings("a", initial=True), observed=(pinned,))
    fake = FakeSync(scripts={"a": lambda n: serving(A) if n < 3 else CertResult(
        url=A, outcome=Outcome.INSTALLED, version="v2", path="/store/vault.a.v2")})
    recorder = Recorder()
    run_until(service(lambda: wanted, fake, recorder), fake, 4)
    assert [names for _, names in fake.calls[:3]] == [("a",)] * 3
    assert recorder.phases[:3] == ["transitioning", "transitioning", "success"]
