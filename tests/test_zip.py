"""build/make_zip.py: a deterministic, self-contained package that runs as the agent unpacks it.

The first build downloads wheels for 8 targets (about 20 s, once per machine: build/vendor is
the cache); later builds take about 3 s each. `built_zip` builds once per version per session.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPERATIONS = ("install", "enable", "disable", "update", "uninstall")
ISOLATED_PATH = "/usr/bin:/bin"  # the system python3, none of the venv's packages


@functools.cache
def built_zip(version: str | None = None, local_only: bool = False) -> str:
    """Build the zip (optionally with a bumped version, or with the vendored dependencies of this
    machine's python only, which is faster) into a temp dir removed at exit."""
    out = tempfile.mkdtemp(prefix="akvvm-zip-")
    atexit.register(shutil.rmtree, out, True)
    argv = [sys.executable, os.path.join(REPO, "build", "make_zip.py"), "--out", out]
    if version:
        argv += ["--version", version]
    if local_only:
        argv += ["--targets", f"cp3{sys.version_info[1]}-{platform.machine()}"]
    subprocess.run(argv, check=True, capture_output=True, timeout=600)
    (name,) = os.listdir(out)
    return os.path.join(out, name)


def unpack_like_the_agent(zip_path: str, target: str,
                          keep: Callable[[str], bool] = lambda name: True) -> str:
    """What waagent does: ZipFile.extractall (modes and links dropped), then u+x on every file.
    `keep` leaves entries out (a package damaged on purpose, or smaller to unpack)."""
    archive = zipfile.ZipFile(zip_path)
    archive.extractall(target, [name for name in archive.namelist() if keep(name)])
    for folder, _, files in os.walk(target):
        for name in files:
            path = os.path.join(folder, name)
            os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return target


def isolated_env(**extra: str) -> dict[str, str]:
    """No venv, no PYTHONPATH: only what the zip brings and the system python3."""
    return {"PATH": ISOLATED_PATH, "LANG": "C.UTF-8", **extra}


@pytest.fixture(scope="module")
def archive() -> zipfile.ZipFile:
    return zipfile.ZipFile(built_zip())


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory) -> str:
    """The zip unpacked once, the agent's way, for the tests that only run it."""
    return unpack_like_the_agent(built_zip(), str(tmp_path_factory.mktemp("unpacked")))


def test_build_is_deterministic(tmp_path):
    """Two builds of the same tree, back to back, give the same bytes."""
    paths = []
    for out in ("first", "second"):
        subprocess.run([sys.executable, os.path.join(REPO, "build", "make_zip.py"), "--out",
                        str(tmp_path / out)], check=True, capture_output=True, timeout=600)
        paths.append(next((tmp_path / out).iterdir()))
    assert paths[0].name == paths[1].name
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_zip_name_and_manifest_follow_the_agent_contract(archive):
    """HandlerManifest.json at the root names bin/ scripts that exist, with SPEC 3.1's flags."""
    assert os.path.basename(built_zip()).startswith("KeyVaultForLinux-")
    manifest = json.loads(archive.read("HandlerManifest.json"))[0]["handlerManifest"]
    names = set(archive.namelist())
    for operation in OPERATIONS:
        command = manifest[f"{operation}Command"]
        assert command == f"bin/{operation}" and command in names
    assert manifest["reportHeartbeat"] is False
    assert manifest["updateMode"] == "UpdateWithInstall"
    assert manifest["rebootAfterInstall"] is False
    assert "continueOnUpdateFailure" in manifest


def test_zip_has_code_schema_and_vendored_dependencies_only(archive):
    """Sources, the schema and vendor/ for every target; no tests, caches or symlinks."""
    names = archive.namelist()
    assert "akvvm_ext/settings_schema.json" in names and "handler/lifecycle.py" in names
    assert "bin/akvvm" in names and "bin/_python" in names
    assert "handler/akvvm_service.service" in names  # the unit template
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n
                or n.endswith(".pyc")]
    for machine in ("x86_64", "aarch64"):
        for version in ("310", "311", "312", "313"):
            assert any(n.startswith(f"vendor/cp{version}-{machine}/") for n in names)
        assert any(n.startswith(f"vendor/{machine}/cryptography/") for n in names)
    assert any(n.startswith("vendor/any/jsonschema/") for n in names)
    for info in archive.infolist():
        assert info.date_time == (1980, 1, 1, 0, 0, 0)
        assert stat.S_ISREG(info.external_attr >> 16)
        assert stat.S_IMODE(info.external_attr >> 16) in (0o644, 0o755)


