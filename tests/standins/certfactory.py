"""Certificate factory for tests: chains, and the PFX/PEM forms Key Vault serves them in.

API:
    make_chain(depth=3, key_type="rsa"|"ec", cn=..., not_before=None, not_after=None,
               key_size=2048, leaf_key=None) -> Chain   (leaf first ... root last)
    Chain.key / .certs / .leaf / .root / .key_pem() / .cert_pems()
    to_pfx(chain, *, legacy=True, password=None, include_root=True, order=None) -> bytes
    to_kv_pem(chain, order=None) -> str      (Key Vault's PEM: key, then certificates)
    secret_value(chain, content_type) -> str (the `value` Key Vault returns for the secret)
    unrelated_cert() -> x509.Certificate     (self-signed, in no chain)
    cached_key(key_type, key_size, slot) -> private key (process-wide cache; keygen is slow)
    key_pem(key) -> bytes / certificate_builder(subject, key, issuer, issuer_key, from, until)
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import subprocess
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PKCS12 = "application/x-pkcs12"
PEM = "application/x-pem-file"
_DAY = dt.timedelta(days=1)
CA_USAGE = x509.KeyUsage(False, False, False, False, False, True, True, False, False)


@dataclass(frozen=True, eq=False)
class Chain:
    """A leaf key and its certificates, leaf first and root last."""

    key: PrivateKey
    certs: tuple[x509.Certificate, ...]

    @property
    def leaf(self) -> x509.Certificate:
        return self.certs[0]

    @property
    def root(self) -> x509.Certificate:
        return self.certs[-1]

    def key_pem(self) -> bytes:
        """The leaf key as unencrypted PKCS#8 PEM."""
        return key_pem(self.key)

    def cert_pems(self) -> tuple[bytes, ...]:
        """Each certificate as PEM, leaf first."""
        return tuple(c.public_bytes(serialization.Encoding.PEM) for c in self.certs)


def key_pem(key: PrivateKey) -> bytes:
    """A private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@functools.cache
def cached_key(key_type: str = "rsa", key_size: int = 2048, slot: int = 0) -> PrivateKey:
    """A private key shared by every caller asking for the same (type, size, slot)."""
    return _new_key(key_type, key_size)


def _new_key(key_type: str, key_size: int) -> PrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    if key_type == "ec":
        curve: ec.EllipticCurve = ec.SECP384R1() if key_size == 384 else ec.SECP256R1()
        return ec.generate_private_key(curve)
    raise ValueError(f"unknown key type {key_type!r}")


def make_chain(
    depth: int = 3,
    key_type: str = "rsa",
    cn: str = "www.example.test",
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    key_size: int = 2048,
    leaf_key: PrivateKey | None = None,
) -> Chain:
    """Build leaf + (depth - 2) intermediates + root; CA keys are cached, the leaf key is new."""
    if depth < 1:
        raise ValueError("depth must be >= 1")
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    leaf_from = not_before or now - _DAY
    leaf_until = not_after or now + 365 * _DAY
    ca_from = min(leaf_from, now) - _DAY
    ca_until = max(leaf_until, now) + 730 * _DAY
    certs, issuer_name, issuer_key = _ca_path(depth, key_type, key_size, ca_from, ca_until)
    if depth == 1:
        return Chain(key=issuer_key, certs=(certs[0],))
    key = leaf_key or _new_key(key_type, key_size)
    leaf = _leaf_cert(cn, key, issuer_name, issuer_key, leaf_from, leaf_until)
    return Chain(key=key, certs=(leaf, *reversed(certs)))


def _ca_path(depth: int, key_type: str, key_size: int, not_before: dt.datetime,
             not_after: dt.datetime) -> tuple[list[x509.Certificate], x509.Name, PrivateKey]:
    """Root and (depth - 2) intermediates, root first, with the last one's name and key."""
    tag = uuid.uuid4().hex[:8]
    names = [f"Stand-in Root CA {tag}"]
    names += [f"Stand-in Intermediate {i} {tag}" for i in range(1, depth - 1)]
    issuer_key = cached_key(key_type, key_size, 0)
    issuer_name = _name(names[0])
    certs = [_ca_cert(issuer_name, issuer_key, issuer_name, issuer_key, not_before, not_after)]
    for level, ca_cn in enumerate(names[1:], start=1):
        key = cached_key(key_type, key_size, level)
        certs.append(_ca_cert(_name(ca_cn), key, issuer_name, issuer_key, not_before, not_after))
        issuer_name, issuer_key = _name(ca_cn), key
    return certs, issuer_name, issuer_key


