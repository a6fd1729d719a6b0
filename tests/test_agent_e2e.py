"""The real zip under the real guest-agent code (WaagentRunner), against the local stand-ins.

Commands run with PATH=/usr/bin:/bin: the system python3 and the zip's vendored dependencies,
as on a VM. The service runs as the detached daemon (AKVVM_SUPERVISOR=daemon: never a unit on
the test machine). After each test no service process of ours may be left.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from handler import supervisor
from tests.standins.certfactory import PEM, make_chain
from tests.standins.package import zip_testpkg
from tests.standins.waagent import ExtensionSpec, WaagentRunner
from tests.test_zip import ISOLATED_PATH, built_zip

NAME = "Microsoft.Azure.KeyVault.KeyVaultForLinux"
STATE = f"{NAME}.State"
DEPENDENT = "Test.Standin.Dependent"
def commands_of(runner: WaagentRunner, name: str) -> list[list[str]]:
    """The test extension's `ops.log`: one [op, version, ..., at=<epoch>] per command."""
    log = runner.ext_log_dir(name) / "ops.log"
    return [line.split() for line in log.read_text().splitlines()]


def our_services(marker: str) -> list[int]:
    """Pids of live service processes whose command line mentions `marker` (a tmp path)."""
    found = []
    for entry in os.listdir("/proc"):
        argv = supervisor.cmdline(int(entry)) if entry.isdigit() else []
        if "service" in argv and any(marker in arg for arg in argv):
            found.append(int(entry))
    return found


@pytest.fixture(autouse=True)
def no_daemon_outlives_its_test(tmp_path):
    """Process-level check: after the test no service started under tmp_path is alive."""
    yield
    left = our_services(str(tmp_path))
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == [], f"service processes outlived the test: {left}"


class Deployment:
    """A fake VM (WaagentRunner) with the stand-ins, our zip(s) published, helpers to look."""

    def __init__(self, root: Path, kv, imds) -> None:
        self.kv, self.imds = kv, imds
        self.store = root / "store"
        self.runner = WaagentRunner(root / "vm", env={
            "PATH": ISOLATED_PATH, "AKVVM_SUPERVISOR": "daemon", "AKVVM_BACKOFF_SCALE": "0.002",
            "REQUESTS_CA_BUNDLE": kv.ca_path, "NO_PROXY": "127.0.0.1,localhost"})
        self.runner.add_package(Path(built_zip()), name=NAME, version="3.1.0")
        self.state = self.runner.lib_dir / STATE
        self.seq = 0

    def settings(self, names, **extra) -> dict:
        sms = {"pollingIntervalInS": "3600", "requireInitialSync": True,
               "certificateStoreLocation": str(self.store),
               "observedCertificates": [f"{self.kv.url}/secrets/{n}" for n in names],
               "additionalVaultDnsSuffixes": ["localhost"], **extra}
        return {"secretsManagementSettings": sms,
                "authenticationSettings": {"msiEndpoint": f"{self.imds.url}/metadata/identity"}}

    def deploy(self, public, version: str = "3.1.0", state: str = "enabled", extra=(),
               protected=None):
        """A new goal state (next seq); one agent pass, then passes until a terminal status."""
        self.seq += 1
        self.runner.set_goal_state([ExtensionSpec(NAME, version, state=state, seq=self.seq,
                                                  public=public, protected=protected), *extra])
        self.runner.run()
        if state != "enabled":
            return None
        return self.runner.run_until(lambda r: r.handler(NAME).terminal, timeout=60)

    def pids(self) -> list[int]:
        return our_services(str(self.state))

    def link(self, name: str) -> str:
        return os.readlink(self.store / f"localhost.{name}")

    def config(self) -> dict:
        return json.loads((self.state / "config.json").read_text())


@pytest.fixture
def vm(tmp_path, kv, imds):
    """A deployment whose vault holds three certificates: PFX (RSA), PEM (RSA), PFX (EC)."""
    made = Deployment(tmp_path, kv, imds)
    kv.add_certificate("web", make_chain())
    kv.add_certificate("api", make_chain(cn="api.example.test"), content_type=PEM)
    kv.add_certificate("mail", make_chain(key_type="ec", cn="mail.example.test"))
    yield made
    spec = supervisor.ServiceSpec(str(made.runner.lib_dir), str(made.state), str(tmp_path))
    supervisor.Daemon().stop(spec)  # what the agent's disable would do; by pid, checked


