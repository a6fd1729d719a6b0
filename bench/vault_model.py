"""A Key Vault throttling model for the fleet simulation: 4,000 secret GETs per 10 s per vault.

Sliding window over one-second buckets; requests over the limit get 429, some with Retry-After
(when the window next has room), some without, as the service sees in the field. No I/O.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field

LIMIT = 4000  # secret GET transactions per vault per window (Key Vault service limits)
WINDOW_S = 10


@dataclass(frozen=True)
class Answer:
    """The vault's answer to one GET: 200, 429 (maybe with Retry-After) or 503 (outage)."""

    status: int
    retry_after: float | None = None


OK = Answer(200)
UNAVAILABLE = Answer(503)


@dataclass
class VaultModel:
    """One vault. Requests must arrive in time order (the simulation's clock only moves on).

    `down_until`: the vault answers 503 before this time. `retry_after_share`: the share of 429s
    that carry Retry-After. Rejected requests do not count against the limit.
    """

    limit: int = LIMIT
    window_s: int = WINDOW_S
    down_until: float = 0.0
    retry_after_share: float = 0.5
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    served: Counter[int] = field(default_factory=Counter)  # second -> GETs served
    sent: Counter[int] = field(default_factory=Counter)  # second -> every request received
    throttled: int = 0
    unavailable: int = 0
    total: int = 0
    _in_window: int = 0
    _window_end: int = 0  # the window covers seconds [_window_end - window_s, _window_end)

    def get(self, now: float) -> Answer:
        """Answer one secret GET arriving at `now`."""
        served, retry_after = self.get_many(now, 1)
        if served:
            return OK
        return UNAVAILABLE if now < self.down_until else Answer(429, retry_after)

    def get_many(self, now: float, count: int) -> tuple[int, float | None]:
        """Answer `count` parallel GETs arriving at `now`: how many were served (200) and the
        Retry-After that came with the 429s, if any of them carried one."""
        if count <= 0:
            return 0, None
        second = math.floor(now)
        self.total += count
        self.sent[second] += count
        if now < self.down_until:
            self.unavailable += count
            return 0, None
        self._slide(second)
        served = min(count, self.limit - self._in_window)
        if served:
            self.served[second] += served
            self._in_window += served
        rejected = count - served
        if not rejected:
            return served, None
        self.throttled += rejected
        return served, self._retry_after(now, second, rejected)

    def _slide(self, second: int) -> None:
        """Move the window so it ends just after `second`."""
        if second + 1 - self._window_end >= self.window_s:
            self._in_window = sum(self.served[s] for s in range(second + 1 - self.window_s,
                                                                 second + 1))
        else:
            for old in range(self._window_end - self.window_s, second + 1 - self.window_s):
                self._in_window -= self.served.get(old, 0)
        self._window_end = max(self._window_end, second + 1)

    def _retry_after(self, now: float, second: int, rejected: int) -> float | None:
        """The Retry-After the service sees among `rejected` 429s (each carries one or not)."""
        if self.rng.random() >= 1 - (1 - self.retry_after_share) ** rejected:
            return None
        window = range(second + 1 - self.window_s, second + 1)
        oldest = next((s for s in window if self.served[s]), second)
        return max(1.0, math.ceil(oldest + self.window_s - now))

    def peak_per_s(self) -> float:
        """The highest request rate seen over any 10-second window, per second."""
        if not self.sent:
            return 0.0
        first, last = min(self.sent), max(self.sent)
        counts = [self.sent.get(s, 0) for s in range(first, last + 1)]
        best = running = sum(counts[: self.window_s])
        for i in range(self.window_s, len(counts)):
            running += counts[i] - counts[i - self.window_s]
            best = max(best, running)
        return best / self.window_s

    def served_peak_per_s(self) -> float:
        """The most GETs served in any one second (never above the limit per window)."""
        return float(max(self.served.values(), default=0))
