"""Turn a Key Vault secret value (PFX or PEM) into one PEM: leaf, intermediates, root, then the key.

No I/O: a string in, bytes out; the current time is an argument. The order comes from the
certificates themselves (names, key identifiers, signatures), never from the input order.
"""
from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import PublicKeyAlgorithmOID

from akvvm_ext.errors import ContentError

PKCS12 = "application/x-pkcs12"
PEM = "application/x-pem-file"

_Ext = TypeVar("_Ext", bound=x509.ExtensionType)
# openssl also reads a block whose BEGIN/END lines end in blanks (an editor's trailing spaces)
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----[ \t]*\n.*?\n-----END \1-----", re.DOTALL)
_REIMPORT = "Re-import the certificate into Key Vault as a PFX or PEM with its private key."
_EXPORT_HINT = (
    "Key Vault certificates are exported without a password; re-import the certificate with an "
    "empty password."
)


@dataclass(frozen=True)
class Bundle:
    """The ordered full-chain PEM with the facts a status report needs about its leaf."""

    pem: bytes
    not_after: datetime
    not_before: datetime
    subject: str
    thumbprint: str  # SHA-1 of the leaf, upper-case hex, as Key Vault's x5t
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Parsed:
    key: PrivateKeyTypes | None
    certs: tuple[x509.Certificate, ...]
    warnings: tuple[str, ...] = ()


def convert(value: str, content_type: str | None, now: datetime) -> Bundle:
    """Read a secret value and return its leaf, chain, root and key as one PEM.

    Raises ContentError (with a hint, never with secret material) when the value is unusable.
    """
    parsed = _parse(value, content_type)
    if parsed.key is None:
        raise ContentError("the secret holds no private key.", _REIMPORT)
    leaf = _pick_leaf(parsed.key, parsed.certs)
    if leaf.public_key_algorithm_oid == PublicKeyAlgorithmOID.RSASSA_PSS:
        raise ContentError(  # re-encoded, its key would say plain RSA and no server loads the pair
            "the certificate has an RSA-PSS key, which cannot be written as a key file that "
            "matches it.", "Issue the certificate with an RSA (rsaEncryption) or EC key.")
    chain, dropped = _order(leaf, [c for c in parsed.certs if c != leaf])
    warnings = (parsed.warnings + _dropped_warnings(dropped)
                + validity_warnings(leaf.not_valid_before_utc, leaf.not_valid_after_utc, now))
    return Bundle(
        pem=_render(chain, parsed.key),
        not_after=leaf.not_valid_after_utc,
        not_before=leaf.not_valid_before_utc,
        subject=leaf.subject.rfc4514_string(),
        thumbprint=leaf.fingerprint(hashes.SHA1()).hex().upper(),  # noqa: S303 - an id, not a MAC
        warnings=warnings,
    )


def _parse(value: str, content_type: str | None) -> _Parsed:
    if not value or not value.strip():
        raise ContentError("the secret's value is empty.", _REIMPORT)
    text = value.replace("\r\n", "\n").strip()
    declared = (content_type or "").split(";")[0].strip().lower()
    looks_pem = "-----BEGIN " in text
    if declared not in (PKCS12, PEM):
        return _sniffed(text, looks_pem, content_type)
    if declared == PKCS12 and looks_pem:
        raise ContentError(
            f"the secret's content type is {PKCS12} but its value is PEM text.",
            f"Set the secret's content type to {PEM}.",
        )
    if declared == PEM and not looks_pem:
        raise ContentError(
            f"the secret's content type is {PEM} but its value is not PEM text.",
            f"If the value is a base64 PFX, set the secret's content type to {PKCS12}.",
        )
    return _parse_pfx(text) if declared == PKCS12 else _parse_pem(text)


def _sniffed(text: str, looks_pem: bool, content_type: str | None) -> _Parsed:
    """Read a value whose content type does not say what it is, and note that."""
    parsed = _parse_pem(text) if looks_pem else _parse_pfx(text)
    said = f"content type {content_type[:60]!r}" if content_type else "no content type"
    note = f"the secret has {said}; its value was read as {PEM if looks_pem else PKCS12}."
    return _Parsed(parsed.key, parsed.certs, (note,))


def _parse_pfx(text: str) -> _Parsed:
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ContentError(
            "the secret's value is not a certificate (neither PEM text nor a base64 PFX).",
            _REIMPORT,
        ) from None
    for password in (b"", None):
        try:
            pfx = pkcs12.load_pkcs12(data, password)
        except (ValueError, UnsupportedAlgorithm):
            continue
        certs = [pfx.cert.certificate] if pfx.cert else []
        certs += [extra.certificate for extra in pfx.additional_certs]
        return _Parsed(pfx.key, tuple(dict.fromkeys(certs)))
    if _looks_like_pfx(data):
        raise ContentError("the PFX cannot be opened without a password.", _EXPORT_HINT)
    raise ContentError("the secret's value is not a certificate (not a PKCS#12 file).", _REIMPORT)


def _looks_like_pfx(data: bytes) -> bool:
    """A DER SEQUENCE whose first element is INTEGER 3: the PFX version."""
    if len(data) < 8 or data[0] != 0x30:
        return False
    first = data[1]
    offset = 2 if first <= 0x80 else 2 + (first & 0x7F)
    return data[offset : offset + 3] == b"\x02\x01\x03"


