"""One sync pass: fetch every observed certificate, convert, write, grant ACLs, move the link.

A bounded thread pool works across certificates; a failure stays with its own certificate and
never changes what is installed. Identical URLs share one GET per pass.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Protocol, TypeGuard, cast

from . import acl, chain, store
from .errors import AkvvmError
from .keyvault import Secret
from .listing import ChangeDetector, Fetched
from .model import AclGrant, CertResult, ObservedCertificate, Outcome, Settings

log = logging.getLogger("akvvm.sync")


class Fetcher(Protocol):
    """What sync needs from `keyvault.Vaults`."""

    def fetch(self, cert: ObservedCertificate) -> Secret: ...


@dataclass(frozen=True)
class _Verified:
    """A version file this process converted and compared against Key Vault's value."""

    path: str
    stat: tuple[int, int, int]  # inode, size, mtime_ns: a file changed behind us is re-checked
    acls: tuple[AclGrant, ...]  # the grants applied to it (a new ACL setting re-applies them)
    not_after: str | None
    warnings: tuple[str, ...]


# Process-wide, per link path (so bounded by the certificates): the first pass of a process
# converts and compares every installed version (a file written by an older extension is
# corrected); later passes skip verified versions. Single dict get/set: atomic in CPython.
_MEMO: dict[str, _Verified] = {}


GrantsRecorder = Callable[[Sequence[acl.TraversalGrant]], None]


@dataclass(frozen=True)
class _Pass:
    """What every worker of one pass shares."""

    vaults: Fetcher
    now: datetime
    acls_on: bool
    record_grants: GrantsRecorder | None
    detector: ChangeDetector | None


def sync(
    settings: Settings,
    vaults: Fetcher,
    now: datetime,
    *,
    max_workers: int = 8,
    record_grants: GrantsRecorder | None = None,
    detector: ChangeDetector | None = None,
) -> list[CertResult]:
    """Run one pass over `settings.observed`; one result per observed certificate, in order.

    `record_grants` receives the traversal ACLs newly added on store ancestors (to persist
    them for revert at uninstall); it may be called from worker threads, one call at a time.
    `detector` (kept across passes; needs `vaults.client(cert)`) lists a vault instead of
    fetching each certificate when that takes fewer requests.
    """
    recorder = _serialized(record_grants) if record_grants else None
    shared = _Pass(vaults, now, settings.acl_enabled, recorder, detector)
    by_cert = {id(c): r for c, r in _unchanged_by_listing(settings.observed, shared)}
    groups: dict[str, list[ObservedCertificate]] = {}
    for cert in settings.observed:
        if id(cert) not in by_cert:
            groups.setdefault(cert.url, []).append(cert)
    if groups:
        with ThreadPoolExecutor(min(max(1, max_workers), len(groups)), "akvvm-sync") as pool:
            futures = [pool.submit(_sync_group, certs, shared) for certs in groups.values()]
            by_cert.update((id(c), r) for f in futures for c, r in f.result())
    return [by_cert[id(cert)] for cert in settings.observed]


def _unchanged_by_listing(
    observed: Sequence[ObservedCertificate], shared: _Pass
) -> list[tuple[ObservedCertificate, CertResult]]:
    """The certificates a vault listing shows unchanged, with their results (no GET for them)."""
    client_for = getattr(shared.vaults, "client", None)
    if shared.detector is None or client_for is None or not observed:
        return []
    selection = shared.detector.select(
        observed, client_for, lambda c: _verified(c, shared.acls_on) is not None,
        shared.now.timestamp(),
    )
    if selection.list_requests:
        log.debug("listed vaults with %d request(s); %d of %d certificate(s) unchanged",
                  selection.list_requests, len(selection.unchanged), len(observed))
    found = [(cert, _verified(cert, shared.acls_on)) for cert in selection.unchanged]
    return [(cert, result) for cert, result in found if result is not None]


def _serialized(record: GrantsRecorder) -> GrantsRecorder:
    lock = threading.Lock()

    def locked(grants: Sequence[acl.TraversalGrant]) -> None:
        with lock:
            record(grants)

    return locked


def _sync_group(
    certs: Sequence[ObservedCertificate], shared: _Pass
) -> list[tuple[ObservedCertificate, CertResult]]:
    """Fetch once, then install for each observed certificate with this URL."""
    pinned = [_verified(c, shared.acls_on) if c.version else None for c in certs]
    if all(pinned):  # a version never changes: once installed and verified, no GET at all
        return [(cert, result) for cert, result in zip(certs, pinned, strict=True) if result]
    try:
        secret = shared.vaults.fetch(certs[0])
    except AkvvmError as err:
        _tell_detector(shared, certs[0], None)
        return [(cert, _failed(cert, err)) for cert in certs]
    except Exception:  # a bug must not take the other certificates down
        log.exception("fetching %s failed unexpectedly", certs[0].url)
        return [(cert, _failed(cert, _internal())) for cert in certs]
    _tell_detector(shared, certs[0], secret)
    bundle = _Lazy(lambda: chain.convert(secret.value, secret.content_type, shared.now))
    return [(cert, _install_guarded(cert, secret, bundle, shared)) for cert in certs]


def _tell_detector(shared: _Pass, cert: ObservedCertificate, secret: Secret | None) -> None:
    if shared.detector is not None:  # Secret is frozen; listing.Fetched declares plain attributes
        shared.detector.fetched(cert, cast("Fetched | None", secret), shared.now.timestamp())


