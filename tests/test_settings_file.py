"""Reading waagent settings files: layouts, encodings, and protectedSettings decrypted by the
openssl CLI and by the pure-cryptography fallback (3DES and AES), with real openssl encryption."""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from akvvm_ext.errors import SettingsError
from akvvm_ext.settings import parse
from handler import cms, settings_file

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
EXT = "Microsoft.Azure.KeyVault.KeyVaultForLinux-3.0.0"
URL = "https://myvault.vault.azure.net/secrets/web"
GUID = "00001111-aaaa-2222-bbbb-3333cccc4444"
SECRET = "Pr0tected-SENTINEL-7d1c"
PUBLIC = {"secretsManagementSettings": {"observedCertificates": [URL], "pollingIntervalInS": "60"}}


@dataclass(frozen=True)
class Transport:
    """The agent's transport certificate pair as `<lib>/<THUMB>.crt/.prv`."""

    lib: Path
    thumbprint: str

    @property
    def crt(self) -> Path:
        return self.lib / f"{self.thumbprint}.crt"

    def encrypt(self, settings: object, cipher: str = "des3", crt: Path | None = None) -> str:
        """base64 DER CMS EnvelopedData, exactly as `openssl cms -encrypt` makes it."""
        done = subprocess.run(
            [OPENSSL, "cms", "-encrypt", "-outform", "DER", "-binary", f"-{cipher}",
             str(crt or self.crt)],
            input=json.dumps(settings).encode(), capture_output=True, check=True)
        return base64.b64encode(done.stdout).decode()


def make_pair(lib: Path, name: str = "LinuxTransport") -> Transport:
    """A self-signed RSA pair made by openssl, named by its SHA-1 thumbprint like waagent does."""
    lib.mkdir(parents=True, exist_ok=True)
    subprocess.run([OPENSSL, "req", "-x509", "-nodes", "-subj", f"/CN={name}", "-days", "2",
                    "-newkey", "rsa:2048", "-keyout", str(lib / "t.prv"), "-out",
                    str(lib / "t.crt")], capture_output=True, check=True)
    cert = x509.load_pem_x509_certificate((lib / "t.crt").read_bytes())
    thumbprint = cert.fingerprint(hashes.SHA1()).hex().upper()
    (lib / "t.crt").rename(lib / f"{thumbprint}.crt")
    (lib / "t.prv").rename(lib / f"{thumbprint}.prv")
    return Transport(lib, thumbprint)


@pytest.fixture(scope="module")
def transport(tmp_path_factory: pytest.TempPathFactory) -> Transport:
    return make_pair(tmp_path_factory.mktemp("waagent"))


def write_settings(lib: Path, handler_settings: dict[str, Any], seq: int = 0) -> Path:
    """`<lib>/<ext>/config/<seq>.settings` as the agent writes it."""
    config = lib / EXT / "config"
    config.mkdir(parents=True, exist_ok=True)
    path = config / f"{seq}.settings"
    path.write_text(json.dumps({"runtimeSettings": [{"handlerSettings": handler_settings}]}))
    return path


def protected_settings(transport: Transport, protected: object, cipher: str = "des3"
                       ) -> dict[str, Any]:
    return {"protectedSettings": transport.encrypt(protected, cipher),
            "protectedSettingsCertThumbprint": transport.thumbprint}


