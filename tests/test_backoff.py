"""Backoff schedules: bounded, increasing, jittered within limits, Retry-After honoured, scaled."""
from __future__ import annotations

import itertools
import random

import pytest

from akvvm_ext import backoff

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
            assert 0.8 * expected <= delay <= expected


def test_initial_retry_numbers_start_at_one_and_end_at_the_cap() -> None:
    """Retry 0 is a bug; retries past the schedule keep its last (capped) delay."""
    with pytest.raises(ValueError):
        backoff.initial_delay(0, lambda: 0.5)
    assert backoff.initial_delay(40, lambda: 0.0) == backoff.INITIAL_CAP_S


def test_initial_delay_honours_a_longer_retry_after() -> None:
    """A server asking for longer than the schedule is obeyed, capped at five minutes."""
    assert backoff.initial_delay(1, lambda: 0.0, retry_after=30) == 30
    assert backoff.initial_delay(1, lambda: 0.0, retry_after=86400) == backoff.RETRY_AFTER_CAP_S


def test_cycle_delay_is_full_jitter_under_a_growing_cap() -> None:
    """Without Retry-After: uniform in [0, min(60, 2 * 2^(n-1))] seconds."""
    for seed in SEEDS:
        rng = rands(seed)
        for attempt in range(1, 10):
            delay = backoff.cycle_delay(attempt, rng.random)
            assert 0 <= delay <= min(60.0, 2.0 * 2 ** (attempt - 1))


def test_cycle_delay_uses_retry_after_when_given() -> None:
    """Retry-After wins over jitter, negative values are clamped, huge ones capped."""
    assert backoff.cycle_delay(1, lambda: 0.9, retry_after=7) == 7
    assert backoff.cycle_delay(1, lambda: 0.9, retry_after=-3) == 0
    assert backoff.cycle_delay(1, lambda: 0.9, retry_after=1e9) == backoff.RETRY_AFTER_CAP_S


def test_poll_delay_jitter_is_bounded() -> None:
    """Each poll waits the interval +/- 10%."""
    for seed in SEEDS:
        delay = backoff.poll_delay(3600, rands(seed).random)
        assert 3240 <= delay <= 3960


def test_poll_delays_spread_out_a_fleet() -> None:
    """A thousand VMs with one setting do not poll in lockstep."""
    rng = rands(1)
    delays = [backoff.poll_delay(3600, rng.random) for _ in range(1000)]
    assert max(delays) - min(delays) > 600


def test_first_poll_offset_is_at_most_five_minutes_or_the_interval() -> None:
    """The optional first-poll offset never exceeds min(interval, 300 s)."""
    for seed in SEEDS:
        rng = rands(seed)
        assert 0 <= backoff.first_poll_offset(3600, rng.random) <= 300
        assert 0 <= backoff.first_poll_offset(60, rng.random) <= 60


def test_every_delay_is_scaled() -> None:
    """AKVVM_BACKOFF_SCALE multiplies every delay."""
    half = lambda: 0.5  # noqa: E731
    unscaled = backoff.initial_delay(3, half)
    assert backoff.initial_delay(3, half, 0.01) == pytest.approx(unscaled / 100)
    assert backoff.cycle_delay(2, half, 0.01) == pytest.approx(backoff.cycle_delay(2, half) / 100)
    assert backoff.cycle_delay(2, half, 0.01, 10) == pytest.approx(0.1)
    assert backoff.poll_delay(100, half, 0.01) == pytest.approx(1.0)


@pytest.mark.parametrize(("raw", "expected", "noted"), [
    (None, 1.0, False), ("", 1.0, False), ("0.001", 0.001, False), ("0", 0.0, False),
    ("fast", 1.0, True), ("-1", 1.0, True), ("nan", 1.0, True), ("inf", 1.0, True),
])
def test_scale_from_environment(raw: str | None, expected: float, noted: bool) -> None:
    """The scale parses as a non-negative float; anything else falls back to 1 with a note."""
    environ = {} if raw is None else {backoff.SCALE_ENV: raw}
    value, note = backoff.scale_from(environ)
    assert value == expected and (note is not None) == noted
