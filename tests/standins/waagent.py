"""A waagent stand-in: the REAL WALinuxAgent code drives extension packages in a temp dir.

Agent: WALinuxAgent 2.7.3.0, the Debian 12 package `waagent`, unpacked by `make waagent` into
tests/.cache/waagent/root (it needs the `distro` module, as the package does). Real agent code
does the work: `ExtensionsGoalStateFromExtensionsConfig` parses the goal state (ExtensionsConfig
XML built here); `ExtHandlersHandler.run()` picks the version from the real `ExtensionManifest`,
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
fake blob store, so the agent's download path runs for real.

Faked, and why (no Azure here): the wire server and blob storage (`_FakeWire`) serve the goal
state, manifests and zips from `<root>/blobs` (a download is a file copy), keep the status blob
instead of uploading it, and give 127.0.0.1 as the wire address. The certificate Azure would
deliver is made here as `<lib>/<THUMBPRINT>.crt/.prv`; protected settings are encrypted to it with
`openssl cms` (3DES as Azure does, or AES-256). cgroups are off (CGroups.Enabled=n and the
configurator uninitialised, as on a VM without cgroup support), so commands run through the
agent's own Popen(shell=True, cwd=<ext dir>, setsid) path. For speed, sleeps inside the agent's
exthandlers module (5 s dependency polling, 2 s status-file retries) are multiplied by
`poll_scale`, and the agent's one-second command polling returns as soon as the command's process
has exited, so command timeouts stay in real seconds. `goal_state_timeout` (default: the agent's
90 minutes) bounds how long one pass waits for a dependency to reach success or error. `env` is
merged into os.environ during a pass (the agent hands os.environ to commands). The agent's state
is global: one pass at a time per process.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from cryptography import x509
from cryptography.hazmat.primitives import hashes

AGENT_PY = Path(__file__).resolve().parents[1] / ".cache/waagent/root/usr/lib/python3/dist-packages"
AGENT_CONF = AGENT_PY.parents[3] / "etc/waagent.conf"
AGENT_VERSION = "2.7.3.0"
TERMINAL = ("success", "error")


def load_agent() -> SimpleNamespace:
    """Import the real agent's modules (the unpacked Debian package) or say how to get them."""
    if not (AGENT_PY / "azurelinuxagent").is_dir():
        raise RuntimeError(f"WALinuxAgent not unpacked at {AGENT_PY}: run `make waagent`")
    for module, hint in (("distro", "pip install distro"),
                         ("distutils.version", "Python >= 3.12: pip install setuptools")):
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise RuntimeError(f"WALinuxAgent {AGENT_VERSION} imports {module}: {hint}") from error
    if str(AGENT_PY) not in sys.path:
        sys.path.append(str(AGENT_PY))
    names = {"conf": "common.conf", "logger": "common.logger", "event": "common.event",
             "exthandlers": "ga.exthandlers", "wire": "common.protocol.wire",
             "processutil": "common.utils.extensionprocessutil",
             "cgroups": "common.cgroupconfigurator", "exception": "common.exception",
             "version": "common.version",
             "gs": "common.protocol.extensions_goal_state_from_extensions_config"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # distutils, crypt: agent's imports
        return SimpleNamespace(**{key: importlib.import_module(f"azurelinuxagent.{module}")
                                  for key, module in names.items()})


@dataclass(frozen=True)
class ExtensionSpec:
    """One extension in a goal state. settings=False: no runtime settings (agent writes an
    empty 0.settings); raw_settings replaces the RuntimeSettings JSON text verbatim."""

    name: str
    version: str
    state: str = "enabled"  # enabled | disabled | uninstall
    seq: int = 0
    public: Mapping[str, Any] | None = None
    protected: Mapping[str, Any] | None = None
    dependency_level: int = 0
    cipher: str = "des3"  # des3 (what Azure uses) | aes256
    settings: bool = True
    raw_settings: str | None = None


@dataclass(frozen=True)
class SubstatusView:
    name: str | None
    status: str
    code: int
    message: str | None


@dataclass(frozen=True)
class ExtensionView:
    """The extension's status as the agent parsed it from `status/<seq>.status`."""

    name: str
    seq: int
    status: str
    code: int
    message: str | None
    operation: str | None
    substatus: tuple[SubstatusView, ...]


@dataclass(frozen=True)
class HandlerView:
    """One handler in the status blob: Ready/NotReady plus the extension status, if any."""

    name: str
    version: str
    status: str
    code: int
    message: str | None
    extension: ExtensionView | None

    @property
    def terminal(self) -> bool:
        return self.extension is not None and self.extension.status in TERMINAL


@dataclass(frozen=True)
class AgentReport:
    """The status blob the agent would upload to Azure, parsed; `blob` is the raw JSON."""

    handlers: tuple[HandlerView, ...]
    goal_state_status: str | None
    blob: Mapping[str, Any]

    def handler(self, name: str) -> HandlerView:
        for handler in self.handlers:
            if handler.name == name:
                return handler
        raise KeyError(f"no status for {name}; reported: {[h.name for h in self.handlers]}")

    @property
    def converged(self) -> bool:
        """Every handler settled, by the rule of the agent's ExtensionsSummary (ga/update.py)."""
        settled = (*TERMINAL, "Ready", "NotReady")
        return all((h.extension.status if h.extension else h.status) in settled
                   for h in self.handlers)

    @classmethod
    def from_blob(cls, blob: Mapping[str, Any]) -> AgentReport:
        aggregate = blob["aggregateStatus"]
        gs = aggregate.get("vmArtifactsAggregateStatus", {}).get("goalStateAggregateStatus")
        handlers = tuple(_handler_view(h) for h in aggregate["handlerAggregateStatus"])
        return cls(handlers, gs["status"] if gs else None, blob)


def _message(node: Mapping[str, Any]) -> str | None:
    formatted = node.get("formattedMessage")
    return None if formatted is None else formatted.get("message")


def _handler_view(node: Mapping[str, Any]) -> HandlerView:
    runtime = node.get("runtimeSettingsStatus")
    extension = None
    if runtime is not None:
        status = runtime["settingsStatus"]["status"]
        subs = tuple(SubstatusView(s.get("name"), s["status"], s.get("code", 0), _message(s))
                     for s in status.get("substatus", []))
        extension = ExtensionView(status["name"], int(runtime["sequenceNumber"]), status["status"],
                                  status.get("code", 0), _message(status), status.get("operation"),
                                  subs)
    return HandlerView(node["handlerName"], node["handlerVersion"], node["status"],
                       node.get("code", 0), _message(node), extension)


def _file_uri(path: Path) -> str:
    return "file://" + str(path)


def _local_path(uri: str) -> Path:
    if not uri.startswith("file://"):
        raise ValueError(f"the fake wire serves only file:// URIs, not {uri}")
    return Path(uri[len("file://"):])


class _FakeWire:
    """Stands in for the agent's WireProtocol and WireClient (`protocol.client` is itself)."""

    def __init__(self, agent: SimpleNamespace) -> None:
        self.agent = agent
        self.client = self
        self.incarnation = "0"
        self.extensions_goal_state: Any = None
        self.status_blob_data: str | None = None

    def get_goal_state(self) -> SimpleNamespace:
        return SimpleNamespace(incarnation=self.incarnation)

    def get_extensions_goal_state(self) -> Any:
        return self.extensions_goal_state

    def get_incarnation(self) -> str:
        return self.incarnation

    def get_endpoint(self) -> str:
        return "127.0.0.1"  # never the real wire server

    def get_ext_handler_pkgs(self, ext_handler: Any) -> Any:
        try:
            xml_text = _local_path(ext_handler.manifest_uris[0]).read_text()
            return self.agent.wire.ExtensionManifest(xml_text).pkg_list
        except Exception as error:  # as WireClient.get_ext_manifest reports it
            raise self.agent.exception.ExtensionDownloadError(
                f"Failed to retrieve extension manifest. Error: {error}") from error

    def download_ext_handler_pkg(self, uri: str, destination: str, *_: Any, **__: Any) -> bool:
        try:
            shutil.copyfile(_local_path(uri), destination)
        except (OSError, ValueError):
            return False
        return True

    def report_vm_status(self, vm_status: Any) -> None:
        blob = self.agent.wire.StatusBlob(None)
        blob.set_vm_status(vm_status)
        self.status_blob_data = blob.to_json()

    def get_status_blob_data(self) -> str | None:
        return self.status_blob_data


class _ScaledClock:
    """The `time` module as seen by the agent's exthandlers: sleeps shortened by `scale`."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds * self.scale)


class _CommandClock:
    """The `time` module as seen by the agent's command polling: a tick ends when the command
    has exited (the agent then reads its exit code), so timeouts keep counting real seconds."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                return
            time.sleep(0.01)


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
        self._wire = _FakeWire(self.agent)
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
        handlers = [(spec, self._runtime_settings(spec),
                     _file_uri(self.blob_dir / f"{spec.name}_manifest.xml")) for spec in specs]
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
        der = subprocess.run(
            ["openssl", "cms", "-encrypt", "-binary", "-outform", "DER", f"-{cipher}",
             str(self.lib_dir / f"{self.thumbprint}.crt")],
            input=json.dumps(dict(settings)).encode(), capture_output=True, check=True).stdout
        return base64.b64encode(der).decode()

    def decrypt(self, protected: str) -> Any:
        """Undo `encrypt` with `<lib>/<thumbprint>.prv` (what the extension must do)."""
        plain = subprocess.run(
            ["openssl", "cms", "-decrypt", "-inform", "DER",
             "-recip", str(self.lib_dir / f"{self.thumbprint}.crt"),
             "-inkey", str(self.lib_dir / f"{self.thumbprint}.prv")],
            input=base64.b64decode(protected), capture_output=True, check=True).stdout
        return json.loads(plain)

    def _runtime_settings(self, spec: ExtensionSpec) -> str | None:
        if spec.raw_settings is not None or not spec.settings:
            return spec.raw_settings
        public = dict(spec.public) if spec.public is not None else None
        handler: dict[str, Any] = {"publicSettings": public}
        if spec.protected is not None:
            handler["protectedSettings"] = self.encrypt(spec.protected, spec.cipher)
            handler["protectedSettingsCertThumbprint"] = self.thumbprint
        return json.dumps({"runtimeSettings": [{"handlerSettings": handler}]})

    @contextlib.contextmanager
    def _activated(self) -> Iterator[None]:
        """Point the agent's global state (conf, logger, events, clocks, env) at this runner."""
        self._configure_agent()
        agent, command_clock = self.agent, _CommandClock()
        real_completion = agent.cgroups.handle_process_completion

        def completion(process: subprocess.Popen[bytes], **kwargs: Any) -> Any:
            command_clock.process = process
            return real_completion(process=process, **kwargs)

        minutes = self.goal_state_timeout / 60
        patches = [(agent.exthandlers, "time", _ScaledClock(self.poll_scale)),
                   (agent.exthandlers, "_DEFAULT_EXT_TIMEOUT_MINUTES", minutes),
                   (agent.processutil, "time", command_clock),
                   (agent.cgroups, "handle_process_completion", completion)]
        originals = [(module, name, getattr(module, name)) for module, name, _ in patches]
        saved_env = dict(os.environ)
        try:
            for module, name, value in patches:
                setattr(module, name, value)
            os.environ.update(self.env)
            yield
        finally:
            for module, name, value in originals:
                setattr(module, name, value)
            os.environ.clear()
            os.environ.update(saved_env)

    def _configure_agent(self) -> None:
        """Debian's /etc/waagent.conf with this runner's dirs, no cgroups; log to agent_log."""
        conf, logger = self.agent.conf, self.agent.logger
        conf.__conf__.values.clear()
        if AGENT_CONF.is_file():
            conf.load_conf_from_file(str(AGENT_CONF))
        conf.__conf__.values.update({
            "Lib.Dir": str(self.lib_dir), "Extension.LogDir": str(self.log_dir),
            "CGroups.Enabled": "n", "Extensions.Enabled": "y", "Logs.Console": "n",
            "Logs.Verbose": "n", "OS.OpensslPath": shutil.which("openssl") or "openssl"})
        logger.DEFAULT_LOGGER.appenders = []
        logger.reset_periodic()
        logger.add_logger_appender(logger.AppenderType.FILE, logger.LogLevel.INFO,
                                   str(self.agent_log))
        self.agent.event.init_event_logger(str(self.lib_dir / "events"))
        self.agent.cgroups.CGroupConfigurator._instance = None  # uninitialised: cgroups off


_TRANSPORT_PAIR: list[tuple[bytes, bytes]] = []  # made once per process: RSA keygen is slow


def make_transport_certificate(lib_dir: Path, fresh: bool = False) -> str:
    """Write `<lib>/<THUMBPRINT>.crt/.prv` as the agent does for goal-state certificates."""
    if fresh or not _TRANSPORT_PAIR:
        key, crt = lib_dir / "new.prv", lib_dir / "new.crt"
        subprocess.run(["openssl", "req", "-x509", "-nodes", "-newkey", "rsa:2048", "-days", "365",
                        "-subj", "/CN=waagent-standin", "-keyout", str(key), "-out", str(crt)],
                       check=True, capture_output=True)
        _TRANSPORT_PAIR[:] = [(crt.read_bytes(), key.read_bytes())]
        crt.unlink()
        key.unlink()
    crt_pem, key_pem = _TRANSPORT_PAIR[0]
    cert = x509.load_pem_x509_certificate(crt_pem)
    thumbprint = cert.fingerprint(hashes.SHA1()).hex().upper()  # Azure's thumbprint
    (lib_dir / f"{thumbprint}.crt").write_bytes(crt_pem)
    private = lib_dir / f"{thumbprint}.prv"
    private.touch(mode=0o600)
    private.write_bytes(key_pem)
    return thumbprint


def manifest_xml(versions: Mapping[str, Path]) -> str:
    """The extension manifest (PIR) listing every published version of one handler."""
    plugins = "".join(
        f"<Plugin><Version>{escape(v)}</Version><Uris><Uri>{escape(_file_uri(p))}</Uri></Uris>"
        "</Plugin>" for v, p in versions.items())
    return ('<?xml version="1.0" encoding="utf-8"?><PluginVersionManifest>'
            f"<Plugins>{plugins}</Plugins><InternalPlugins /></PluginVersionManifest>")


def goal_state_xml(incarnation: str, handlers: Sequence[tuple[ExtensionSpec, str | None, str]]
                   ) -> str:
    """ExtensionsConfig as the wire server sends it: Plugins, PluginSettings, metadata."""
    plugins, settings = [], []
    for spec, runtime_settings, manifest_uri in handlers:
        plugins.append(
            f"<Plugin name={quoteattr(spec.name)} version={quoteattr(spec.version)} "
            f"location={quoteattr(manifest_uri)} state={quoteattr(spec.state)} "
            'autoUpgrade="false" runAsStartupTask="false" isJson="true" useExactVersion="true" />')
        if runtime_settings is None and spec.raw_settings is None:
            continue
        depends = (f'<DependsOn dependencyLevel="{spec.dependency_level}" />'
                   if spec.dependency_level else "")
        settings.append(
            f"<Plugin name={quoteattr(spec.name)} version={quoteattr(spec.version)}>{depends}"
            f'<RuntimeSettings seqNo="{spec.seq}">{escape(runtime_settings or "")}'
            "</RuntimeSettings></Plugin>")
    ticks = int((time.time() + 62135596800) * 10**7)
    return ('<?xml version="1.0" encoding="utf-8"?>'
            f'<Extensions version="1.0.0.0" goalStateIncarnation="{incarnation}">'
            f"<Plugins>{''.join(plugins)}</Plugins>"
            f"<PluginSettings>{''.join(settings)}</PluginSettings>"
            '<StatusUploadBlob statusBlobType="BlockBlob">file:///dev/null</StatusUploadBlob>'
            f'<InVMGoalStateMetaData inSvdSeqNo="{incarnation}" createdOnTicks="{ticks}" '
            'activityId="00000000-0000-0000-0000-00000000a11d" '
            'correlationId="00000000-0000-0000-0000-00000000c0de" /></Extensions>')