def _parse_pem(text: str) -> _Parsed:
    keys: list[PrivateKeyTypes] = []
    certs: list[x509.Certificate] = []
    for block in _PEM_BLOCK.finditer(text):
        label, pem = block.group(1), block.group(0).encode("ascii", "replace")
        if label == "CERTIFICATE":
            certs.append(_load_pem_cert(pem))
        elif label.endswith("PRIVATE KEY"):
            keys.append(_load_pem_key(label, pem))
    if not keys and not certs:
        raise ContentError("the secret's value is not a certificate (no PEM blocks).", _REIMPORT)
    if len(keys) > 1:
        raise ContentError("the PEM value holds more than one private key.", _REIMPORT)
    return _Parsed(keys[0] if keys else None, tuple(dict.fromkeys(certs)))


def _load_pem_cert(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise ContentError("a CERTIFICATE block of the PEM value is damaged.", _REIMPORT) from None


def _load_pem_key(label: str, pem: bytes) -> PrivateKeyTypes:
    if label.startswith("ENCRYPTED") or b"Proc-Type: 4,ENCRYPTED" in pem:
        raise ContentError("the private key in the PEM value is encrypted.", _EXPORT_HINT)
    try:
        # Key Vault validated the key at import and we only re-encode it and match it against
        # the certificate's public key; the RSA consistency check would cost ~40 ms per key.
        return serialization.load_pem_private_key(
            pem, password=None, unsafe_skip_rsa_key_validation=True
        )
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ContentError("the private key in the PEM value cannot be read.", _REIMPORT) from None


def _spki(cert: x509.Certificate) -> bytes | None:
    try:
        public = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return None
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _pick_leaf(key: PrivateKeyTypes, certs: Sequence[x509.Certificate]) -> x509.Certificate:
    if not certs:
        raise ContentError("the secret holds a private key but no certificate.", _REIMPORT)
    wanted = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    matching = [c for c in certs if _spki(c) == wanted]
    if not matching:
        raise ContentError(
            "the private key matches none of the certificates in the secret.",
            "The key and the certificates do not belong together. " + _REIMPORT,
        )
    if len(matching) == 1:
        return matching[0]
    return max(matching, key=lambda c: (not _is_ca(c), c.not_valid_after_utc))


def _order(
    leaf: x509.Certificate, pool: list[x509.Certificate]
) -> tuple[list[x509.Certificate], list[x509.Certificate]]:
    """Walk from the leaf up through its issuers; return the chain and the leftovers."""
    chain, remaining = [leaf], list(pool)
    while chain[-1].subject != chain[-1].issuer:
        issuer = _find_issuer(chain[-1], remaining)
        if issuer is None:
            if _find_issuer(chain[-1], chain) is not None:
                raise ContentError(
                    "the certificate chain loops: an issuer of "
                    f"{chain[-1].subject.rfc4514_string()!r} is already in the chain.",
                    "Upload a chain that ends at a self-signed root or an intermediate.",
                )
            break
        chain.append(issuer)
        remaining.remove(issuer)
    return chain, remaining


def _find_issuer(
    cert: x509.Certificate, candidates: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    named = [c for c in candidates if c.subject == cert.issuer and c != cert]
    if not named:
        return None
    authority = _extension_value(cert, x509.AuthorityKeyIdentifier)
    wanted = authority.key_identifier if authority is not None else None
    if wanted is not None:
        keyed = [c for c in named if _subject_key_id(c) == wanted]
        named = keyed or [c for c in named if _subject_key_id(c) is None]
    if len(named) > 1:
        named = [c for c in named if _signed_by(cert, c)] or named
    if len(named) > 1:  # cross-signed: first the copy whose issuers in the secret reach a root
        pool = list(candidates)
        return max(named, key=lambda c: (_reaches_root(c, pool), c.not_valid_after_utc))
    return max(named, key=lambda c: c.not_valid_after_utc, default=None)


def _reaches_root(cert: x509.Certificate, pool: Sequence[x509.Certificate]) -> bool:
    """Whether the issuers of `cert` found in `pool` lead to a self-signed certificate."""
    seen = {cert}
    while cert.subject != cert.issuer:
        found = next((c for c in pool if c not in seen and c.subject == cert.issuer
                      and _signed_by(cert, c)), None)
        if found is None:
            return False
        seen.add(found)
        cert = found
    return True


def _subject_key_id(cert: x509.Certificate) -> bytes | None:
    ski = _extension_value(cert, x509.SubjectKeyIdentifier)
    return ski.digest if ski is not None else None


def _is_ca(cert: x509.Certificate) -> bool:
    constraints = _extension_value(cert, x509.BasicConstraints)
    return constraints is not None and constraints.ca


def _extension_value(
    cert: x509.Certificate, kind: type[_Ext]
) -> _Ext | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except (x509.ExtensionNotFound, ValueError):
        return None


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def _dropped_warnings(dropped: Sequence[x509.Certificate]) -> tuple[str, ...]:
    if not dropped:
        return ()
    names = "; ".join(c.subject.rfc4514_string() for c in dropped)
    return (f"dropped {len(dropped)} certificate(s) not in the leaf's chain: {names}.",)


def validity_warnings(not_before: datetime, not_after: datetime, now: datetime) -> tuple[str, ...]:
    """The SPEC §7 warning for a leaf used outside its validity at `now` (none inside it)."""
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    if now < not_before:
        return (f"the certificate is not valid before {not_before.isoformat()}; installed anyway.",)
    if now > not_after:
        return (f"the certificate expired on {not_after.isoformat()}; installed anyway "
                "(Key Vault decides).",)
    return ()


def _render(chain: Sequence[x509.Certificate], key: PrivateKeyTypes) -> bytes:
    pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain) + pkcs8
