"""Decrypts waagent's protectedSettings: a DER CMS EnvelopedData for the `<THUMB>.crt/.prv` pair.

`openssl cms -decrypt` first (DER in on stdin, plaintext out on stdout: never argv, never a file);
without the openssl CLI, the `cryptography` library: `pkcs7_decrypt_der` for AES-128/256, and for
3DES/AES-192 (which it lacks) our own KeyTransRecipientInfo RSA unwrap plus CBC decryption over a
minimal DER walker. Error texts never carry plaintext.
"""
from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

from cryptography import x509
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import padding as rsa_padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.ciphers import BlockCipherAlgorithm, Cipher, algorithms, modes
from cryptography.hazmat.primitives.serialization import pkcs7

from akvvm_ext.errors import AkvvmError

OPENSSL_TIMEOUT_S = 30
_ENVELOPED_DATA = "1.2.840.113549.1.7.3"
_RSA = "1.2.840.113549.1.1.1"
_RSA_OAEP = "1.2.840.113549.1.1.7"
_DES_EDE3_CBC = "1.2.840.113549.3.7"
_AES_CBC = {"2.16.840.1.101.3.4.1.2": 16, "2.16.840.1.101.3.4.1.22": 24,
            "2.16.840.1.101.3.4.1.42": 32}
_LIBRARY_AES = ("2.16.840.1.101.3.4.1.2", "2.16.840.1.101.3.4.1.42")


class CmsError(AkvvmError):
    """The protected settings could not be decrypted."""

    code = "SETTINGS"


def decrypt(der: bytes, cert_path: str, key_path: str) -> bytes:
    """The plaintext of an EnvelopedData `der` addressed to the certificate at `cert_path`."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return decrypt_in_python(der, _read(cert_path), _read(key_path))
    command = [openssl, "cms", "-decrypt", "-inform", "DER", "-recip", cert_path,
               "-inkey", key_path]
    try:
        result = subprocess.run(command, input=der, capture_output=True,
                                timeout=OPENSSL_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return decrypt_in_python(der, _read(cert_path), _read(key_path))
    if result.returncode == 0:
        return result.stdout
    reason = result.stderr.decode("utf-8", "replace").strip().splitlines()[:1]
    try:  # an algorithm this openssl build lacks may still be within our reach
        return decrypt_in_python(der, _read(cert_path), _read(key_path))
    except CmsError as err:
        raise CmsError(f"{err.message} (openssl cms: {''.join(reason) or 'failed'})",
                       err.hint) from err


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as err:
        raise CmsError(f"cannot read {path}: {err.strerror}",
                       "Run as root on the VM whose agent wrote the settings") from err


def decrypt_in_python(der: bytes, cert_pem: bytes, key_pem: bytes) -> bytes:
    """Decrypt with the `cryptography` library only (no openssl CLI)."""
    cert, key = _credentials(cert_pem, key_pem)
    try:
        encrypted_key, algorithm, iv, ciphertext = _envelope(der, cert)
    except (IndexError, ValueError) as err:
        raise CmsError("protectedSettings is not a DER CMS EnvelopedData",
                       "Re-deploy the extension settings") from err
    if algorithm in _LIBRARY_AES and encrypted_key[0] == _RSA:
        try:
            return pkcs7.pkcs7_decrypt_der(der, cert, key, [])
        except ValueError as err:
            raise CmsError("protectedSettings could not be decrypted with this VM's "
                           "certificate", "Re-deploy the extension settings") from err
    content_key = _unwrap_key(key, encrypted_key)
    return _cbc_decrypt(algorithm, content_key, iv, ciphertext)


def _credentials(cert_pem: bytes, key_pem: bytes) -> tuple[x509.Certificate, RSAPrivateKey]:
    try:
        cert = (x509.load_pem_x509_certificate(cert_pem) if b"-----BEGIN" in cert_pem
                else x509.load_der_x509_certificate(cert_pem))
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as err:
        raise CmsError("the transport certificate or key is unreadable",
                       "The agent's <THUMBPRINT>.crt/.prv pair must be PEM") from err
    if not isinstance(key, RSAPrivateKey):
        raise CmsError("the transport key is not an RSA key", "")
    return cert, key


def _unwrap_key(key: RSAPrivateKey, encrypted_key: tuple[str, bytes]) -> bytes:
    algorithm, wrapped = encrypted_key
    if algorithm == _RSA:
        scheme: rsa_padding.AsymmetricPadding = rsa_padding.PKCS1v15()
    elif algorithm == _RSA_OAEP:  # default parameters only: SHA-1 and MGF1-SHA-1
        scheme = rsa_padding.OAEP(rsa_padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)  # noqa: S303
    else:
        raise CmsError(f"unsupported key transport algorithm {algorithm}", "")
    try:
        return key.decrypt(wrapped, scheme)
    except ValueError as err:
        raise CmsError("protectedSettings could not be decrypted with this VM's certificate",
                       "Re-deploy the extension settings") from err


def _cbc_decrypt(algorithm: str, content_key: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    cipher: BlockCipherAlgorithm
    if algorithm == _DES_EDE3_CBC and len(content_key) == 24:
        cipher = TripleDES(content_key)
    elif _AES_CBC.get(algorithm) == len(content_key):
        cipher = algorithms.AES(content_key)
    else:
        raise CmsError(f"unsupported content encryption {algorithm}", "")
    decryptor = Cipher(cipher, modes.CBC(iv)).decryptor()
    unpadder = padding.PKCS7(cipher.block_size).unpadder()
    try:
        padded = decryptor.update(ciphertext) + decryptor.finalize()
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError as err:
        raise CmsError("protectedSettings could not be decrypted (bad padding)",
                       "Re-deploy the extension settings") from err


# --- a minimal DER walker: just enough of RFC 5652 EnvelopedData ---------------------------


def _tlv(data: bytes, offset: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at `offset`."""
    tag, length = data[offset], data[offset + 1]
    start = offset + 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4:
            raise ValueError("indefinite or oversized DER length")
        length = int.from_bytes(data[start:start + count], "big")
        start += count
    if start + length > len(data):
        raise ValueError("truncated DER")
    return tag, start, start + length