def unrelated_cert() -> x509.Certificate:
    """A self-signed certificate that belongs to no chain made here."""
    key = cached_key("ec", 256, 99)
    name = _name(f"Unrelated {uuid.uuid4().hex[:8]}")
    now = dt.datetime.now(dt.timezone.utc)
    return _ca_cert(name, key, name, key, now - _DAY, now + 365 * _DAY)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def certificate_builder(
    subject: x509.Name, key: PrivateKey, issuer: x509.Name, issuer_key: PrivateKey,
    not_before: dt.datetime, not_after: dt.datetime,
) -> x509.CertificateBuilder:
    """Subject, issuer, validity, serial and key identifiers: what every certificate here has."""
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(aki, False)
    )


def _ca_cert(
    subject: x509.Name, key: PrivateKey, issuer: x509.Name, issuer_key: PrivateKey,
    not_before: dt.datetime, not_after: dt.datetime,
) -> x509.Certificate:
    builder = (
        certificate_builder(subject, key, issuer, issuer_key, not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .add_extension(CA_USAGE, True)
    )
    return builder.sign(issuer_key, hashes.SHA256())


def _leaf_cert(
    cn: str, key: PrivateKey, issuer: x509.Name, issuer_key: PrivateKey,
    not_before: dt.datetime, not_after: dt.datetime,
) -> x509.Certificate:
    usage = x509.KeyUsage(True, False, True, False, False, False, False, False, False)
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    builder = (
        certificate_builder(_name(cn), key, issuer, issuer_key, not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(usage, True)
        .add_extension(eku, False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), False)
    )
    return builder.sign(issuer_key, hashes.SHA256())


def _ordered(
    chain: Chain, order: Sequence[int] | None, include_root: bool = True
) -> list[x509.Certificate]:
    certs = [chain.certs[i] for i in order] if order is not None else list(chain.certs)
    if not include_root and len(chain.certs) > 1:
        certs = [c for c in certs if c is not chain.root]
    return certs


def to_pfx(
    chain: Chain,
    *,
    legacy: bool = True,
    password: bytes | None = None,
    include_root: bool = True,
    order: Sequence[int] | None = None,
) -> bytes:
    """PKCS#12 bytes. legacy=True is Key Vault's form (RC2-40 certs, 3DES key, SHA1 MAC);
    legacy=False is a modern AES-256 PFX. The password defaults to empty, as in Key Vault."""
    certs = _ordered(chain, order, include_root)
    return _openssl_pfx(chain.key_pem(), certs, password or b"", legacy)


def _openssl_pfx(
    key_pem: bytes, certs: Sequence[x509.Certificate], password: bytes, legacy: bool
) -> bytes:
    # cryptography cannot write RC2-40 (Key Vault's form) nor an empty-password AES PFX;
    # openssl can. openssl writes the key's certificate first, then the others in order.
    with tempfile.TemporaryDirectory(prefix="certfactory-") as tmp:
        key_path, certs_path = Path(tmp, "key.pem"), Path(tmp, "certs.pem")
        out = Path(tmp, "out.pfx")
        key_path.write_bytes(key_pem)
        key_path.chmod(0o600)
        certs_path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
        args = ["openssl", "pkcs12", "-export", "-inkey", str(key_path), "-in", str(certs_path),
                "-out", str(out), "-passout", "stdin"]
        subprocess.run(
            args + (["-legacy"] if legacy else []),
            input=password + b"\n", check=True, capture_output=True,
        )
        return out.read_bytes()


def to_kv_pem(chain: Chain, order: Sequence[int] | None = None) -> str:
    """Key Vault's PEM: the key, then certificates (default order root first, leaf last)."""
    if order is None:
        order = range(len(chain.certs) - 1, -1, -1)
    certs = _ordered(chain, order)
    pems = [chain.key_pem()] + [c.public_bytes(serialization.Encoding.PEM) for c in certs]
    return b"".join(pems).decode("ascii").replace("\r\n", "\n")


def secret_value(chain: Chain, content_type: str | None = PKCS12) -> str:
    """The string Key Vault returns as the secret's `value` for a certificate."""
    if content_type == PEM:
        return to_kv_pem(chain)
    if content_type in (PKCS12, None):
        return base64.b64encode(to_pfx(chain)).decode("ascii")
    raise ValueError(f"no certificate form for content type {content_type!r}")
