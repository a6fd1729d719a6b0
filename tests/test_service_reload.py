"""Reloads (SIGHUP, a new enable): new settings and clients, the last results reported at
once, only what the change left uninstalled synced again."""
from __future__ import annotations

from dataclasses import replace

from akvvm_ext.model import Identity, Settings
from akvvm_ext.service import Service
from tests.test_service import (
    FakeSync,
    Recorder,
    Vaults,
    _prompt_reloads,
    fail,
    running,
    service,
    settings,
    wait_until,
)

__all__ = ["_prompt_reloads"]  # the fixture, shared with test_service


def test_reload_picks_up_a_new_certificate_and_keeps_clients() -> None:
    """A reload request re-reads the settings; same identity keeps the vault clients."""
    current = [settings("a")]
    fake, recorder, made = FakeSync(), Recorder(), []
    svc = service(lambda: current[0], fake, recorder, made, scale=1.0)
    with running(svc):
        wait_until(lambda: len(fake.calls) == 1)
        current[0] = settings("a", "new")
        svc.request_reload()
        wait_until(lambda: len(fake.calls) == 2, timeout=3)
    assert fake.calls[1][1] == ("new",)  # "a" is installed: not fetched again for the reload
    assert len(made) == 1 and made[0].closed


def test_reload_with_a_new_identity_rebuilds_the_vault_clients() -> None:
    """A changed identity closes the old clients and builds new ones."""
    current = [settings("a")]
    fake, made = FakeSync(), []
    svc = service(lambda: current[0], fake, Recorder(), made, scale=1.0)
    with running(svc):
        wait_until(lambda: len(fake.calls) == 1)
        current[0] = replace(current[0], identity=Identity(msi_client_id="0" * 8))
        svc.request_reload()
        wait_until(lambda: len(made) == 2, timeout=3)
    assert made[0].closed and made[1].identity.msi_client_id == "0" * 8


def test_failed_reload_keeps_the_last_good_settings() -> None:
    """Invalid settings at reload are logged; the service keeps syncing the old ones."""

    def load() -> Settings:
        if len(loads) > 1:
            raise ValueError("bad settings")
        return loads[0]

    loads = [settings("a", interval=100)]  # polls every 0.1 s at this scale
    fake = FakeSync()
    svc = service(load, fake, Recorder(), scale=0.001)
    with running(svc):
        wait_until(lambda: len(fake.calls) == 1)
        loads.append(settings("b"))
        svc.request_reload()
        wait_until(lambda: len(fake.calls) == 3)
    assert {names for _, names in fake.calls} == {("a",)}


def test_reload_whose_new_identity_fails_keeps_everything() -> None:
    """If clients for a new identity cannot be built, the old settings and clients stay."""
    current = [settings("a", interval=100)]  # polls every 0.1 s at this scale
    fake, made = FakeSync(), []

    def make_vaults(s: Settings) -> Vaults:
        if s.identity.msi_client_id:
            raise RuntimeError("no such identity")
        made.append(Vaults(s))
        return made[-1]

    svc = Service(lambda: current[0], make_vaults, Recorder(), sync=fake, rand=lambda: 0.5,
                  backoff_scale=0.001)
    with running(svc):
        wait_until(lambda: len(fake.calls) == 1)
        current[0] = settings("a", "b", identity=Identity(msi_client_id="1" * 8))
        svc.request_reload()
        wait_until(lambda: len(fake.calls) == 3)
        assert not made[0].closed
    assert {names for _, names in fake.calls} == {("a",)}
    assert len(made) == 1 and made[0].closed  # closed when run ends


def test_reload_with_the_same_served_certificates_reports_them_at_once() -> None:
    """requireInitialSync: a reload changing nothing observed reports success, no refetch."""
    current = [settings("a", "b", initial=True)]
    fake, recorder = FakeSync(), Recorder()
    svc = service(lambda: current[0], fake, recorder, scale=1.0)
    with running(svc):
        wait_until(lambda: recorder.phases == ["success"])
        current[0] = settings("b", "a", initial=True, interval=60)
        svc.request_reload()
        wait_until(lambda: len(recorder.reports) == 3)
    assert recorder.phases == ["success"] * 3
    assert [r.url.rsplit("/", 1)[1] for r in recorder.reports[1][1]] == ["b", "a"]
    assert len(fake.calls) == 1


def test_reload_adding_a_certificate_syncs_only_it() -> None:
    """requireInitialSync: a new certificate is transitioning until installed, alone."""
    url = "https://vault.localhost/secrets/new"
    current = [settings("a", initial=True)]
    fake = FakeSync(scripts={"new": lambda n: fail(url) if n == 1 else None})
    recorder = Recorder()
    svc = service(lambda: current[0], fake, recorder, scale=0.001)
    with running(svc):
        wait_until(lambda: recorder.phases == ["success"])
        current[0] = settings("a", "new", initial=True)
        svc.request_reload()
        wait_until(lambda: len(fake.calls) == 3)
        wait_until(lambda: recorder.phases[-1] == "success" and len(recorder.reports[-1][1]) == 2)
    assert [names for _, names in fake.calls] == [("a",), ("new",), ("new",)]
    assert recorder.phases[:3] == ["success", "success", "transitioning"]
    assert [r.url for r in recorder.reports[1][1]] == ["https://vault.localhost/secrets/a"]
