"""Shared fixtures: the Azure stand-ins, an Azure-ready environment, and the loopback-only guard.

Fixtures:
    imds        a started ImdsStandin (IMDS mode), function-scoped
    kv          a started KeyVaultStandin that accepts only tokens `imds` issued, function-scoped
    azure_env   os.environ pointed at the stand-ins (AZURE_POD_IDENTITY_AUTHORITY_HOST, CA bundle,
                no proxies, no other managed-identity flows); returns the variables it set
    chain       the certificate factory: chain(depth=3, key_type="rsa", cn=..., ...) -> Chain
Guard: in this process any connect() to an address outside 127.0.0.0/8 / ::1 raises and fails the
test; child processes inherit AZURE_POD_IDENTITY_AUTHORITY_HOST=http://127.0.0.1:9 (refused) so
azure-identity in them never falls back to 169.254.169.254 unless a test points it elsewhere.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.standins.certfactory import Chain, make_chain
from tests.standins.imds import ImdsStandin
from tests.standins.keyvault import KeyVaultStandin

_DEAD_END = "http://127.0.0.1:9"  # discard port: nothing listens, connections are refused
_FLOW_VARS = ("IDENTITY_ENDPOINT", "IMDS_ENDPOINT", "IDENTITY_HEADER", "IDENTITY_SERVER_THUMBPRINT",
              "MSI_ENDPOINT", "MSI_SECRET", "AZURE_CLIENT_ID", "AZURE_TENANT_ID",
              "AZURE_FEDERATED_TOKEN_FILE", "AZURE_AUTHORITY_HOST")
_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
_violations: list[str] = []


def _loopback(address: Any) -> bool:
    if not isinstance(address, tuple):
        return True  # AF_UNIX path or abstract socket
    host = str(address[0]).split("%")[0]
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name to resolve elsewhere: not ours to reach
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _guarded(original: Callable[..., Any]) -> Callable[..., Any]:
    def connect(sock: socket.socket, address: Any) -> Any:
        if not _loopback(address):
            _violations.append(repr(address))
            raise ConnectionRefusedError(f"test tried to reach {address!r}: loopback only")
        return original(sock, address)
    return connect


@pytest.fixture(autouse=True, scope="session")
def _loopback_only() -> Iterator[None]:
    """Refuse non-loopback connects in this process; dead-end IMDS for child processes."""
    patch = pytest.MonkeyPatch()
    patch.setattr(socket.socket, "connect", _guarded(socket.socket.connect))
    patch.setattr(socket.socket, "connect_ex", _guarded(socket.socket.connect_ex))
    patch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", _DEAD_END)
    for name in _FLOW_VARS + _PROXY_VARS:
        patch.delenv(name, raising=False)
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def _no_escape() -> Iterator[None]:
    """Fail the test loudly if it tried to connect outside loopback, even if that was swallowed."""
    _violations.clear()
    yield
    if _violations:
        pytest.fail(f"non-loopback connection attempted: {', '.join(_violations)}")


@pytest.fixture
def imds() -> Iterator[ImdsStandin]:
    with ImdsStandin() as standin:
        yield standin


@pytest.fixture
def kv(imds: ImdsStandin) -> Iterator[KeyVaultStandin]:
    with KeyVaultStandin(accept_token=imds.token_issued) as standin:
        yield standin


@pytest.fixture
def azure_env(monkeypatch: pytest.MonkeyPatch, kv: KeyVaultStandin,
              imds: ImdsStandin) -> dict[str, str]:
    """Point azure-identity at `imds` and trust `kv`'s CA; return the variables set."""
    values = {"AZURE_POD_IDENTITY_AUTHORITY_HOST": imds.url, "REQUESTS_CA_BUNDLE": kv.ca_path,
              "SSL_CERT_FILE": kv.ca_path, "NO_PROXY": "127.0.0.1,localhost",
              "no_proxy": "127.0.0.1,localhost"}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    for name in _FLOW_VARS + _PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    return values


@pytest.fixture
def chain() -> Callable[..., Chain]:
    return make_chain
