"""Small file-system steps of the store and the handler's state files: lstat without raising, a
write that completes or raises, directory fsync, quiet unlink, one listing of a store shared by a
pass, and the sweep of temp files a killed writer of ours left behind. Never follows a symlink.
Standard library only (the handler's dependency guard uses it)."""
from __future__ import annotations

import bisect
import errno
import logging
import os
import re
import stat
import threading

log = logging.getLogger("akvvm.store")

# After `.<prefix>.`: `<version>.tmp-<16 hex>`; after `.<link>`: `.lnk-<16 hex>`. Compiled once:
# a pattern per certificate would be compiled again for each one (the re cache holds 512).
_TEMP_FILE_TAIL = re.compile(r".+\.tmp-[0-9a-f]{16}")
_TEMP_LINK_TAIL = re.compile(r"\.lnk-[0-9a-f]{16}")


def lstat(path: str) -> os.stat_result | None:
    """The path's own status, None when it does not exist."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def write_all(fd: int, data: bytes) -> None:
    """write(2) until every byte is written (a filling disk writes short); one that writes
    nothing raises ENOSPC instead of looping."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (wrote nothing)")
        view = view[written:]


def fsync_dir(path: str) -> None:
    """Make the renames done in the directory durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_quietly(path: str) -> None:
    """Remove our own temp file; a failure here must not hide the original error."""
    try:
        os.unlink(path)
    except OSError as err:
        log.warning("could not remove the temp file %s: %s", path, err.strerror)


class Scan:
    """One listing of a directory, sorted, taken before a pass writes into it. A pass installing
    N certificates asks it for each one's names instead of listing the store N times (which is
    quadratic in N). It does not see what was written after it was taken."""

    def __init__(self, directory: str) -> None:
        try:
            self._names = sorted(os.listdir(directory))
        except OSError:
            self._names = []

    def starting_with(self, start: str) -> list[str]:
        """The names that start with `start`: one contiguous run of the sorted listing."""
        first = bisect.bisect_left(self._names, start)
        last = first
        while last < len(self._names) and self._names[last].startswith(start):
            last += 1
        return self._names[first:last]


class Scans:
    """One `Scan` per directory, each taken when first asked for (thread-safe): a sync pass asks
    before its first write into a store, so each store is listed at most once per pass."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scans: dict[str, Scan] = {}

    def get(self, directory: str) -> Scan:
        with self._lock:
            if directory not in self._scans:
                self._scans[directory] = Scan(directory)
            return self._scans[directory]


def remove_stale_temps(
    store_dir: str, file_prefix: str, link_name: str, scan: Scan | None = None
) -> None:
    """Remove what a killed writer left: `.<prefix>.<version>.tmp-<16 hex>` regular files and
    `.<link>.lnk-<16 hex>` symlinks, unlinked, never followed. None is in flight: settings give
    each certificate of a store its own prefix and link, and one service writes at a time.
    `scan`: the store's listing taken at the start of this pass (else the store is listed)."""
    file_start, link_start = f".{file_prefix}.", f".{link_name}"
    scan = scan or Scan(store_dir)
    for name in scan.starting_with(file_start) + scan.starting_with(link_start):
        if _TEMP_FILE_TAIL.fullmatch(name, len(file_start)) and name.startswith(file_start):
            wanted = stat.S_ISREG
        elif _TEMP_LINK_TAIL.fullmatch(name, len(link_start)) and name.startswith(link_start):
            wanted = stat.S_ISLNK
        else:
            continue
        path = os.path.join(store_dir, name)
        found = lstat(path)
        if found is not None and wanted(found.st_mode):
            log.info("removing %s, left behind by an interrupted write", path)
            remove_quietly(path)
