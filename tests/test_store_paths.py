"""store on hostile ground: planted links and files, a store that is a file or a link, read-only
and full filesystems, file size limits. What is served never changes; errors say why."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from akvvm_ext import store
from akvvm_ext.errors import StoreError
from tests.test_store import PEM1, PEM2, V1, V2, install, observed


def test_symlink_planted_at_the_version_path_is_not_followed(tmp_path: Path) -> None:
    """A link planted where the version file goes is an error; its target is untouched."""
    store_dir, victim = tmp_path / "store", tmp_path / "victim"
    store_dir.mkdir()
    victim.write_bytes(b"precious")
    (store_dir / f"myvault.web.{V1}").symlink_to(victim)
    with pytest.raises(StoreError, match="symbolic link"):
        install(observed(store_dir), V1, PEM1)
    assert victim.read_bytes() == b"precious"
    assert not (store_dir / "myvault.web").exists()
    assert sorted(p.name for p in store_dir.iterdir()) == [f"myvault.web.{V1}"]


@pytest.mark.parametrize("temp_name", [f".myvault.web.{V1}.tmp-feed", ".myvault.web.lnk-feed"])
def test_symlink_planted_at_a_temp_path_is_not_followed(tmp_path: Path, temp_name: str) -> None:
    """A link planted at the (here predictable) temp name is an error; its target is untouched."""
    store_dir, victim = tmp_path / "store", tmp_path / "victim"
    store_dir.mkdir()
    victim.write_bytes(b"precious")
    (store_dir / temp_name).symlink_to(victim)
    with pytest.raises(StoreError, match="planted"):
        store.apply(store.plan(observed(store_dir), V1, PEM1), token=lambda: "feed")
    assert victim.read_bytes() == b"precious"
    assert os.readlink(store_dir / temp_name) == str(victim)
    assert not (store_dir / "myvault.web").exists()


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_link_path_taken_by_a_user_file_is_an_error_and_kept(tmp_path: Path, kind: str) -> None:
    """A regular file or directory at the link path is never clobbered."""
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    taken = store_dir / "myvault.web"
    taken.write_bytes(b"mine") if kind == "file" else taken.mkdir()
    with pytest.raises(StoreError, match="not a symbolic link") as caught:
        install(observed(store_dir), V1, PEM1)
    assert caught.value.hint
    assert taken.read_bytes() == b"mine" if kind == "file" else taken.is_dir()
    assert not [p for p in store_dir.iterdir() if p.name.startswith(".")]


def test_store_path_that_is_a_file_is_a_store_error(tmp_path: Path) -> None:
    """A file where the store should be gives a StoreError with a hint, and stays as it was."""
    (tmp_path / "store").write_bytes(b"not a dir")
    with pytest.raises(StoreError, match="not a directory") as caught:
        install(observed(tmp_path / "store"), V1, PEM1)
    assert "certificateStoreLocation" in caught.value.hint
    assert (tmp_path / "store").read_bytes() == b"not a dir"


@pytest.mark.parametrize("target", ["real", "missing"])
def test_symlink_at_the_store_path_is_refused(tmp_path: Path, target: str) -> None:
    """A link planted at the store path redirects nothing: StoreError, nothing written anywhere."""
    real = tmp_path / "real"
    if target == "real":
        real.mkdir()
    (tmp_path / "store").symlink_to(real)
    with pytest.raises(StoreError, match="symbolic link") as caught:
        install(observed(tmp_path / "store"), V1, PEM1)
    assert "certificateStoreLocation" in caught.value.hint
    assert not real.exists() or list(real.iterdir()) == []
    assert os.readlink(tmp_path / "store") == str(real)


def test_symlinked_ancestor_of_the_store_is_followed(tmp_path: Path) -> None:
    """Only the store path itself is refused; a link above it (/var -> /private/var) is fine."""
    (tmp_path / "private").mkdir()
    (tmp_path / "var").symlink_to(tmp_path / "private")
    install(observed(tmp_path / "var" / "store"), V1, PEM1)
    assert (tmp_path / "private" / "store" / "myvault.web").read_bytes() == PEM1


def test_store_under_a_file_is_a_store_error(tmp_path: Path) -> None:
    """A store whose parent is a file fails with a StoreError, not an OSError."""
    (tmp_path / "blocker").write_bytes(b"x")
    with pytest.raises(StoreError):
        install(observed(tmp_path / "blocker" / "store"), V1, PEM1)


def _run(*args: str) -> bool:
    return subprocess.run(args, capture_output=True).returncode == 0


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[str]:
    """Make `directory` unwritable even for root; yield the method used."""
    if _run("mount", "--bind", str(directory), str(directory)):
        try:
            if _run("mount", "-o", "remount,bind,ro", str(directory)):
                yield "bind mount"
                return
        finally:
            _run("umount", str(directory))
    if _run("chattr", "+i", str(directory)):
        try:
            yield "chattr +i"
        finally:
            _run("chattr", "-i", str(directory))
        return
    pytest.fail("no way to make a directory read-only for root here (mount, chattr)")


def assert_serves(store_dir: Path, version: str, pem: bytes) -> None:
    """The link serves exactly this version, and no temp file is left around."""
    link = store_dir / "myvault.web"
    assert os.readlink(link) == f"myvault.web.{version}"
    assert link.read_bytes() == pem
    assert not [p.name for p in store_dir.iterdir() if p.name.startswith(".")]


def test_read_only_store_is_a_clear_error_and_keeps_serving(tmp_path: Path) -> None:
    """On a read-only store the error names the problem; the old version is still served."""
    store_dir = tmp_path / "store"
    cert = observed(store_dir)
    install(cert, V1, PEM1)
    with read_only(store_dir) as method:
        with pytest.raises(StoreError) as caught:
            install(cert, V2, PEM2)
        assert_serves(store_dir, V1, PEM1)
    text = str(caught.value)
    assert ("Read-only" in text and "read-write" in text) or method == "chattr +i", text
    assert "chattr" in text or method == "bind mount", text
    assert install(cert, V2, PEM2).changed  # recovers by itself once writable
    assert_serves(store_dir, V2, PEM2)


@contextlib.contextmanager
def small_tmpfs(mount_point: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs at `mount_point` (created); fails rather than skips when it cannot mount."""
    mount_point.mkdir()
    if not _run("mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mount_point)):
        pytest.fail("cannot mount a tmpfs here")
    try:
        yield mount_point
    finally:
        _run("umount", str(mount_point))


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "small") as mount_point:
        yield mount_point


