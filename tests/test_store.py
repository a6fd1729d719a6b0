"""store: versioned files behind a relative link, written atomically, never via planted links."""
from __future__ import annotations

import datetime as dt
import logging
import os
import stat
import subprocess
import sys
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


def test_write_version_leaves_the_link_until_point_link(tmp_path: Path) -> None:
    """The version file is written first; the link moves only when point_link is called."""
    store_dir = tmp_path / "store"
    cert = observed(store_dir)
    install(cert, V1, PEM1)
    plan = store.plan(cert, V2, PEM2)
    assert store.write_version(plan) == store.Change(wrote=True)
    assert os.readlink(store_dir / "myvault.web") == f"myvault.web.{V1}"
    assert (store_dir / f"myvault.web.{V2}").read_bytes() == PEM2
    assert store.point_link(plan) == store.Change(moved_link=True)
    assert store.installed(cert) == store.Installed(V2, str(store_dir / f"myvault.web.{V2}"))
    assert store.point_link(plan) == store.Change()


def test_point_link_given_the_write_installs_new_and_replaced_files(tmp_path: Path) -> None:
    """write_version(sync_dir=False), then point_link(written=...): new or replaced, served."""
    store_dir = tmp_path / "store"
    cert = observed(store_dir)
    install(cert, V1, PEM1)
    plan = store.plan(cert, V2, PEM2)
    written = store.write_version(plan, sync_dir=False)
    assert written == store.Change(wrote=True)
    assert store.point_link(plan, written=written) == store.Change(moved_link=True)
    (store_dir / f"myvault.web.{V2}").write_bytes(PEM1)  # same version, other content, served
    rewritten = store.write_version(plan, sync_dir=False)
    assert rewritten == store.Change(replaced=True)
    assert store.point_link(plan, written=rewritten) == store.Change()
    assert (store_dir / "myvault.web").read_bytes() == PEM2


@pytest.mark.parametrize("on_disk", [None, PEM1])
def test_point_link_refuses_a_version_file_without_the_plan(
    tmp_path: Path, on_disk: bytes | None
) -> None:
    """The link never moves to a missing version file or one with other content."""
    store_dir = tmp_path / "store"
    cert = observed(store_dir)
    install(cert, V1, PEM1)
    if on_disk is not None:
        (store_dir / f"myvault.web.{V2}").write_bytes(on_disk)
    with pytest.raises(StoreError, match="does not hold this version"):
        store.point_link(store.plan(cert, V2, PEM2))
    assert os.readlink(store_dir / "myvault.web") == f"myvault.web.{V1}"


def test_prepare_sees_the_whole_file_before_it_takes_its_name(tmp_path: Path) -> None:
    """`prepare` gets the complete temp file while the version path does not exist yet."""
    store_dir, seen = tmp_path / "store", []
    plan = store.plan(observed(store_dir), V1, PEM1)

    def prepare(temp: str) -> None:
        named = os.path.lexists(plan.version_path)
        seen.append((os.path.basename(temp), Path(temp).read_bytes(), named))

    store.write_version(plan, prepare=prepare, token=lambda: "feed")
    assert seen == [(f".myvault.web.{V1}.tmp-feed", PEM1, False)]
    assert store.write_version(plan, prepare=prepare) == store.Change() and len(seen) == 1


def test_failing_prepare_writes_nothing(tmp_path: Path) -> None:
    """An exception from `prepare` propagates as is; no version file, no temp file remains."""
    store_dir = tmp_path / "store"

    def refuse(temp: str) -> None:
        raise LookupError("no such user")

    with pytest.raises(LookupError):
        store.write_version(store.plan(observed(store_dir), V1, PEM1), prepare=refuse)
    assert list(store_dir.iterdir()) == []


_KILLED_WRITER = """
import os, sys
from akvvm_ext import store
from tests.test_store import observed, PEM2, V2
store.write_version(store.plan(observed(sys.argv[1]), V2, PEM2), prepare=lambda temp: os._exit(9))
"""


def test_temp_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path: Path) -> None:
    """A temp file left by a writer killed mid-write (os._exit) is removed by the next write."""
    store_dir = tmp_path / "store"
    install(observed(store_dir), V1, PEM1)
    child = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(store_dir)],
                           capture_output=True, cwd=Path(__file__).parent.parent)
    assert child.returncode == 9, child.stderr
    [left] = [p.name for p in store_dir.iterdir() if p.name.startswith(".")]
    assert left.startswith(f".myvault.web.{V2}.tmp-")
    install(observed(store_dir), V2, PEM2)
    assert sorted(p.name for p in store_dir.iterdir()) == [
        "myvault.web", f"myvault.web.{V1}", f"myvault.web.{V2}"]


def test_stale_temp_cleanup_removes_only_our_own_names_and_kinds(tmp_path: Path) -> None:
    """Our temp files and temp links go (links unlinked, not followed); everything else stays."""
    store_dir, victim, token = tmp_path / "store", tmp_path / "victim", "0123456789abcdef"
    install(observed(store_dir), V1, PEM1)
    victim.write_bytes(b"precious")
    ours = [f".myvault.web.{V2}.tmp-{token}", f".myvault.web.{V1}.tmp-{token}"]
    for name in ours:
        (store_dir / name).write_bytes(b"half a certi")
    (store_dir / f".myvault.web.lnk-{token}").symlink_to(victim)
    ours.append(f".myvault.web.lnk-{token}")
    kept = {f".myvault.web.{V2}.tmp-feed": "file", f".other.web.{V1}.tmp-{token}": "file",
            f".myvault.web.{V2}.tmp-{token}0": "file", f".myvault.web.lnk-{token}x": "link",
            f".myvault.webx.{V2}.tmp-{token}": "file", f".myvault.web.{V1}.tmp-{'f' * 16}": "link",
            f".myvault.web.lnk-{'f' * 16}": "file", f".myvault.web.{V2}.tmp-{'e' * 16}": "dir"}
    for name, kind in kept.items():
        if kind == "dir":
            (store_dir / name).mkdir()
        elif kind == "link":
            (store_dir / name).symlink_to(victim)
        else:
            (store_dir / name).write_bytes(b"not ours")
    install(observed(store_dir), V2, PEM2)
    names = {p.name for p in store_dir.iterdir()}
    assert not names & set(ours)
    assert names == set(kept) | {"myvault.web", f"myvault.web.{V1}", f"myvault.web.{V2}"}
    assert victim.read_bytes() == b"precious"