def test_install_enable_three_certificates_reports_success(vm):
    """The agent parses a success status with one substatus per certificate; handler Ready."""
    handler = vm.deploy(vm.settings(["web", "api", "mail"])).handler(NAME)
    assert handler.status == "Ready"
    assert handler.extension.status == "success"
    assert handler.extension.message.startswith("Successfully started Key Vault extension service")
    assert sorted(s.status for s in handler.extension.substatus) == ["success"] * 3
    for name in ("web", "api", "mail"):
        assert vm.link(name) == f"localhost.{name}.{vm.kv.versions(name)[-1]}"
        assert b"PRIVATE KEY" in (vm.store / f"localhost.{name}").read_bytes()
    assert len(vm.pids()) == 1


def test_the_service_restarts_only_when_the_settings_change(vm):
    """Same settings in a new goal state: same pid, success for the new seq. Changed settings:
    exactly one new service process, running the new config."""
    vm.deploy(vm.settings(["web"]))
    (first,) = vm.pids()
    handler = vm.deploy(vm.settings(["web"])).handler(NAME)
    assert (handler.extension.seq, handler.extension.status) == (2, "success")
    assert vm.pids() == [first]
    handler = vm.deploy(vm.settings(["web", "api"])).handler(NAME)
    assert (handler.extension.seq, handler.extension.status) == (3, "success")
    (second,) = vm.pids()
    assert second != first
    assert vm.config()["seq"] == 3
    assert vm.link("api").startswith("localhost.api.")


def test_upgrade_keeps_certificates_and_runs_the_service_from_the_new_version(vm):
    """3.1.0 -> 3.1.1: files untouched, old dir gone, one service started from the new dir."""
    vm.runner.add_package(Path(built_zip("3.1.1", local_only=True)), name=NAME, version="3.1.1")
    vm.deploy(vm.settings(["web", "api"]))
    files = {p.name: (p.lstat().st_ino, p.lstat().st_mtime_ns) for p in vm.store.iterdir()}
    handler = vm.deploy(vm.settings(["web", "api"]), version="3.1.1").handler(NAME)
    assert (handler.version, handler.status, handler.extension.status) == (
        "3.1.1", "Ready", "success")
    assert {p.name: (p.lstat().st_ino, p.lstat().st_mtime_ns)
            for p in vm.store.iterdir()} == files
    new_dir = vm.runner.ext_dir(NAME, "3.1.1")
    assert not vm.runner.ext_dir(NAME, "3.1.0").exists()
    (pid,) = vm.pids()
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    pythonpath = next(e for e in environ if e.startswith(b"PYTHONPATH="))
    assert pythonpath.startswith(f"PYTHONPATH={new_dir}:".encode())
    assert vm.config()["extensionPath"] == str(new_dir)


def test_uninstall_stops_the_service_and_keeps_certificates(vm):
    """Uninstall: no service, no state dir, no extension dir; the certificates stay."""
    vm.deploy(vm.settings(["web"]))
    served = (vm.store / "localhost.web").read_bytes()
    vm.deploy(vm.settings(["web"]), state="uninstall")
    assert vm.pids() == []
    assert not vm.state.exists()
    assert not vm.runner.ext_dir(NAME, "3.1.0").exists()
    assert (vm.store / "localhost.web").read_bytes() == served


def test_require_initial_sync_holds_the_dependent_extension(vm, tmp_path):
    """With requireInitialSync, a dependent extension starts only after the certificate is in."""
    vm.runner.add_package(zip_testpkg(tmp_path / "dependent.zip"), name=DEPENDENT, version="1.0.0")
    vm.kv.fault("web", "forbidden", times=3)
    dependent = ExtensionSpec(DEPENDENT, "1.0.0", dependency_level=1)
    report = vm.deploy(vm.settings(["web"]), extra=[dependent])
    report = vm.runner.run_until(lambda r: r.handler(DEPENDENT).terminal, timeout=60)
    assert report.handler(NAME).extension.status == "success"
    assert report.handler(DEPENDENT).extension.status == "success"
    installed_at = (vm.store / f"localhost.web.{vm.kv.versions('web')[-1]}").stat().st_mtime
    dependent_install = commands_of(vm.runner, DEPENDENT)[0]
    assert dependent_install[0] == "install"
    assert float(dependent_install[-1][3:]) >= installed_at
    assert vm.kv.count("web", status=403) == 3


def test_invalid_settings_report_the_reason(vm):
    """Invalid settings: the agent reports our error status naming the setting and the fix."""
    bad = vm.settings(["web"])
    bad["secretsManagementSettings"]["observedCertificates"] = [
        "https://myvault.vault.azure.net/certificates/web"]
    handler = vm.deploy(bad).handler(NAME)
    assert handler.extension.status == "error"
    assert "observedCertificates[0]" in handler.extension.message
    assert "https://myvault.vault.azure.net/secrets/web" in handler.extension.message
    assert vm.pids() == []
