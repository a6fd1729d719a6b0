"""chain.convert: Key Vault's PFX and PEM secrets become leaf, intermediates, root, key."""
from __future__ import annotations

import base64
import datetime as dt
import re
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from akvvm_ext.chain import PEM, PKCS12, convert
from akvvm_ext.errors import ContentError
from tests.standins import certfactory as cf

NOW = dt.datetime.now(dt.timezone.utc)
_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----\n.*?\n-----END \1-----\n", re.DOTALL)

# Scrambled positions (indices into leaf..root) per depth; the leaf is never first.
SCRAMBLES = {2: [1, 0], 3: [2, 0, 1], 4: [2, 0, 3, 1]}


def blocks(pem: bytes) -> list[tuple[str, bytes]]:
    """The PEM blocks of a file, in order, and proof nothing else is in it."""
    found = [(m.group(1).decode(), m.group(0)) for m in _BLOCK.finditer(pem)]
    assert b"".join(b for _, b in found) == pem
    return found


def value_for(chain: cf.Chain, form: str) -> tuple[str, str]:
    """(value, content type) of the chain in a scrambled order, in one of Key Vault's forms."""
    order = SCRAMBLES[len(chain.certs)]
    if form == "pem":
        return cf.to_kv_pem(chain, order=order), PEM
    pfx = cf.to_pfx(chain, legacy=form == "pfx-legacy", order=order)
    return base64.b64encode(pfx).decode(), PKCS12


def openssl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize("form", ["pem", "pfx-legacy", "pfx-modern"])
@pytest.mark.parametrize("key_type", ["rsa", "ec"])
@pytest.mark.parametrize("depth", [2, 3, 4])
def test_scrambled_chain_comes_out_leaf_first_and_verifies(
    tmp_path: Path, depth: int, key_type: str, form: str
) -> None:
    """Any input order gives leaf, intermediates, root, key; openssl verifies; the key fits."""
    chain = cf.make_chain(depth, key_type)
    value, content_type = value_for(chain, form)
    bundle = convert(value, content_type, NOW)
    found = blocks(bundle.pem)
    assert [label for label, _ in found] == ["CERTIFICATE"] * depth + ["PRIVATE KEY"]
    assert tuple(b for _, b in found[:-1]) == chain.cert_pems()
    assert b"\r" not in bundle.pem
    (tmp_path / "out.pem").write_bytes(bundle.pem)
    (tmp_path / "leaf.pem").write_bytes(found[0][1])
    (tmp_path / "root.pem").write_bytes(found[depth - 1][1])
    (tmp_path / "mid.pem").write_bytes(b"".join(b for _, b in found[1 : depth - 1]) or found[0][1])
    verify = openssl("verify", "-CAfile", "root.pem", "-untrusted", "mid.pem", "leaf.pem",
                     cwd=tmp_path)
    assert verify.returncode == 0 and "leaf.pem: OK" in verify.stdout, verify.stderr
    cert_key = openssl("x509", "-in", "out.pem", "-noout", "-pubkey", cwd=tmp_path)
    file_key = openssl("pkey", "-in", "out.pem", "-pubout", cwd=tmp_path)
    assert cert_key.returncode == 0 and file_key.returncode == 0
    assert cert_key.stdout == file_key.stdout


def test_key_vault_legacy_pfx_needs_openssl_legacy_but_converts(tmp_path: Path) -> None:
    """Key Vault's RC2-40 PFX, which openssl 3 reads only with -legacy, converts without help."""
    chain = cf.make_chain(3, "rsa")
    pfx = cf.to_pfx(chain, legacy=True)
    (tmp_path / "kv.pfx").write_bytes(pfx)
    plain = openssl("pkcs12", "-in", "kv.pfx", "-nodes", "-passin", "pass:", cwd=tmp_path)
    assert plain.returncode != 0
    bundle = convert(base64.b64encode(pfx).decode(), PKCS12, NOW)
    assert [b for _, b in blocks(bundle.pem)][:3] == list(chain.cert_pems())


def test_bundle_facts_describe_the_leaf() -> None:
    """Subject, validity and SHA-1 thumbprint are the leaf's, whatever the input order."""
    chain = cf.make_chain(3, "ec", cn="facts.example.test")
    bundle = convert(cf.to_kv_pem(chain), PEM, NOW)
    assert bundle.subject == "CN=facts.example.test"
    assert bundle.not_after == chain.leaf.not_valid_after_utc
    assert bundle.not_before == chain.leaf.not_valid_before_utc
    assert bundle.thumbprint == chain.leaf.fingerprint(hashes.SHA1()).hex().upper()
    assert bundle.warnings == ()


