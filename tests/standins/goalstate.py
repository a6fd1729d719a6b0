"""What Azure hands the agent, made locally: the ExtensionsConfig goal state, extension manifests,
the transport certificate protected settings are encrypted to, and a fake wire serving them.

Faked, and why (no Azure here): `FakeWire` stands in for the wire server and blob storage. It
serves the goal state, manifests and zips from a local folder (a download is a file copy), keeps
the status blob instead of uploading it, and gives 127.0.0.1 as the wire address. The certificate
Azure would deliver is made here as `<lib>/<THUMBPRINT>.crt/.prv`; protected settings are
encrypted to it with `openssl cms` (3DES as Azure does, or AES-256).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from cryptography import x509
from cryptography.hazmat.primitives import hashes


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


def file_uri(path: Path) -> str:
    return "file://" + str(path)


def _local_path(uri: str) -> Path:
    if not uri.startswith("file://"):
        raise ValueError(f"the fake wire serves only file:// URIs, not {uri}")
    return Path(uri[len("file://"):])


class FakeWire:
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


def encrypt_settings(settings: Mapping[str, Any], certificate: Path, cipher: str = "des3") -> str:
    """Protected settings as Azure sends them: base64 DER CMS to `certificate`."""
    der = subprocess.run(
        ["openssl", "cms", "-encrypt", "-binary", "-outform", "DER", f"-{cipher}",
         str(certificate)],
        input=json.dumps(dict(settings)).encode(), capture_output=True, check=True).stdout
    return base64.b64encode(der).decode()


def decrypt_settings(protected: str, certificate: Path, private_key: Path) -> Any:
    """Undo `encrypt_settings` with the certificate's private key (what the extension does)."""
    plain = subprocess.run(
        ["openssl", "cms", "-decrypt", "-inform", "DER",
         "-recip", str(certificate), "-inkey", str(private_key)],
        input=base64.b64decode(protected), capture_output=True, check=True).stdout
    return json.loads(plain)


def runtime_settings(spec: ExtensionSpec, lib_dir: Path, thumbprint: str) -> str | None:
    """The RuntimeSettings JSON of `spec`, protected settings encrypted to `<lib>/<thumbprint>`."""
    if spec.raw_settings is not None or not spec.settings:
        return spec.raw_settings
    public = dict(spec.public) if spec.public is not None else None
    handler: dict[str, Any] = {"publicSettings": public}
    if spec.protected is not None:
        certificate = lib_dir / f"{thumbprint}.crt"
        handler["protectedSettings"] = encrypt_settings(spec.protected, certificate, spec.cipher)
        handler["protectedSettingsCertThumbprint"] = thumbprint
    return json.dumps({"runtimeSettings": [{"handlerSettings": handler}]})


def manifest_xml(versions: Mapping[str, Path]) -> str:
    """The extension manifest (PIR) listing every published version of one handler."""
    plugins = "".join(
        f"<Plugin><Version>{escape(v)}</Version><Uris><Uri>{escape(file_uri(p))}</Uri></Uris>"
        "</Plugin>" for v, p in versions.items())
    return ('<?xml version="1.0" encoding="utf-8"?><PluginVersionManifest>'
            f"<Plugins>{plugins}</Plugins><InternalPlugins /></PluginVersionManifest>")


def goal_state_xml(incarnation: str, handlers: Sequence[tuple[ExtensionSpec, str | None, str]]
                   ) -> str:
    """ExtensionsConfig as the wire server sends it: Plugins, PluginSettings, metadata."""
    plugins = "".join(_plugin_xml(spec, manifest_uri) for spec, _, manifest_uri in handlers)
    settings = "".join(_plugin_settings_xml(spec, runtime_settings_json)
                       for spec, runtime_settings_json, _ in handlers
                       if runtime_settings_json is not None or spec.raw_settings is not None)
    ticks = int((time.time() + 62135596800) * 10**7)
    return ('<?xml version="1.0" encoding="utf-8"?>'
            f'<Extensions version="1.0.0.0" goalStateIncarnation="{incarnation}">'
            f"<Plugins>{plugins}</Plugins>"
            f"<PluginSettings>{settings}</PluginSettings>"
            '<StatusUploadBlob statusBlobType="BlockBlob">file:///dev/null</StatusUploadBlob>'
            f'<InVMGoalStateMetaData inSvdSeqNo="{incarnation}" createdOnTicks="{ticks}" '
            'activityId="00000000-0000-0000-0000-00000000a11d" '
            'correlationId="00000000-0000-0000-0000-00000000c0de" /></Extensions>')


def _plugin_xml(spec: ExtensionSpec, manifest_uri: str) -> str:
    return (f"<Plugin name={quoteattr(spec.name)} version={quoteattr(spec.version)} "
            f"location={quoteattr(manifest_uri)} state={quoteattr(spec.state)} "
            'autoUpgrade="false" runAsStartupTask="false" isJson="true" useExactVersion="true" />')


def _plugin_settings_xml(spec: ExtensionSpec, runtime_settings_json: str | None) -> str:
    depends = (f'<DependsOn dependencyLevel="{spec.dependency_level}" />'
               if spec.dependency_level else "")
    return (f"<Plugin name={quoteattr(spec.name)} version={quoteattr(spec.version)}>{depends}"
            f'<RuntimeSettings seqNo="{spec.seq}">{escape(runtime_settings_json or "")}'
            "</RuntimeSettings></Plugin>")
