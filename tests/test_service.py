"""The poll loop with a fake sync pass: phases, initial retries and their budget, retry passes,
stop; and the fakes test_service_reload shares."""
from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pytest

from akvvm_ext import backoff
from akvvm_ext import service as service_module
from akvvm_ext.model import CertResult, Identity, ObservedCertificate, Outcome, Settings
from akvvm_ext.service import Phase, Service

Script = Callable[[int], CertResult | None]  # n-th attempt for a URL -> result (None: success)


@pytest.fixture(autouse=True)
def _prompt_reloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop notices a reload request within 50 ms instead of a second."""
    monkeypatch.setattr(service_module, "WAKE_S", 0.05)


def cert(name: str) -> ObservedCertificate:
    """An observed certificate on the stand-in vault host."""
    return ObservedCertificate(url=f"https://vault.localhost/secrets/{name}",
                               vault_url="https://vault.localhost", vault_name="vault",
                               secret_name=name, version=None, store_dir="/store",
                               link_name=f"vault.{name}")


def settings(*names: str, initial: bool = False, interval: int = 3600,
             identity: Identity | None = None) -> Settings:
    """Settings observing `names`."""
    return Settings(observed=tuple(cert(n) for n in names), polling_interval_s=interval,
                    require_initial_sync=initial, identity=identity or Identity())


def fail(url: str, *, retryable: bool = True, retry_after: float | None = None,
         error: str = "HTTP 503 ServiceUnavailable.") -> CertResult:
    """A failed result for `url`."""
    return CertResult(url=url, outcome=Outcome.FAILED, error=error, error_kind="FETCH",
                      retryable=retryable, retry_after=retry_after)


@dataclass
class FakeSync:
    """Implements sync's call signature; scripted per URL, recording every call."""

    scripts: dict[str, Script] = field(default_factory=dict)
    calls: list[tuple[float, tuple[str, ...]]] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)
    on_pass: Callable[[int], None] = lambda n: None

    def __call__(self, settings: Settings, vaults: Any, now: datetime) -> list[CertResult]:
        self.calls.append((time.monotonic(), tuple(c.secret_name for c in settings.observed)))
        results = [self._one(c) for c in settings.observed]
        self.on_pass(len(self.calls))
        return results

    def _one(self, observed: ObservedCertificate) -> CertResult:
        n = self.attempts.get(observed.url, 0) + 1
        self.attempts[observed.url] = n
        scripted = self.scripts.get(observed.secret_name, lambda n: None)(n)
        return scripted or CertResult(url=observed.url, outcome=Outcome.UNCHANGED, version="v1",
                                      path=f"/store/vault.{observed.secret_name}.v1")


@dataclass
class Recorder:
    """A Reporter that remembers what it was told."""

    reports: list[tuple[Phase, list[CertResult], str]] = field(default_factory=list)

    def report(self, phase: Phase, results: Sequence[CertResult], message: str) -> None:
        self.reports.append((phase, list(results), message))

    @property
    def phases(self) -> list[Phase]:
        return [phase for phase, _, _ in self.reports]


class Vaults:
    """Stands for keyvault.Vaults: only close() matters to the loop."""

    def __init__(self, settings: Settings) -> None:
        self.identity = settings.identity
        self.closed = False

    def close(self) -> None:
        self.closed = True


def service(load: Callable[[], Settings], fake: FakeSync, recorder: Recorder,
            made: list[Vaults] | None = None, scale: float = 0.0,
            monotonic: Callable[[], float] | None = None) -> Service:
    """A Service wired to fakes, with all waits scaled to (almost) nothing.

    At scale 0 its clock stands still (else the scaled initial budget, 0 s, would be spent).
    """
    made = made if made is not None else []
    clock = monotonic or (time.monotonic if scale else lambda: 0.0)

    def make_vaults(s: Settings) -> Vaults:
        made.append(Vaults(s))
        return made[-1]

    return Service(load, make_vaults, recorder, sync=fake, rand=lambda: 0.5,
                   backoff_scale=scale, monotonic=clock,
                   clock=lambda: datetime(2026, 11, 26, tzinfo=timezone.utc))


