"""The IMDS / Arc stand-in as azure-identity's ManagedIdentityCredential (and MSAL) see it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import requests
from azure.identity import CredentialUnavailableError, ManagedIdentityCredential

from tests.standins.imds import ARC_KEY_DIR, SYSTEM_CLIENT_ID, TOKEN_PATH, ImdsStandin

VAULT = "https://vault.azure.net/.default"
USER_ID = "0f8c3a52-7e7d-4c1b-9a43-2d5b7f0e9c11"


def _raw(imds: ImdsStandin, headers: dict[str, str] | None = None,
         **params: str) -> requests.Response:
    query = {"api-version": "2018-02-01", "resource": "https://vault.azure.net", **params}
    return requests.get(imds.url + TOKEN_PATH, params=query,
                        headers={"Metadata": "true"} if headers is None else headers)


def test_credential_gets_a_token_from_the_standin(azure_env: dict[str, str],
                                                  imds: ImdsStandin) -> None:
    """ManagedIdentityCredential, pointed by AZURE_POD_IDENTITY_AUTHORITY_HOST, gets our token."""
    token = ManagedIdentityCredential().get_token(VAULT)
    assert imds.token_issued(token.token) and imds.token_requests == 1
    assert imds.issued_tokens[0].resource == "https://vault.azure.net"
    assert imds.issued_tokens[0].client_id == SYSTEM_CLIENT_ID
    assert abs(token.expires_on - (time.time() + 86399)) < 60


def test_missing_metadata_header_is_400(imds: ImdsStandin) -> None:
    """Without `Metadata: true` IMDS refuses with its invalid_request body."""
    reply = _raw(imds, headers={})
    assert reply.status_code == 400
    assert reply.json() == {"error": "invalid_request",
                            "error_description": "Required metadata header not specified"}
    assert not imds.issued_tokens


def test_token_json_has_string_numbers_and_echoes_client_id(imds: ImdsStandin) -> None:
    """Numbers are strings, as IMDS writes them, and the requested client_id is echoed."""
    imds.add_identity(USER_ID)
    body = _raw(imds, client_id=USER_ID).json()
    assert body["client_id"] == USER_ID and body["token_type"] == "Bearer"
    for key in ("expires_in", "expires_on", "ext_expires_in", "not_before"):
        assert isinstance(body[key], str) and body[key].isdigit()
    assert body["expires_in"] == "86399"


def test_unknown_client_id_is_identity_not_found(azure_env: dict[str, str],
                                                 imds: ImdsStandin) -> None:
    """A client id the 'VM' does not have is 400 Identity not found, unavailable to the SDK."""
    assert _raw(imds, client_id="11111111-2222-3333-4444-555555555555").status_code == 400
    with pytest.raises(CredentialUnavailableError, match="Identity not found"):
        ManagedIdentityCredential(client_id="11111111-2222-3333-4444-555555555555").get_token(VAULT)


def test_user_assigned_identity_by_client_id(azure_env: dict[str, str], imds: ImdsStandin) -> None:
    """A known user-assigned identity gets a token issued for its own client id."""
    imds.add_identity(USER_ID)
    token = ManagedIdentityCredential(client_id=USER_ID).get_token(VAULT)
    assert imds.issued_tokens[-1].token == token.token
    assert imds.issued_tokens[-1].client_id == USER_ID


@pytest.mark.parametrize("status", [404, 410, 429, 500, 503])
def test_scripted_fault_is_retried_by_azure_identity(azure_env: dict[str, str],
                                                     imds: ImdsStandin, status: int) -> None:
    """One 404/410/429/5xx is retried by azure-identity's IMDS policy and the token arrives."""
    imds.fault(status, times=1)
    ManagedIdentityCredential(retry_backoff_factor=0.01).get_token(VAULT)
    assert [s for _, s in imds.requests] == [status, 200]


def test_msal_caches_a_5xx_for_five_seconds(azure_env: dict[str, str], imds: ImdsStandin) -> None:
    """After a final 503, MSAL answers the next request from its error cache, not from IMDS."""
    imds.fault(503, times=1)
    credential = ManagedIdentityCredential(retry_total=0)
    for _ in range(2):
        with pytest.raises(CredentialUnavailableError, match="service_unavailable"):
            credential.get_token(VAULT)
    assert imds.token_requests == 1


def test_arc_challenge_writes_a_key_and_requires_it(tmp_path: Path) -> None:
    """Arc mode answers 401 Basic realm=<key file>; the file's content then unlocks a token."""
    with ImdsStandin(mode="arc", key_dir=str(tmp_path / "tokens")) as arc:
        first = _raw(arc)
        realm = first.headers["WWW-Authenticate"]
        assert first.status_code == 401 and realm.startswith("Basic realm=")
        key_file = Path(realm.split("=", 1)[1])
        assert key_file.parent == tmp_path / "tokens" and key_file.suffix == ".key"
        wrong = {"Metadata": "true", "Authorization": "Basic wrong"}
        assert _raw(arc, headers=wrong).status_code == 401
        headers = {"Metadata": "true", "Authorization": f"Basic {key_file.read_text()}"}
        assert arc.token_issued(_raw(arc, headers=headers).json()["access_token"])
    assert not key_file.exists() and not (tmp_path / "tokens").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason=f"Arc keys must live in {ARC_KEY_DIR} (root only)")
def test_arc_flow_with_the_real_credential(monkeypatch: pytest.MonkeyPatch) -> None:
    """ManagedIdentityCredential in Arc mode follows the challenge, reads the key, gets a token."""
    existed = Path(ARC_KEY_DIR).exists()
    with ImdsStandin(mode="arc") as arc:
        monkeypatch.setenv("IDENTITY_ENDPOINT", arc.token_url)
        monkeypatch.setenv("IMDS_ENDPOINT", arc.url)
        token = ManagedIdentityCredential().get_token(VAULT)
        assert arc.token_issued(token.token)
        assert [s for _, s in arc.requests] == [401, 200]
        key_files = arc.key_files
    assert key_files and not any(f.exists() for f in key_files)
    assert Path(ARC_KEY_DIR).exists() == existed
