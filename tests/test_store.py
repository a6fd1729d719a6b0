"""store: versioned files behind a relative link, written atomically, never via planted links."""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from akvvm_ext import store
from akvvm_ext.chain import PEM, convert
from akvvm_ext.errors import StoreError
from akvvm_ext.model import ObservedCertificate
from tests.standins import certfactory as cf

NOW = dt.datetime.now(dt.timezone.utc)
V1, V2 = "0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210"


def bundle_pem() -> bytes:
    """A real full-chain PEM, as the store receives it."""
    return convert(cf.to_kv_pem(cf.make_chain(3, "ec")), PEM, NOW).pem


PEM1, PEM2 = bundle_pem(), bundle_pem()


def observed(store_dir: Path, link_name: str = "myvault.web") -> ObservedCertificate:
    return ObservedCertificate(
        url="https://myvault.vault.azure.net/secrets/web", vault_url="https://myvault.vault.azure.net",
        vault_name="myvault", secret_name="web", version=None, store_dir=str(store_dir),
        link_name=link_name,
    )


def install(cert: ObservedCertificate, version: str, pem: bytes) -> store.Change:
    return store.apply(store.plan(cert, version, pem))


def listing(directory: Path) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime_ns) of every entry, links not followed."""
    return {p.name: (p.lstat().st_ino, p.lstat().st_mtime_ns) for p in directory.iterdir()}


def test_plan_names_the_version_file_and_a_relative_link(tmp_path: Path) -> None:
    """The plan puts `<vault>.<name>.<version>` and the link in the store, the target relative."""
    plan = store.plan(observed(tmp_path / "s", "web.pem"), V1, PEM1)
    assert plan.version_path == str(tmp_path / "s" / f"myvault.web.{V1}")
    assert plan.link_path == str(tmp_path / "s" / "web.pem")
    assert plan.link_target == f"myvault.web.{V1}"
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("version", ["", ".", "..", "a/b", "x\0y"])
def test_plan_refuses_a_version_that_is_not_a_file_name(tmp_path: Path, version: str) -> None:
    """A version id that would escape the store is refused before any I/O."""
    with pytest.raises(StoreError):
        store.plan(observed(tmp_path), version, PEM1)


def test_first_install_creates_private_store_file_and_relative_link(tmp_path: Path) -> None:
    """A new store is 0700, the version file 0600 and root's, the link relative to it."""
    store_dir = tmp_path / "var" / "lib" / "store"
    cert = observed(store_dir)
    change = install(cert, V1, PEM1)
    assert change == store.Change(wrote=True, moved_link=True) and change.changed
    assert stat.S_IMODE(store_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "var").stat().st_mode) == 0o755
    version_file = store_dir / f"myvault.web.{V1}"
    st = version_file.lstat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    assert os.readlink(store_dir / "myvault.web") == version_file.name
    assert (store_dir / "myvault.web").read_bytes() == PEM1
    assert store.installed(cert) == store.Installed(V1, str(version_file))
    assert sorted(p.name for p in store_dir.iterdir()) == ["myvault.web", version_file.name]


def test_modes_hold_under_a_restrictive_umask(tmp_path: Path) -> None:
    """With umask 077 the parents are still 0755 (traversable), the store 0700, the file 0600."""
    old_umask = os.umask(0o077)
    try:
        install(observed(tmp_path / "a" / "b" / "store"), V1, PEM1)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "a" / "b" / "store").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a/b/store" / f"myvault.web.{V1}").stat().st_mode) == 0o600


def test_unchanged_certificate_writes_nothing(tmp_path: Path) -> None:
    """Applying the same version again touches no file: same inodes, same mtimes."""
    cert = observed(tmp_path / "store")
    install(cert, V1, PEM1)
    before = listing(tmp_path / "store")
    change = install(cert, V1, PEM1)
    assert change == store.Change() and not change.changed
    assert listing(tmp_path / "store") == before


def test_rotation_moves_the_link_and_keeps_the_old_version(tmp_path: Path) -> None:
    """A new version gets its own file; the link moves; the old file stays as it was."""
    store_dir = tmp_path / "store"
    cert = observed(store_dir)
    install(cert, V1, PEM1)
    old = (store_dir / f"myvault.web.{V1}").lstat()
    assert install(cert, V2, PEM2) == store.Change(wrote=True, moved_link=True)
    assert os.readlink(store_dir / "myvault.web") == f"myvault.web.{V2}"
    assert (store_dir / "myvault.web").read_bytes() == PEM2
    assert (store_dir / f"myvault.web.{V1}").read_bytes() == PEM1
    assert (store_dir / f"myvault.web.{V1}").lstat().st_mtime_ns == old.st_mtime_ns
    assert store.installed(cert) == store.Installed(V2, str(store_dir / f"myvault.web.{V2}"))


def test_differing_existing_version_file_is_replaced_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A version file without the chain (older extension) is replaced atomically and logged."""
    store_dir = tmp_path / "store"
    store_dir.mkdir(mode=0o700)
    stale = store_dir / f"myvault.web.{V1}"
    stale.write_bytes(PEM1.split(b"-----END CERTIFICATE-----\n")[0])
    stale.chmod(0o644)
    inode = stale.stat().st_ino
    with caplog.at_level(logging.INFO, logger="akvvm.store"):
        change = install(observed(store_dir), V1, PEM1)
    assert change == store.Change(replaced=True, moved_link=True)
    assert stale.read_bytes() == PEM1 and stale.stat().st_ino != inode
    assert stat.S_IMODE(stale.stat().st_mode) == 0o600
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("replaced" in message for message in warnings)


def test_same_size_differing_file_is_replaced(tmp_path: Path) -> None:
    """Content is compared byte for byte, not by size alone."""
    store_dir = tmp_path / "store"
    install(observed(store_dir), V1, PEM1)
    flipped = PEM1[:-10] + bytes(reversed(PEM1[-10:]))
    assert install(observed(store_dir), V1, flipped).replaced
    assert (store_dir / "myvault.web").read_bytes() == flipped


def test_installed_is_none_without_link_or_when_dangling(tmp_path: Path) -> None:
    """No link, a dangling link and a link to a foreign name all mean nothing installed."""
    store_dir = tmp_path / "store"
    cert = observed(store_dir)
    assert store.installed(cert) is None
    store_dir.mkdir()
    (store_dir / "myvault.web").symlink_to(f"myvault.web.{V1}")
    assert store.installed(cert) is None
    (store_dir / "elsewhere").write_bytes(PEM1)
    (store_dir / "myvault.web").unlink()
    (store_dir / "myvault.web").symlink_to("elsewhere")
    assert store.installed(cert) is None
    (tmp_path / f"myvault.web.{V1}").write_bytes(PEM1)
    (store_dir / "myvault.web").unlink()
    (store_dir / "myvault.web").symlink_to(tmp_path / f"myvault.web.{V1}")
    assert store.installed(cert) is None  # our name, but outside the store


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


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs; fails rather than skips when it cannot be mounted."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if not _run("mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mount_point)):
        pytest.fail("cannot mount a tmpfs here")
    try:
        yield mount_point
    finally:
        _run("umount", str(mount_point))


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
