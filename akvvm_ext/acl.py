"""POSIX ACLs that let listed users and groups read installed certificates.

Read on the version files, traversal on the store and on every ancestor the principal could not
traverse yet; ancestor grants are returned for the caller to persist and `revert` later.
pylibacl (`posix1e`) when importable, else the `getfacl`/`setfacl` tools.
"""
from __future__ import annotations

import errno
import functools
import grp
import logging
import operator
import os
import pwd
import subprocess
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from akvvm_ext.errors import AclError
from akvvm_ext.model import AclGrant

try:
    import posix1e
except ImportError:  # pragma: no cover - depends on the machine
    posix1e = None

log = logging.getLogger("akvvm.acl")
READ, EXECUTE = 4, 1
_BITS = (("r", READ), ("w", 2), ("x", EXECUTE))
_TAGS = {"user": "u", "group": "g", "mask": "m", "other": "o"}
_LOCK = threading.Lock()  # one read-modify-write of an ACL at a time (shared ancestors)
use_tools = posix1e is None  # tests flip this to exercise the setfacl path


class TraversalGrant(NamedTuple):
    """A traversal entry added to an ancestor of a store: `kind` is "user" or "group"."""

    path: str
    kind: str
    id: int


@dataclass(frozen=True)
class _Principal:
    kind: str  # "user" | "group"
    id: int
    gids: frozenset[int]  # the groups it acts with: a user's groups, or the group itself


Entries = dict[tuple[str, int | None], int]  # (tag u/g/m/o, id or None) -> rwx bits


def grant(paths: Sequence[str], store_dir: str, grants: Sequence[AclGrant], *,
          record: Callable[[Sequence[TraversalGrant]], None] | None = None,
          ) -> list[TraversalGrant]:
    """Give each principal read on `paths` and the traversal it lacks; return ancestor grants.

    `record` hears of each ancestor grant as soon as it is made, so one that a later failure
    interrupts is still remembered for revert. Raises AclError (before changing anything) for an
    unknown user or group name.
    """
    principals = [p for g in grants for p in _resolve(g)]
    added: list[TraversalGrant] = []
    with _LOCK:
        for principal in principals:
            for path in paths:
                _ensure(path, principal, READ)
            _ensure(store_dir, principal, EXECUTE)
            for ancestor in _ancestors(store_dir):
                if _ensure(ancestor, principal, EXECUTE):
                    added.append(TraversalGrant(ancestor, principal.kind, principal.id))
                    if record is not None:
                        record(added[-1:])
    return added


def set_exact(path: str, grants: Sequence[AclGrant]) -> bool:
    """Make the named entries of `path` the configured ones; True when some were taken away.

    Each principal of `grants` can read `path`; every other named user or group entry is
    removed (no grants: no named entry and no mask). Raises AclError for an unknown name; with
    no grants, a filesystem (or machine) without ACL support has nothing to take away.
    """
    principals = [p for g in grants for p in _resolve(g)]
    keep = {_key(p) for p in principals}
    with _LOCK:
        try:
            entries = _read(path)
        except AclError:
            if principals:
                raise
            return False
        stale = [key for key in entries if key[1] is not None and key not in keep]
        for key in stale:
            del entries[key]
        if stale or (("m", None) in entries and not any(k[1] is not None for k in entries)):
            _write(path, entries)
        for principal in principals:
            _ensure(path, principal, READ)
    return bool(stale)


def _key(principal: _Principal) -> tuple[str, int]:
    return ("u" if principal.kind == "user" else "g", principal.id)


def revert(records: Iterable[TraversalGrant]) -> None:
    """Take back traversal grants made by `grant`; gone paths and entries are skipped."""
    with _LOCK:
        for record in records:
            try:
                _take_back(record)
            except AclError as err:  # one stuck path must not keep the others granted
                log.warning("could not revert %s for %s %d: %s", record.path, record.kind,
                            record.id, err)


def _take_back(record: TraversalGrant) -> None:
    if not os.path.lexists(record.path):
        return
    key = ("u" if record.kind == "user" else "g", record.id)
    entries = _read(record.path)
    if key in entries:
        entries[key] &= ~EXECUTE
        if not entries[key]:
            del entries[key]
        _write(record.path, entries, mask_plus=0)


def _resolve(acl: AclGrant) -> list[_Principal]:
    found = []
    if acl.user is not None:
        found.append(_user(acl.user))
    if acl.group is not None:
        found.append(_group(acl.group))
    return found


def _numeric(name: str) -> bool:
    """A uid or gid written in ASCII digits (superscript or Arabic-Indic digits make a name)."""
    return name.isascii() and name.isdigit()


def _user(name: str) -> _Principal:
    try:
        entry = pwd.getpwuid(int(name)) if _numeric(name) else pwd.getpwnam(name)
    except KeyError:
        if _numeric(name):  # a numeric id need not exist in /etc/passwd
            return _Principal("user", int(name), frozenset())
        raise AclError(
            f"unknown user {name!r} in acls.", "Create the user first or give a numeric uid."
        ) from None
    gids = frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return _Principal("user", entry.pw_uid, gids)