def fill(directory: Path) -> Path:
    """Fill the filesystem of `directory` to the last byte."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as out:
        with contextlib.suppress(OSError):
            while True:
                out.write(b"\0" * 1024)
    return filler


def test_full_disk_is_a_clear_error_leaves_nothing_and_recovers(small_fs: Path) -> None:
    """ENOSPC: StoreError naming the cause, no half-written file, old version still served."""
    store_dir = small_fs / "store"
    cert = observed(store_dir)
    install(cert, V1, PEM1)
    filler = fill(small_fs)
    with pytest.raises(StoreError) as caught:
        install(cert, V2, PEM2)
    assert "No space left" in str(caught.value) and "Free space" in caught.value.hint
    assert_serves(store_dir, V1, PEM1)
    assert not (store_dir / f"myvault.web.{V2}").exists()
    filler.unlink()
    assert install(cert, V2, PEM2).changed
    assert_serves(store_dir, V2, PEM2)


_FSIZE_CHILD = """
import resource, sys
from akvvm_ext import store
from akvvm_ext.errors import StoreError
from tests.test_store import observed, PEM2, V2
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
try:
    store.apply(store.plan(observed(sys.argv[1]), V2, PEM2))
except StoreError as err:
    print(err)
"""


def test_file_size_limit_is_a_clear_error(tmp_path: Path) -> None:
    """EFBIG under `ulimit -f`: a StoreError with a hint, the previous version untouched."""
    store_dir = tmp_path / "store"
    install(observed(store_dir), V1, PEM1)
    child = subprocess.run([sys.executable, "-c", _FSIZE_CHILD, str(store_dir)],
                           capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert child.returncode == 0, child.stderr
    assert "too large" in child.stdout and "ulimit -f" in child.stdout
    assert_serves(store_dir, V1, PEM1)
