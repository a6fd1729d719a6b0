"""Backoff schedules: bounded, increasing, jittered within limits, Retry-After honoured, scaled."""
from __future__ import annotations

import itertools
import random

import pytest

from akvvm_ext import backoff
from akvvm_ext.model import CertResult, Outcome

SEEDS = range(200)


def rands(seed: int) -> random.Random:
    """A seeded source of randomness, so property failures reproduce."""
    return random.Random(seed)


def test_initial_schedule_has_25_increasing_retries_within_an_hour() -> None:
    """25 retries, never shorter than the one before, together at most an hour."""
    schedule = backoff.initial_schedule()
    assert len(schedule) == 25
    assert all(a <= b for a, b in itertools.pairwise(schedule))
    assert schedule[0] < schedule[-1]
    assert sum(schedule) <= backoff.INITIAL_BUDGET_S


def test_jittered_initial_retries_stay_within_budget() -> None:
    """Whatever the jitter, the 25 delays stay under the budget and near the nominal schedule."""
    for seed in SEEDS:
        rng = rands(seed)
        delays = [backoff.initial_delay(n, rng.random) for n in range(1, 26)]
        nominal = backoff.initial_schedule()
        assert sum(delays) <= backoff.INITIAL_BUDGET_S
        for delay, expected in zip(delays, nominal, strict=True):
            assert (1 - backoff.JITTER_SHORTENS) * expected <= delay <= expected


def test_initial_retry_numbers_start_at_one_and_end_at_the_cap() -> None:
    """Retry 0 is a bug; retries past the schedule keep its last (capped) delay."""
    with pytest.raises(ValueError):
        backoff.initial_delay(0, lambda: 0.5)
    assert backoff.initial_delay(40, lambda: 0.0) == backoff.INITIAL_CAP_S


def test_initial_delay_honours_a_longer_retry_after() -> None:
    """A server asking for longer than the schedule is obeyed, capped at five minutes."""
    assert backoff.initial_delay(1, lambda: 0.0, retry_after=30) == 30
    assert backoff.initial_delay(1, lambda: 0.0, retry_after=86400) == backoff.RETRY_AFTER_CAP_S


def test_cycle_delay_doubles_with_jitter_up_to_the_interval() -> None:
    """Without Retry-After: in [c/2, c] for c = min(interval, 2 * 2^(n-1)) seconds."""
    for seed in SEEDS:
        rng = rands(seed)
        for attempt in range(1, 14):
            ceiling = min(600.0, 2.0 * 2 ** (attempt - 1))
            assert ceiling / 2 <= backoff.cycle_delay(attempt, rng.random,
                                                      interval_s=600) <= ceiling
    assert backoff.cycle_delay(10_000, lambda: 0.0) > 0  # no overflow far out


def test_cycle_delay_is_never_shorter_than_retry_after() -> None:
    """Retry-After is a floor under the backoff; negative values are ignored, huge ones capped."""
    assert backoff.cycle_delay(1, lambda: 0.9, retry_after=7) == 7
    assert backoff.cycle_delay(8, lambda: 0.0, retry_after=7) == 256
    assert backoff.cycle_delay(1, lambda: 0.0, retry_after=-3) == 2
    assert backoff.cycle_delay(1, lambda: 0.9, retry_after=1e9) == backoff.RETRY_AFTER_CAP_S


def throttled(url: str, retry_after: float | None = None,
              retryable: bool = True) -> CertResult:
    """A failed result, as a 429 (or 503 without Retry-After) gives."""
    return CertResult(url=url, outcome=Outcome.FAILED, retryable=retryable,
                      retry_after=retry_after)


def test_holds_give_a_failed_certificate_its_own_retry_pass() -> None:
    """A failure before the next cycle: a retry pass of its own after the backoff, not sooner."""
    holds = backoff.Holds(lambda: 0.0)
    holds.record([throttled("a"), CertResult("b", Outcome.UNCHANGED)], 100.0, 3700.0, 3600)
    assert holds.next_wake(3700.0) == 102.0
    assert not holds.due("a", 101.0, cycle=False) and holds.due("a", 102.0, cycle=False)
    assert not holds.due("b", 102.0, cycle=False) and holds.due("b", 3700.0, cycle=True)
    holds.record([CertResult("a", Outcome.INSTALLED)], 102.0, 3700.0, 3600)
    assert holds.next_wake(3700.0) == 3700.0 and not holds.due("a", 103.0, cycle=False)


def test_holds_honour_retry_after_even_across_a_poll_cycle() -> None:
    """Retry-After longer than the cycle: the cycle skips the certificate until then."""
    holds = backoff.Holds(lambda: 0.0)
    holds.record([throttled("a", retry_after=120)], 0.0, 60.0, 60)
    assert holds.next_wake(60.0) == 60.0  # no retry pass of its own: the cycle takes it
    assert not holds.due("a", 61.0, cycle=True) and holds.due("a", 121.0, cycle=True)


