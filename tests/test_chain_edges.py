"""chain.convert on certificates met in the wild: cross-signed intermediates, PEM armour lines
with trailing blanks, and RSA-PSS keys (refused with a reason rather than installed broken)."""
from __future__ import annotations

import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from akvvm_ext.chain import PEM, convert
from akvvm_ext.errors import ContentError
from tests.standins import certfactory as cf

NOW = datetime.now(timezone.utc).replace(microsecond=0)
DAY = timedelta(days=1)


def _ca(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
        signer: ec.EllipticCurvePrivateKey, days: int, ca: bool = True) -> x509.Certificate:
    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY).not_valid_after(NOW + days * DAY)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                signer.public_key()), False)
            .sign(signer, hashes.SHA256()))


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def test_cross_signed_intermediate_follows_the_root_in_the_secret(tmp_path: Path) -> None:
    """Two copies of the issuing CA (one under the root in the secret, one cross-signed by an
    old root that is not, expiring later): the chain goes to the root that is there."""
    root_key, old_key, ca_key, leaf_key = (ec.generate_private_key(ec.SECP256R1())
                                           for _ in range(4))
    root = _ca("Root New", root_key, "Root New", root_key, 3000)
    under_root = _ca("Issuing CA", ca_key, "Root New", root_key, 1000)
    cross = _ca("Issuing CA", ca_key, "Root Old", old_key, 1200)
    leaf = _ca("www.example.test", leaf_key, "Issuing CA", ca_key, 90, ca=False)
    key = leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    bundle = convert((key + _pem(root) + _pem(cross) + _pem(under_root) + _pem(leaf)).decode(),
                     PEM, NOW)
    assert bundle.pem.startswith(_pem(leaf) + _pem(under_root) + _pem(root))
    for name, data in (("root.pem", _pem(root)), ("out.pem", bundle.pem),
                       ("leaf.pem", _pem(leaf))):
        (tmp_path / name).write_bytes(data)
    verify = subprocess.run(["openssl", "verify", "-CAfile", "root.pem", "-untrusted", "out.pem",
                             "leaf.pem"], cwd=tmp_path, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_armour_lines_with_trailing_blanks_are_read_as_openssl_reads_them() -> None:
    """`-----BEGIN CERTIFICATE----- ` (a pasted trailing space) converts like the clean PEM."""
    chain = cf.make_chain(2, key_type="ec", key_size=256)
    clean = cf.to_kv_pem(chain)
    padded = clean.replace("-----\n", "----- \n").replace("-----\n", "-----\t\n")
    assert convert(padded, PEM, NOW).pem == convert(clean, PEM, NOW).pem


def test_rsa_pss_key_is_refused_with_a_reason(tmp_path: Path) -> None:
    """An RSA-PSS key would be re-encoded as plain RSA, which no TLS server pairs with the
    certificate: nothing is installed, and the message says why and what to do."""
    def run(*args: str) -> None:
        subprocess.run(args, cwd=tmp_path, check=True, capture_output=True)
    run("openssl", "genpkey", "-algorithm", "RSA-PSS", "-pkeyopt", "rsa_keygen_bits:2048",
        "-out", "k.pem")
    run("openssl", "req", "-new", "-x509", "-key", "k.pem", "-subj", "/CN=pss.test", "-days",
        "30", "-out", "c.pem")
    value = (tmp_path / "k.pem").read_text() + (tmp_path / "c.pem").read_text()
    with pytest.raises(ContentError, match="RSA-PSS") as caught:
        convert(value, PEM, NOW)
    assert "rsaEncryption" in caught.value.hint