def _verified(cert: ObservedCertificate, acls_on: bool) -> CertResult | None:
    """UNCHANGED when what the link serves was verified by this process (pinned: that version)."""
    current = _installed_quietly(cert)
    known = _MEMO.get(os.path.join(cert.store_dir, cert.link_name))
    grants = cert.acls if acls_on else ()
    if current is None or cert.version not in (None, current.version):
        return None
    if not _still_valid(known, current.path, grants):
        return None
    return _result(cert, Outcome.UNCHANGED, current.version, current.path, known)


def _install_guarded(
    cert: ObservedCertificate, secret: Secret, bundle: _Lazy, shared: _Pass
) -> CertResult:
    try:
        return _install(cert, secret, bundle, shared)
    except AkvvmError as err:
        return _failed(cert, err, secret.version)
    except Exception:  # a bug must not take the other certificates down
        log.exception("installing %s failed unexpectedly", cert.url)
        return _failed(cert, _internal(), secret.version)


def _install(
    cert: ObservedCertificate, secret: Secret, bundle: _Lazy, shared: _Pass
) -> CertResult:
    """Skip when this version is installed and verified; else convert, write, grant, then link
    (last: it never serves a file a listed user cannot read; an ACL failure leaves it as it was)."""
    done = _verified(cert, shared.acls_on)
    if done is not None and done.version == secret.version:
        return done
    grants = cert.acls if shared.acls_on else ()
    converted = bundle.get()
    plan = store.plan(cert, secret.version, converted.pem)
    written = _write_granted(plan, grants, shared)
    change = replace(written, moved_link=store.point_link(plan, written=written).moved_link)
    if change.changed:
        log.info("%s: installed version %s at %s (link %s, notAfter %s)%s", cert.url,
                 plan.version, plan.version_path, plan.link_path, _iso(converted.not_after),
                 " replacing different content" if change.replaced else "")
    for warning in converted.warnings if change.changed else ():
        log.warning("%s: %s", cert.url, warning)
    verified = _Verified(plan.version_path, _stat(plan.version_path), grants,
                         _iso(converted.not_after), converted.warnings)
    _MEMO[plan.link_path] = verified
    outcome = Outcome.INSTALLED if change.changed else Outcome.UNCHANGED
    return _result(cert, outcome, plan.version, plan.version_path, verified)


def _write_granted(
    plan: store.StorePlan, grants: tuple[AclGrant, ...], shared: _Pass
) -> store.Change:
    """Write the version file with its ACLs: a new file gets them before it takes its name."""
    if not grants:
        return store.write_version(plan, sync_dir=False)

    def grant(path: str) -> None:
        acl.grant([path], plan.store_dir, grants, record=shared.record_grants)

    written = store.write_version(plan, prepare=grant, sync_dir=False)
    if not written.changed:  # an existing file: the ACL setting may be new
        grant(plan.version_path)
    return written


def _still_valid(
    known: _Verified | None, path: str, grants: tuple[AclGrant, ...]
) -> TypeGuard[_Verified]:
    """True when this process already verified the file at `path` with these grants."""
    if known is None or known.path != path or known.acls != grants:
        return False
    try:
        return known.stat == _stat(path)
    except OSError:
        return False


def _stat(path: str) -> tuple[int, int, int]:
    st = os.stat(path, follow_symlinks=False)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _result(
    cert: ObservedCertificate, outcome: Outcome, version: str, path: str, verified: _Verified
) -> CertResult:
    return CertResult(
        url=cert.url,
        outcome=outcome,
        version=version,
        path=path,
        link=os.path.join(cert.store_dir, cert.link_name),
        not_after=verified.not_after,
        warnings=verified.warnings,
    )


def _failed(cert: ObservedCertificate, err: AkvvmError, fetched: str | None = None) -> CertResult:
    """A failed result that still names what is served, so status can say "still serving X"."""
    current = _installed_quietly(cert)
    known = _MEMO.get(os.path.join(cert.store_dir, cert.link_name))
    not_after = known.not_after if known and current and known.path == current.path else None
    serving = f" (still serving version {current.version})" if current else ""
    log.warning("%s: %s%s", cert.url, err, serving)
    retry_after = getattr(err, "retry_after", None)
    return CertResult(
        url=cert.url,
        outcome=Outcome.FAILED,
        version=current.version if current else None,
        path=current.path if current else None,
        link=os.path.join(cert.store_dir, cert.link_name) if current else None,
        not_after=not_after,
        error=str(err) if not fetched else f"version {fetched}: {err}",
        error_kind=err.code,
        retryable=bool(getattr(err, "retryable", False)),
        retry_after=retry_after,
    )


def _installed_quietly(cert: ObservedCertificate) -> store.Installed | None:
    try:
        return store.installed(cert)
    except OSError:
        return None


class _InternalError(AkvvmError):
    code = "INTERNAL"


def _internal() -> AkvvmError:
    return _InternalError("internal error while syncing this certificate.", "See the service log.")


def _iso(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Lazy:
    """Convert at most once per pass, and only when some certificate needs it."""

    def __init__(self, make: Callable[[], chain.Bundle]) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._value: chain.Bundle | None = None

    def get(self) -> chain.Bundle:
        with self._lock:
            if self._value is None:
                self._value = self._make()
            return self._value
