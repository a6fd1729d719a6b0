"""`make demo`: the extension zip under the real guest-agent code, against local stand-ins (SPEC 8).

Lays out a fake /var/lib/waagent in a temp dir, starts Key Vault and IMDS stand-ins on loopback,
lets the real WALinuxAgent code install and enable the zip, shows the installed files, rotates a
certificate and shows the link move, prints the status file, then disables and uninstalls.
Reaches nothing outside 127.0.0.0/8; stops only the service it started; removes the temp dir.
"""
from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from handler import supervisor
from tests.standins.certfactory import PEM, make_chain
from tests.standins.imds import ImdsStandin
from tests.standins.keyvault import KeyVaultStandin
from tests.standins.waagent import AgentReport, ExtensionSpec, WaagentRunner
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
NAME = "Microsoft.Azure.KeyVault.KeyVaultForLinux"
STATE = f"{NAME}.State"


def say(title: str) -> None:
    bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
    print(f"\n{bold}==> {title}{plain}", flush=True)


def ls(folder: Path) -> None:
    """`ls -l` of a folder: mode, size, name, and the target of each link."""
    for path in sorted(folder.iterdir()):
        info = path.lstat()
        target = f" -> {os.readlink(path)}" if path.is_symlink() else ""
        stamp = datetime.fromtimestamp(info.st_mtime).strftime("%H:%M:%S")
        print(f"    {stat.filemode(info.st_mode)} {info.st_size:6d} {stamp} {path.name}{target}")


def zip_path(given: str | None = None) -> Path:
    """The zip to deploy: `--zip PATH`, else dist/KeyVaultForLinux-<version>.zip (`make demo`
    builds it first; built here if missing)."""
    if given:
        return Path(given).resolve()
    found = sorted((REPO / "dist").glob("KeyVaultForLinux-*.zip"))
    if not found:
        subprocess.run([sys.executable, str(REPO / "build" / "make_zip.py")], check=True)
        found = sorted((REPO / "dist").glob("KeyVaultForLinux-*.zip"))
    return found[-1]


def ensure_agent() -> None:
    """The real agent code is unpacked by `make waagent`; do it here when it is missing."""
    if not (REPO / "tests/.cache/waagent/.done").exists():
        subprocess.run(["make", "-C", str(REPO), "waagent"], check=True)


def settings(kv: KeyVaultStandin, imds: ImdsStandin, store: Path) -> dict:
    return {"secretsManagementSettings": {
        "pollingIntervalInS": "2", "requireInitialSync": True,
        "certificateStoreLocation": str(store),
        "observedCertificates": [f"{kv.url}/secrets/web",
                                 {"url": f"{kv.url}/secrets/api",
                                  "customSymbolicLinkName": "api.pem"}],
        "additionalVaultDnsSuffixes": ["localhost"]},
        "authenticationSettings": {"msiEndpoint": f"{imds.url}/metadata/identity"}}


def leaf(path: Path) -> str:
    done = subprocess.run(["openssl", "x509", "-noout", "-subject", "-enddate", "-in", str(path)],
                          capture_output=True, text=True, check=False)
    return " / ".join(done.stdout.split("\n")[:2]).strip()


def demo(root: Path, kv: KeyVaultStandin, imds: ImdsStandin, package: Path) -> None:
    say(f"Stand-ins on loopback: Key Vault {kv.url}, IMDS {imds.url}")
    kv.add_certificate("web", make_chain(cn="www.example.test"))
    kv.add_certificate("api", make_chain(key_type="ec", cn="api.example.test"), content_type=PEM)
    print("    vault holds: web (PFX, RSA, leaf+intermediate+root), api (PEM, EC)")
    ensure_agent()
    runner = WaagentRunner(root / "vm", env={
        "PATH": "/usr/bin:/bin", "AKVVM_SUPERVISOR": "daemon", "REQUESTS_CA_BUNDLE": kv.ca_path,
        "NO_PROXY": "127.0.0.1,localhost"})
    version = package.stem.rpartition("-")[2]
    runner.add_package(package, name=NAME, version=version)
    store = root / "store"
    public = settings(kv, imds, store)
    enable(runner, package.name, version, public)
    show_files(runner, store, version)
    rotate(kv, store)
    show_status(runner, version)
    remove(runner, store, version, public)


