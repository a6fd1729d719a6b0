"""Change detection by listing against a vault: the real SDK's paging, the detector's cycles,
and a real sync against the Key Vault stand-in."""
from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import urllib3
from azure.core.credentials import AccessToken
from azure.core.pipeline.transport import RequestsTransport
from azure.keyvault.secrets import SecretClient

from akvvm_ext import identity, listing, sync
from akvvm_ext.keyvault import Vaults
from akvvm_ext.listing import ChangeDetector, Listing, NotListed, Stamp, list_vault
from akvvm_ext.model import Identity, ObservedCertificate, Outcome
from tests.listing_helpers import NOW, OLD, VAULT, cert, everything_installed
from tests.standins.certfactory import make_chain
from tests.standins.imds import ImdsStandin
from tests.standins.keyvault import KeyVaultStandin
from tests.test_sync import settings

# --- the real SDK against a Key Vault fake that answers like the recordings ----------------------


@dataclass
class FakeVault(requests.adapters.BaseAdapter):
    """Answers `GET /secrets` as Key Vault does: challenge first, 25 items a page, absolute
    nextLink, sometimes an empty page; `status` forces an error answer."""

    items: list[dict[str, object]]
    empty_page_after: int | None = None
    status: int = 200
    requests_seen: int = 0
    fail_from: int | None = None  # pages from this item on answer 503

    def send(self, request: requests.PreparedRequest, **_: object) -> requests.Response:
        """One HTTP exchange."""
        self.requests_seen += 1
        if "Authorization" not in request.headers:
            return self._answer(401, {"error": {"code": "Unauthorized"}}, {
                "WWW-Authenticate": 'Bearer authorization="https://login.windows.net/t", '
                                    'resource="https://vault.azure.net"'})
        if self.status != 200:
            return self._answer(self.status, {"error": {"code": "Forbidden", "message": "no"}})
        query = parse_qs(urlsplit(str(request.url)).query)
        start = int(query.get("$skiptoken", ["0"])[0])
        if self.fail_from is not None and start >= self.fail_from:
            return self._answer(503, {"error": {"code": "ServiceUnavailable", "message": "x"}})
        size = int(query.get("maxresults", ["25"])[0])
        if self.empty_page_after is not None and start == self.empty_page_after:
            self.empty_page_after = None
            return self._page([], start)
        return self._page(self.items[start:start + size], start + size)

    def _page(self, value: list[dict[str, object]], next_start: int) -> requests.Response:
        more = next_start < len(self.items)
        link = f"{VAULT}:443/secrets?api-version=7.5&$skiptoken={next_start}&maxresults=25"
        return self._answer(200, {"value": value, "nextLink": link if more else None})

    def _answer(self, status: int, body: object, headers: dict[str, str] | None = None,
                ) -> requests.Response:
        content = json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json; charset=utf-8",
                       "Content-Length": str(len(content)), **(headers or {})}
        response = requests.Response()
        response.status_code = status
        response.headers.update(all_headers)
        response.raw = urllib3.HTTPResponse(io.BytesIO(content), headers=all_headers,
                                            status=status, preload_content=False)
        return response

    def close(self) -> None:
        """Nothing to close."""


class StaticToken:
    """A credential that always has a valid token."""

    def get_token(self, *scopes: str, **_: object) -> AccessToken:
        """The same token every time."""
        return AccessToken("token", int(time.time()) + 3600)


def item(name: str, created: int, managed: bool = True) -> dict[str, object]:
    """A list item shaped like the recorded ones: versionless id, contentType, managed."""
    return {"id": f"{VAULT}/secrets/{name}", "contentType": "application/x-pkcs12",
            "managed": managed, "attributes": {"enabled": True, "nbf": created - 600,
            "exp": created + 31_536_000, "created": created, "updated": created,
            "recoveryLevel": "Recoverable+Purgeable"}}


def client_of(vault: FakeVault) -> SecretClient:
    """A real SecretClient whose requests go to `vault`."""
    session = requests.Session()
    session.mount("https://", vault)
    return SecretClient(VAULT, StaticToken(), transport=RequestsTransport(session=session),
                        retry_total=0)


def test_list_vault_follows_next_links_and_counts_empty_pages() -> None:
    """60 secrets list in 3 pages plus the empty page Key Vault may interleave."""
    vault = FakeVault([item(f"s{i:02}", OLD + i) for i in range(60)], empty_page_after=25)
    got = list_vault(client_of(vault), max_pages=10)
    assert isinstance(got, Listing)
    assert got.pages == 4
    assert len(got.stamps) == 60
    assert got.stamps["s07"] == Stamp(OLD + 7, OLD + 7, True, "application/x-pkcs12")


