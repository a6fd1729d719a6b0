"""Fleet simulation: a scale set of VMs, 5 certificates each, against one throttled vault.

Discrete-event, simulated time (heapq, no sleeping). Every wait comes from the service's own
code in `akvvm_ext.backoff`: the initial-sync schedule with Retry-After and its one-hour budget,
`Holds` (per-certificate retry passes after a failed poll cycle), poll jitter, applied the way
`akvvm_ext.service.Service` applies them. Run: `python bench/fleet.py`.
"""
from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from akvvm_ext import backoff  # noqa: E402
from akvvm_ext.model import CertResult, Outcome  # noqa: E402
from bench.vault_model import LIMIT, VaultModel  # noqa: E402

INITIAL, POLL = 0, 1  # event kinds: an initial-sync attempt; a poll cycle or retry pass
URLS = tuple(f"https://fleet.vault.azure.net/secrets/cert{i}" for i in range(64))
ALL = [(1 << n) - 1 for n in range(65)]  # bitmask of n certificates
CONVERGE_S = 900.0  # targets (a) and (c): every VM serves every certificate within 15 minutes


@dataclass(frozen=True)
class Scenario:
    """One fleet experiment."""

    name: str
    vms: int = 10_000
    certs: int = 5
    interval_s: float = 3600.0  # pollingIntervalInS
    enable_window_s: float = 60.0  # every VM runs enable within this window
    outage_s: float = 0.0  # the vault answers 503 for this long from t = 0
    rotate: bool = False  # steady polling; all certificates rotated at one random moment
    phases_s: float = 0.0  # (b): VMs' poll phases spread over this long (interval: long-running)
    listing: bool = False  # one listing page per cycle instead of a GET per certificate
    poll_jitter: float = backoff.POLL_JITTER
    interval_scale: float = 1.0  # what-if: poll_delay(interval * this)
    vault_limit: int = LIMIT
    seed: int = 1


@dataclass(frozen=True)
class Result:
    """What the scenario showed against its targets."""

    scenario: str
    vms: int
    requests: int
    peak_rate_per_s: float  # highest request rate over any 10-second window
    share_429: float
    share_503: float
    # from the start (a), the rotation (b), the vault's return (c); None: some VM never did
    converged_s: float | None
    since_start_s: float | None
    target_s: float
    errors: int  # VMs whose initial sync gave up (25 retries or its hour; status "error")
    met: bool


