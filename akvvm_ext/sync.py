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
from datetime import datetime
from typing import Protocol, cast

from . import acl, chain, fsio, store, verified
from .errors import AkvvmError
from .keyvault import Secret
from .listing import ChangeDetector, Fetched
from .model import AclGrant, CertResult, ObservedCertificate, Outcome, Settings

log = logging.getLogger("akvvm.sync")


class Fetcher(Protocol):
    """What sync needs from `keyvault.Vaults`."""

    def fetch(self, cert: ObservedCertificate) -> Secret: ...


# Process-wide memo of verified version files, per link path (see verified.MEMO).
_MEMO = verified.MEMO


GrantsRecorder = Callable[[Sequence[acl.TraversalGrant]], None]


@dataclass(frozen=True)
class _Pass:
    """What every worker of one pass shares."""

    vaults: Fetcher
    now: datetime
    acls_on: bool
    record_grants: GrantsRecorder | None
    detector: ChangeDetector | None
    scans: fsio.Scans


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
    shared = _Pass(vaults, now, settings.acl_enabled, recorder, detector, fsio.Scans())
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
        observed, client_for, lambda c: _verified(c, shared) is not None,
        shared.now.timestamp(),
    )
    if selection.list_requests:
        log.debug("listed vaults with %d request(s); %d of %d certificate(s) unchanged",
                  selection.list_requests, len(selection.unchanged), len(observed))
    found = [(cert, _verified(cert, shared)) for cert in selection.unchanged]
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
    pinned = [_verified(c, shared) if c.version else None for c in certs]
    if all(pinned):  # a version never changes: once installed and verified, no GET at all
        return [(cert, result) for cert, result in zip(certs, pinned, strict=True) if result]
    try:
        secret = shared.vaults.fetch(certs[0])
    except AkvvmError as err:
        _tell_detector(shared, certs[0], None)
        return [(cert, _failed(cert, err)) for cert in certs]
    except Exception:  # a bug must not take the other certificates down
        log.exception("fetching %s failed unexpectedly", certs[0].url)
        _tell_detector(shared, certs[0], None)
        return [(cert, _failed(cert, _internal())) for cert in certs]
    bundle = _Lazy(lambda: chain.convert(secret.value, secret.content_type, shared.now))
    results = [(cert, _install_guarded(cert, secret, bundle, shared)) for cert in certs]
    failed = any(result.outcome is Outcome.FAILED for _, result in results)
    _tell_detector(shared, certs[0], None if failed else secret)  # a failure is retried by GET
    return results


def _tell_detector(shared: _Pass, cert: ObservedCertificate, secret: Secret | None) -> None:
    if shared.detector is None:
        return
    try:  # Secret is frozen; listing.Fetched declares plain attributes
        shared.detector.fetched(cert, cast("Fetched | None", secret), shared.now.timestamp())
    except Exception:  # odd attributes must not end the pass; without a baseline: a GET
        log.exception("recording the attributes of %s failed", cert.url)
        shared.detector.fetched(cert, None, shared.now.timestamp())


def _verified(cert: ObservedCertificate, shared: _Pass) -> CertResult | None:
    """UNCHANGED when what the link serves was verified by this process (pinned: that version)."""
    current = _installed_quietly(cert)
    known = _MEMO.get(os.path.join(cert.store_dir, cert.link_name))
    grants = cert.acls if shared.acls_on else ()
    if current is None or not cert.wants(current.version):
        return None
    if not verified.still_valid(known, current.path, grants):
        return None
    return _result(cert, Outcome.UNCHANGED, current.version, current.path, known, shared.now)


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
    done = _verified(cert, shared)
    if done is not None and done.version == secret.version:
        return done
    grants = cert.acls if shared.acls_on else ()
    converted = bundle.get()
    plan = store.plan(cert, secret.version, converted.pem)
    written = _write_granted(plan, grants, shared)
    change = replace(written, moved_link=store.point_link(plan, written=written).moved_link)
    if change.changed:
        log.info("%s: installed version %s at %s (link %s, notAfter %s)%s", cert.url,
                 plan.version, plan.version_path, plan.link_path, verified.iso(converted.not_after),
                 " replacing different content" if change.replaced else "")
    for warning in converted.warnings if change.changed else ():
        log.warning("%s: %s", cert.url, warning)
    validity = chain.validity_warnings(converted.not_before, converted.not_after, shared.now)
    known = verified.Verified(
        plan.version_path, verified.stat(plan.version_path), grants, converted.not_before,
        converted.not_after, tuple(w for w in converted.warnings if w not in validity))
    _MEMO[plan.link_path] = known
    outcome = Outcome.INSTALLED if change.changed else Outcome.UNCHANGED
    return _result(cert, outcome, plan.version, plan.version_path, known, shared.now)


def _write_granted(
    plan: store.StorePlan, grants: tuple[AclGrant, ...], shared: _Pass
) -> store.Change:
    """Write the version file with its ACLs: a new file gets them before it takes its name.

    Runs on a process's first pass and when the ACL setting changed: named entries that are no
    longer configured (or aclEnabled false) are taken away from the file to be served."""
    def grant(path: str) -> None:
        if grants:
            acl.grant([path], plan.store_dir, grants, record=shared.record_grants)

    scan = shared.scans.get(plan.store_dir)
    written = store.write_version(plan, prepare=grant, sync_dir=False, scan=scan)
    if not written.changed:  # an existing file: the ACL setting may be new
        grant(plan.version_path)
    if acl.set_exact(plan.version_path, grants):
        log.info("%s: took back read access not configured any more", plan.version_path)
    _take_back_from_older(plan, grants, scan)
    return written


def _take_back_from_older(
    plan: store.StorePlan, grants: tuple[AclGrant, ...], scan: fsio.Scan
) -> None:
    """Older versions stay on disk but are served no more: only the configured principals keep
    read access, so a user taken out of `acls` cannot read an old private key by its path."""
    for path in store.older_versions(plan, scan):
        try:
            if acl.set_exact(path, grants):
                log.info("%s: took back read access not configured any more", path)
        except AkvvmError as err:  # the served file got its ACL; an old one must not fail it
            log.warning("%s: %s", path, err)


def _result(
    cert: ObservedCertificate, outcome: Outcome, version: str, path: str,
    known: verified.Verified, now: datetime,
) -> CertResult:
    return CertResult(
        url=cert.url,
        outcome=outcome,
        version=version,
        path=path,
        link=os.path.join(cert.store_dir, cert.link_name),
        not_after=verified.iso(known.not_after),
        warnings=known.warnings_at(now),
    )


def _failed(cert: ObservedCertificate, err: AkvvmError, fetched: str | None = None) -> CertResult:
    """A failed result that still names what is served, so status can say "still serving X"."""
    current = _installed_quietly(cert)
    known = _MEMO.get(os.path.join(cert.store_dir, cert.link_name))
    served = known if known and current and known.path == current.path else None
    not_after = verified.iso(served.not_after) if served else None
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