def test_list_vault_reports_forbidden_on_403() -> None:
    """An identity without list permission gets NotListed('forbidden'), no exception."""
    got = list_vault(client_of(FakeVault([], status=403)), max_pages=5)
    assert got == NotListed("forbidden", 1)


def test_list_vault_gives_up_when_the_page_budget_is_spent() -> None:
    """A vault too big to be worth listing costs at most `max_pages` pages."""
    vault = FakeVault([item(f"s{i:03}", OLD) for i in range(200)])
    got = list_vault(client_of(vault), max_pages=3)
    assert got == NotListed("costly", 3)


@dataclass(frozen=True)
class Version:
    """What keyvault.Secret says about a fetched version."""

    created: datetime | None
    updated: datetime | None
    enabled: bool | None = True
    content_type: str | None = "application/x-pkcs12"


def at(epoch: int) -> datetime:
    """An aware datetime for an epoch second."""
    return datetime.fromtimestamp(epoch, timezone.utc)


def run_cycle(detector: ChangeDetector, vault: FakeVault, certs: list[ObservedCertificate],
              now: float, installed: Callable[[ObservedCertificate], bool] = everything_installed,
              ) -> listing.Selection:
    """One sync cycle as sync.py runs it: select, then record each fetch."""
    client = client_of(vault)
    chosen = detector.select(certs, lambda _: client, installed, now)
    stamps = {str(i["id"]).rsplit("/", 1)[1].lower(): i["attributes"] for i in vault.items}
    for c in chosen.fetch:
        attrs = stamps[c.secret_name.lower()]
        assert isinstance(attrs, dict)
        detector.fetched(c, Version(at(attrs["created"]), at(attrs["updated"])), now)
    return chosen


def test_detector_lists_a_busy_vault_and_fetches_only_the_rotated_secret() -> None:
    """60 certificates: first cycle 60 GETs, then 3 pages a cycle, plus one GET per rotation."""
    vault = FakeVault([item(f"s{i:02}", OLD) for i in range(60)])
    certs = [cert(f"s{i:02}") for i in range(60)]
    detector = ChangeDetector()
    first = run_cycle(detector, vault, certs, NOW)
    assert (len(first.fetch), first.list_requests) == (60, 0)
    quiet = run_cycle(detector, vault, certs, NOW + 3600)
    assert (len(quiet.fetch), len(quiet.unchanged), quiet.list_requests) == (0, 60, 3)
    vault.items[42] = item("s42", int(NOW) + 3700)
    rotated = run_cycle(detector, vault, certs, NOW + 7200)
    assert [c.secret_name for c in rotated.fetch] == ["s42"]
    assert rotated.list_requests == 3


def test_detector_falls_back_to_gets_when_listing_is_forbidden() -> None:
    """A 403 on listing costs one request once; then one GET per certificate, no more listing."""
    vault = FakeVault([item(f"s{i}", OLD) for i in range(5)])
    certs = [cert(f"s{i}") for i in range(5)]
    detector = ChangeDetector()
    run_cycle(detector, vault, certs, NOW)
    vault.status = 403
    denied = run_cycle(detector, vault, certs, NOW + 3600)
    assert (len(denied.fetch), denied.list_requests) == (5, 1)
    later = run_cycle(detector, vault, certs, NOW + 7200)
    assert (len(later.fetch), later.list_requests) == (5, 0)


@pytest.mark.parametrize("count", [1, 2])
def test_detector_never_lists_for_one_or_two_certificates(count: int) -> None:
    """A 30-secret vault needs 2 pages: never worth it for 1 or 2 certificates (one probe at most,
    cut off after its first page, then no listing for a day)."""
    vault = FakeVault([item(f"s{i:02}", OLD) for i in range(30)])
    certs = [cert(f"s{i:02}") for i in range(count)]
    detector = ChangeDetector()
    run_cycle(detector, vault, certs, NOW)
    second = run_cycle(detector, vault, certs, NOW + 3600)
    assert second.list_requests <= max(0, count - 1)
    third = run_cycle(detector, vault, certs, NOW + 7200)
    assert third.list_requests == 0 and len(third.fetch) == count


