"""The sync pass the service runs for its whole life: listings instead of GETs, grants recorded."""
from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from akvvm_ext.model import Outcome
from akvvm_ext.settings import parse
from handler import service_main
from tests.standins.certfactory import make_chain
from tests.standins.imds import ImdsStandin
from tests.standins.keyvault import KeyVaultStandin


def test_service_sync_lists_a_settled_vault_instead_of_one_get_per_certificate(
        azure_env: dict[str, str], imds: ImdsStandin, tmp_path: Path) -> None:
    """The service keeps one change detector across cycles: once its certificates are settled,
    an idle cycle costs one listing page, not six GETs, and a rotation still installs."""
    hour_ago = [time.time() - 3600]
    with KeyVaultStandin(accept_token=imds.token_issued, clock=lambda: hour_ago[0]) as kv:
        names = [f"c{i}" for i in range(6)]
        for name in names:
            kv.add_certificate(name, make_chain())
        settings = parse({
            "secretsManagementSettings": {
                "observedCertificates": [kv.secret_id(n) for n in names],
                "certificateStoreLocation": str(tmp_path / "store"),
                "additionalVaultDnsSuffixes": ["localhost"]},
            "authenticationSettings": {"msiEndpoint": f"{imds.url}/metadata/identity"}})
        sync_pass = service_main._sync_pass(str(tmp_path))
        clients = service_main.Clients(settings, 1.0)
        try:
            sync_pass(settings, clients, datetime.now(timezone.utc))
            kv.reset_counters()
            idle = sync_pass(settings, clients, datetime.now(timezone.utc))
            assert {r.outcome for r in idle} == {Outcome.UNCHANGED}
            assert kv.requests == [("GET", "/secrets", 200)]
            hour_ago[0] = time.time()
            new = kv.add_certificate("c2", make_chain())
            rotated = sync_pass(settings, clients, datetime.now(timezone.utc))
        finally:
            clients.close()
    assert rotated[2].outcome is Outcome.INSTALLED and rotated[2].version == new
    assert (tmp_path / "store" / "localhost.c2").resolve().name == f"localhost.c2.{new}"
