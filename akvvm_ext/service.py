"""The poll loop of `akvvm_service`: initial sync with retries, then one sync per polling interval.

Settings, vault access, the sync pass, time, randomness and reporting come in as arguments; the
loop waits only on the stop event, so a stop request ends it at once.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, Literal, Protocol

import tenacity

from akvvm_ext import backoff, logs
from akvvm_ext.model import CertResult, Outcome, Settings

Phase = Literal["transitioning", "success", "error"]
SyncPass = Callable[[Settings, Any, datetime], list[CertResult]]
WAKE_S = 1.0  # longest single wait, so a reload request is seen within a second

log = logging.getLogger("akvvm.service")
GAVE_UP = (f"Gave up after {backoff.INITIAL_RETRIES} retries; the service keeps retrying "
           "every polling interval.")


class Reporter(Protocol):
    """Where the service tells the outside world how it is doing."""

    def report(self, phase: Phase, results: Sequence[CertResult], message: str) -> None:
        """Called after every pass; `message` is a short detail for the phase (may be empty)."""


def _real_sync(settings: Settings, vaults: Any, now: datetime) -> list[CertResult]:
    # imported late: the Key Vault SDK is heavy, and Phase/Reporter users need none of it
    from akvvm_ext.sync import sync

    return sync(settings, vaults, now)


def failing(results: Sequence[CertResult]) -> list[CertResult]:
    """The results that failed."""
    return [r for r in results if r.outcome is Outcome.FAILED]


def _longest_retry_after(results: Sequence[CertResult]) -> float | None:
    asked = [r.retry_after for r in results if r.retry_after is not None]
    return max(asked) if asked else None


class Service:
    """Runs sync passes until stopped; `request_reload()` (SIGHUP) re-reads the settings."""

    def __init__(self, load_settings: Callable[[], Settings],
                 make_vaults: Callable[[Settings], Any], reporter: Reporter, *,
                 sync: SyncPass | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 rand: Callable[[], float] = random.random, backoff_scale: float = 1.0,
                 spread_first_poll: bool = False) -> None:
        self._load_settings = load_settings
        self._make_vaults = make_vaults
        self._reporter = reporter
        self._sync = sync or _real_sync
        self._clock = clock
        self._rand = rand
        self._scale = backoff_scale
        self._spread = spread_first_poll
        self._reload = threading.Event()
        self._stop = threading.Event()
        self.passes = 0
        self._failing: set[str] = set()

    def request_reload(self) -> None:
        """Ask for a settings reload at the next wake-up (safe from a signal handler)."""
        self._reload.set()

    def run(self, stop: threading.Event) -> None:
        """Serve until `stop` is set; settings errors at start propagate to the caller."""
        self._stop = stop
        settings = self._load_settings()
        vaults = self._make_vaults(settings)
        try:
            while not stop.is_set():
                self._reload.clear()
                self._serve(settings, vaults)
                if self._reload.is_set() and not stop.is_set():
                    settings, vaults = self._reloaded(settings, vaults)
        finally:
            _close(vaults)

    def _serve(self, settings: Settings, vaults: Any) -> None:
        """Initial sync, then poll cycles, until stop or reload."""
        if self._spread and self.passes == 0:
            self._sleep(backoff.first_poll_offset(settings.polling_interval_s, self._rand,
                                                  self._scale))
        phase, results = self._initial(settings, vaults)
        while not self._interrupted():
            self._report(phase, results)
            if self._sleep(backoff.poll_delay(settings.polling_interval_s, self._rand,
                                              self._scale)):
                return
            results = self._cycle(settings, vaults)
            if phase == "error" and not failing(results):
                log.info("every certificate is installed now; recovered from the initial error")
                phase = "success"

    def _initial(self, settings: Settings, vaults: Any) -> tuple[Phase, list[CertResult]]:
        """The first pass: plain when no initial sync is required, else retried (SPEC 3.6)."""
        if not settings.require_initial_sync:
            self._reporter.report("success", [], "")
            return "success", self._cycle(settings, vaults)
        results = self._retrying(
            settings, vaults, backoff.INITIAL_RETRIES, retryable=lambda r: True,
            wait=lambda n, rs: backoff.initial_delay(n, self._rand, self._scale,
                                                     _longest_retry_after(rs)),
            before_sleep=self._transitioning,
        )
        if failing(results) and not self._interrupted():
            log.error("initial sync failed for %d certificate(s) after %d retries",
                      len(failing(results)), backoff.INITIAL_RETRIES)
            return "error", results
        return "success", results

    def _transitioning(self, results: list[CertResult], retry: int, delay: float) -> None:
        detail = f"Retry {retry} of {backoff.INITIAL_RETRIES} in {delay:.0f} s."
        log.info("initial sync: %d certificate(s) failing; %s", len(failing(results)), detail)
        self._reporter.report("transitioning", results, detail)

    def _cycle(self, settings: Settings, vaults: Any) -> list[CertResult]:
        """One poll cycle; retryable failures are retried a few times, the others not delayed."""
        return self._retrying(
            settings, vaults, backoff.CYCLE_ATTEMPTS - 1, retryable=lambda r: r.retryable,
            wait=lambda n, rs: backoff.cycle_delay(n, self._rand, self._scale,
                                                   _longest_retry_after(rs)),
            before_sleep=None,
        )

    def _retrying(self, settings: Settings, vaults: Any, retries: int,
                  retryable: Callable[[CertResult], bool],
                  wait: Callable[[int, list[CertResult]], float],
                  before_sleep: Callable[[list[CertResult], int, float], None] | None,
                  ) -> list[CertResult]:
        """A full pass, then up to `retries` passes over only the failed, retryable results."""
        attempt = _Attempts(settings, vaults, self._pass, self._interrupted)

        def worth_retrying(results: list[CertResult]) -> bool:
            return not self._interrupted() and any(retryable(r) for r in failing(results))

        def on_sleep(state: tenacity.RetryCallState) -> None:
            if before_sleep is not None and state.next_action is not None:
                before_sleep(attempt.results, state.attempt_number, state.next_action.sleep)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_result(worth_retrying),
            stop=tenacity.stop_after_attempt(1 + retries),
            wait=lambda state: wait(state.attempt_number, failing(attempt.results)),
            sleep=self._pause, before_sleep=on_sleep,
            retry_error_callback=lambda state: attempt.results,
        )
        results: list[CertResult] = retrying(attempt.next, retryable)
        self._note_recoveries(results)
        return results

    def _note_recoveries(self, results: list[CertResult]) -> None:
        """Log a certificate that works again, and let its next failure log at once."""
        now_failing = {r.url for r in failing(results)}
        for url in sorted(self._failing - now_failing):
            logs.forget_repeats(url)
            log.info("%s: works again", url)
        self._failing = now_failing

    def _pass(self, settings: Settings, vaults: Any) -> list[CertResult]:
        results = self._sync(settings, vaults, self._clock())
        self.passes += 1
        return results

    def _report(self, phase: Phase, results: list[CertResult]) -> None:
        self._reporter.report(phase, results, GAVE_UP if phase == "error" else "")

    def _sleep(self, seconds: float) -> bool:
        """Wait `seconds` in slices; True when interrupted by stop or a reload request."""
        deadline = time.monotonic() + seconds
        while not self._interrupted():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._stop.wait(min(remaining, WAKE_S))
        return True

    def _pause(self, seconds: float) -> None:
        self._sleep(seconds)

    def _interrupted(self) -> bool:
        return self._stop.is_set() or self._reload.is_set()

    def _reloaded(self, settings: Settings, vaults: Any) -> tuple[Settings, Any]:
        """New settings (and new vault clients when the identity changed); old ones on error."""
        try:
            fresh = self._load_settings()
            fresh_vaults = (vaults if fresh.identity == settings.identity
                            else self._make_vaults(fresh))
        except Exception as err:  # noqa: BLE001 - a bad reload keeps the last good settings
            log.error("reload failed, keeping the last good settings: %s", err)
            return settings, vaults
        log.info("settings reloaded: %d observed certificate(s)", len(fresh.observed))
        if fresh_vaults is not vaults:
            _close(vaults)
        return fresh, fresh_vaults


class _Attempts:
    """The results so far; each call after the first re-syncs only the failed, retryable ones."""

    def __init__(self, settings: Settings, vaults: Any,
                 run: Callable[[Settings, Any], list[CertResult]],
                 interrupted: Callable[[], bool]) -> None:
        self.settings, self.vaults, self.run, self.interrupted = settings, vaults, run, interrupted
        self.results: list[CertResult] = []

    def next(self, retryable: Callable[[CertResult], bool]) -> list[CertResult]:
        """The first call syncs everything; later ones merge in a re-sync of the failed."""
        if not self.results:
            self.results = self.run(self.settings, self.vaults)
            return self.results
        if self.interrupted():
            return self.results
        again = [i for i, r in enumerate(self.results)
                 if r.outcome is Outcome.FAILED and retryable(r)]
        subset = replace(self.settings, observed=tuple(self.settings.observed[i] for i in again))
        merged = list(self.results)
        for index, result in zip(again, self.run(subset, self.vaults), strict=True):
            merged[index] = result
        self.results = merged
        return merged


def _close(vaults: Any) -> None:
    close = getattr(vaults, "close", None)
    if callable(close):
        close()