def test_detector_matches_secret_names_in_any_case() -> None:
    """Observing `…/secrets/web07` of a secret named `Web07`: quiet cycles list, fetch nothing."""
    vault = FakeVault([item(f"Web{i:02}", OLD) for i in range(30)])
    certs = [cert(f"web{i:02}") for i in range(30)]
    detector = ChangeDetector()
    assert len(run_cycle(detector, vault, certs, NOW).fetch) == 30
    quiet = run_cycle(detector, vault, certs, NOW + 3600)
    assert (len(quiet.fetch), quiet.list_requests) == (0, 2)
    vault.items[7] = item("Web07", int(NOW) + 3700)
    rotated = run_cycle(detector, vault, certs, NOW + 7200)
    assert [c.secret_name for c in rotated.fetch] == ["web07"]


def test_abandoned_listing_still_spares_the_certificates_it_showed_unchanged() -> None:
    """A 503 on page 2: the 25 certificates page 1 showed unchanged are not fetched again."""
    vault = FakeVault([item(f"s{i:02}", OLD) for i in range(60)])
    certs = [cert(f"s{i:02}") for i in range(60)]
    detector = ChangeDetector()
    run_cycle(detector, vault, certs, NOW)
    vault.fail_from = 25
    partial = run_cycle(detector, vault, certs, NOW + 3600)
    assert [c.secret_name for c in partial.fetch] == [f"s{i:02}" for i in range(25, 60)]
    assert partial.list_requests == 2


def test_detector_counts_a_secret_observed_into_five_stores_once() -> None:
    """Five certificates observing one secret cost one GET a cycle: never a listing of 4 pages."""
    vault = FakeVault([item(f"s{i:02}", OLD) for i in range(100)])
    base = cert("s07")
    certs = [replace(base, store_dir=f"/tmp/app{i}") for i in range(5)]
    detector = ChangeDetector()
    run_cycle(detector, vault, certs, NOW)
    for hour in (1, 2):
        cycle = run_cycle(detector, vault, certs, NOW + hour * 3600)
        assert (cycle.list_requests, len(cycle.fetch)) == (0, 5)


def test_stand_in_proxy_page_instead_of_a_listing_falls_back_to_gets(
        azure_env: dict[str, str], imds: ImdsStandin, tmp_path: Path) -> None:
    """A 200 HTML page (a filtering proxy) where a list page was due: the pass still reports
    every certificate, fetched one by one, and nothing installed changes."""
    hour_ago = time.time() - 3600
    with KeyVaultStandin(accept_token=imds.token_issued, clock=lambda: hour_ago) as kv:
        for i in range(4):
            kv.add_certificate(f"web{i}", make_chain())
        vaults = Vaults(identity.credential(Identity(imds.url + "/metadata/identity")),
                        connection_verify=kv.ca_path)
        detector, store = ChangeDetector(), tmp_path / "store"
        wanted = settings(kv, store, *[f"web{i}" for i in range(4)])
        try:
            sync.sync(wanted, vaults, datetime.now(timezone.utc), detector=detector)
            links = {p.name: os.readlink(p) for p in store.iterdir() if p.is_symlink()}
            kv.reset_counters()
            kv.fault(None, "proxy_page")
            again = sync.sync(wanted, vaults, datetime.now(timezone.utc), detector=detector)
            assert [r.outcome for r in again] == [Outcome.UNCHANGED] * 4
            assert kv.requests[0] == ("GET", "/secrets", 200) and kv.count(status=200) == 5
            assert {p.name: os.readlink(p) for p in store.iterdir() if p.is_symlink()} == links
        finally:
            vaults.close()


def test_stand_in_quiet_cycles_list_once_whatever_the_case(
        azure_env: dict[str, str], imds: ImdsStandin, tmp_path: Path) -> None:
    """Real sync against the stand-in: secrets `Web0..3` observed as `web0..3` cost one listing
    page per quiet cycle, no GET per certificate."""
    hour_ago = time.time() - 3600
    with KeyVaultStandin(accept_token=imds.token_issued, clock=lambda: hour_ago) as kv:
        for i in range(4):
            kv.add_certificate(f"Web{i}", make_chain())
        vaults = Vaults(identity.credential(Identity(imds.url + "/metadata/identity")),
                        connection_verify=kv.ca_path)
        detector = ChangeDetector()
        wanted = settings(kv, tmp_path / "store", *[f"web{i}" for i in range(4)])
        try:
            sync.sync(wanted, vaults, datetime.now(timezone.utc), detector=detector)
            for _ in range(2):
                kv.reset_counters()
                sync.sync(wanted, vaults, datetime.now(timezone.utc), detector=detector)
                assert kv.requests == [("GET", "/secrets", 200)]
        finally:
            vaults.close()