def test_chain_without_root_ends_at_the_last_intermediate() -> None:
    """A PFX without its root yields leaf and intermediates, then the key."""
    chain = cf.make_chain(4, "ec")
    pfx = cf.to_pfx(chain, include_root=False)
    bundle = convert(base64.b64encode(pfx).decode(), PKCS12, NOW)
    assert [b for _, b in blocks(bundle.pem)][:-1] == list(chain.cert_pems()[:3])


def test_unrelated_certificates_are_dropped_with_a_warning() -> None:
    """An extra certificate outside the leaf's chain is left out and named in a warning."""
    chain = cf.make_chain(3, "ec")
    stray = cf.unrelated_cert()
    value = cf.to_kv_pem(chain) + stray.public_bytes(serialization.Encoding.PEM).decode()
    bundle = convert(value, PEM, NOW)
    assert [b for _, b in blocks(bundle.pem)][:-1] == list(chain.cert_pems())
    assert len(bundle.warnings) == 1
    assert stray.subject.rfc4514_string() in bundle.warnings[0]


@pytest.mark.parametrize("content_type", [None, "", "text/plain"])
def test_missing_or_unknown_content_type_is_sniffed_with_a_warning(
    content_type: str | None,
) -> None:
    """PEM text and a base64 PFX are both recognised when the content type does not say."""
    chain = cf.make_chain(2, "ec")
    for value in (cf.to_kv_pem(chain), base64.b64encode(cf.to_pfx(chain)).decode()):
        bundle = convert(value, content_type, NOW)
        assert [b for _, b in blocks(bundle.pem)][:-1] == list(chain.cert_pems())
        assert len(bundle.warnings) == 1 and "content type" in bundle.warnings[0]


def test_crlf_pem_and_wrapped_base64_are_accepted() -> None:
    """Windows line endings in PEM and line-wrapped base64 in a PFX secret both convert."""
    chain = cf.make_chain(2, "ec")
    crlf = convert(cf.to_kv_pem(chain).replace("\n", "\r\n"), PEM, NOW)
    wrapped = base64.encodebytes(cf.to_pfx(chain)).decode()
    pfx = convert(wrapped, PKCS12, NOW)
    assert crlf.pem == pfx.pem and b"\r" not in crlf.pem


@pytest.mark.parametrize(
    ("not_before", "not_after", "words"),
    [(NOW - dt.timedelta(days=30), NOW - dt.timedelta(days=1), "expired"),
     (NOW + dt.timedelta(days=1), NOW + dt.timedelta(days=30), "not valid before")],
)
def test_expired_or_future_leaf_is_converted_with_a_warning(
    not_before: dt.datetime, not_after: dt.datetime, words: str
) -> None:
    """The vault is the source of truth: an out-of-date leaf converts, with a warning."""
    chain = cf.make_chain(2, "ec", not_before=not_before, not_after=not_after)
    bundle = convert(cf.to_kv_pem(chain), PEM, NOW)
    assert blocks(bundle.pem)[0][1] == chain.cert_pems()[0]
    assert len(bundle.warnings) == 1 and words in bundle.warnings[0]


def _ca(subject: x509.Name, key: object, issuer: x509.Name, signer: object,
        ski: bytes | None = None, days: int = 400) -> x509.Certificate:
    """A CA certificate with chosen names, keys and subject key identifier."""
    public = key.public_key()  # type: ignore[attr-defined]
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .add_extension(x509.SubjectKeyIdentifier(ski) if ski else
                       x509.SubjectKeyIdentifier.from_public_key(public), False)
    )
    return builder.sign(signer, hashes.SHA256())  # type: ignore[arg-type]


def test_same_name_intermediates_are_told_apart_by_signature() -> None:
    """An impostor CA with the real one's name and key id is not chosen; the signer is."""
    chain = cf.make_chain(3, "ec")
    real = chain.certs[1]
    real_ski = real.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    other_key = cf.cached_key("ec", 256, 42)
    impostor = _ca(real.subject, other_key, chain.root.subject, cf.cached_key("ec", 256, 0),
                   ski=real_ski, days=3000)
    pems = [chain.key_pem(), impostor.public_bytes(serialization.Encoding.PEM), *chain.cert_pems()]
    bundle = convert(b"".join(pems).decode(), PEM, NOW)
    assert [b for _, b in blocks(bundle.pem)][:-1] == list(chain.cert_pems())
    assert len(bundle.warnings) == 1  # the impostor, dropped


