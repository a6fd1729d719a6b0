"""The board of latest results per observed certificate, in settings order. No I/O."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from akvvm_ext.model import CertResult, ObservedCertificate, Outcome


def failing(results: Sequence[CertResult]) -> list[CertResult]:
    """The results that failed."""
    return [r for r in results if r.outcome is Outcome.FAILED]


def serves(cert: ObservedCertificate, result: CertResult) -> bool:
    """Whether the link serves what `cert` asks for: any version, or the one pinned."""
    return result.version is not None and cert.wants(result.version)


def not_installed(cert: ObservedCertificate, result: CertResult) -> bool:
    """A failure that left `cert` without what it asks for installed: what the initial sync
    waits for (SPEC 3.6). A failed pin still names the older version it serves."""
    return result.outcome is Outcome.FAILED and not serves(cert, result)


class Board:
    """The latest result of each observed certificate, in settings order: what is reported."""

    def __init__(self, observed: Sequence[ObservedCertificate],
                 known: Mapping[ObservedCertificate, CertResult] | None = None) -> None:
        self.observed = tuple(observed)
        self._latest = {c: known[c] for c in self.observed if known and c in known}

    def update(self, certs: Sequence[ObservedCertificate],
               results: Sequence[CertResult]) -> None:
        self._latest.update(zip(certs, results, strict=True))

    def results(self) -> list[CertResult]:
        return [self._latest[c] for c in self.observed if c in self._latest]

    def missing(self) -> tuple[ObservedCertificate, ...]:
        """The certificates without what they ask for installed (never synced, failed before any
        version, or a pinned version not yet installed)."""
        return tuple(c for c in self.observed
                     if c not in self._latest or not serves(c, self._latest[c]))

    def carried(self, observed: Sequence[ObservedCertificate]) -> Board:
        """A board for new settings keeping what is known of the certificates still observed."""
        return Board(observed, self._latest)

    def failed(self, certs: Sequence[ObservedCertificate], error: str) -> list[CertResult]:
        """`certs` failed with an internal, retryable `error`; each still names what it serves."""
        return [replace(self._latest.get(c) or CertResult(url=c.url, outcome=Outcome.FAILED),
                        outcome=Outcome.FAILED, error=error, error_kind="INTERNAL",
                        retryable=True, retry_after=None)
                for c in certs]
