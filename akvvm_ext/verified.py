"""What this process verified about installed version files, so later passes can skip them.

Validity warnings stay out of the memo: each pass computes them for its own time. Reads file
status only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TypeGuard

from .chain import validity_warnings
from .model import AclGrant


@dataclass(frozen=True)
class Verified:
    """A version file this process converted and compared against Key Vault's value."""

    path: str
    stat: tuple[int, int, int, int]  # inode, size, mtime, ctime: changed behind us, re-checked
    acls: tuple[AclGrant, ...]  # the grants applied to it (a new ACL setting re-applies them)
    not_before: datetime
    not_after: datetime
    warnings: tuple[str, ...]  # about the content; validity ones come from `warnings_at`

    def warnings_at(self, now: datetime) -> tuple[str, ...]:
        """The content warnings plus the SPEC §7 validity warning for `now`."""
        return self.warnings + validity_warnings(self.not_before, self.not_after, now)


# Process-wide, per link path (so bounded by the certificates): the first pass of a process
# converts and compares every installed version (a file written by an older extension is
# corrected); later passes skip verified versions. Single dict get/set: atomic in CPython.
MEMO: dict[str, Verified] = {}


def still_valid(
    known: Verified | None, path: str, grants: tuple[AclGrant, ...]
) -> TypeGuard[Verified]:
    """True when this process already verified the file at `path` with these grants."""
    if known is None or known.path != path or known.acls != grants:
        return False
    try:
        return known.stat == stat(path)
    except OSError:
        return False


def stat(path: str) -> tuple[int, int, int, int]:
    """What tells that a file changed: its content (mtime), or its owner, mode or ACL (ctime)."""
    st = os.stat(path, follow_symlinks=False)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def iso(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