def _leaf_pem(chain: cf.Chain) -> str:
    return chain.cert_pems()[0].decode()


def _loop_value() -> str:
    """A leaf whose issuer A is issued by B, which is issued by A."""
    a_name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Loop A")])
    b_name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Loop B")])
    a_key, b_key = cf.cached_key("ec", 256, 50), cf.cached_key("ec", 256, 51)
    a = _ca(a_name, a_key, b_name, b_key)
    b = _ca(b_name, b_key, a_name, a_key)
    leaf = cf.make_chain(2, "ec")
    leaf_cert = (
        x509.CertificateBuilder().subject_name(leaf.leaf.subject).issuer_name(a_name)
        .public_key(leaf.key.public_key()).serial_number(7)
        .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=9))
        .sign(a_key, hashes.SHA256())
    )
    certs = [c.public_bytes(serialization.Encoding.PEM) for c in (b, leaf_cert, a)]
    pems = [leaf.key_pem(), *certs]
    return b"".join(pems).decode()


def _bad_values() -> dict[str, tuple[str, str | None, str]]:
    """name -> (value, content type, words the message must contain)."""
    ec_chain, other = cf.make_chain(3, "ec"), cf.make_chain(2, "ec")
    certs_only = "".join(p.decode() for p in ec_chain.cert_pems())
    enc_key = ec_chain.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret-pass"),
    ).decode()
    nokey_pfx = pkcs12.serialize_key_and_certificates(
        None, None, None, list(ec_chain.certs), serialization.NoEncryption()
    )
    b64 = base64.b64encode
    return {
        "empty": ("", PKCS12, "empty"),
        "blank": ("  \n ", PEM, "empty"),
        "garbage-text": ("this is not a certificate!", PKCS12, "not a certificate"),
        "garbage-base64": (b64(b"\x01\x02junk" * 40).decode(), PKCS12, "not a certificate"),
        "json-secret": ('{"user": "x", "password": "hunter2"}', None, "not a certificate"),
        "pem-without-blocks": ("-----BEGIN nothing", PEM, "not a certificate"),
        "damaged-pem-cert": ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                             PEM, "damaged"),
        "pem-declared-pfx": (cf.to_kv_pem(ec_chain), PKCS12, "content type"),
        "pfx-declared-pem": (b64(cf.to_pfx(ec_chain)).decode(), PEM, "content type"),
        "pfx-with-password-legacy": (
            b64(cf.to_pfx(ec_chain, password=b"pw1")).decode(), PKCS12, "password"),
        "pfx-with-password-modern": (
            b64(cf.to_pfx(ec_chain, legacy=False, password=b"pw2")).decode(), PKCS12, "password"),
        "encrypted-pem-key": (enc_key + certs_only, PEM, "encrypted"),
        "pem-no-key": (certs_only, PEM, "no private key"),
        "pfx-no-key": (b64(nokey_pfx).decode(), PKCS12, "no private key"),
        "key-no-cert": (ec_chain.key_pem().decode(), PEM, "no certificate"),
        "key-matches-nothing": (other.key_pem().decode() + certs_only, PEM, "matches none"),
        "chain-loop": (_loop_value(), PEM, "loops"),
    }


BAD = _bad_values()


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_content_is_a_content_error_with_a_hint_and_no_secret(name: str) -> None:
    """Each unusable secret value gets a ContentError that says why and what to do."""
    value, content_type, words = BAD[name]
    with pytest.raises(ContentError) as caught:
        convert(value, content_type, NOW)
    text = str(caught.value)
    assert words in caught.value.message, text
    assert caught.value.hint, text
    assert "PRIVATE KEY" not in text and "hunter2" not in text
    assert not any(len(chunk) > 40 and chunk in text for chunk in value.split())


def test_password_protected_pfx_hint_says_to_export_without_password() -> None:
    """The hint for a password-protected PFX says how Key Vault expects it: empty password."""
    chain = cf.make_chain(2, "ec")
    value = base64.b64encode(cf.to_pfx(chain, password=b"pw")).decode()
    with pytest.raises(ContentError) as caught:
        convert(value, PKCS12, NOW)
    assert "empty password" in caught.value.hint


def test_self_signed_leaf_alone_is_a_valid_bundle() -> None:
    """A self-signed certificate with its key gives one certificate and the key."""
    chain = cf.make_chain(1, "ec")
    bundle = convert(base64.b64encode(cf.to_pfx(chain)).decode(), PKCS12, NOW)
    assert [label for label, _ in blocks(bundle.pem)] == ["CERTIFICATE", "PRIVATE KEY"]
    assert bundle.warnings == ()