def _group(name: str) -> _Principal:
    if _numeric(name):
        return _Principal("group", int(name), frozenset({int(name)}))
    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        raise AclError(
            f"unknown group {name!r} in acls.", "Create the group first or give a numeric gid."
        ) from None
    return _Principal("group", gid, frozenset({gid}))


def _ancestors(store_dir: str) -> list[str]:
    """Directories above the store, both as written and as resolved; symlinks themselves skipped."""
    found: list[str] = []
    for start in (os.path.abspath(store_dir), os.path.realpath(store_dir)):
        path = os.path.dirname(start)
        while True:
            if path not in found and not os.path.islink(path):
                found.append(path)
            if os.path.dirname(path) == path:
                break
            path = os.path.dirname(path)
    return found


def _ensure(path: str, principal: _Principal, bit: int) -> bool:
    """Add `bit` for the principal on `path` unless it has it already; True when added."""
    entries = _read(path)
    try:
        st = os.stat(path)
    except OSError as err:
        raise _acl_error(path, err) from None
    if _allowed(entries, st, principal, bit):
        return False
    key = _key(principal)
    entries[key] = entries.get(key, 0) | bit
    _write(path, entries, mask_plus=bit)
    return True


def _allowed(entries: Entries, st: os.stat_result, principal: _Principal, bit: int) -> bool:
    """The POSIX.1e access check: can the principal use `bit` on a file with these entries?"""
    mask = entries.get(("m", None), 7)
    if principal.kind == "user":
        if principal.id == 0:
            return True
        if principal.id == st.st_uid:
            return bool(entries[("u", None)] & bit)
        if ("u", principal.id) in entries:
            return bool(entries[("u", principal.id)] & mask & bit)
    groups = [
        perms for (tag, qualifier), perms in entries.items()
        if tag == "g" and (st.st_gid if qualifier is None else qualifier) in principal.gids
    ]
    if groups:
        return any(perms & mask & bit for perms in groups)
    return bool(entries[("o", None)] & bit)


def _read(path: str) -> Entries:
    try:
        if use_tools:
            text = _tool(["getfacl", "-c", "-n", "-p", path])
        else:
            text = posix1e.ACL(file=path).to_any_text(options=posix1e.TEXT_NUMERIC_IDS).decode()
    except OSError as err:
        raise _acl_error(path, err) from None
    return _parse(text)


def _parse(text: str) -> Entries:
    entries: Entries = {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if not line or line.startswith("default:"):
            continue
        tag, qualifier, perms = line.split(":")
        bits = sum(bit for char, bit in _BITS if char in perms)
        entries[(_TAGS.get(tag, tag), int(qualifier) if qualifier else None)] = bits
    return entries


def _write(path: str, entries: Entries, mask_plus: int | None = None) -> None:
    """Set the access ACL. The mask is recomputed as setfacl does (the union of the group
    class); with `mask_plus`, an existing mask only gains those bits: a directory that is not
    ours keeps what its mask withholds from other named entries."""
    named = [perms for (tag, qualifier), perms in entries.items() if qualifier is not None]
    mask = entries.pop(("m", None), None)
    if named and mask is not None and mask_plus is not None:
        entries[("m", None)] = mask | mask_plus
    elif named:
        entries[("m", None)] = functools.reduce(operator.or_, named, entries[("g", None)])
    text = ",".join(_entry_text(key, perms) for key, perms in sorted(entries.items(), key=_order))
    try:
        if use_tools:
            _tool(["setfacl", "--set", text, path])
        else:
            posix1e.ACL(text=text).applyto(path)
    except OSError as err:
        raise _acl_error(path, err) from None


def _order(item: tuple[tuple[str, int | None], int]) -> tuple[int, int]:
    (tag, qualifier), _ = item
    return "ugmo".index(tag), -1 if qualifier is None else qualifier


def _entry_text(key: tuple[str, int | None], perms: int) -> str:
    tag, qualifier = key
    rwx = "".join(char if perms & bit else "-" for char, bit in _BITS)
    return f"{tag}:{'' if qualifier is None else qualifier}:{rwx}"


def _tool(args: list[str]) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise AclError(f"the {args[0]} tool is not installed and pylibacl is unavailable.",
                       "Install the acl package (apt-get install acl), or set aclEnabled to "
                       "false.") from None
    if done.returncode != 0:
        code = errno.ENOTSUP if "not supported" in done.stderr else errno.EIO
        raise OSError(code, done.stderr.strip() or f"{args[0]} failed", args[-1])
    return done.stdout


def _acl_error(path: str, err: OSError) -> AclError:
    if err.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
        return AclError(
            f"the filesystem of {path} does not support ACLs.",
            "Mount it with ACL support, or set aclEnabled to false.",
        )
    return AclError(f"cannot set the ACL of {path}: {err.strerror}.", "Check the path and mounts.")
