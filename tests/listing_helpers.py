"""What both listing test modules share: the test vault, its clock and its certificates."""
from __future__ import annotations

from akvvm_ext.model import ObservedCertificate

VAULT = "https://fleet.vault.azure.net"
NOW = 1_800_000_000.0
OLD = int(NOW) - 7200  # a version made two hours ago


def cert(name: str, version: str | None = None) -> ObservedCertificate:
    """An observed certificate of the test vault."""
    url = f"{VAULT}/secrets/{name}" + (f"/{version}" if version else "")
    return ObservedCertificate(url, VAULT, "fleet", name, version, "/tmp/store", f"fleet.{name}")


def everything_installed(_: ObservedCertificate) -> bool:
    """Every certificate has a file behind its link."""
    return True
