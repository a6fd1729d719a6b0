"""How long the service waits: initial-sync retries, Retry-After, in-cycle retries, poll jitter.

No I/O and no sleeping: randomness (`rand() -> [0, 1)`) and the scale come in as arguments; every
delay is multiplied by `scale` (`AKVVM_BACKOFF_SCALE`, read once by the service's composition root).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping

SCALE_ENV = "AKVVM_BACKOFF_SCALE"

INITIAL_RETRIES = 25
INITIAL_FIRST_S = 4.0
INITIAL_FACTOR = 1.6
INITIAL_CAP_S = 180.0
INITIAL_BUDGET_S = 3600.0  # the error must reach the agent well before its 90-minute budget
JITTER_SHORTENS = 0.2  # initial delays are cut by up to 20%, never lengthened

RETRY_AFTER_CAP_S = 300.0  # a server asking for more than this gets retried sooner anyway
CYCLE_ATTEMPTS = 3  # attempts of a failing certificate within one poll cycle
CYCLE_FIRST_S = 2.0
CYCLE_CAP_S = 60.0

POLL_JITTER = 0.1  # each poll interval is the setting +/- 10%
FIRST_POLL_SPREAD_CAP_S = 300.0

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
    if not math.isfinite(value) or value < 0:
        return 1.0, f"{SCALE_ENV}={raw!r} is not a non-negative number; using 1"
    return value, None


def initial_schedule() -> tuple[float, ...]:
    """The nominal initial-sync delays in seconds, one per retry, increasing, unscaled."""
    return tuple(min(INITIAL_CAP_S, INITIAL_FIRST_S * INITIAL_FACTOR**n)
                 for n in range(INITIAL_RETRIES))


def initial_delay(retry: int, rand: Rand, scale: float = 1.0,
                  retry_after: float | None = None) -> float:
    """Seconds to wait before initial-sync retry number `retry` (1-based).

    Jitter only shortens the nominal delay, so the 25 retries stay within the budget; a
    server's Retry-After (capped) wins when it asks for longer. Past the schedule, its last.
    """
    if retry < 1:
        raise ValueError(f"retry numbers start at 1, not {retry}")
    nominal = initial_schedule()[min(retry, INITIAL_RETRIES) - 1] * (1 - JITTER_SHORTENS * rand())
    return max(nominal, capped_retry_after(retry_after)) * scale


def capped_retry_after(retry_after: float | None) -> float:
    """A server-given Retry-After, within [0, RETRY_AFTER_CAP_S]; 0 when there was none."""
    if retry_after is None or not math.isfinite(retry_after):
        return 0.0
    return min(max(retry_after, 0.0), RETRY_AFTER_CAP_S)


def cycle_delay(attempt: int, rand: Rand, scale: float = 1.0,
                retry_after: float | None = None) -> float:
    """Seconds before retrying failed certificates inside one cycle, after attempt `attempt`.

    Retry-After (capped) when the server gave one; otherwise exponential with full jitter.
    """
    if retry_after is not None:
        return capped_retry_after(retry_after) * scale
    ceiling = min(CYCLE_CAP_S, CYCLE_FIRST_S * 2.0 ** max(attempt - 1, 0))
    return rand() * ceiling * scale


def poll_delay(interval_s: float, rand: Rand, scale: float = 1.0,
               jitter: float = POLL_JITTER) -> float:
    """The wait until the next poll: the interval +/- `jitter`, so a fleet spreads out."""
    return interval_s * (1 + jitter * (2 * rand() - 1)) * scale


def first_poll_offset(interval_s: float, rand: Rand, scale: float = 1.0) -> float:
    """A random offset before the first poll (when asked for), at most the interval or 5 min."""
    return rand() * min(interval_s, FIRST_POLL_SPREAD_CAP_S) * scale
