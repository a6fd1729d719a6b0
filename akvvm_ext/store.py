"""The certificate store on disk: versioned PEM files behind one stable, relative symlink.

`plan` is pure; `write_version` then `point_link` (`apply`: both) write atomically, never follow a
planted symlink and delete nothing but the temp files a killed writer of ours left behind."""
from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from akvvm_ext.errors import StoreError
from akvvm_ext.fsio import (
    Scan,
    fsync_dir,
    lstat,
    remove_quietly,
    remove_stale_temps,
    write_all,
)
from akvvm_ext.model import ObservedCertificate

log = logging.getLogger("akvvm.store")

Token = Callable[[], str]  # names temp files: unpredictable by default, tests pass their own
Prepare = Callable[[str], None]  # called with a new version file's temp path before its rename
_random_token: Token = functools.partial(secrets.token_hex, 8)
_VERSION_ID = re.compile(r"[0-9a-fA-F]{32}")  # Key Vault's version ids
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_HINTS = {
    errno.ENOSPC: "Free space on the store's filesystem; the previous version keeps being served.",
    errno.EDQUOT: "Raise the disk quota of the service user; the previous version is kept.",
    errno.EROFS: "Remount the filesystem read-write or set another certificateStoreLocation.",
    errno.EACCES: "Check chattr +i, SELinux/AppArmor and mount options of the store directory.",
    errno.EPERM: "Check chattr +i, SELinux/AppArmor and mount options of the store directory.",
    errno.ENOTDIR: "certificateStoreLocation must be a directory (or not exist yet).",
    errno.EFBIG: "A file size limit (ulimit -f) stops the write; raise it for the service.",
}


@dataclass(frozen=True)
class Installed:
    """What the link serves now: the version and the absolute path of its file."""

    version: str
    path: str


@dataclass(frozen=True)
class StorePlan:
    """The desired state for one certificate: its version file and the link pointing at it."""

    store_dir: str
    version: str
    version_path: str  # <store>/<vault>.<name>.<version>
    link_path: str  # <store>/<link_name>
    link_target: str  # relative: the version file's name
    content: bytes
    file_prefix: str  # <vault>.<name>: whose temp files are ours to clean up


@dataclass(frozen=True)
class Change:
    """What `write_version`, `point_link` or `apply` did."""

    wrote: bool = False  # a new version file was written
    replaced: bool = False  # an existing version file with other content was replaced
    moved_link: bool = False  # the link was created or now points elsewhere

    @property
    def changed(self) -> bool:
        """True when anything on disk changed."""
        return self.wrote or self.replaced or self.moved_link


def installed(cert: ObservedCertificate) -> Installed | None:
    """The version the link serves, or None when the link is absent, not ours or dangling."""
    link = os.path.join(cert.store_dir, cert.link_name)
    try:
        target = os.readlink(link)
    except OSError:
        return None
    path = os.path.normpath(os.path.join(cert.store_dir, target))
    name, prefix = os.path.basename(path), cert.file_prefix + "."
    if (os.path.dirname(path) != os.path.normpath(cert.store_dir) or len(name) <= len(prefix)
            or not name.startswith(prefix) or not os.path.isfile(path)):
        return None
    return Installed(version=name[len(prefix) :], path=path)


def older_versions(plan: StorePlan, scan: Scan | None = None) -> list[str]:
    """The other version files of the plan's certificate in its store (regular files only).
    `scan`: the store's listing taken at the start of this pass (else the store is listed)."""
    prefix, current = plan.file_prefix + ".", os.path.basename(plan.version_path)
    names = (scan or Scan(plan.store_dir)).starting_with(prefix)
    found = [os.path.join(plan.store_dir, n) for n in names
             if n != current and _VERSION_ID.fullmatch(n[len(prefix):])]
    return [p for p in found if (st := lstat(p)) is not None and stat.S_ISREG(st.st_mode)]


