"""Change detection by listing, the pure decisions: what to fetch and when listing pays. No I/O."""
from __future__ import annotations

from akvvm_ext import listing
from akvvm_ext.listing import Listing, NotListed, Seen, Stamp, VaultMemory, plan, strategy
from tests.listing_helpers import NOW, OLD, cert, everything_installed


def memory_with(*names: str, at: float = NOW - 3600, stamp: Stamp | None = None) -> VaultMemory:
    """A vault memory whose baselines for `names` were taken at `at`."""
    base = stamp or Stamp(OLD, OLD)
    return VaultMemory(seen={name: Seen(base, at) for name in names})


def test_pages_needed_counts_25_secrets_per_page() -> None:
    """A vault of 500 secrets lists in 20 pages at best, an empty one in 1."""
    assert [listing.pages_needed(n) for n in (0, 25, 26, 500)] == [1, 1, 2, 20]


def test_strategy_lists_only_when_cheaper_than_one_get_per_certificate() -> None:
    """Listing is used only if its pages cost fewer requests than the GETs it replaces."""
    assert strategy(VaultMemory(), candidates=1, now=NOW) == 0
    assert strategy(VaultMemory(), candidates=10, now=NOW) == 9
    assert strategy(VaultMemory(pages=4), candidates=10, now=NOW) == 9
    assert strategy(VaultMemory(pages=10), candidates=10, now=NOW) == 0
    assert strategy(VaultMemory(list_after=NOW + 1), candidates=10, now=NOW) == 0


def test_unchanged_listing_means_no_fetch() -> None:
    """A secret whose listing stamp equals the baseline is not fetched again."""
    certs = [cert("a"), cert("b")]
    seen = Listing({"a": Stamp(OLD, OLD), "b": Stamp(OLD, OLD)}, pages=1)
    assert plan(certs, memory_with("a", "b"), seen, everything_installed, NOW) == ()


def test_new_version_or_changed_attributes_are_fetched() -> None:
    """A newer `updated`, another content type or a disabled version each trigger a fetch."""
    certs = [cert("new"), cert("type"), cert("off"), cert("same")]
    stamps = {
        "new": Stamp(OLD + 60, OLD + 60),
        "type": Stamp(OLD, OLD, content_type="application/x-pem-file"),
        "off": Stamp(OLD, OLD, enabled=False),
        "same": Stamp(OLD, OLD),
    }
    memory = memory_with("new", "type", "off", "same")
    fetched = plan(certs, memory, Listing(stamps, 1), everything_installed, NOW)
    assert [c.secret_name for c in fetched] == ["new", "type", "off"]


def test_missing_baseline_missing_item_or_missing_file_is_fetched() -> None:
    """No baseline, a secret absent from the listing, or nothing installed: fetch."""
    certs = [cert("unknown"), cert("gone"), cert("nofile")]
    stamps = {"unknown": Stamp(OLD, OLD), "nofile": Stamp(OLD, OLD)}
    memory = memory_with("gone", "nofile")
    fetched = plan(certs, memory, Listing(stamps, 1), lambda c: c.secret_name != "nofile", NOW)
    assert [c.secret_name for c in fetched] == ["unknown", "gone", "nofile"]


def test_pinned_versions_are_fetched_only_until_installed() -> None:
    """A pinned version never changes: once installed it costs no request at all."""
    pinned = cert("pinned", "0123abcd")
    unlisted = NotListed("forbidden")
    assert plan([pinned], VaultMemory(), unlisted, everything_installed, NOW) == ()
    assert plan([pinned], VaultMemory(), unlisted, lambda _: False, NOW) == (pinned,)


def test_without_a_listing_every_latest_certificate_is_fetched() -> None:
    """Listing forbidden, failed or not worth it: one GET per latest-version certificate."""
    certs = [cert("a"), cert("b")]
    for reason in ("forbidden", "failed", "costly", "skipped"):
        got = plan(certs, memory_with("a", "b"), NotListed(reason), everything_installed, NOW)
        assert got == tuple(certs)


def test_same_second_versions_are_not_trusted() -> None:
    """A baseline taken within the settle window of its own timestamp is re-fetched.

    Key Vault's timestamps have one-second resolution: a second version made in the same second
    as the one we fetched would list with an identical stamp.
    """
    fresh = Stamp(int(NOW) - 10, int(NOW) - 10)
    memory = memory_with("a", at=NOW - 5, stamp=fresh)
    got = plan([cert("a")], memory, Listing({"a": fresh}, 1), everything_installed, NOW)
    assert got == (cert("a"),)


def test_every_certificate_is_fetched_at_least_daily() -> None:
    """However quiet the listing, a baseline older than a day is refreshed by a GET."""
    memory = memory_with("a", at=NOW - listing.REFRESH_S)
    got = plan([cert("a")], memory, Listing({"a": Stamp(OLD, OLD)}, 1), everything_installed, NOW)
    assert got == (cert("a"),)


def test_forbidden_or_costly_listing_pauses_listing_for_a_day() -> None:
    """After a 403 or a listing that cost too much, the vault is not listed again for a day."""
    for reason, pause in (("forbidden", listing.REFRESH_S), ("costly", listing.REFRESH_S),
                          ("failed", listing.FAILED_PAUSE_S)):
        after = listing.after_listing(VaultMemory(), NotListed(reason, 1), NOW)
        assert after.list_after == NOW + pause
        assert strategy(after, candidates=100, now=NOW + pause - 1) == 0
