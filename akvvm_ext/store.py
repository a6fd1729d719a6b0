"""The certificate store on disk: versioned PEM files behind one stable, relative symlink.

`plan` is pure; `apply` makes the disk match a plan atomically (temp file + fsync + rename, temp
link + rename, directory fsync), never follows a planted symlink and never deletes anything.
"""
from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from akvvm_ext.errors import StoreError
from akvvm_ext.model import ObservedCertificate

log = logging.getLogger("akvvm.store")

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


@dataclass(frozen=True)
class Change:
    """What `apply` did."""

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
    if os.path.dirname(path) != os.path.normpath(cert.store_dir) or not name.startswith(prefix):
        return None
    if len(name) == len(prefix) or not os.path.isfile(path):
        return None
    return Installed(version=name[len(prefix) :], path=path)


def plan(cert: ObservedCertificate, version: str, pem: bytes) -> StorePlan:
    """The files and link that serve `pem` as `version` of `cert`. No I/O."""
    if not version or "/" in version or "\0" in version or version in (".", ".."):
        raise StoreError(f"the version id {version!r} cannot be a file name.", "Report this.")
    file_name = f"{cert.file_prefix}.{version}"
    return StorePlan(
        store_dir=cert.store_dir,
        version=version,
        version_path=os.path.join(cert.store_dir, file_name),
        link_path=os.path.join(cert.store_dir, cert.link_name),
        link_target=file_name,
        content=pem,
    )


def apply(plan: StorePlan, *, token: Callable[[], str] = lambda: secrets.token_hex(8)) -> Change:
    """Make the disk match `plan`; raise StoreError and leave what is served intact on failure.

    `token` names temp files (unpredictable by default; tests pass their own).
    """
    with _store_errors(plan.store_dir):
        _ensure_dir(plan.store_dir)
        wrote, replaced = _install_file(plan, token)
        if wrote or replaced:
            _fsync_dir(plan.store_dir)
        moved = _point_link(plan, token)
        if moved:
            _fsync_dir(plan.store_dir)
    return Change(wrote=wrote, replaced=replaced, moved_link=moved)


@contextmanager
def _store_errors(store_dir: str) -> Iterator[None]:
    try:
        yield
    except OSError as err:
        where = str(err.filename or store_dir)
        if os.path.dirname(where) == store_dir:  # a temp or version file: name the store
            where = store_dir
        hint = _HINTS.get(err.errno or 0, "The previous version keeps being served.")
        raise StoreError(f"cannot write the store {where}: {err.strerror}.", hint) from None


def _ensure_dir(store_dir: str) -> None:
    try:
        st = os.stat(store_dir)
    except FileNotFoundError:
        _make_parents(os.path.dirname(store_dir))
        try:
            os.mkdir(store_dir, 0o700)
        except FileExistsError:  # created by someone else meanwhile: check it below
            return _ensure_dir(store_dir)
        os.chmod(store_dir, 0o700)
        log.info("created the certificate store %s", store_dir)
        return None
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(
            f"the store path {store_dir} exists and is not a directory.",
            "Move that file away or set another certificateStoreLocation.",
        )
    return None


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


def _install_file(plan: StorePlan, token: Callable[[], str]) -> tuple[bool, bool]:
    """Write the version file unless it already holds the content; (wrote, replaced)."""
    existing = _read_existing(plan.version_path, len(plan.content))
    if existing == plan.content:
        return False, False
    _write_atomically(plan, token)
    if existing is None:
        log.info("wrote %s", plan.version_path)
        return True, False
    log.warning("replaced %s: its content differed from the vault's version", plan.version_path)
    return False, True


def _read_existing(path: str, expected_size: int) -> bytes | None:
    """The file's content (up to one byte more than expected), None if absent; never follows."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise StoreError(
            f"{path} is {kind}; it was not created by this extension and is not followed.",
            "Remove it; the extension then writes the certificate there.",
        )
    if st.st_size != expected_size:
        return b""  # differs; reading it is needless
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as existing:
        return existing.read(expected_size + 1)


def _write_atomically(plan: StorePlan, token: Callable[[], str]) -> None:
    temp = os.path.join(plan.store_dir, f".{os.path.basename(plan.version_path)}.tmp-{token()}")
    fd = _create_temp(temp)
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask may have taken bits away; never adds any
            view = memoryview(plan.content)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, plan.version_path)
    except BaseException:
        _remove_quietly(temp)
        raise


def _create_temp(temp: str) -> int:
    try:
        return os.open(temp, _OPEN_NEW, 0o600)
    except FileExistsError:
        raise StoreError(
            f"{temp} already exists (planted?); it is not followed or overwritten.",
            "Remove it and check who writes into the store directory.",
        ) from None


def _point_link(plan: StorePlan, token: Callable[[], str]) -> bool:
    """Point the link at the version file; False when it already did."""
    try:
        st = os.lstat(plan.link_path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISLNK(st.st_mode):
        raise StoreError(
            f"{plan.link_path} exists and is not a symbolic link; it is left untouched.",
            "Move it away or choose another customSymbolicLinkName.",
        )
    if st is not None and os.readlink(plan.link_path) == plan.link_target:
        return False
    _swap_link(plan, token)
    log.info("%s -> %s", plan.link_path, plan.link_target)
    return True


def _swap_link(plan: StorePlan, token: Callable[[], str]) -> None:
    """Create the link under a temp name, then rename it over the old one: never a gap."""
    temp = os.path.join(plan.store_dir, f".{os.path.basename(plan.link_path)}.lnk-{token()}")
    try:
        os.symlink(plan.link_target, temp)
    except FileExistsError:
        raise StoreError(
            f"{temp} already exists (planted?); it is not followed or overwritten.",
            "Remove it and check who writes into the store directory.",
        ) from None
    try:
        os.rename(temp, plan.link_path)
    except BaseException:
        _remove_quietly(temp)
        raise


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    """Remove our own temp file; a failure here must not hide the original error."""
    try:
        os.unlink(path)
    except OSError as err:
        log.warning("could not remove the temp file %s: %s", path, err.strerror)
