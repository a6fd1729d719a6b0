"""Change detection by listing: one listing page per 25 secrets instead of one GET per certificate.

Pure decisions (`strategy`, `plan`, `remember`) plus `list_vault` (pages through a vault with a
SecretClient) and `ChangeDetector`, the per-service memory that `sync` consults each cycle.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Protocol

from akvvm_ext.model import ObservedCertificate

PAGE_SIZE = 25  # Key Vault's default and our maxresults
# Key Vault's timestamps have one-second resolution, so two versions made within the same second
# list identically; a secret touched this close to our baseline is fetched again to be sure.
SETTLE_S = 300.0
# Every latest-version certificate is fetched at least this often, whatever listings say.
REFRESH_S = 24 * 3600.0
# After a listing failed (429, 5xx, a vault that cannot list), per-certificate GETs for this long.
FAILED_PAUSE_S = 3600.0


@dataclass(frozen=True)
class Stamp:
    """What one listing item says about a secret's current version (the item names no version)."""

    created: int | None
    updated: int | None
    enabled: bool | None = True
    content_type: str | None = None

    @property
    def latest_second(self) -> int:
        """The newest moment this stamp mentions, in epoch seconds."""
        return max(self.created or 0, self.updated or 0)


@dataclass(frozen=True)
class Listing:
    """A complete listing of one vault: stamps by lower-cased secret name (Key Vault names are
    case-insensitive) and the requests it took."""

    stamps: Mapping[str, Stamp]
    pages: int


@dataclass(frozen=True)
class NotListed:
    """Listing gave no usable answer: forbidden (403), too costly, or failed; `pages` were spent."""

    # "forbidden" (403 or another 4xx), "costly", "failed" (429, 5xx, network), "skipped"
    reason: str
    pages: int = 0
    # what the pages read before giving up said (current, so still trusted), by lower-cased name
    stamps: Mapping[str, Stamp] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Seen:
    """The stamp a secret had when we last fetched it, and when that listing was taken."""

    stamp: Stamp
    at: float  # epoch seconds (local clock)


@dataclass(frozen=True)
class VaultMemory:
    """What we remember about one vault between cycles."""

    seen: Mapping[str, Seen] = field(default_factory=dict)  # by lower-cased secret name
    pages: int | None = None  # pages the last complete listing took (empty pages included)
    list_after: float = 0.0  # no listing before this time (after a 403 or a too costly listing)


def pages_needed(total_secrets: int) -> int:
    """Pages a listing takes at best (Key Vault may also send short or empty pages)."""
    return max(1, math.ceil(total_secrets / PAGE_SIZE))


def settled(seen: Seen, now: float, settle_s: float = SETTLE_S) -> bool:
    """Whether a baseline can be trusted: old enough to be unambiguous, young enough to keep."""
    return seen.stamp.latest_second < seen.at - settle_s and now - seen.at < REFRESH_S


def strategy(memory: VaultMemory, candidates: int, now: float) -> int:
    """How many listing pages are worth spending on `candidates` settled certificates (0: GETs).

    Listing pays only when it takes fewer requests than one GET per candidate.
    """
    if candidates < 2 or now < memory.list_after:
        return 0
    if memory.pages is not None and memory.pages >= candidates:
        return 0
    return candidates - 1


def needs_fetch(
    name: str, memory: VaultMemory, listing: Listing | NotListed, now: float,
    settle_s: float = SETTLE_S,
) -> bool:
    """Whether the listing (or the part read of it) leaves any doubt that the installed version
    is still the current one; `name` in any case."""
    seen = memory.seen.get(name.lower())
    stamp = listing.stamps.get(name.lower())
    if seen is None or stamp is None or stamp != seen.stamp:
        return True
    return not settled(seen, now, settle_s)


def plan(
    certs: Sequence[ObservedCertificate],
    memory: VaultMemory,
    listing: Listing | NotListed,
    installed: Callable[[ObservedCertificate], bool],
    now: float,
    settle_s: float = SETTLE_S,
) -> tuple[ObservedCertificate, ...]:
    """The certificates of one vault that must be fetched this cycle.

    Pinned versions are fetched only until installed; latest-version ones when nothing is
    installed, when the listing (or the part read before it was abandoned) does not show them,
    or shows a change (or any doubt).
    """
    def fetch(cert: ObservedCertificate) -> bool:
        if not installed(cert):
            return True
        if cert.version is not None:
            return False
        return needs_fetch(cert.secret_name, memory, listing, now, settle_s)

    return tuple(cert for cert in certs if fetch(cert))


def after_listing(memory: VaultMemory, listing: Listing | NotListed, now: float) -> VaultMemory:
    """The memory after a listing attempt: its cost, or how long to leave listing alone."""
    if isinstance(listing, Listing):
        return replace(memory, pages=listing.pages)
    pause = FAILED_PAUSE_S if listing.reason == "failed" else REFRESH_S
    return replace(memory, list_after=now + pause)


def with_baseline(memory: VaultMemory, name: str, stamp: Stamp | None, now: float) -> VaultMemory:
    """The memory after fetching `name`: its stamp becomes the baseline (None forgets it)."""
    seen = {key: value for key, value in memory.seen.items() if key != name.lower()}
    if stamp is not None:
        seen[name.lower()] = Seen(stamp, now)
    return replace(memory, seen=seen)


