"""Corrupted protectedSettings: the pure-Python CMS reader answers every damage with a CmsError
(a message and a hint), never with another exception."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from handler import cms
from tests.test_settings_file import make_pair


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes, bytes]:
    """(DER from `openssl cms -encrypt -des3`, certificate PEM, key PEM)."""
    transport = make_pair(Path(tmp_path_factory.mktemp("lib")))
    der = base64.b64decode(transport.encrypt({"secret": "x"}))
    key = (transport.lib / f"{transport.thumbprint}.prv").read_bytes()
    return der, transport.crt.read_bytes(), key


def test_the_sample_itself_decrypts(sample: tuple[bytes, bytes, bytes]) -> None:
    """The undamaged blob decrypts to the settings: the damage below is all that differs."""
    der, cert, key = sample
    assert json.loads(cms.decrypt_in_python(der, cert, key)) == {"secret": "x"}


def test_every_truncation_and_flipped_byte_is_a_cms_error(
    sample: tuple[bytes, bytes, bytes],
) -> None:
    """Cut short, or one byte changed (every 7th position): a CmsError or some plaintext (which
    the settings reader then refuses as not JSON), never another exception."""
    der, cert, key = sample
    damaged = [der[:n] for n in range(0, len(der), 7)]
    damaged += [der[:i] + bytes([der[i] ^ 0xFF]) + der[i + 1:] for i in range(0, len(der), 7)]
    for blob in damaged:
        try:
            cms.decrypt_in_python(blob, cert, key)
        except cms.CmsError:
            continue
