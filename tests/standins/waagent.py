"""A waagent stand-in: the REAL WALinuxAgent code drives extension packages in a temp dir.

Agent: WALinuxAgent 2.7.3.0 (see `agentcode`). Real agent code does the work:
`ExtensionsGoalStateFromExtensionsConfig` parses the goal state (ExtensionsConfig XML built in
`goalstate`); `ExtHandlersHandler.run()` picks the version from the real `ExtensionManifest`,
downloads and unzips the package, writes HandlerManifest.json, HandlerEnvironment.json and
`config/<seq>.settings`, orders extensions by dependency level and waits for each level's status,
runs every command through a shell in the extension dir with the agent's env vars and timeouts,
and upgrades (disable old, update new, uninstall old, install new, enable new);
`report_ext_handlers_status()` reads status files with `collect_ext_status`/`parse_ext_status`;
the real `StatusBlob` serialises the status blob that `run()` hands back as an `AgentReport`.

    runner = WaagentRunner(tmp_path)      # a fake /var/lib/waagent and /var/log/azure in tmp_path
    runner.add_package(zip_path, name="Microsoft.Azure.KeyVault.KeyVaultForLinux", version="3.1.0")
    runner.set_goal_state([ExtensionSpec(name, "3.1.0", public={...}, protected={...})])
    report = runner.run()                 # one agent pass: process a new goal state, report
    report = runner.run_until(lambda r: r.handler(name).terminal, timeout=30)
    report.handler(name).status           # "Ready"/"NotReady"; .extension.status, .substatus ...

Packages, as 2.7.3 finds them: `download()` uses `<lib>/<Name>__<version>.zip` if it exists,
else fetches each package URI of the manifest to that path, then unzips into
`<lib>/<Name>-<version>/`; removing a handler deletes both. `add_package` publishes a zip to the
fake blob store `<root>/blobs`, so the agent's download path runs for real (`goalstate.FakeWire`
says what else is faked). cgroups are off (CGroups.Enabled=n and the configurator uninitialised,
as on a VM without cgroup support), so commands run through the agent's own
Popen(shell=True, cwd=<ext dir>, setsid) path. For speed, sleeps inside the agent's exthandlers
module (5 s dependency polling, 2 s status-file retries) are multiplied by `poll_scale`, and the
agent's one-second command polling returns as soon as the command's process has exited, so
command timeouts stay in real seconds. `goal_state_timeout` (default: the agent's 90 minutes)
bounds how long one pass waits for a dependency to reach success or error. `env` is merged into
os.environ during a pass (the agent hands os.environ to commands). The agent's state is global:
one pass at a time per process.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.standins.agentcode import (
    AGENT_CONF,
    AGENT_PY,
    AGENT_VERSION,
    configure_agent,
    load_agent,
    merged_environ,
    patched_clocks,
)
from tests.standins.goalstate import (
    ExtensionSpec,
    FakeWire,
    decrypt_settings,
    encrypt_settings,
    file_uri,
    goal_state_xml,
    make_transport_certificate,
    manifest_xml,
    runtime_settings,
)
from tests.standins.statusblob import (
    TERMINAL,
    AgentReport,
    ExtensionView,
    HandlerView,
    SubstatusView,
)

__all__ = ["AGENT_CONF", "AGENT_PY", "AGENT_VERSION", "TERMINAL", "AgentReport", "ExtensionSpec",
           "ExtensionView", "HandlerView", "SubstatusView", "WaagentRunner", "goal_state_xml",
           "load_agent", "make_transport_certificate", "manifest_xml"]


class WaagentRunner:
    """Drives extension packages through the real agent; see the module docstring."""

    def __init__(self, root: Path, *, env: Mapping[str, str] | None = None,
                 poll_scale: float = 0.02, goal_state_timeout: float = 90 * 60) -> None:
        self.agent = load_agent()
        self.agent_version: str = self.agent.version.AGENT_VERSION
        self.root = Path(root)
        self.lib_dir = self.root / "var/lib/waagent"
        self.log_dir = self.root / "var/log/azure"
        self.blob_dir = self.root / "blobs"
        self.agent_log = self.root / "var/log/waagent.log"
        for folder in (self.lib_dir, self.log_dir, self.blob_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.env = dict(env or {})
        self.poll_scale = poll_scale
        self.goal_state_timeout = goal_state_timeout
        self.thumbprint = make_transport_certificate(self.lib_dir)
        self._wire = FakeWire(self.agent)
        self._handler: Any = None
        self._processed: str | None = None
        self._packages: dict[str, dict[str, Path]] = {}
        self.last_report: AgentReport | None = None

    def add_package(self, zip_path: Path, name: str, version: str) -> None:
        """Publish a zip as `name` `version` (the manifest lists every version published)."""
        blob = self.blob_dir / f"{name}__{version}.zip"
        shutil.copyfile(zip_path, blob)
        self._packages.setdefault(name, {})[version] = blob
        (self.blob_dir / f"{name}_manifest.xml").write_text(manifest_xml(self._packages[name]))

    def set_goal_state(self, specs: Sequence[ExtensionSpec]) -> str:
        """Publish a new goal state (a new incarnation) for the next pass to process."""
        incarnation = str(int(self._wire.incarnation) + 1)
        handlers = [(spec, runtime_settings(spec, self.lib_dir, self.thumbprint),
                     file_uri(self.blob_dir / f"{spec.name}_manifest.xml")) for spec in specs]
        xml_text = goal_state_xml(incarnation, handlers)
        (self.root / f"ExtensionsConfig.{incarnation}.xml").write_text(xml_text)
        with self._activated():
            parse = self.agent.gs.ExtensionsGoalStateFromExtensionsConfig
            self._wire.extensions_goal_state = parse(incarnation, xml_text, None)
        self._wire.incarnation = incarnation
        return incarnation

    def run(self) -> AgentReport:
        """One pass of the agent's main loop: process a new goal state, then report status."""
        self._wire.status_blob_data = None
        with self._activated():
            if self._handler is None:
                self._handler = self.agent.exthandlers.ExtHandlersHandler(self._wire)
            changed = self._wire.incarnation != self._processed
            if changed and self._wire.extensions_goal_state is not None:
                self._handler.run()
            self._processed = self._wire.incarnation
            self._handler.report_ext_handlers_status(incarnation_changed=changed)
        if self._wire.status_blob_data is None:
            raise RuntimeError(f"the agent reported no status; see {self.agent_log}")
        self.last_report = AgentReport.from_blob(json.loads(self._wire.status_blob_data))
        return self.last_report

    def restart_agent(self) -> None:
        """As if waagent restarted: the next pass processes the current goal state again
        (for an enabled handler that means enable runs again, without install)."""
        self._handler = None
        self._processed = None

    def run_until(self, predicate: Callable[[AgentReport], bool], timeout: float = 30.0,
                  interval: float = 0.1) -> AgentReport:
        """Repeat passes until `predicate(report)` holds; raise TimeoutError with the last one."""
        deadline = time.monotonic() + timeout
        while True:
            report = self.run()
            with contextlib.suppress(KeyError):
                if predicate(report):
                    return report
            if time.monotonic() > deadline:
                raise TimeoutError(f"agent report never matched in {timeout}s: {report.handlers}")
            time.sleep(interval)

    def status(self, name: str) -> HandlerView:
        """The agent's current view of one handler (a status-only pass when nothing is new)."""
        return self.run().handler(name)

    def ext_dir(self, name: str, version: str) -> Path:
        return self.lib_dir / f"{name}-{version}"

    def ext_log_dir(self, name: str) -> Path:
        return self.log_dir / name

    def encrypt(self, settings: Mapping[str, Any], cipher: str = "des3") -> str:
        """Protected settings as Azure sends them: base64 DER CMS to `<lib>/<thumbprint>.crt`."""
        return encrypt_settings(settings, self.lib_dir / f"{self.thumbprint}.crt", cipher)

    def decrypt(self, protected: str) -> Any:
        """Undo `encrypt` with `<lib>/<thumbprint>.prv` (what the extension must do)."""
        return decrypt_settings(protected, self.lib_dir / f"{self.thumbprint}.crt",
                                self.lib_dir / f"{self.thumbprint}.prv")

    @contextlib.contextmanager
    def _activated(self) -> Iterator[None]:
        """Point the agent's global state (conf, logger, events, clocks, env) at this runner."""
        configure_agent(self.agent, self.lib_dir, self.log_dir, self.agent_log)
        with (patched_clocks(self.agent, self.poll_scale, self.goal_state_timeout),
              merged_environ(self.env)):
            yield
