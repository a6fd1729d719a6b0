"""The poll loop of `akvvm_service`: initial sync with retries, then poll cycles and retry passes.

Load on Key Vault (SPEC 6): a poll cycle GETs each observed certificate once, and a failure is
never retried inside it. A retryable failure instead gets a retry pass for that certificate alone
(`backoff.Holds`): never sooner than the server's Retry-After, else exponential backoff with
jitter growing with each failure in a row, at most the polling interval; the retry pass is that
certificate's cycle. So no certificate gets more than one GET per cycle or retry pass, nor one
sooner than its Retry-After or backoff. The initial sync (requireInitialSync) waits only for
certificates with nothing installed (an installed one that fails takes the retry passes), on its
own schedule: 25 retries, ended early when the next would start past an hour (SPEC 3.6); what it
gave up on is then tried once per poll cycle. A reload reports the last results at once and
syncs again only certificates it added or changed that are not installed; after the initial sync
gave up, it starts that again with fresh retries (a new goal state must not inherit the error).

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
from akvvm_ext.board import Board, failing, not_installed
from akvvm_ext.model import CertResult, ObservedCertificate, Settings

Phase = Literal["transitioning", "success", "error"]
SyncPass = Callable[[Settings, Any, datetime], list[CertResult]]
WAKE_S = 1.0  # longest single wait, so a reload request is seen within a second

log = logging.getLogger("akvvm.service")


class Reporter(Protocol):
    """Where the service tells the outside world how it is doing."""

    def report(self, phase: Phase, results: Sequence[CertResult], message: str) -> None:
        """Called after every pass; `message` is a short detail for the phase (may be empty)."""


def _real_sync(settings: Settings, vaults: Any, now: datetime) -> list[CertResult]:
    # imported late: the Key Vault SDK is heavy, and Phase/Reporter users need none of it
    from akvvm_ext.sync import sync

    return sync(settings, vaults, now)


def gave_up(retries: int) -> str:
    """The error detail once the initial sync stops retrying."""
    return (f"Gave up after {retries} retries; the service keeps retrying every polling "
            "interval.")


class Service:
    """Runs sync passes until stopped; `request_reload()` (SIGHUP) re-reads the settings."""

    def __init__(self, load_settings: Callable[[], Settings],
                 make_vaults: Callable[[Settings], Any], reporter: Reporter, *,
                 sync: SyncPass | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 rand: Callable[[], float] = random.random, backoff_scale: float = 1.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._load_settings, self._make_vaults = load_settings, make_vaults
        self._reporter, self._sync = reporter, sync or _real_sync
        self._clock, self._rand, self._monotonic = clock, rand, monotonic
        self._scale = backoff_scale
        self._reload, self._stop = threading.Event(), threading.Event()
        self.passes = 0
        self._failing: set[str] = set()
        self._board = Board(())
        self._holds = backoff.Holds(rand, backoff_scale)
        self._phase: Phase = "success"
        self._detail, self._next_poll, self._report_error = "", 0.0, ""

    def request_reload(self) -> None:
        """Ask for a settings reload at the next wake-up (safe from a signal handler)."""
        self._reload.set()

    def run(self, stop: threading.Event) -> None:
        """Serve until `stop` is set; settings errors at start propagate to the caller."""
        self._stop = stop
        settings = self._load_settings()
        vaults = self._make_vaults(settings)
        try:
            self._board = Board(settings.observed)
            self._next_poll = self._poll_at(settings)
            self._initial(settings, vaults, first=True)
            while not stop.is_set():
                self._poll(settings, vaults)
                if self._reload.is_set() and not stop.is_set():
                    self._reload.clear()
                    settings, vaults = self._reloaded(settings, vaults)
        finally:
            _close(vaults)

    def _initial(self, settings: Settings, vaults: Any, *, first: bool) -> None:
        """Sync what is not installed: once, or with the initial retries (SPEC 3.6)."""
        targets = self._board.missing()
        if settings.require_initial_sync:
            self._phase = self._initial_retries(settings, vaults, targets)
        else:
            if first:
                self._tell("success", [], "")
            self._cycle_pass(settings, vaults, targets)
            self._phase = "success"

    def _initial_retries(self, settings: Settings, vaults: Any,
                         targets: Sequence[ObservedCertificate]) -> Phase:
        """Retry only the uninstalled until all are installed, 25 retries or the budget run out."""
        pending = _Pending(targets, lambda certs: self._initial_pass(settings, vaults, certs),
                           self._interrupted)
        started = self._monotonic()

        def give_up(state: tenacity.RetryCallState) -> bool:  # 25 retries or the budget spent
            return state.attempt_number > backoff.INITIAL_RETRIES or backoff.initial_out_of_time(
                self._monotonic() - started, state.upcoming_sleep, self._scale)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_result(lambda left: bool(left) and not self._interrupted()),
            stop=give_up,
            wait=lambda state: backoff.initial_delay(state.attempt_number, self._rand,
                                                     self._scale,
                                                     pending.retry_after()),
            sleep=self._sleep, before_sleep=self._transitioning,
            retry_error_callback=lambda state: pending.certs,
        )
        if not retrying(pending.attempt):
            return "success"
        if self._interrupted():
            return "transitioning"
        self._holds.give_up(pending.failed, self._monotonic())
        self._detail = gave_up(pending.attempts - 1)
        log.error("initial sync failed for %d certificate(s) after %d retries",
                  len(pending.certs), pending.attempts - 1)
        return "error"

    def _transitioning(self, state: tenacity.RetryCallState) -> None:
        delay = state.next_action.sleep if state.next_action else 0.0
        detail = f"Retry {state.attempt_number} of {backoff.INITIAL_RETRIES} in {delay:.0f} s."
        log.info("initial sync: %d not installed yet; %s", len(self._board.missing()), detail)
        self._tell("transitioning", self._board.results(), detail)

    def _poll(self, settings: Settings, vaults: Any) -> None:
        """Poll cycles and retry passes (module docstring) until stop or reload."""
        while not self._interrupted():
            if self._phase == "error" and not self._board.missing():
                log.info("every certificate is installed now; recovered from the initial error")
                self._phase = "success"
            self._report()
            self._sleep(self._holds.next_wake(self._next_poll) - self._monotonic())
            if self._interrupted():
                return
            cycle = self._monotonic() >= self._next_poll
            if cycle:
                self._next_poll = self._poll_at(settings)
            now = self._monotonic()
            self._cycle_pass(settings, vaults, [c for c in settings.observed
                                                if self._holds.due(c.url, now, cycle)])

    def _initial_pass(self, settings: Settings, vaults: Any,
                      certs: Sequence[ObservedCertificate]) -> list[CertResult]:
        """An initial attempt; an installed certificate that fails takes the retry passes."""
        results = self._pass(settings, vaults, certs)
        self._holds.record([r for c, r in zip(certs, results, strict=True)
                            if not not_installed(c, r)], self._monotonic(),
                           self._next_poll, settings.polling_interval_s)
        return results

    def _cycle_pass(self, settings: Settings, vaults: Any,
                    certs: Sequence[ObservedCertificate]) -> None:
        results = self._pass(settings, vaults, certs)
        self._holds.record(results, self._monotonic(), self._next_poll,
                           settings.polling_interval_s)

    def _pass(self, settings: Settings, vaults: Any,
              certs: Sequence[ObservedCertificate]) -> list[CertResult]:
        """One sync of `certs` (none: no call), merged into the board; an unexpected exception
        fails them all, retryable, instead of ending the service."""
        if not certs:
            return []
        try:
            results = self._sync(replace(settings, observed=tuple(certs)), vaults, self._clock())
            self._board.update(certs, results)
        except Exception as err:  # a bug or a process limit must not end the polling
            log.exception("sync pass of %d certificate(s) failed unexpectedly; retried with "
                          "backoff", len(certs))
            results = self._board.failed(certs, f"internal error in the sync pass "
                                         f"({type(err).__name__}); retried. See the service log.")
            self._board.update(certs, results)
        self.passes += 1
        self._note_recoveries(self._board.results())
        return results

    def _poll_at(self, settings: Settings) -> float:
        return self._monotonic() + backoff.poll_delay(settings.polling_interval_s, self._rand,
                                                      self._scale)

    def _note_recoveries(self, results: list[CertResult]) -> None:
        """Log a certificate that works again, and let its next failure log at once."""
        now_failing = {r.url for r in failing(results)}
        for url in sorted(self._failing - now_failing):
            logs.forget_repeats(url)
            log.info("%s: works again", url)
        self._failing = now_failing

    def _report(self) -> None:
        self._tell(self._phase, self._board.results(),
                   self._detail if self._phase == "error" else "")

    def _tell(self, phase: Phase, results: Sequence[CertResult], message: str) -> None:
        """Report through the reporter; a failing write (ENOSPC, EROFS, no status dir) is logged
        once per distinct error and retried on the next report, never ending the service."""
        try:
            self._reporter.report(phase, results, message)
        except Exception as err:  # noqa: BLE001 - status is best effort; syncing goes on
            kind = f"{type(err).__name__} {getattr(err, 'errno', '')}"  # not the temp name
            if kind != self._report_error:
                log.error("cannot write the status (retried next pass): %s", err)
            self._report_error = kind
        else:
            if self._report_error:
                log.info("status written again")
            self._report_error = ""

    def _sleep(self, seconds: float) -> None:
        """Wait `seconds` in slices, ending early on stop or a reload request."""
        deadline = time.monotonic() + seconds
        while not self._interrupted() and (remaining := deadline - time.monotonic()) > 0:
            self._stop.wait(min(remaining, WAKE_S))

    def _interrupted(self) -> bool:
        return self._stop.is_set() or self._reload.is_set()

    def _reloaded(self, settings: Settings, vaults: Any) -> tuple[Settings, Any]:
        """Apply new settings: report what is known at once (the reporter may have a new target),
        sync what is not installed when the change added it or the initial sync had given up
        (with fresh retries); on a bad reload keep the last good ones."""
        fresh, fresh_vaults = self._load(settings, vaults)
        changed = set(fresh.observed) != set(settings.observed)
        self._board = self._board.carried(fresh.observed)
        self._holds.keep({c.url for c in fresh.observed})
        self._next_poll = min(self._next_poll, self._poll_at(fresh))
        if self._phase == "error":  # the agent takes error as final: retry before reporting it
            self._phase = "transitioning" if fresh.require_initial_sync else "success"
        self._report()
        if (changed and self._board.missing()) or self._phase == "transitioning":
            self._initial(fresh, fresh_vaults, first=False)
        return fresh, fresh_vaults

    def _load(self, settings: Settings, vaults: Any) -> tuple[Settings, Any]:
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


class _Pending:
    """The initial sync's certificates with nothing installed; each attempt syncs only those."""

    def __init__(self, certs: Sequence[ObservedCertificate],
                 run: Callable[[Sequence[ObservedCertificate]], list[CertResult]],
                 interrupted: Callable[[], bool]) -> None:
        self.certs, self.run, self.interrupted = list(certs), run, interrupted
        self.failed: list[CertResult] = []
        self.attempts = 0

    def attempt(self) -> list[ObservedCertificate]:
        """Sync the pending certificates (unless interrupted); return those still not installed."""
        if self.certs and not self.interrupted():
            results = self.run(self.certs)
            self.attempts += 1
            pending = [(c, r) for c, r in zip(self.certs, results, strict=True)
                       if not_installed(c, r)]
            self.failed, self.certs = [r for _, r in pending], [c for c, _ in pending]
        return self.certs

    def retry_after(self) -> float | None:
        """The longest Retry-After the last attempt's failures asked for."""
        asked = [r.retry_after for r in self.failed if r.retry_after is not None]
        return max(asked) if asked else None


def _close(vaults: Any) -> None:
    close = getattr(vaults, "close", None)
    if callable(close):
        close()
