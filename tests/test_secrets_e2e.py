"""Protected settings and private keys never leak: the real zip under the real agent code with a
distinctive secret in protected settings, then every file the agent and the extension wrote and
everything printed is searched for it (SPEC 3.3: never log protected values)."""
from __future__ import annotations

import os
import signal
import stat
import uuid
from pathlib import Path

import pytest

from handler import supervisor
from tests.standins.certfactory import make_chain
from tests.test_agent_e2e import NAME, Deployment, our_services

SECRET = f"S3cr3t-{uuid.uuid4().hex}"


@pytest.fixture
def vm(tmp_path, kv, imds):
    """A deployment (tests/test_agent_e2e.py) whose vault holds one certificate; no service
    outlives the test."""
    made = Deployment(tmp_path, kv, imds)
    kv.add_certificate("web", make_chain())
    yield made
    spec = supervisor.ServiceSpec(str(made.runner.lib_dir), str(made.state), str(tmp_path))
    supervisor.Daemon().stop(spec)
    for pid in our_services(str(tmp_path)):
        os.kill(pid, signal.SIGKILL)


def protected_settings(vm: Deployment, **secrets_management: object) -> tuple[dict, dict]:
    """Public and protected halves: the whole authenticationSettings and secret-looking unknown
    keys go to protected, each holding SECRET."""
    public = vm.settings(["web"])
    authentication = {**public.pop("authenticationSettings"), "clientSecret": SECRET}
    return public, {"authenticationSettings": authentication,
                    "secretsManagementSettings": {"sasToken": SECRET, **secrets_management}}


def files_containing(root: Path, needles: list[bytes]) -> set[str]:
    """Every file under `root` (relative path) holding any of `needles`."""
    hits = set()
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if any(needle in data for needle in needles):
                hits.add(str(path.relative_to(root)))
    return hits


def key_body_lines(pem: bytes) -> list[bytes]:
    """The base64 lines of every private-key block in a PEM bundle."""
    lines, inside = [], False
    for line in pem.splitlines():
        if line.startswith(b"-----"):
            inside = line.startswith(b"-----BEGIN") and b"PRIVATE KEY" in line
        elif inside and len(line) > 20:
            lines.append(line)
    return lines


def test_protected_values_and_private_keys_never_leak(vm, tmp_path, capfd):
    """Valid and invalid protected settings: the secret is only in the 0600 config.json of the
    0700 state dir; no log, status file, agent file or output holds it or the private key."""
    public, protected = protected_settings(vm)
    handler = vm.deploy(public, protected=protected).handler(NAME)
    assert (handler.extension.status, handler.status) == ("success", "Ready")
    (pid,) = vm.pids()
    for part in ("cmdline", "environ"):
        assert SECRET.encode() not in Path(f"/proc/{pid}/{part}").read_bytes()

    public, protected = protected_settings(vm, pollingIntervalInS=SECRET)
    handler = vm.deploy(public, protected=protected).handler(NAME)
    assert handler.extension.status == "error"
    assert "pollingIntervalInS" in handler.extension.message
    assert SECRET not in handler.extension.message
    assert vm.pids() == [pid]  # the last good config keeps running

    root = vm.runner.root
    config = vm.state / "config.json"
    assert files_containing(root, [SECRET.encode()]) == {str(config.relative_to(root))}
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stat.S_IMODE(vm.state.stat().st_mode) == 0o700
    key_lines = key_body_lines((vm.store / "localhost.web").read_bytes())
    assert len(key_lines) > 5
    assert files_containing(root, key_lines) == set()
    logs = {p.name for p in vm.runner.ext_log_dir(NAME).iterdir()}
    assert {"extension.log", "akvvm_service.log"} <= logs  # the scan did read the logs
    printed = "".join(capfd.readouterr()).encode()
    assert SECRET.encode() not in printed
    assert not [line for line in key_lines if line in printed]
