"""The service's one-instance lock and its pidfile, both in the state dir
(`akvvm_service.lock`, `akvvm_service.pid`; DESIGN: files on the VM).
"""
from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

from handler.environment import write_atomic

LOCK_NAME = "akvvm_service.lock"
PID_NAME = "akvvm_service.pid"


@contextmanager
def single_instance(state_dir: str) -> Iterator[bool]:
    """Hold `<state_dir>/akvvm_service.lock`; yields False when another instance holds it."""
    fd = os.open(os.path.join(state_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


@contextmanager
def pidfile(state_dir: str) -> Iterator[str]:
    """Write this process's pid to `<state_dir>/akvvm_service.pid` (atomically) and remove it
    on the way out, unless another process has taken it over meanwhile."""
    path = os.path.join(state_dir, PID_NAME)
    write_atomic(path, f"{os.getpid()}\n".encode(), 0o644)
    try:
        yield path
    finally:
        _remove_if_ours(path)


def _remove_if_ours(path: str) -> None:
    try:
        with open(path, encoding="ascii") as handle:
            if handle.read().strip() == str(os.getpid()):
                os.unlink(path)
    except OSError:
        pass