def test_bumped_version_is_stamped(tmp_path):
    """--version names the zip and is the version the packaged code reports."""
    path = built_zip("3.9.1", local_only=True)
    assert os.path.basename(path) == "KeyVaultForLinux-3.9.1.zip"
    assert b'__version__ = "3.9.1"' in zipfile.ZipFile(path).read("akvvm_ext/__init__.py")


def test_unpacked_zip_checks_settings_with_the_system_python(unpacked, tmp_path):
    """`bin/akvvm check` runs from the agent-style unpack with no venv: plan on 0, problems on 2."""
    ext = unpacked
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"secretsManagementSettings": {"observedCertificates": [
        "https://myvault.vault.azure.net/secrets/web"]}}))
    done = subprocess.run([os.path.join(ext, "bin", "akvvm"), "check", str(good)],
                          env=isolated_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "myvault" in done.stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"secretsManagementSettings": {"observedCertificates": [
        "https://myvault.vault.azure.net/certificates/web"]}}))
    done = subprocess.run([os.path.join(ext, "bin", "akvvm"), "check", str(bad)],
                          env=isolated_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "/secrets/web" in done.stderr


def test_no_python_means_exit_52_with_an_error_status(unpacked, tmp_path):
    """Without any python3 >= 3.10 the sh launcher writes an error status and exits 52."""
    ext = unpacked
    sh_only = tmp_path / "sbin"
    sh_only.mkdir()
    for tool in ("sh", "dirname", "ls", "grep", "head", "mkdir", "date", "mv"):
        os.symlink(shutil.which(tool), sh_only / tool)
    done = subprocess.run([os.path.join(ext, "bin", "install")], cwd=ext,
                          env={"PATH": str(sh_only), "ConfigSequenceNumber": "4",
                               "AKVVM_PYTHON": "/nonexistent/python3"},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 52
    status = json.load(open(os.path.join(ext, "status", "4.status")))[0]["status"]
    assert status["status"] == "error" and "python3" in status["formattedMessage"]["message"]


def example_settings(name: str) -> object:
    """The settings object inside one of docs/examples, ARM `[parameters('x')]` resolved."""
    with open(os.path.join(REPO, "docs", "examples", name)) as handle:
        document = json.load(handle)
    if "resources" in document:
        defaults = {k: v.get("defaultValue") for k, v in document["parameters"].items()}
        settings = document["resources"][0]["properties"]["settings"]
        text = json.dumps(settings)
        for key, value in defaults.items():
            text = text.replace(f"[parameters('{key}')]", str(value))
        return json.loads(text)
    if "extensionProfile" in document:
        return document["extensionProfile"]["extensions"][0]["properties"]["settings"]
    return document


@pytest.mark.parametrize("name", ["settings.json", "arm-template.json",
                                  "vmss-extension-profile.json"])
def test_documented_examples_pass_check(name, unpacked, tmp_path):
    """Every settings example in docs/examples is valid for `bin/akvvm check`."""
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(example_settings(name)))
    done = subprocess.run([os.path.join(unpacked, "bin", "akvvm"), "check", str(path)],
                          env=isolated_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "myvault" in done.stdout


def test_unpacked_service_once_installs_from_the_standins(unpacked, kv, imds, tmp_path):
    """`bin/akvvm service --once` with the system python syncs a certificate from the stand-ins."""
    from tests.standins.certfactory import make_chain

    version = kv.add_certificate("web", make_chain())
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    settings = {"secretsManagementSettings": {
        "observedCertificates": [f"{kv.url}/secrets/web"],
        "certificateStoreLocation": str(tmp_path / "store"),
        "additionalVaultDnsSuffixes": ["localhost"]},
        "authenticationSettings": {"msiEndpoint": f"{imds.url}/metadata/identity"}}
    config = {"settings": settings, "seq": 0, "statusFolder": str(tmp_path),
              "logFolder": str(tmp_path / "log"), "extensionPath": unpacked,
              "handlerVersion": "3.1.0"}
    (state / "config.json").write_text(json.dumps(config))
    done = subprocess.run(
        [os.path.join(unpacked, "bin", "akvvm"), "service", "--once", "--config",
         str(state / "config.json")], capture_output=True, text=True, timeout=120,
        env=isolated_env(REQUESTS_CA_BUNDLE=kv.ca_path, NO_PROXY="127.0.0.1,localhost"))
    assert done.returncode == 0, done.stdout + done.stderr
    link = tmp_path / "store" / "localhost.web"
    assert os.readlink(link) == f"localhost.web.{version}"
    assert b"PRIVATE KEY" in link.read_bytes()


def agent_layout(ext: str, tmp_path) -> str:
    """HandlerEnvironment.json and config/ as the agent writes them; returns the status dir."""
    folders = {"logFolder": str(tmp_path / "log"), "configFolder": os.path.join(ext, "config"),
               "statusFolder": os.path.join(ext, "status")}
    with open(os.path.join(ext, "HandlerEnvironment.json"), "w") as handle:
        json.dump([{"name": "Microsoft.Azure.KeyVault.KeyVaultForLinux", "version": 1.0,
                    "handlerEnvironment": folders}], handle)
    os.makedirs(folders["configFolder"], exist_ok=True)
    return folders["statusFolder"]


def run_script(ext: str, operation: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """A lifecycle script as the agent runs it: cwd = extension dir, the system python3."""
    return subprocess.run([os.path.join(ext, "bin", operation)], cwd=ext, timeout=60, text=True,
                          capture_output=True,
                          env=isolated_env(AZURE_GUEST_AGENT_EXTENSION_PATH=ext, **extra))


def error_status(status_dir: str, seq: int) -> dict:
    with open(os.path.join(status_dir, f"{seq}.status")) as handle:
        document = json.load(handle)
    assert document[0]["version"] == 1.0 and document[0]["timestampUTC"].endswith("Z")
    status = document[0]["status"]
    assert status["status"] == "error"
    assert status["name"] == "Microsoft.Azure.KeyVault.KeyVaultForLinux"
    assert set(status["formattedMessage"]) == {"lang", "message"}
    return status


def test_without_vendored_dependencies_install_and_enable_exit_52_naming_the_module(tmp_path):
    """No vendor/ (no wheels for this machine): exit 52 with an error status naming the missing
    module and the machine, no traceback; disable still exits 0."""
    ext = unpack_like_the_agent(built_zip(), str(tmp_path / "ext"),
                                keep=lambda name: not name.startswith("vendor/"))
    status_dir = agent_layout(ext, tmp_path)
    (tmp_path / "ext" / "config" / "3.settings").write_text("{}")
    for operation, seq in (("install", 3), ("enable", 4)):
        extra = {"ConfigSequenceNumber": "4"} if seq == 4 else {}
        done = run_script(ext, operation, **extra)
        assert done.returncode == 52, done.stderr
        assert "Traceback" not in done.stderr
        status = error_status(status_dir, seq)  # seq 3: the newest settings file
        assert status["operation"] == operation.capitalize()
        message = status["formattedMessage"]["message"]
        module = message.split("the python module ")[1].split()[0]
        assert platform.machine() in message and "Python 3." in message
        probe = subprocess.run(["python3", "-s", "-c", f"import {module}"],
                               env=isolated_env(PYTHONPATH=ext), capture_output=True)
        assert probe.returncode != 0, f"{module} imports: the message names the wrong module"
    assert run_script(ext, "disable", ConfigSequenceNumber="5").returncode == 0
    assert not os.path.exists(os.path.join(status_dir, "5.status"))


def test_a_broken_shared_library_is_a_missing_dependency(tmp_path):
    """A vendored .so that does not load (wrong glibc, damaged): exit 52, the module named."""
    machine = platform.machine()
    ext = unpack_like_the_agent(
        built_zip(), str(tmp_path / "ext"),
        keep=lambda name: not name.startswith("vendor/") or machine in name.split("/")[1]
        or name.startswith("vendor/any/"))
    status_dir = agent_layout(ext, tmp_path)
    library = os.path.join(ext, "vendor", machine, "cryptography", "hazmat", "bindings",
                           "_rust.abi3.so")
    with open(library, "wb") as handle:
        handle.write(b"not an ELF file")
    done = run_script(ext, "enable", ConfigSequenceNumber="1")
    assert done.returncode == 52, done.stderr
    assert "cryptography" in error_status(status_dir, 1)["formattedMessage"]["message"]


def test_lifecycle_scripts_ignore_a_handler_package_where_the_caller_stands(unpacked, tmp_path):
    """bin/<op> run from another directory never imports a `handler/` found there."""
    (tmp_path / "handler").mkdir()
    (tmp_path / "handler" / "__init__.py").write_text("raise SystemExit(99)\n")
    (tmp_path / "handler" / "__main__.py").write_text("raise SystemExit(99)\n")
    ext = tmp_path / "lib" / "Microsoft.Azure.KeyVault.KeyVaultForLinux-3.1.0"
    ext.mkdir(parents=True)
    agent_layout(str(ext), tmp_path)
    done = subprocess.run([os.path.join(unpacked, "bin", "install")], cwd=tmp_path, timeout=60,
                          env=isolated_env(AZURE_GUEST_AGENT_EXTENSION_PATH=str(ext)),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