def plan(cert: ObservedCertificate, version: str, pem: bytes) -> StorePlan:
    """The files and link that serve `pem` as `version` of `cert`. No I/O."""
    if not version or "/" in version or "\0" in version or version in (".", ".."):
        raise StoreError(f"the version id {version!r} cannot be a file name.", "Report this.")
    file_name = f"{cert.file_prefix}.{version}"
    return StorePlan(store_dir=cert.store_dir, version=version,
                     version_path=os.path.join(cert.store_dir, file_name),
                     link_path=os.path.join(cert.store_dir, cert.link_name),
                     link_target=file_name, content=pem, file_prefix=cert.file_prefix)


def write_version(
    plan: StorePlan, *, prepare: Prepare | None = None, token: Token = _random_token,
    sync_dir: bool = True, scan: Scan | None = None,
) -> Change:
    """Write the version file unless it holds the content already; the link is not touched.

    Creates the store if missing, first removes this certificate's stale temp files. `prepare`
    (e.g. ACL grants) runs on a new file before its rename; its exception aborts the write.
    `sync_dir=False` leaves the directory fsync to `point_link(plan, written=<this Change>)`.
    `scan`: the store's listing taken at the start of this pass, to find stale temp files in."""
    with _store_errors(plan.store_dir):
        _ensure_dir(plan.store_dir)
        remove_stale_temps(plan.store_dir, plan.file_prefix, os.path.basename(plan.link_path),
                           scan)
        wrote, replaced = _install_file(plan, prepare, token)
        if sync_dir and (wrote or replaced):
            fsync_dir(plan.store_dir)
    return Change(wrote=wrote, replaced=replaced)


def point_link(
    plan: StorePlan, *, token: Token = _random_token, written: Change | None = None
) -> Change:
    """Point the link at the version file `write_version` wrote; refuse unless it holds the plan.

    `written`: what `write_version(plan, sync_dir=False)` just returned. The file is then known
    to hold the plan (not read back), and one directory fsync covers both renames (same dir)."""
    with _store_errors(plan.store_dir):
        if written is None and (
                _read_existing(plan.version_path, len(plan.content)) != plan.content):
            raise StoreError(f"{plan.version_path} does not hold this version; the link stays.",
                             "Write the version file first (store.write_version).")
        moved = _point_link(plan, token)
        if moved or (written is not None and written.changed):
            fsync_dir(plan.store_dir)
    return Change(moved_link=moved)


def apply(plan: StorePlan, *, token: Token = _random_token) -> Change:
    """`write_version` then `point_link`; raise StoreError, leaving what is served intact."""
    written = write_version(plan, token=token, sync_dir=False)
    return replace(written, moved_link=point_link(plan, token=token, written=written).moved_link)


@contextlib.contextmanager
def _store_errors(store_dir: str) -> Iterator[None]:
    try:
        yield
    except OSError as err:
        where = str(err.filename2 or err.filename or store_dir)  # symlink(): 1 is the target
        if os.path.dirname(where) == store_dir:  # a temp or version file: name the store
            where = store_dir
        hint = _HINTS.get(err.errno or 0, "The previous version keeps being served.")
        raise StoreError(f"cannot write the store {where}: {err.strerror}.", hint) from None


def _ensure_dir(store_dir: str) -> None:
    """Create the store (0700) if missing; a symlink at the store path itself is refused."""
    st = lstat(store_dir)
    if st is None:
        _make_parents(os.path.dirname(store_dir))
        with contextlib.suppress(FileExistsError):  # made by someone else meanwhile: checked below
            os.mkdir(store_dir, 0o700)
            os.chmod(store_dir, 0o700)
            fsync_dir(os.path.dirname(store_dir))  # the new store's own entry survives a crash
            log.info("created the certificate store %s", store_dir)
        st = os.lstat(store_dir)
    if stat.S_ISLNK(st.st_mode):  # ancestors may be links (/var -> /private/var); this may not
        raise StoreError(f"the store path {store_dir} is a symbolic link; it is not followed.",
                         "Set certificateStoreLocation to the directory the link points at.")
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"the store path {store_dir} exists and is not a directory.",
                         "Move that file away or set another certificateStoreLocation.")


