"""Review regressions of the poll loop: an unexpected exception in a pass, a reload after the
initial sync gave up, installed certificates whose refresh fails during the initial sync."""
from __future__ import annotations

import logging

import pytest

from akvvm_ext.model import CertResult, Outcome
from tests.test_service import FakeSync, Recorder, _prompt_reloads, run_until, service, settings

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