def without_openssl(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "no-openssl-bin"
    empty.mkdir(exist_ok=True)
    monkeypatch.setenv("PATH", str(empty))
    assert shutil.which("openssl") is None


def test_public_settings_only(tmp_path: Path) -> None:
    """A file with public settings and no protected ones yields the public settings."""
    path = write_settings(tmp_path, {"publicSettings": PUBLIC})
    assert settings_file.load(str(path)).raw == PUBLIC


def test_read_by_config_dir_and_seq(tmp_path: Path) -> None:
    """read(config_dir, seq, lib_dir) picks `<seq>.settings`."""
    write_settings(tmp_path, {"publicSettings": {"a": 1}}, seq=3)
    write_settings(tmp_path, {"publicSettings": PUBLIC}, seq=4)
    assert settings_file.read(str(tmp_path / EXT / "config"), 4, str(tmp_path)) == PUBLIC


@pytest.mark.parametrize("cipher", ["des3", "aes256", "aes128", "aes192"])
@pytest.mark.parametrize("decrypter", ["openssl-cli", "python-fallback"])
def test_protected_settings_decrypt_and_win(
    transport: Transport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cipher: str,
    decrypter: str,
) -> None:
    """CMS from `openssl cms -encrypt` decrypts with the CLI and without it; protected wins."""
    protected = {"secretsManagementSettings": {"pollingIntervalInS": "7200"},
                 "authenticationSettings": {"msiClientId": GUID}}
    path = write_settings(transport.lib, {"publicSettings": PUBLIC,
                                          **protected_settings(transport, protected, cipher)})
    if decrypter == "python-fallback":
        without_openssl(monkeypatch, tmp_path)
    raw = settings_file.load(str(path)).raw
    assert raw["secretsManagementSettings"] == {"observedCertificates": [URL],
                                                "pollingIntervalInS": "7200"}
    assert parse(raw).identity.msi_client_id == GUID


def test_null_public_settings_with_protected(transport: Transport) -> None:
    """publicSettings null: everything comes from the protected settings."""
    path = write_settings(transport.lib, {"publicSettings": None,
                                          **protected_settings(transport, PUBLIC)}, seq=7)
    assert settings_file.load(str(path)).raw == PUBLIC


def test_failing_openssl_falls_back_to_python(transport: Transport, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """An openssl that cannot decrypt (e.g. no 3DES in its build) does not stop us."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "openssl").write_text("#!/bin/sh\necho 'unsupported cipher' >&2\nexit 1\n")
    (fake / "openssl").chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    path = write_settings(transport.lib, {"publicSettings": None,
                                          **protected_settings(transport, PUBLIC)}, seq=8)
    assert settings_file.load(str(path)).raw == PUBLIC


def test_secrets_travel_by_pipe_not_argv(transport: Transport, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """openssl gets only paths on its command line; the plaintext comes back on stdout."""
    fake, log = tmp_path / "bin", tmp_path / "argv.log"
    fake.mkdir()
    (fake / "openssl").write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec {OPENSSL} "$@"\n')
    (fake / "openssl").chmod(0o755)
    handler = {"publicSettings": PUBLIC, **protected_settings(transport, {"x": SECRET})}
    path = write_settings(transport.lib, handler, seq=9)
    monkeypatch.setenv("PATH", str(fake))
    assert settings_file.load(str(path)).raw["x"] == SECRET
    logged = log.read_text()
    assert "cms -decrypt" in logged and SECRET not in logged
    assert handler["protectedSettings"][:40] not in logged


def test_settings_for_another_certificate_fail_clearly(transport: Transport, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """CMS addressed to a different certificate: a problem naming protectedSettings."""
    other = make_pair(tmp_path / "other", "Other")
    blob = transport.encrypt({"x": SECRET}, crt=other.crt)
    path = write_settings(transport.lib, {"protectedSettings": blob,
                                          "protectedSettingsCertThumbprint": transport.thumbprint},
                          seq=10)
    without_openssl(monkeypatch, tmp_path)
    with pytest.raises(SettingsError, match=r"protectedSettings: cannot be decrypted: .*not "
                                            r"addressed to this VM's certificate"):
        settings_file.load(str(path))


def test_missing_transport_pair_names_thumbprint_and_lib_dir(tmp_path: Path,
                                                              transport: Transport) -> None:
    """Without `<THUMB>.crt/.prv` the problem says where they were looked for."""
    path = write_settings(tmp_path, protected_settings(transport, PUBLIC))
    with pytest.raises(SettingsError) as caught:
        settings_file.load(str(path))
    assert f"{transport.thumbprint}.crt/.prv not found in {tmp_path}" in str(caught.value)
    assert "--lib-dir" in str(caught.value)


def test_bad_thumbprint_and_bad_base64(tmp_path: Path) -> None:
    """A non-hex thumbprint and non-base64 protected settings are named problems."""
    path = write_settings(tmp_path, {"protectedSettings": "QUJD",
                                     "protectedSettingsCertThumbprint": "../../etc/passwd"})
    with pytest.raises(SettingsError, match="protectedSettingsCertThumbprint: is missing or not"):
        settings_file.load(str(path))
    path = write_settings(tmp_path, {"protectedSettings": "not base64!",
                                     "protectedSettingsCertThumbprint": "AB" * 20})
    with pytest.raises(SettingsError, match="protectedSettings: is not base64"):
        settings_file.load(str(path))


def test_protected_plaintext_that_is_not_json_is_not_echoed(transport: Transport) -> None:
    """Decrypted garbage is reported without its content."""
    done = subprocess.run([OPENSSL, "cms", "-encrypt", "-outform", "DER", "-binary", "-aes256",
                           str(transport.crt)], input=SECRET.encode(), capture_output=True,
                          check=True)
    path = write_settings(transport.lib, {
        "protectedSettings": base64.b64encode(done.stdout).decode(),
        "protectedSettingsCertThumbprint": transport.thumbprint}, seq=11)
    with pytest.raises(SettingsError) as caught:
        settings_file.load(str(path))
    assert "decrypts to something that is not JSON" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_indefinite_length_cms_gets_a_clear_error_in_python(transport: Transport) -> None:
    """BER streaming output (indefinite lengths) is refused by the fallback with a message."""
    done = subprocess.run([OPENSSL, "cms", "-encrypt", "-outform", "DER", "-stream", "-binary",
                           "-des3", str(transport.crt)], input=b"{}", capture_output=True,
                          check=True)
    with pytest.raises(cms.CmsError, match="not a DER CMS EnvelopedData"):
        cms.decrypt_in_python(done.stdout, transport.crt.read_bytes(),
                              (transport.lib / f"{transport.thumbprint}.prv").read_bytes())


def test_zero_byte_file_is_a_clear_problem(tmp_path: Path) -> None:
    """An empty settings file says so, with how to give settings."""
    path = tmp_path / "0.settings"
    path.write_bytes(b"")
    with pytest.raises(SettingsError, match=r"is empty: no settings were delivered. Give the "):
        settings_file.load(str(path))


def test_missing_handler_settings_reads_as_no_settings(tmp_path: Path) -> None:
    """runtimeSettings without handlerSettings: parsing then names what is missing."""
    path = tmp_path / "1.settings"
    path.write_text('{"runtimeSettings":[{}]}')
    with pytest.raises(SettingsError, match=r"^secretsManagementSettings: is missing"):
        parse(settings_file.load(str(path)).raw)


def test_escaped_public_settings_get_the_powershell_fix(tmp_path: Path) -> None:
    """publicSettings holding a JSON string are refused with the exact fix."""
    path = write_settings(tmp_path, {"publicSettings": json.dumps(PUBLIC)})
    with pytest.raises(SettingsError, match=r"Get-Content -Raw settings.json"):
        settings_file.load(str(path))


def test_bare_file_with_backslash_quotes(tmp_path: Path) -> None:
    """A file whose quotes are all \\" escaped gets the PowerShell fix, not a JSON error."""
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(PUBLIC).replace('"', '\\"'))
    with pytest.raises(SettingsError, match=r"holds .* escapes. .*--settings @settings.json"):
        settings_file.load(str(path))


def test_invalid_json_names_line_and_column(tmp_path: Path) -> None:
    """Broken JSON is reported with its position."""
    path = tmp_path / "settings.json"
    path.write_text('{\n  "a": 1\n  "b": 2\n}')
    with pytest.raises(SettingsError, match="is not valid JSON \\(line 3 column 3: "):
        settings_file.load(str(path))


def test_seed_example_trailing_comma_is_accepted_with_a_note() -> None:
    """The docs' example with its trailing comma loads, noting where the comma is."""
    path = Path(__file__).parent / "data" / "settings" / "seed_arm_extension_schema.json"
    loaded = settings_file.load(str(path))
    assert loaded.raw["secretsManagementSettings"]["observedCertificates"][1]["acls"] == [
        {"user": "app2"}]
    assert len(loaded.notes) == 1 and "trailing comma at line 34 column 37" in loaded.notes[0]


def test_commas_inside_strings_are_left_alone() -> None:
    """Only structural trailing commas are blanked."""
    text = '{"a": "x,]", "b": [1, 2,], "c": "q\\",}",}'
    relaxed, found = settings_file.without_trailing_commas(text)
    assert json.loads(relaxed) == {"a": "x,]", "b": [1, 2], "c": 'q",}'}
    assert len(found) == 2


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_windows_encodings(tmp_path: Path, encoding: str) -> None:
    """Files saved by Windows tools (UTF-8 with BOM, UTF-16 with BOM) are read."""
    path = tmp_path / "settings.json"
    path.write_bytes(json.dumps(PUBLIC).encode(encoding))
    assert settings_file.load(str(path)).raw == PUBLIC


def test_protected_values_never_appear_in_problems(transport: Transport) -> None:
    """Invalid protected values are reported by path only."""
    protected = {"authenticationSettings": {"msiClientId": SECRET, "msiEndpoint": SECRET},
                 "secretsManagementSettings": {"requireInitialSync": SECRET}}
    path = write_settings(transport.lib, {"publicSettings": PUBLIC,
                                          **protected_settings(transport, protected)}, seq=12)
    with pytest.raises(SettingsError) as caught:
        parse(settings_file.load(str(path)).raw)
    assert len(caught.value.problems) == 3
    assert SECRET not in str(caught.value)


def test_no_file_is_left_behind(transport: Transport) -> None:
    """Decrypting writes nothing next to the settings or the transport pair."""
    path = write_settings(transport.lib, {"publicSettings": None,
                                          **protected_settings(transport, PUBLIC)}, seq=13)
    before = sorted(os.listdir(transport.lib)) + sorted(os.listdir(path.parent))
    settings_file.load(str(path))
    assert sorted(os.listdir(transport.lib)) + sorted(os.listdir(path.parent)) == before