def _children(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    while start < end:
        tag, content, stop = _tlv(data, start)
        yield tag, content, stop
        start = stop


def _oid(body: bytes) -> str:
    arc = min(body[0] // 40, 2)
    parts, value = [str(arc), str(body[0] - 40 * arc)], 0
    for byte in body[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(str(value))
            value = 0
    return ".".join(parts)


def _envelope(der: bytes, cert: x509.Certificate) -> tuple[tuple[str, bytes], str, bytes, bytes]:
    """(key transport (algorithm, wrapped key) for `cert`, content algorithm, IV, ciphertext)."""
    _, start, end = _tlv(der, 0)
    (_, o1, o2), (_, e1, _e2) = list(_children(der, start, end))[:2]
    if _oid(der[o1:o2]) != _ENVELOPED_DATA:
        raise ValueError("not EnvelopedData")
    _, s1, s2 = _tlv(der, e1)  # [0] EXPLICIT -> EnvelopedData SEQUENCE
    fields = [f for f in _children(der, s1, s2) if f[0] != 0xA0]  # skip originatorInfo
    recipients, content = fields[1], fields[2]
    wrapped = _recipient(der, recipients, cert)
    _, (_, a1, a2), *rest = list(_children(der, content[1], content[2]))
    algorithm_fields = list(_children(der, a1, a2))
    algorithm = _oid(der[algorithm_fields[0][1]:algorithm_fields[0][2]])
    iv = der[algorithm_fields[1][1]:algorithm_fields[1][2]] if len(algorithm_fields) > 1 else b""
    return wrapped, algorithm, iv, _octets(der, rest[0]) if rest else b""


def _octets(der: bytes, element: tuple[int, int, int]) -> bytes:
    """encryptedContent [0] IMPLICIT OCTET STRING, primitive or constructed."""
    tag, start, end = element
    if tag == 0x80:
        return der[start:end]
    return b"".join(der[s:e] for _, s, e in _children(der, start, end))


def _recipient(der: bytes, recipients: tuple[int, int, int], cert: x509.Certificate
               ) -> tuple[str, bytes]:
    """The KeyTransRecipientInfo addressed to `cert`: (algorithm, wrapped key)."""
    for tag, start, end in _children(der, recipients[1], recipients[2]):
        if tag != 0x30:
            continue  # not a KeyTransRecipientInfo
        _, rid, algorithm, key = list(_children(der, start, end))[:4]
        alg_oid = next(_children(der, algorithm[1], algorithm[2]))
        if _addressed_to(der, rid, cert):
            return _oid(der[alg_oid[1]:alg_oid[2]]), der[key[1]:key[2]]
    raise CmsError("protectedSettings are not addressed to this VM's certificate",
                   "Check protectedSettingsCertThumbprint, or re-deploy the extension settings")


def _addressed_to(der: bytes, rid: tuple[int, int, int], cert: x509.Certificate) -> bool:
    tag, start, end = rid
    if tag == 0x80:  # [0] subjectKeyIdentifier
        try:
            ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        except x509.ExtensionNotFound:
            return False
        return der[start:end] == ski.value.digest
    (_, i1, i2), (_, n1, n2) = list(_children(der, start, end))[:2]  # issuerAndSerialNumber
    issuer = cert.issuer.public_bytes()
    _, c1, c2 = _tlv(issuer, 0)
    serial = int.from_bytes(der[n1:n2], "big", signed=True)
    return serial == cert.serial_number and der[i1:i2] == issuer[c1:c2]
