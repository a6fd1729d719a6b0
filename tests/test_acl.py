"""acl: listed users and groups can read `<store>/<link>`; ancestor grants are reverted."""
from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from akvvm_ext import acl, store
from akvvm_ext.errors import AclError
from akvvm_ext.model import AclGrant, ObservedCertificate

PEM = b"-----BEGIN CERTIFICATE-----\nstand-in for a full chain\n-----END CERTIFICATE-----\n"
NOBODY = pwd.getpwnam("nobody").pw_uid
NOGROUP = grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name


@dataclass(frozen=True)
class Installed:
    base: Path  # a private (0700) ancestor, as /var/lib/waagent might be
    store_dir: Path
    version_file: Path
    link: Path


@pytest.fixture(params=["pylibacl", "setfacl"])
def installed(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Installed]:
    """A certificate installed under a 0700 ancestor, with either ACL backend."""
    monkeypatch.setattr(acl, "use_tools", request.param == "setfacl")
    base = Path(tempfile.mkdtemp(prefix="akvvm-acl-"))  # 0700, in world-traversable /tmp
    store_dir = base / "srv" / "store"
    cert = ObservedCertificate(
        url="https://v.vault.azure.net/secrets/web", vault_url="https://v.vault.azure.net",
        vault_name="v", secret_name="web", version=None, store_dir=str(store_dir),
        link_name="web.pem",
    )
    plan = store.plan(cert, "1234", PEM)
    store.apply(plan)
    try:
        yield Installed(base, store_dir, Path(plan.version_path), Path(plan.link_path))
    finally:
        shutil.rmtree(base)


def read_as(user: str, path: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["runuser", "-u", user, "--", "cat", str(path)], capture_output=True)