def _make_parents(path: str) -> None:
    """Create missing parents as 0755 whatever the umask, so that ACL'd users can traverse."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o755)
        except FileExistsError:
            continue
        os.chmod(directory, 0o755)  # noqa: S103 - parents stay traversable, as SPEC §5 says


def _install_file(plan: StorePlan, prepare: Prepare | None, token: Token) -> tuple[bool, bool]:
    """Write the version file unless it already holds the content, is ours and is not readable
    by others (a restored or chmod'ed copy of a private key is written again); (wrote, replaced).
    """
    existing = _read_existing(plan.version_path, len(plan.content))
    if existing == plan.content and _private(plan.version_path):
        return False, False
    _write_atomically(plan, prepare, token)
    if existing is None:
        log.debug("wrote %s", plan.version_path)
        return True, False
    what = "owner or mode" if existing == plan.content else "content"
    log.warning("replaced %s: its %s differed from what the extension writes",
                plan.version_path, what)
    return False, True


def _private(path: str) -> bool:
    """Owned by this process's user, and nothing for others (group bits may be an ACL mask)."""
    st = lstat(path)
    return st is not None and st.st_uid == os.geteuid() and not st.st_mode & 0o007


def _read_existing(path: str, expected_size: int) -> bytes | None:
    """The file's content (up to one byte more than expected), None if absent; never follows."""
    st = lstat(path)
    if st is None:
        return None
    if not stat.S_ISREG(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise StoreError(f"{path} is {kind}; not created by this extension, it is not followed.",
                         "Remove it; the extension then writes the certificate there.")
    if st.st_size != expected_size:
        return b""  # differs; reading it is needless
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as existing:
        return existing.read(expected_size + 1)


def _write_atomically(plan: StorePlan, prepare: Prepare | None, token: Token) -> None:
    temp = os.path.join(plan.store_dir, f".{os.path.basename(plan.version_path)}.tmp-{token()}")
    try:
        fd = os.open(temp, _OPEN_NEW, 0o600)
    except FileExistsError:
        raise _planted(temp) from None
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask may have taken bits away; never adds any
            write_all(fd, plan.content)
            os.fsync(fd)
        finally:
            os.close(fd)
        if prepare is not None:
            prepare(temp)
        os.rename(temp, plan.version_path)
    except BaseException:
        remove_quietly(temp)
        raise


def _planted(temp: str) -> StoreError:
    return StoreError(f"{temp} already exists (planted?); it is not followed or overwritten.",
                      "Remove it and check who writes into the store directory.")


def _point_link(plan: StorePlan, token: Token) -> bool:
    """Point the link at the version file; False when it already did."""
    st = lstat(plan.link_path)
    if st is not None and not stat.S_ISLNK(st.st_mode):
        raise StoreError(f"{plan.link_path} exists and is not a symbolic link; left untouched.",
                         "Move it away or choose another customSymbolicLinkName.")
    if st is not None and os.readlink(plan.link_path) == plan.link_target:
        return False
    _swap_link(plan, token)
    log.debug("%s -> %s", plan.link_path, plan.link_target)
    return True


def _swap_link(plan: StorePlan, token: Token) -> None:
    """Create the link under a temp name, then rename it over the old one: never a gap."""
    temp = os.path.join(plan.store_dir, f".{os.path.basename(plan.link_path)}.lnk-{token()}")
    try:
        os.symlink(plan.link_target, temp)
    except FileExistsError:
        raise _planted(temp) from None
    try:
        os.rename(temp, plan.link_path)
    except BaseException:
        remove_quietly(temp)
        raise