def epoch(moment: datetime | None) -> int | None:
    """Seconds since the epoch, as Key Vault sends them."""
    return None if moment is None else int(moment.timestamp())


def stamp_of(props: Any) -> Stamp:
    """A Stamp from the SDK's SecretProperties (a listing item)."""
    created, updated = epoch(props.created_on), epoch(props.updated_on)
    return Stamp(created, updated, props.enabled, props.content_type)


class Fetched(Protocol):
    """What `keyvault.Secret` tells about the version fetched (read-only: Secret is frozen)."""

    @property
    def created(self) -> datetime | None: ...

    @property
    def updated(self) -> datetime | None: ...

    @property
    def enabled(self) -> bool | None: ...

    @property
    def content_type(self) -> str | None: ...


class Lister(Protocol):
    """The one method of azure.keyvault.secrets.SecretClient that listing uses."""

    def list_properties_of_secrets(self, **kwargs: Any) -> Any: ...


def list_vault(client: Lister, max_pages: int) -> Listing | NotListed:
    """List every secret of a vault, giving up once more than `max_pages` pages would be needed."""
    from azure.core.exceptions import AzureError, HttpResponseError

    stamps: dict[str, Stamp] = {}
    pages = 0
    try:
        pager = client.list_properties_of_secrets(max_page_size=PAGE_SIZE).by_page()
        for page in pager:
            pages += 1
            for props in page:
                stamps[props.name.lower()] = stamp_of(props)
            if pages >= max_pages and getattr(pager, "continuation_token", None):
                return NotListed("costly", pages, stamps)
    except HttpResponseError as err:
        status = err.status_code or 0
        transient = status == 429 or status >= 500
        return NotListed("failed" if transient else "forbidden", pages + 1, stamps)
    except (AzureError, ValueError):  # ValueError: a page that is not JSON (a proxy's page)
        return NotListed("failed", pages + 1, stamps)
    return Listing(stamps, pages)


@dataclass(frozen=True)
class Selection:
    """What one cycle should do: fetch some certificates, report the rest as unchanged."""

    fetch: tuple[ObservedCertificate, ...]
    unchanged: tuple[ObservedCertificate, ...]
    list_requests: int  # listing pages spent this cycle (add them to the cycle's request count)


class ChangeDetector:
    """One per service, kept across cycles: lists vaults where that saves requests.

    `select` runs at the start of a cycle (one thread); `fetched` may be called from workers.
    """

    def __init__(self, settle_s: float = SETTLE_S) -> None:
        self._settle_s = settle_s
        self._lock = threading.Lock()
        self._memory: dict[str, VaultMemory] = {}

    def select(
        self,
        certs: Sequence[ObservedCertificate],
        client_for: Callable[[ObservedCertificate], Lister],
        installed: Callable[[ObservedCertificate], bool],
        now: float,
    ) -> Selection:
        """Decide, vault by vault, which certificates to fetch (listing a vault when it pays)."""
        fetch: list[ObservedCertificate] = []
        spent = 0
        for vault_url, group in _by_vault(certs).items():
            to_fetch, pages = self._select_vault(vault_url, group, client_for, installed, now)
            fetch.extend(to_fetch)
            spent += pages
        chosen = {id(cert) for cert in fetch}
        unchanged = tuple(cert for cert in certs if id(cert) not in chosen)
        return Selection(tuple(cert for cert in certs if id(cert) in chosen), unchanged, spent)

    def fetched(self, cert: ObservedCertificate, secret: Fetched | None, now: float) -> None:
        """Record a fetch of a latest-version certificate: the version's attributes become the
        baseline that listings are compared with (None, after a failure, forgets it)."""
        if cert.version is not None:
            return
        stamp = None
        if secret is not None:
            created, updated = epoch(secret.created), epoch(secret.updated)
            stamp = Stamp(created, updated, secret.enabled, secret.content_type)
        with self._lock:
            memory = self._memory.get(cert.vault_url, VaultMemory())
            self._memory[cert.vault_url] = with_baseline(memory, cert.secret_name, stamp, now)

    def _select_vault(
        self,
        vault_url: str,
        certs: Sequence[ObservedCertificate],
        client_for: Callable[[ObservedCertificate], Lister],
        installed: Callable[[ObservedCertificate], bool],
        now: float,
    ) -> tuple[tuple[ObservedCertificate, ...], int]:
        with self._lock:
            memory = self._memory.get(vault_url, VaultMemory())
        candidates = [
            cert for cert in certs
            if cert.version is None and cert.secret_name.lower() in memory.seen
            and settled(memory.seen[cert.secret_name.lower()], now, self._settle_s)
        ]
        # A pass GETs each URL once, however many certificates observe it: count secrets.
        max_pages = strategy(memory, len({c.secret_name.lower() for c in candidates}), now)
        listing: Listing | NotListed = NotListed("skipped")  # no listing: GET them all
        if max_pages:
            listing = list_vault(client_for(certs[0]), max_pages)
            with self._lock:
                memory = after_listing(self._memory.get(vault_url, memory), listing, now)
                self._memory[vault_url] = memory
        return plan(certs, memory, listing, installed, now, self._settle_s), listing.pages


def _by_vault(certs: Sequence[ObservedCertificate]) -> dict[str, list[ObservedCertificate]]:
    groups: dict[str, list[ObservedCertificate]] = {}
    for cert in certs:
        groups.setdefault(cert.vault_url, []).append(cert)
    return groups