def enable(runner: WaagentRunner, package: str, version: str, public: dict) -> AgentReport:
    say(f"Goal state 1: {package} with these settings (real WALinuxAgent code)")
    print("    " + json.dumps(public, indent=2).replace("\n", "\n    "))
    runner.set_goal_state([ExtensionSpec(NAME, version, seq=1, public=public)])
    started = time.monotonic()
    report = runner.run_until(lambda r: r.handler(NAME).terminal, timeout=60)
    handler = report.handler(NAME)
    print(f"    agent ran install + enable; handler {handler.status}, extension "
          f"{handler.extension.status}: {handler.extension.message} "
          f"({time.monotonic() - started:.1f} s); service pid {running_services(runner)}")
    return report


def show_files(runner: WaagentRunner, store: Path, version: str) -> None:
    say(f"Installed certificates in {store}")
    ls(store)
    print(f"    web leaf: {leaf(store / 'localhost.web')}")
    say(f"The extension dir {runner.ext_dir(NAME, version)}")
    ls(runner.ext_dir(NAME, version))
    say(f"The version-less state dir {runner.lib_dir / STATE}")
    ls(runner.lib_dir / STATE)


def rotate(kv: KeyVaultStandin, store: Path) -> None:
    link = store / "localhost.web"
    before = os.readlink(link)
    say("Rotating 'web' in the vault (a new version, as a renewal makes one)")
    version = kv.add_certificate("web", make_chain(cn="www.example.test"))
    started = time.monotonic()
    moved = wait_until(lambda: os.readlink(link) != before, timeout=30, interval=0.1)
    print(f"    localhost.web: {before}\n                -> {os.readlink(link)}"
          f"  ({'moved' if moved else 'NOT moved'} after {time.monotonic() - started:.1f} s;"
          f" pollingIntervalInS is 2)")
    if not moved or not os.readlink(link).endswith(version):
        raise SystemExit("demo: the link did not move to the new version")
    ls(store)


def show_status(runner: WaagentRunner, version: str) -> None:
    status_file = runner.ext_dir(NAME, version) / "status" / "1.status"
    say(f"The status file the agent reads: {status_file}")
    print("    " + json.dumps(json.loads(status_file.read_text()), indent=2).replace(
        "\n", "\n    "))
    view = runner.status(NAME)
    print(f"    the agent parses it (parse_ext_status) as: handler {view.status}, extension "
          f"{view.extension.status}, substatus "
          f"{[(s.name, s.status) for s in view.extension.substatus]}")
    log = runner.ext_log_dir(NAME) / "akvvm_service.log"
    say(f"Last lines of the service log {log}")
    for line in log.read_text().splitlines()[-6:]:
        print(f"    {line[:160]}")


def remove(runner: WaagentRunner, store: Path, version: str, public: dict) -> None:
    say("Goal state 2: uninstall (the agent runs disable, then uninstall)")
    runner.set_goal_state([ExtensionSpec(NAME, version, state="uninstall", seq=2, public=public)])
    runner.run()
    left = running_services(runner)
    print(f"    service processes left: {left or 'none'}; extension dir exists: "
          f"{runner.ext_dir(NAME, version).exists()}; state dir exists: "
          f"{(runner.lib_dir / STATE).exists()}")
    print("    certificates are never deleted:")
    ls(store)


def running_services(runner: WaagentRunner) -> list[int]:
    spec = supervisor.ServiceSpec(str(runner.lib_dir), str(runner.lib_dir / STATE), "")
    return [int(p) for p in os.listdir("/proc") if p.isdigit()
            and supervisor.is_service_cmdline(supervisor.cmdline(int(p)), spec)]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.demo",
                                     description="`make demo` (SPEC 8); see tests/demo.py")
    parser.add_argument("--zip", help="the extension zip to deploy (default: dist/, built "
                        "if missing)")
    package = zip_path(parser.parse_args(argv).zip)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="akvvm-demo-") as tmp:
        root = Path(tmp)
        os.environ["AZURE_POD_IDENTITY_AUTHORITY_HOST"] = "http://127.0.0.1:9"  # never real IMDS
        try:
            with ImdsStandin() as imds, KeyVaultStandin(accept_token=imds.token_issued) as kv:
                demo(root, kv, imds, package)
        finally:
            state = root / "vm/var/lib/waagent" / STATE
            supervisor.Daemon().stop(supervisor.ServiceSpec("", str(state), ""))
    say(f"Done in {time.monotonic() - started:.0f} s; the temp dir is removed.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
