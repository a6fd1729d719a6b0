"""The fleet simulation's logic on a small fleet: the vault limit holds and the fleet converges."""
from __future__ import annotations

from akvvm_ext import backoff
from bench import fleet
from bench.vault_model import VaultModel


def windows(model: VaultModel) -> list[int]:
    """GETs served in every 10-second sliding window the model saw."""
    seconds = range(min(model.served), max(model.served) + 1)
    return [sum(model.served[s] for s in range(start, start + model.window_s))
            for start in seconds]


def test_vault_model_serves_at_most_the_limit_per_window_and_throttles_the_rest() -> None:
    """A burst far above the limit is served up to 40 per 10 s; the rest get 429."""
    model = VaultModel(limit=40, retry_after_share=1.0)
    answers = [model.get(t / 10) for t in range(1000)]  # 10 requests per second for 100 s
    assert max(windows(model)) == 40
    assert sum(a.status == 200 for a in answers) == 400
    throttled = [a for a in answers if a.status == 429]
    assert len(throttled) == 600
    assert all(a.retry_after is not None and 1 <= a.retry_after <= 10 for a in throttled)


def test_vault_model_sends_retry_after_on_some_429s_only() -> None:
    """With the default share, some 429s carry Retry-After and some do not."""
    model = VaultModel(limit=1)
    answers = [model.get(0.5) for _ in range(200)]
    with_header = sum(a.retry_after is not None for a in answers if a.status == 429)
    assert 50 < with_header < 150


def test_vault_model_answers_503_during_an_outage() -> None:
    """Before `down_until` every request fails with 503 and nothing counts as served."""
    model = VaultModel(down_until=600.0)
    assert model.get(599.0).status == 503
    assert model.get(600.0).status == 200
    assert model.unavailable == 1


def test_creation_wave_on_a_throttled_vault_converges_without_errors() -> None:
    """200 VMs x 5 certificates against a vault allowing 40 GETs/10 s all get their files."""
    sc = fleet.Scenario("small creation", vms=200, vault_limit=40)
    sim = fleet.Fleet(sc)
    sim.start()
    with fleet.cached_schedule():
        sim.run(horizon=4 * 3600.0)
    assert sim.errors == 0
    assert all(done is not None for done in sim.done_at)
    assert sim.vault.throttled > 0
    assert max(windows(sim.vault)) <= 40
    assert sum(sim.vault.served.values()) == 200 * 5


def test_outage_longer_than_the_retry_budget_reports_error() -> None:
    """A vault down for 2 hours exhausts the 25 initial-sync retries: every VM reports error."""
    result = fleet.simulate(fleet.Scenario("long outage", vms=200, outage_s=7200.0))
    assert result.errors == 200
    assert not result.met


def test_retries_follow_the_service_schedule() -> None:
    """A VM that never gets an answer sends exactly 1 + 25 initial-sync passes."""
    result = fleet.simulate(fleet.Scenario("one vm", vms=1, certs=1, outage_s=7200.0))
    assert result.requests == 1 + backoff.INITIAL_RETRIES


def test_rotation_reaches_every_vm_and_listing_saves_requests() -> None:
    """Hourly polling: every VM gets the rotated versions within one poll gap; listing a
    5-secret vault costs fewer requests than 5 GETs a cycle."""
    base = fleet.Scenario("rotation", vms=200, rotate=True, phases_s=3600.0)
    plain = fleet.simulate(base)
    listed = fleet.simulate(fleet.Scenario("rotation", vms=200, rotate=True, phases_s=3600.0,
                                           listing=True))
    assert plain.errors == 0 and plain.converged_s is not None
    assert plain.converged_s <= 3600.0 * (1 + backoff.POLL_JITTER)
    assert listed.converged_s is not None
    assert listed.requests < plain.requests / 2


def test_a_throttled_poll_cycle_is_finished_by_retry_passes_not_the_next_poll() -> None:
    """With room for 2 GETs per 10 s, a 5-certificate cycle gets the rest through the
    service's retry passes (backoff.Holds) within minutes, not an hour later."""
    sim = fleet.Fleet(fleet.Scenario("throttled cycle", vms=1, rotate=True, vault_limit=2))
    sim.start()
    sim.rotated_at = 0.0
    first_poll = sim.next_poll[0]
    with fleet.cached_schedule():
        sim.run(horizon=first_poll + 300.0)
    assert sim.vault.throttled > 0
    done = sim.done_at[0]
    assert done is not None and done - first_poll < 300.0
    assert sum(sim.vault.served.values()) == 5
