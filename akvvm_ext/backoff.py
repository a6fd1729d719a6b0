"""How long the service waits: initial-sync retries and their deadline, Retry-After, retry passes
of certificates that failed in a poll cycle (`Holds`), poll jitter.

No I/O and no sleeping: time, randomness (`rand() -> [0, 1)`) and the scale come in as arguments;
every delay is multiplied by `scale` (`AKVVM_BACKOFF_SCALE`, read once by the composition root).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from akvvm_ext.model import CertResult, Outcome

SCALE_ENV = "AKVVM_BACKOFF_SCALE"

INITIAL_RETRIES = 25
INITIAL_FIRST_S = 4.0
INITIAL_FACTOR = 1.6
INITIAL_CAP_S = 180.0
# No initial retry starts later than this after the first attempt, whatever the attempts and
# Retry-After cost: the error reaches the agent ~25 min before its 90-minute goal-state budget.
INITIAL_BUDGET_S = 3600.0
JITTER_SHORTENS = 0.5  # initial delays are cut by up to half, never lengthened: a fleet's
# retries spread out instead of arriving in waves (bench/fleet.py: 37,500 -> 62,500 VMs a vault)

RETRY_AFTER_CAP_S = 300.0  # a server asking for more than this gets retried sooner anyway
CYCLE_FIRST_S = 2.0  # the first retry pass of a certificate that failed in a poll cycle
CYCLE_MAX_DOUBLINGS = 40  # keeps 2**n finite; the polling interval caps the delay long before

POLL_JITTER = 0.1  # each poll interval is the setting shortened by up to 20%, never lengthened

Rand = Callable[[], float]


def scale_from(environ: Mapping[str, str]) -> tuple[float, str | None]:
    """`AKVVM_BACKOFF_SCALE` as a float (default 1) and a note when the value was unusable."""
    raw = environ.get(SCALE_ENV)
    if raw is None or raw.strip() == "":
        return 1.0, None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:  # 0 would poll Key Vault without a pause
        return 1.0, f"{SCALE_ENV}={raw!r} is not a positive number; using 1"
    return value, None


def initial_schedule() -> tuple[float, ...]:
    """The nominal initial-sync delays in seconds, one per retry, increasing, unscaled."""
    return tuple(min(INITIAL_CAP_S, INITIAL_FIRST_S * INITIAL_FACTOR**n)
                 for n in range(INITIAL_RETRIES))


def initial_delay(retry: int, rand: Rand, scale: float = 1.0,
                  retry_after: float | None = None) -> float:
    """Seconds to wait before initial-sync retry number `retry` (1-based).

    Jitter only shortens the nominal delay; a server's Retry-After (capped) wins when it asks
    for longer (then `initial_out_of_time` ends the retries early). Past the schedule, its last.
    """
    if retry < 1:
        raise ValueError(f"retry numbers start at 1, not {retry}")
    nominal = initial_schedule()[min(retry, INITIAL_RETRIES) - 1] * (1 - JITTER_SHORTENS * rand())
    return max(nominal, capped_retry_after(retry_after)) * scale


def initial_out_of_time(elapsed_s: float, next_delay_s: float, scale: float = 1.0) -> bool:
    """Whether the initial sync gives up now: the next retry would start past the budget.

    `elapsed_s` is the wall-clock time since the first attempt (attempts included) and
    `next_delay_s` the wait before the next retry, both as measured (already scaled).
    """
    return elapsed_s + next_delay_s > INITIAL_BUDGET_S * scale


def capped_retry_after(retry_after: float | None) -> float:
    """A server-given Retry-After, within [0, RETRY_AFTER_CAP_S]; 0 when there was none."""
    if retry_after is None or not math.isfinite(retry_after):
        return 0.0
    return min(max(retry_after, 0.0), RETRY_AFTER_CAP_S)


def cycle_delay(attempt: int, rand: Rand, scale: float = 1.0,
                retry_after: float | None = None, interval_s: float = math.inf) -> float:
    """Seconds before the retry pass of a certificate that failed `attempt` times in a row.

    Exponential from CYCLE_FIRST_S, doubling per failure, at most `interval_s`, with jitter that
    shortens by up to half; never shorter than the server's Retry-After (capped).
    """
    doublings = min(max(attempt - 1, 0), CYCLE_MAX_DOUBLINGS)
    ceiling = min(CYCLE_FIRST_S * 2.0**doublings, interval_s)
    return max(capped_retry_after(retry_after), ceiling * (1 - 0.5 * rand())) * scale


def poll_delay(interval_s: float, rand: Rand, scale: float = 1.0,
               jitter: float = POLL_JITTER) -> float:
    """The wait until the next poll: the interval shortened by up to 2 x `jitter`, so a fleet
    spreads out and yet no certificate waits longer than the polling interval for a rotation."""
    return interval_s * (1 - 2 * jitter * rand()) * scale


@dataclass(frozen=True)
class Hold:
    """No GET for a certificate before `not_before` (monotonic seconds).

    `own_pass`: it gets a retry pass of its own then; else it waits for the first poll cycle
    at or after that time.
    """

    not_before: float
    own_pass: bool


class Holds:
    """When certificates that failed in poll cycles may be fetched again (SPEC 6).

    A retryable failure holds the certificate for `cycle_delay` (its failures in a row counted):
    a retry pass of its own when that comes before the next poll cycle, else (and once the
    backoff has grown to the interval) the next cycle not sooner than its Retry-After. Success
    or a permanent failure releases it. Times are monotonic seconds, already scaled.
    """

    def __init__(self, rand: Rand, scale: float = 1.0) -> None:
        self._rand, self._scale = rand, scale
        self._held: dict[str, Hold] = {}
        self._failures: dict[str, int] = {}

    def record(self, results: Sequence[CertResult], now: float, next_poll: float,
               interval_s: float) -> None:
        """Hold or release each certificate of a poll cycle or retry pass that ended at `now`."""
        for result in results:
            if result.outcome is not Outcome.FAILED or not result.retryable:
                self._held.pop(result.url, None)
                self._failures.pop(result.url, None)
                continue
            failures = self._failures[result.url] = self._failures.get(result.url, 0) + 1
            at = now + cycle_delay(failures, self._rand, self._scale, result.retry_after,
                                   interval_s)
            grown = CYCLE_FIRST_S * 2.0 ** min(failures - 1, CYCLE_MAX_DOUBLINGS) >= interval_s
            self._held[result.url] = (Hold(at, own_pass=True) if at < next_poll and not grown
                                      else self._respect(result, now))

    def give_up(self, results: Sequence[CertResult], now: float) -> None:
        """Failures the initial sync gave up on: no retry passes any more, just the poll cycles
        (not sooner than Retry-After), until they work again."""
        for result in results:
            if result.outcome is Outcome.FAILED:
                self._failures[result.url] = CYCLE_MAX_DOUBLINGS + 1
                self._held[result.url] = self._respect(result, now)

    def _respect(self, result: CertResult, now: float) -> Hold:
        return Hold(now + capped_retry_after(result.retry_after) * self._scale, own_pass=False)

    def due(self, url: str, now: float, cycle: bool) -> bool:
        """Whether a pass at `now` (a poll cycle when `cycle`) fetches `url`."""
        hold = self._held.get(url)
        if hold is None:
            return cycle
        return hold.not_before <= now and (cycle or hold.own_pass)

    def next_wake(self, next_poll: float) -> float:
        """The next poll cycle or the earliest retry pass, whichever comes first."""
        return min([next_poll, *(h.not_before for h in self._held.values() if h.own_pass)])

    def keep(self, urls: Collection[str]) -> None:
        """Forget certificates no longer observed."""
        for url in [u for u in self._held if u not in urls]:
            del self._held[url]
        for url in [u for u in self._failures if u not in urls]:
            del self._failures[url]