class Fleet:
    """The VMs' state as parallel lists (fast), one vault, one event queue."""

    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self.rng = random.Random(sc.seed)
        self.rand: Callable[[], float] = self.rng.random
        self.vault = VaultModel(sc.vault_limit, down_until=sc.outage_s,
                                rng=random.Random(sc.seed + 1))
        self.queue: list[tuple[float, int, int]] = []
        self.missing = [sc.certs] * sc.vms  # (a, c): certificates not installed yet
        self.attempts = [0] * sc.vms  # (a, c): initial-sync attempts so far
        self.started = [0.0] * sc.vms  # (a, c): when the first attempt ran
        self.fresh = [0] * sc.vms  # (b): bit i set once certificate i serves the new version
        self.holds: list[backoff.Holds] = []  # (b): the service's retry holds, one per VM
        self.next_poll = [0.0] * sc.vms  # (b)
        self.done_at: list[float | None] = [None] * sc.vms
        self.errors = 0
        self.rotated_at = float("inf")

    def push(self, at: float, vm: int, kind: int) -> None:
        heapq.heappush(self.queue, (at, vm, kind))

    def initial(self, now: float, vm: int) -> None:
        """One attempt of the initial sync over what is missing (Service._initial_retries)."""
        if not self.attempts[vm]:
            self.started[vm] = now
        self.attempts[vm] += 1
        served, retry_after = self.vault.get_many(now, self.missing[vm])
        self.missing[vm] -= served
        if not self.missing[vm]:
            self.done_at[vm] = now
            return
        delay = backoff.initial_delay(self.attempts[vm], self.rand, 1.0, retry_after)
        if self.attempts[vm] > backoff.INITIAL_RETRIES or backoff.initial_out_of_time(
                now - self.started[vm], delay):
            self.errors += 1  # status "error"; the service then goes on polling
            return
        self.push(now + delay, vm, INITIAL)

    def wake(self, now: float, vm: int) -> None:
        """A poll cycle or a retry pass (Service._poll with backoff.Holds)."""
        holds, cycle = self.holds[vm], now >= self.next_poll[vm]
        if cycle:
            self.next_poll[vm] = now + self.poll_delay()
        due = [i for i in range(self.sc.certs) if holds.due(URLS[i], now, cycle)]
        rotated = now >= self.rotated_at
        listed = self.sc.listing and cycle and self.vault.get_many(now, 1)[0] == 1
        results = [self.fetch_one(now, vm, i, rotated, listed) for i in due]
        holds.record(results, now, self.next_poll[vm], self.sc.interval_s)
        if rotated and self.done_at[vm] is None and self.fresh[vm] == ALL[self.sc.certs]:
            self.done_at[vm] = now
        self.push(holds.next_wake(self.next_poll[vm]), vm, POLL)

    def fetch_one(self, now: float, vm: int, cert: int, rotated: bool, listed: bool,
                  ) -> CertResult:
        """One certificate of a pass; with a listing, only the changed ones cost a GET."""
        stale = rotated and not self.fresh[vm] >> cert & 1
        if listed and not stale:
            return CertResult(URLS[cert], Outcome.UNCHANGED)
        served, retry_after = self.vault.get_many(now, 1)
        if not served:
            return CertResult(URLS[cert], Outcome.FAILED, retryable=True,
                              retry_after=retry_after)
        if stale:
            self.fresh[vm] |= 1 << cert
        return CertResult(URLS[cert], Outcome.INSTALLED if stale else Outcome.UNCHANGED)

    def poll_delay(self) -> float:
        """The wait until the next poll (Service._serve)."""
        interval = self.sc.interval_s * self.sc.interval_scale
        return backoff.poll_delay(interval, self.rand, 1.0, self.sc.poll_jitter)

    def start(self) -> None:
        """Every VM runs enable within the window; (b) starts polling, (a, c) initial sync."""
        for vm in range(self.sc.vms):
            enabled = self.rng.uniform(0.0, max(self.sc.enable_window_s, self.sc.phases_s))
            if self.sc.rotate:
                self.holds.append(backoff.Holds(self.rand))
                self.next_poll[vm] = enabled + self.poll_delay()
                self.push(self.next_poll[vm], vm, POLL)
            else:
                self.push(enabled, vm, INITIAL)
        if self.sc.rotate:
            self.rotated_at = self.rng.uniform(self.sc.interval_s, 2 * self.sc.interval_s)

    def run(self, horizon: float) -> None:
        queue, initial, wake = self.queue, self.initial, self.wake
        while queue:
            now, vm, kind = heapq.heappop(queue)
            if now > horizon:
                break
            if kind == INITIAL:
                initial(now, vm)
            else:
                wake(now, vm)


@contextlib.contextmanager
def cached_schedule() -> Iterator[None]:
    """Compute backoff's nominal schedule once per run instead of once per retry (it is pure)."""
    original = backoff.initial_schedule
    schedule = original()
    backoff.initial_schedule = lambda: schedule
    try:
        yield
    finally:
        backoff.initial_schedule = original


def simulate(sc: Scenario) -> Result:
    """Run one scenario to the end and check it against its target."""
    fleet = Fleet(sc)
    fleet.start()
    horizon = fleet.rotated_at + 3 * sc.interval_s if sc.rotate else 4 * 3600.0
    with cached_schedule():
        fleet.run(horizon)
    origin = fleet.rotated_at if sc.rotate else sc.outage_s
    times = [t for t in fleet.done_at if t is not None]
    last = max(times) if len(times) == sc.vms else None
    converged = None if last is None else max(0.0, last - origin)
    target = sc.interval_s if sc.rotate else CONVERGE_S
    vault = fleet.vault
    return Result(
        scenario=sc.name, vms=sc.vms, requests=vault.total,
        peak_rate_per_s=round(vault.peak_per_s(), 1),
        share_429=round(vault.throttled / max(1, vault.total), 4),
        share_503=round(vault.unavailable / max(1, vault.total), 4),
        converged_s=None if converged is None else round(converged, 1),
        since_start_s=None if last is None else round(last, 1), target_s=target,
        errors=fleet.errors,
        met=fleet.errors == 0 and converged is not None and converged <= target,
    )