@contextmanager
def running(svc: Service) -> Iterator[threading.Event]:
    """Run `svc` in a thread; stop it and check it ended promptly."""
    stop = threading.Event()
    thread = threading.Thread(target=svc.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(2)
        assert not thread.is_alive()


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll `predicate` (the service runs in another thread)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def stop_after(passes: int, stop: threading.Event) -> Callable[[int], None]:
    """An on_pass hook that stops the service after `passes` passes."""
    return lambda n: stop.set() if n >= passes else None


def run_until(svc: Service, fake: FakeSync, passes: int) -> None:
    """Run `svc` in this thread until the fake has seen `passes` passes."""
    stop = threading.Event()
    fake.on_pass = stop_after(passes, stop)
    svc.run(stop)


def test_without_initial_sync_success_comes_before_the_first_pass() -> None:
    """requireInitialSync false: success as soon as polling starts, then with substatus."""
    fake, recorder = FakeSync(), Recorder()
    run_until(service(lambda: settings("a", "b"), fake, recorder), fake, 2)
    assert recorder.reports[0] == ("success", [], "")
    assert recorder.phases[1] == "success" and len(recorder.reports[1][1]) == 2


def test_initial_sync_retries_only_the_failing_certificate() -> None:
    """requireInitialSync true: transitioning while one fails, success once it is installed."""
    fake = FakeSync(scripts={"b": lambda n: fail("https://vault.localhost/secrets/b")
                             if n <= 2 else None})
    recorder = Recorder()
    run_until(service(lambda: settings("a", "b", initial=True), fake, recorder), fake, 4)
    assert [names for _, names in fake.calls[:3]] == [("a", "b"), ("b",), ("b",)]
    assert recorder.phases[:3] == ["transitioning", "transitioning", "success"]
    assert recorder.reports[0][2].startswith("Retry 1 of 25")
    assert all(r.outcome is not Outcome.FAILED for r in recorder.reports[2][1])


def test_initial_sync_gives_up_after_25_retries_then_recovers() -> None:
    """26 attempts, then error naming the certificate; a later pass that works reports success."""
    url = "https://vault.localhost/secrets/b"
    fake = FakeSync(scripts={"b": lambda n: fail(url, retryable=False, error="HTTP 403 Forbidden.")
                             if n <= 27 else None})
    recorder = Recorder()
    run_until(service(lambda: settings("a", "b", initial=True), fake, recorder), fake, 29)
    assert recorder.phases[:25] == ["transitioning"] * 25
    phase, results, message = recorder.reports[25]
    assert phase == "error" and "25 retries" in message
    assert [r.error for r in results if r.outcome is Outcome.FAILED] == ["HTTP 403 Forbidden."]
    assert len(fake.calls) == 29
    assert recorder.phases[-1] == "success" and recorder.phases[-2] == "error"


def test_later_failures_keep_the_top_level_success() -> None:
    """After a good start, a failing certificate does not turn the service to error."""
    url = "https://vault.localhost/secrets/a"
    fake = FakeSync(scripts={"a": lambda n: fail(url, retryable=False) if n >= 2 else None})
    recorder = Recorder()
    run_until(service(lambda: settings("a", initial=True), fake, recorder), fake, 3)
    assert set(recorder.phases) == {"success"}
    assert recorder.reports[-1][1][0].outcome is Outcome.FAILED


def test_cycle_failure_gets_backed_off_retry_passes_of_its_own() -> None:
    """A 503 is not retried inside the cycle: retry passes of only it, each wait twice as long."""
    fake = FakeSync(scripts={
        "busy": lambda n: fail("https://vault.localhost/secrets/busy"),
        "gone": lambda n: fail("https://vault.localhost/secrets/gone", retryable=False),
    })
    run_until(service(lambda: settings("ok", "busy", "gone"), fake, Recorder(), scale=0.01),
              fake, 4)
    assert [names for _, names in fake.calls] == [("ok", "busy", "gone"), ("busy",), ("busy",),
                                                  ("busy",)]
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(fake.calls)]
    floors = [backoff.CYCLE_FIRST_S * 2**n * 0.75 * 0.01 for n in range(3)]  # rand() = 0.5
    assert all(gap >= floor for gap, floor in zip(gaps, floors, strict=True)), gaps


