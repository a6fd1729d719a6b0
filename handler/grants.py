"""The ledger of traversal ACLs the service added to store ancestors (`<state>/acl_grants.json`).

The service appends to it; uninstall reads it to take those grants back. Rows are [path, kind, id].
"""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence

from akvvm_ext.acl import TraversalGrant
from handler.environment import write_atomic

LEDGER = "acl_grants.json"
_lock = threading.Lock()


def load(state_dir: str) -> list[TraversalGrant]:
    """The recorded grants; a missing or damaged ledger counts as empty."""
    try:
        with open(os.path.join(state_dir, LEDGER), encoding="utf-8") as handle:
            rows = json.load(handle)
    except (OSError, ValueError):
        return []
    if not isinstance(rows, list):
        return []
    return [TraversalGrant(str(r[0]), str(r[1]), int(r[2])) for r in rows
            if isinstance(r, list) and len(r) == 3 and str(r[2]).isdigit()]


def recorder(state_dir: str) -> Callable[[Sequence[TraversalGrant]], None]:
    """A function that adds grants to the ledger (atomically, each grant once)."""
    def record(added: Sequence[TraversalGrant]) -> None:
        with _lock:
            known = load(state_dir)
            fresh = [g for g in added if g not in known]
            if fresh:
                _write(state_dir, known + fresh)
    return record


def _write(state_dir: str, grants: Sequence[TraversalGrant]) -> None:
    data = json.dumps([list(g) for g in grants]).encode()
    write_atomic(os.path.join(state_dir, LEDGER), data, 0o600)
