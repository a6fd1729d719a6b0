"""The fake waagent tree both lifecycle test modules run the handler in.

The supervisor is the real daemon path; bin/akvvm is a stand-in that behaves like the service
towards it (pidfile, SIGHUP, SIGTERM), so these tests need no Key Vault.
"""
from __future__ import annotations

import json
import os
import signal
import sys

from handler import supervisor
from handler.environment import EXTENSION_NAME
from handler.main import main
from tests.test_supervisor import FAKE_SERVICE

GOOD = {"secretsManagementSettings": {
    "pollingIntervalInS": "3600", "certificateStoreLocation": "/tmp/akvvm-lifecycle-store",
    "observedCertificates": ["https://localhost:8443/secrets/web"],
    "additionalVaultDnsSuffixes": ["localhost"]},
    "authenticationSettings": {"msiEndpoint": "http://127.0.0.1:9/metadata/identity"}}


class Tree:
    """A fake /var/lib/waagent with one extension version laid out as the agent does."""

    def __init__(self, root: str, version: str = "3.1.0") -> None:
        self.lib = os.path.join(root, "waagent")
        self.logs = os.path.join(root, "log")
        self.ext = self.version_dir(version)
        self.state = os.path.join(self.lib, f"{EXTENSION_NAME}.State")
        self.environ = {"AZURE_GUEST_AGENT_EXTENSION_PATH": self.ext,
                        "AKVVM_SUPERVISOR": "daemon", "PATH": os.environ["PATH"]}

    def version_dir(self, version: str) -> str:
        ext = os.path.join(self.lib, f"{EXTENSION_NAME}-{version}")
        for sub in ("config", "status", "bin"):
            os.makedirs(os.path.join(ext, sub), exist_ok=True)
        launcher = os.path.join(ext, "bin", "akvvm")
        with open(launcher, "w") as handle:
            handle.write(FAKE_SERVICE.format(python=sys.executable))
        os.chmod(launcher, 0o755)
        folders = {"logFolder": self.logs, "configFolder": os.path.join(ext, "config"),
                   "statusFolder": os.path.join(ext, "status"),
                   "heartbeatFile": os.path.join(ext, "heartbeat.log")}
        with open(os.path.join(ext, "HandlerEnvironment.json"), "w") as handle:
            json.dump([{"name": EXTENSION_NAME, "version": 1.0,
                        "handlerEnvironment": folders}], handle)
        return ext

    def settings(self, seq: int, public: object, raw: str | None = None) -> None:
        body = raw if raw is not None else json.dumps({"runtimeSettings": [{"handlerSettings": {
            "publicSettings": public}}]})
        with open(os.path.join(self.ext, "config", f"{seq}.settings"), "w") as handle:
            handle.write(body)

    def run(self, operation: str, seq: int) -> int:
        return main([operation], {**self.environ, "ConfigSequenceNumber": str(seq)})

    def status(self, seq: int) -> dict:
        with open(os.path.join(self.ext, "status", f"{seq}.status")) as handle:
            return json.load(handle)[0]["status"]

    def config(self) -> dict:
        with open(os.path.join(self.state, "config.json")) as handle:
            return json.load(handle)

    @property
    def spec(self) -> supervisor.ServiceSpec:
        return supervisor.ServiceSpec(self.ext, self.state, self.logs)

    def pid(self) -> int | None:
        return supervisor.Daemon().pid(self.spec)


def kill_services(tree: Tree) -> None:
    """SIGKILL every process whose command line names the tree's state dir."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and tree.state in " ".join(supervisor.cmdline(int(entry))):
            os.kill(int(entry), signal.SIGKILL)
