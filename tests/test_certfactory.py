"""The certificate factory: chains that verify, and Key Vault's PFX/PEM forms read back for real."""

from __future__ import annotations

import base64
import datetime as dt
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, pkcs12

from tests.standins.certfactory import (
    PEM,
    PKCS12,
    Chain,
    secret_value,
    to_kv_pem,
    to_pfx,
    unrelated_cert,
)


def _openssl_info(pfx: bytes, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "c.pfx"
    path.write_bytes(pfx)
    return subprocess.run(["openssl", "pkcs12", "-info", "-nokeys", "-in", str(path),
                           "-passin", "pass:", *extra], capture_output=True, text=True)


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_chain_links_leaf_to_self_signed_root(chain: Callable[..., Chain], depth: int) -> None:
    """Each certificate is issued by the next; the root signs itself; SKI/AKI line up."""
    made = chain(depth=depth)
    assert len(made.certs) == depth and made.leaf is made.certs[0] and made.root is made.certs[-1]
    for child, parent in zip(made.certs, made.certs[1:] + made.certs[-1:]):
        child.verify_directly_issued_by(parent)
        aki = child.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = parent.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert aki.key_identifier == ski.digest


def test_leaf_and_ca_extensions(chain: Callable[..., Chain]) -> None:
    """CA certificates say CA; the leaf does not and names its host in the SAN."""
    made = chain(cn="svc.example.test")
    constraints = [c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
                   for c in made.certs]
    assert constraints == [False, True, True]
    san = made.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["svc.example.test"]


def test_ec_chain_and_validity_window(chain: Callable[..., Chain]) -> None:
    """EC keys work, and the leaf carries the requested (here: expired) validity window."""
    start = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    end = dt.datetime(2021, 1, 1, tzinfo=dt.timezone.utc)
    made = chain(key_type="ec", not_before=start, not_after=end)
    assert isinstance(made.key, ec.EllipticCurvePrivateKey)
    assert (made.leaf.not_valid_before_utc, made.leaf.not_valid_after_utc) == (start, end)
    made.leaf.verify_directly_issued_by(made.certs[1])


def test_legacy_pfx_reads_back_with_cryptography(chain: Callable[..., Chain]) -> None:
    """Key Vault's empty-password PFX gives back the key and every certificate."""
    made = chain(depth=4)
    loaded = pkcs12.load_pkcs12(to_pfx(made), b"")
    assert loaded.key is not None and loaded.key.public_key() == made.key.public_key()
    assert loaded.cert is not None and loaded.cert.certificate == made.leaf
    assert {c.certificate for c in loaded.additional_certs} == set(made.certs[1:])


def test_legacy_pfx_is_rc2_40_and_needs_openssl_legacy(chain: Callable[..., Chain],
                                                      tmp_path: Path) -> None:
    """openssl -legacy reads RC2-40 + 3DES; openssl 3 without -legacy refuses it."""
    pfx = to_pfx(chain())
    legacy = _openssl_info(pfx, tmp_path, "-legacy")
    assert legacy.returncode == 0
    report = legacy.stderr + legacy.stdout
    assert "pbeWithSHA1And40BitRC2-CBC" in report and "MAC: sha1" in report
    assert "Shrouded Keybag: pbeWithSHA1And3-KeyTripleDES-CBC" in report
    assert _openssl_info(pfx, tmp_path).returncode != 0


def test_modern_pfx_needs_no_legacy_provider(chain: Callable[..., Chain], tmp_path: Path) -> None:
    """legacy=False is an AES-256 PFX that plain openssl 3 reads."""
    info = _openssl_info(to_pfx(chain(), legacy=False), tmp_path)
    assert info.returncode == 0 and "AES-256-CBC" in info.stderr + info.stdout


def test_pfx_password_order_and_root(chain: Callable[..., Chain]) -> None:
    """A password protects the PFX; include_root=False leaves the root out; order is honoured."""
    made = chain(depth=4)
    loaded = pkcs12.load_pkcs12(to_pfx(made, password=b"pw", include_root=False), b"pw")
    assert made.root not in {c.certificate for c in loaded.additional_certs}
    with pytest.raises(ValueError):
        pkcs12.load_pkcs12(to_pfx(made, password=b"pw"), b"")
    scrambled = pkcs12.load_pkcs12(to_pfx(made, order=(2, 0, 3, 1)), b"")
    assert [c.certificate for c in scrambled.additional_certs] == [
        made.certs[2], made.certs[3], made.certs[1]]


def test_kv_pem_is_key_then_root_first(chain: Callable[..., Chain]) -> None:
    """Key Vault's PEM: the PKCS#8 key first, then certificates root to leaf, LF endings."""
    made = chain()
    text = to_kv_pem(made)
    assert text.startswith("-----BEGIN PRIVATE KEY-----\n") and "\r" not in text
    key = load_pem_private_key(text.encode(), None)
    assert key.public_key() == made.key.public_key()
    assert x509.load_pem_x509_certificates(text.encode()) == [made.root, made.certs[1], made.leaf]
    ordered = x509.load_pem_x509_certificates(to_kv_pem(made, order=(0, 1, 2)).encode())
    assert ordered == list(made.certs)


def test_secret_values_by_content_type(chain: Callable[..., Chain]) -> None:
    """PKCS#12 secrets are base64 PFX; PEM secrets are the PEM text."""
    made = chain(depth=2)
    pfx = pkcs12.load_pkcs12(base64.b64decode(secret_value(made, PKCS12)), b"")
    assert pfx.cert is not None and pfx.cert.certificate == made.leaf
    assert secret_value(made, PEM).count("-----BEGIN CERTIFICATE-----") == 2


def test_unrelated_cert_is_outside_the_chain(chain: Callable[..., Chain]) -> None:
    """The unrelated certificate was not issued by any certificate of a chain."""
    made, stranger = chain(), unrelated_cert()
    for cert in made.certs:
        with pytest.raises((ValueError, TypeError)):
            stranger.verify_directly_issued_by(cert)
