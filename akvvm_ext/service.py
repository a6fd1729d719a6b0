"""The poll loop of `akvvm_service`: initial sync with retries, then one sync per polling interval.

Time, randomness, settings, vault access and reporting come in as arguments.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

from akvvm_ext.model import CertResult

Phase = Literal["transitioning", "success", "error"]


class Reporter(Protocol):
    """Where the service tells the outside world how it is doing."""

    def report(self, phase: Phase, results: Sequence[CertResult], message: str) -> None:
        """Called after every pass; `message` is a short detail for the phase (may be empty)."""