def test_short_cycles_never_fetch_sooner_than_retry_after() -> None:
    """Polling every 10 ms, a certificate answered with Retry-After 0.3 s waits that long."""
    url = "https://vault.localhost/secrets/t"
    fake = FakeSync(scripts={"t": lambda n: fail(url, retry_after=30)})
    svc = service(lambda: settings("ok", "t", interval=1), fake, Recorder(), scale=0.01)
    with running(svc):
        wait_until(lambda: sum("t" in names for _, names in fake.calls) >= 3)
    times = [at for at, names in fake.calls if "t" in names]
    assert all(b - a >= 0.3 for a, b in itertools.pairwise(times))
    assert sum("ok" in names for _, names in fake.calls) > 2 * len(times)


def test_cycle_retry_honours_retry_after() -> None:
    """A 429 with Retry-After waits that long (scaled) before retrying that certificate."""
    url = "https://vault.localhost/secrets/t"
    fake = FakeSync(scripts={"t": lambda n: fail(url, retry_after=30) if n == 1 else None})
    run_until(service(lambda: settings("t"), fake, Recorder(), scale=0.01), fake, 2)
    waited = fake.calls[1][0] - fake.calls[0][0]
    assert 0.29 <= waited < 1.0


def test_stop_ends_a_long_wait_at_once() -> None:
    """Setting the stop event ends the hour-long poll wait within a second."""
    fake, recorder = FakeSync(), Recorder()
    svc = service(lambda: settings("a"), fake, recorder, scale=1.0)
    with running(svc):
        wait_until(lambda: len(recorder.reports) == 2)
        started = time.monotonic()
    assert time.monotonic() - started < 1.0


def test_initial_sync_gives_up_when_its_hour_is_spent() -> None:
    """Attempts that take long end the initial retries early: error within the hour budget."""
    offset = [0.0]
    url = "https://vault.localhost/secrets/slow"
    fake = FakeSync(scripts={"slow": lambda n: fail(url)})
    fake.on_pass = lambda n: offset.__setitem__(0, offset[0] + 400 * 0.001)  # 400 "s" each
    recorder = Recorder()
    svc = service(lambda: settings("slow", initial=True), fake, recorder, scale=0.001,
                  monotonic=lambda: time.monotonic() + offset[0])
    with running(svc):
        wait_until(lambda: "error" in recorder.phases)
    retries = recorder.phases.index("error")
    assert 6 <= retries < 9  # 9 attempts of 400 s leave no room for another retry in 3600 s
    assert recorder.reports[retries][2].startswith(f"Gave up after {retries} retries")


def test_long_retry_after_ends_the_initial_retries_within_the_budget() -> None:
    """25 x Retry-After 300 s would take two hours: the retries stop inside the hour instead."""
    url = "https://vault.localhost/secrets/t"
    fake = FakeSync(scripts={"t": lambda n: fail(url, retry_after=300)})
    recorder = Recorder()
    started = time.monotonic()
    svc = service(lambda: settings("t", initial=True), fake, recorder, scale=0.0002)
    with running(svc):
        wait_until(lambda: "error" in recorder.phases)
    assert time.monotonic() - started <= backoff.INITIAL_BUDGET_S * 0.0002 + 0.2
    # at most 11 x 300 s fit (fewer when the attempts themselves take long, as on a busy host)
    assert 5 <= recorder.phases.index("error") <= 11