def getfacl(path: Path) -> list[str]:
    """The access ACL entries of `path`, as getfacl prints them with numeric ids."""
    out = subprocess.run(["getfacl", "-c", "-n", "-p", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return [line for line in out.splitlines() if line and not line.startswith("default:")]


def test_granted_user_reads_the_link_and_others_do_not(installed: Installed) -> None:
    """Before the grant nobody cannot read the link; after it nobody can; daemon still cannot."""
    assert read_as("nobody", installed.link).returncode != 0
    records = acl.grant([str(installed.version_file)], str(installed.store_dir),
                        [AclGrant(user="nobody")])
    done = read_as("nobody", installed.link)
    assert done.returncode == 0, done.stderr
    assert done.stdout == PEM
    assert read_as("daemon", installed.link).returncode != 0
    assert records == [acl.TraversalGrant(str(installed.base), "user", NOBODY)]


def test_entries_have_a_correct_mask_and_no_redundant_entries(installed: Installed) -> None:
    """File: user:nobody:r-- with mask r--; store and 0700 ancestor: --x; open dirs untouched."""
    acl.grant([str(installed.version_file)], str(installed.store_dir), [AclGrant(user="nobody")])
    assert getfacl(installed.version_file) == [
        "user::rw-", f"user:{NOBODY}:r--", "group::---", "mask::r--", "other::---"]
    for directory in (installed.store_dir, installed.base):
        assert f"user:{NOBODY}:--x" in getfacl(directory)
        assert "mask::--x" in getfacl(directory)
    assert getfacl(installed.store_dir.parent) == ["user::rwx", "group::r-x", "other::r-x"]
    assert getfacl(Path("/tmp")) == ["user::rwx", "group::rwx", "other::rwx"]


def test_granting_twice_adds_nothing(installed: Installed) -> None:
    """A second grant returns no records and leaves every ACL as it was."""
    args = ([str(installed.version_file)], str(installed.store_dir), [AclGrant(user="nobody")])
    acl.grant(*args)
    before = [getfacl(p) for p in (installed.version_file, installed.store_dir, installed.base)]
    assert acl.grant(*args) == []
    after = [getfacl(p) for p in (installed.version_file, installed.store_dir, installed.base)]
    assert after == before


def test_revert_takes_back_the_ancestor_grant(installed: Installed) -> None:
    """After revert the 0700 ancestor is back to a plain 0700 and nobody cannot read the link."""
    records = acl.grant([str(installed.version_file)], str(installed.store_dir),
                        [AclGrant(user="nobody")])
    acl.revert(records)
    assert getfacl(installed.base) == ["user::rwx", "group::---", "other::---"]
    assert (installed.base.stat().st_mode & 0o777) == 0o700
    assert read_as("nobody", installed.link).returncode != 0
    acl.revert(records)  # twice, or on a path that is gone: nothing happens
    acl.revert([acl.TraversalGrant(str(installed.base / "gone"), "user", NOBODY)])


def test_a_grant_and_its_revert_do_not_widen_an_admin_s_mask(installed: Installed) -> None:
    """An ancestor where the admin's mask withholds rwx from user 54321: our traversal grant
    adds execute to the mask and nothing more, and the revert gives back nothing else."""
    subprocess.run(["setfacl", "-m", "u:54321:rwx", str(installed.base)], check=True)
    installed.base.chmod(0o700)  # with an ACL, chmod sets the mask: u:54321 has nothing left
    records = acl.grant([str(installed.version_file)], str(installed.store_dir),
                        [AclGrant(user="nobody")])
    assert "mask::--x" in getfacl(installed.base)
    acl.revert(records)
    assert "mask::--x" in getfacl(installed.base) and f"user:{NOBODY}" not in str(
        getfacl(installed.base))


def test_revert_keeps_an_entry_the_user_had_before(installed: Installed) -> None:
    """An ancestor entry that existed with read only loses just the added execute bit."""
    subprocess.run(["setfacl", "-m", f"u:{NOBODY}:r", str(installed.base)], check=True)
    records = acl.grant([str(installed.version_file)], str(installed.store_dir),
                        [AclGrant(user="nobody")])
    assert f"user:{NOBODY}:r-x" in getfacl(installed.base)
    acl.revert(records)
    assert f"user:{NOBODY}:r--" in getfacl(installed.base)


def test_group_grant_lets_its_members_read(installed: Installed) -> None:
    """A group grant gives read to members: nobody reads through its primary group."""
    records = acl.grant([str(installed.version_file)], str(installed.store_dir),
                        [AclGrant(group=NOGROUP)])
    gid = grp.getgrnam(NOGROUP).gr_gid
    assert f"group:{gid}:r--" in getfacl(installed.version_file)
    assert read_as("nobody", installed.link).returncode == 0
    assert records == [acl.TraversalGrant(str(installed.base), "group", gid)]


def test_traversable_ancestors_get_no_entry(installed: Installed) -> None:
    """When others may already traverse every ancestor, only the store and file get entries."""
    installed.base.chmod(0o711)
    records = acl.grant([str(installed.version_file)], str(installed.store_dir),
                        [AclGrant(user="nobody")])
    assert records == []
    assert getfacl(installed.base) == ["user::rwx", "group::--x", "other::--x"]
    assert read_as("nobody", installed.link).returncode == 0


def test_numeric_ids_are_taken_as_they_are(installed: Installed) -> None:
    """A uid or gid without a passwd/group entry is granted as written."""
    acl.grant([str(installed.version_file)], str(installed.store_dir),
              [AclGrant(user="54321", group="54322")])
    entries = getfacl(installed.version_file)
    assert "user:54321:r--" in entries and "group:54322:r--" in entries


@pytest.mark.parametrize("grant", [AclGrant(user="no-such-user-akvvm"),
                                   AclGrant(user="nobody", group="no-such-group-akvvm"),
                                   AclGrant(user="\u00b2"),  # superscript two: not a uid
                                   AclGrant(group="\u0661\u0660\u0660\u0660")])  # not gid 1000
def test_unknown_name_is_an_acl_error_and_changes_nothing(
    installed: Installed, grant: AclGrant
) -> None:
    """An unknown user or group name fails with AclError before any ACL is touched."""
    with pytest.raises(AclError, match="unknown") as caught:
        acl.grant([str(installed.version_file)], str(installed.store_dir), [grant])
    assert "numeric" in caught.value.hint
    assert getfacl(installed.version_file) == ["user::rw-", "group::---", "other::---"]
    assert getfacl(installed.base) == ["user::rwx", "group::---", "other::---"]


def test_owner_and_root_need_no_entries(installed: Installed) -> None:
    """Granting the owner (root, by name or uid) adds nothing anywhere."""
    assert acl.grant([str(installed.version_file)], str(installed.store_dir),
                     [AclGrant(user="root"), AclGrant(user="0")]) == []
    assert getfacl(installed.version_file) == ["user::rw-", "group::---", "other::---"]
    assert os.geteuid() == 0


def test_missing_path_is_an_acl_error(installed: Installed) -> None:
    """A version file that vanished gives an AclError, not a crash."""
    with pytest.raises(AclError):
        acl.grant([str(installed.store_dir / "gone")], str(installed.store_dir),
                  [AclGrant(user="nobody")])


def test_ancestor_grants_are_recorded_even_when_a_later_step_fails(
    installed: Installed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first principal's ancestor grant is told to `record` before the second one fails."""
    real_write = acl._write

    def failing_for_daemon(path: str, entries: acl.Entries, mask_plus: int | None = None) -> None:
        if ("u", pwd.getpwnam("daemon").pw_uid) in entries:
            raise AclError("simulated failure", "")
        real_write(path, entries, mask_plus)

    monkeypatch.setattr(acl, "_write", failing_for_daemon)
    heard: list[acl.TraversalGrant] = []
    with pytest.raises(AclError):
        acl.grant([str(installed.version_file)], str(installed.store_dir),
                  [AclGrant(user="nobody"), AclGrant(user="daemon")], record=heard.extend)
    assert heard == [acl.TraversalGrant(str(installed.base), "user", NOBODY)]


def test_missing_setfacl_says_what_to_install(
    installed: Installed, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without pylibacl and without the acl tools the error names the tool and the package."""
    monkeypatch.setattr(acl, "use_tools", True)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(AclError) as caught:
        acl.grant([str(installed.version_file)], str(installed.store_dir),
                  [AclGrant(user="nobody")])
    assert "setfacl" in str(caught.value) or "getfacl" in str(caught.value)
    assert "apt-get install acl" in str(caught.value)


def test_set_exact_with_no_grants_takes_every_named_entry_away(installed: Installed) -> None:
    """Granted user and group lose read; the file is back to a plain 0600 without a mask."""
    acl.grant([str(installed.version_file)], str(installed.store_dir),
              [AclGrant(user="nobody", group=NOGROUP)])
    assert read_as("nobody", installed.link).returncode == 0
    assert acl.set_exact(str(installed.version_file), []) is True
    assert getfacl(installed.version_file) == ["user::rw-", "group::---", "other::---"]
    assert read_as("nobody", installed.link).returncode != 0
    assert acl.set_exact(str(installed.version_file), []) is False  # nothing left to take


def test_set_exact_keeps_the_configured_and_removes_the_rest(installed: Installed) -> None:
    """Only the group stays configured: the user entry goes, the group still reads."""
    acl.grant([str(installed.version_file)], str(installed.store_dir),
              [AclGrant(user="nobody"), AclGrant(user="daemon")])
    acl.grant([str(installed.version_file)], str(installed.store_dir), [AclGrant(group=NOGROUP)])
    assert acl.set_exact(str(installed.version_file), [AclGrant(group=NOGROUP)]) is True
    gid = grp.getgrnam(NOGROUP).gr_gid
    assert getfacl(installed.version_file) == [
        "user::rw-", "group::---", f"group:{gid}:r--", "mask::r--", "other::---"]
    assert read_as("nobody", installed.link).returncode == 0  # through its group
    assert read_as("daemon", installed.link).returncode != 0


def test_set_exact_adds_a_configured_entry_that_is_missing(installed: Installed) -> None:
    """A configured user without an entry gets read on the file."""
    assert acl.set_exact(str(installed.version_file), [AclGrant(user="nobody")]) is False
    assert f"user:{NOBODY}:r--" in getfacl(installed.version_file)