def scenarios(vms: int = 10_000, **overrides: object) -> list[Scenario]:
    """The issue's three scenarios: (a) creation, (b) rotation under hourly polling, (c) outage."""
    base = [
        Scenario("a: creation, requireInitialSync", vms=vms),
        Scenario("b: hourly polling, all rotated", vms=vms, rotate=True, phases_s=3600.0),
        Scenario("c: creation, vault down 10 min", vms=vms, outage_s=600.0),
    ]
    return [replace(sc, **overrides) for sc in base]  # type: ignore[arg-type]


@contextlib.contextmanager
def constants(**values: float) -> Iterator[None]:
    """What-if: run with other values of backoff.py's constants (its functions unchanged)."""
    saved = {name: getattr(backoff, name) for name in values}
    for name, value in values.items():
        setattr(backoff, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(backoff, name, value)


def size_met(vms: int, what_if: dict[str, float], **overrides: object) -> bool:
    """Whether the fleet-size-dependent targets, (a) and (c), hold at `vms`."""
    with constants(**what_if):
        return all(simulate(sc).met for sc in scenarios(vms, **overrides) if not sc.rotate)


def largest_safe(low: int, high: int, step: int, what_if: dict[str, float] | None = None,
                 **overrides: object) -> int:
    """Bisection over fleet size: the largest size (to `step`) at which (a) and (c) hold."""
    what_if = what_if or {}
    if not size_met(low, what_if, **overrides):
        return 0
    while size_met(high, what_if, **overrides):
        low, high = high, high * 2
    while high - low > step:
        middle = (low + high) // 2 // step * step
        low, high = (middle, high) if size_met(middle, what_if, **overrides) else (low, middle)
    return low


# Shorten-only poll jitter, [0.8, 1.0] x interval, expressed through backoff.poll_delay itself.
SHORTEN_ONLY = {"interval_scale": 0.9, "poll_jitter": 0.1 / 0.9}
VARIANTS: dict[str, tuple[dict[str, float], dict[str, object]]] = {
    "defaults": ({}, {}),
    "backoff.JITTER_SHORTENS = 0.5": ({"JITTER_SHORTENS": 0.5}, {}),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vms", type=int, default=10_000)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fleet.json"))
    parser.add_argument("--no-bisect", action="store_true")
    args = parser.parse_args(argv)
    started = time.monotonic()
    runs = [*scenarios(args.vms),
            replace(scenarios(args.vms)[1], name="b + listing", listing=True),
            replace(scenarios(args.vms)[1], name="b + shorten-only poll jitter",
                    **SHORTEN_ONLY)]  # type: ignore[arg-type]
    results = [simulate(sc) for sc in runs]
    for result in results:
        print(_row(result))
    report: dict[str, object] = {"results": [asdict(r) for r in results]}
    if not args.no_bisect:
        sizes = {name: largest_safe(10_000, 20_000, 2_500, what_if, **overrides)
                 for name, (what_if, overrides) in VARIANTS.items()}
        for name, size in sizes.items():
            print(f"largest fleet meeting (a) and (c), {name}: {size} VMs")
        report["largest_safe_fleet"] = sizes
    report["seconds"] = round(time.monotonic() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"({report['seconds']} s)")
    return 0


def _row(r: Result) -> str:
    converged = "never" if r.converged_s is None else f"{r.converged_s:5.0f} s"
    return (f"{r.scenario:33} vms={r.vms} req={r.requests:8} peak={r.peak_rate_per_s:8.1f}/s "
            f"429={r.share_429:6.1%} converged {converged} (target {r.target_s:.0f} s) "
            f"errors={r.errors} {'met' if r.met else 'MISSED'}")


if __name__ == "__main__":
    sys.exit(main())