def test_a_lasting_failure_settles_at_one_get_per_cycle() -> None:
    """Backoff doubles per failure in a row; once it reaches the cycle, no more retry passes."""
    holds, now, gets = backoff.Holds(lambda: 0.5), 0.0, 0
    for cycle in range(1, 40):
        next_poll = cycle * 3600.0
        while True:
            gets += 1
            holds.record([throttled("a")], now, next_poll, 3600)
            if holds.next_wake(next_poll) >= next_poll:
                break
            now = holds.next_wake(next_poll)
        now = next_poll
    assert gets <= 39 + 12  # 11 retry passes while the backoff grows to an hour, then 1 per cycle


def test_permanent_failures_and_forgotten_certificates_are_released() -> None:
    """A 403 gets no retry pass; `keep` drops certificates no longer observed."""
    holds = backoff.Holds(lambda: 0.0)
    holds.record([throttled("a", retryable=False), throttled("b")], 0.0, 3600.0, 3600)
    assert holds.due("a", 3600.0, cycle=True) and not holds.due("a", 5.0, cycle=False)
    holds.keep({"a"})
    assert holds.next_wake(3600.0) == 3600.0


def test_after_the_initial_sync_gave_up_failures_ride_the_poll_cycles() -> None:
    """What the initial retries gave up on gets no retry passes; Retry-After still holds."""
    holds = backoff.Holds(lambda: 0.0)
    holds.give_up([throttled("a", retry_after=30), throttled("b")], 0.0)
    assert not holds.due("a", 29.0, cycle=True) and holds.due("b", 1.0, cycle=True)
    holds.record([throttled("a"), throttled("b")], 3600.0, 7200.0, 3600)
    assert holds.next_wake(7200.0) == 7200.0
    holds.record([CertResult("a", Outcome.INSTALLED)], 7200.0, 10800.0, 3600)
    holds.record([throttled("a")], 7200.0, 10800.0, 3600)
    assert holds.next_wake(10800.0) == 7202.0  # working again: the backoff starts over


def test_initial_sync_ends_within_the_hour_whatever_the_server_asks() -> None:
    """25 x Retry-After 300 s with 24 s attempts: the last retry starts within the hour."""
    elapsed, retries = 24.0, 0
    while retries < backoff.INITIAL_RETRIES:
        delay = backoff.initial_delay(retries + 1, lambda: 0.0, retry_after=300)
        if backoff.initial_out_of_time(elapsed, delay):
            break
        elapsed, retries = elapsed + delay + 24.0, retries + 1
    assert retries < backoff.INITIAL_RETRIES
    assert elapsed <= backoff.INITIAL_BUDGET_S + 24.0 < 90 * 60


def test_initial_budget_is_scaled() -> None:
    """The budget shrinks with AKVVM_BACKOFF_SCALE like every delay."""
    assert not backoff.initial_out_of_time(3.0, 0.5, scale=0.001)
    assert backoff.initial_out_of_time(3.0, 0.7, scale=0.001)


def test_poll_delay_never_exceeds_the_interval() -> None:
    """Each poll waits 80-100% of the interval: a rotation is seen within one polling interval."""
    for seed in SEEDS:
        delay = backoff.poll_delay(3600, rands(seed).random)
        assert 2880 <= delay <= 3600
    assert backoff.poll_delay(3600, lambda: 0.0) == 3600


def test_poll_delays_spread_out_a_fleet() -> None:
    """A thousand VMs with one setting do not poll in lockstep."""
    rng = rands(1)
    delays = [backoff.poll_delay(3600, rng.random) for _ in range(1000)]
    assert max(delays) - min(delays) > 600


def test_every_delay_is_scaled() -> None:
    """AKVVM_BACKOFF_SCALE multiplies every delay."""
    half = lambda: 0.5  # noqa: E731
    unscaled = backoff.initial_delay(3, half)
    assert backoff.initial_delay(3, half, 0.01) == pytest.approx(unscaled / 100)
    assert backoff.cycle_delay(2, half, 0.01) == pytest.approx(backoff.cycle_delay(2, half) / 100)
    assert backoff.cycle_delay(2, half, 0.01, 10) == pytest.approx(0.1)
    assert backoff.poll_delay(100, half, 0.01) == pytest.approx(0.9)


@pytest.mark.parametrize(("raw", "expected", "noted"), [
    (None, 1.0, False), ("", 1.0, False), ("0.001", 0.001, False), ("0", 1.0, True),
    ("fast", 1.0, True), ("-1", 1.0, True), ("nan", 1.0, True), ("inf", 1.0, True),
])
def test_scale_from_environment(raw: str | None, expected: float, noted: bool) -> None:
    """The scale parses as a positive float; anything else (0 would poll without a pause) falls
    back to 1 with a note."""
    environ = {} if raw is None else {backoff.SCALE_ENV: raw}
    value, note = backoff.scale_from(environ)
    assert value == expected and (note is not None) == noted
