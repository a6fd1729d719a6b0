"""`bin/akvvm check`: end to end through the launcher, exit codes, stdout and stderr."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import handler
from handler import cli
from tests.test_settings_file import PUBLIC, SECRET, make_pair, protected_settings, write_settings

ROOT = Path(__file__).resolve().parent.parent
AKVVM = ROOT / "bin" / "akvvm"
DATA = ROOT / "tests" / "data" / "settings"
GUID = "00001111-aaaa-2222-bbbb-3333cccc4444"


def akvvm(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AKVVM_PYTHON": sys.executable}
    return subprocess.run([str(AKVVM), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)


def test_valid_file_prints_the_plan() -> None:
    """Exit 0, the plan as JSON on stdout, nothing on stderr."""
    done = akvvm("check", str(DATA / "scale_set.json"))
    assert (done.returncode, done.stderr) == (0, "")
    shown = json.loads(done.stdout)
    assert [c["link"] for c in shown["certificates"]] == [
        "/var/lib/waagent/Microsoft.Azure.KeyVault.Store/fleetvault.web",
        "/var/lib/waagent/Microsoft.Azure.KeyVault.Store/fleetvault.api"]
    assert len(shown["notes"]) == 2


def test_invalid_file_prints_one_line_per_problem() -> None:
    """Exit 2, each problem on its own stderr line as `<path>: <problem>. <hint>`; no stdout."""
    done = akvvm("check", str(DATA / "seed_cli_settings_verbatim.json"))
    assert (done.returncode, done.stdout) == (2, "")
    lines = done.stderr.splitlines()
    assert [line.split(": ")[0] for line in lines] == [
        "secretsManagementSettings.observedCertificates[0].url",
        "secretsManagementSettings.observedCertificates[1].url",
        "authenticationSettings.msiClientId"]
    assert all(line.endswith(".") for line in lines)


def test_waagent_file_with_protected_settings(tmp_path: Path) -> None:
    """A waagent N.settings file is decrypted with the lib dir's pair; secrets stay unprinted."""
    transport = make_pair(tmp_path / "waagent")
    protected = {"authenticationSettings": {"msiClientId": GUID}, "apiKey": SECRET}
    path = write_settings(transport.lib, {"publicSettings": PUBLIC,
                                          **protected_settings(transport, protected)})
    before = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    done = akvvm("check", str(path))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["identity"]["msiClientId"] == GUID
    assert SECRET not in done.stdout + done.stderr
    assert sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


def test_zero_byte_settings_file(tmp_path: Path) -> None:
    """An empty file: exit 2 and one clear line, no traceback."""
    path = tmp_path / "0.settings"
    path.write_bytes(b"")
    done = akvvm("check", str(path))
    assert done.returncode == 2
    assert done.stderr == (f"{path}: is empty: no settings were delivered. Give the extension its "
                           "settings, e.g. az vm extension set ... --settings @settings.json.\n")


def test_files_where_the_user_stands_do_not_shadow_the_package(tmp_path: Path) -> None:
    """A `handler` package in the current directory is not imported by the launcher."""
    (tmp_path / "handler").mkdir()
    (tmp_path / "handler" / "__init__.py").write_text("raise SystemExit('shadowed')\n")
    done = akvvm("check", str(DATA / "seed_cli_settings.json"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def test_usage_error_exits_2() -> None:
    """No command: argparse usage on stderr, exit 2."""
    done = akvvm()
    assert done.returncode == 2 and "usage: akvvm" in done.stderr


def test_check_in_process_reports_missing_file(tmp_path: Path) -> None:
    """A missing file is a one-line problem with exit 2."""
    out, err = io.StringIO(), io.StringIO()
    assert cli.check(str(tmp_path / "none.json"), None, out, err) == 2
    missing = tmp_path / "none.json"
    assert err.getvalue() == f"{missing}: cannot be read (No such file or directory).\n"
    assert out.getvalue() == ""


def test_check_prepends_reading_notes_to_the_plan() -> None:
    """A tolerated trailing comma shows up first among the plan's notes."""
    out, err = io.StringIO(), io.StringIO()
    assert cli.check(str(DATA / "seed_arm_extension_schema.json"), None, out, err) == 0
    notes = json.loads(out.getvalue())["notes"]
    assert "trailing comma" in notes[0] and "linkOnRenewal" in notes[1]


def test_service_is_delegated(monkeypatch: pytest.MonkeyPatch) -> None:
    """`akvvm service ...` hands the remaining arguments to handler.service_main.main."""
    seen: list[list[str]] = []
    fake = types.ModuleType("handler.service_main")
    fake.main = lambda argv: seen.append(list(argv)) or 7  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "handler.service_main", fake)
    monkeypatch.setattr(handler, "service_main", fake, raising=False)
    assert cli.main(["service", "--config", "/x/config.json"]) == 7
    assert seen == [["--config", "/x/config.json"]]


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").exists(), reason="no checkout venv")
def test_checkout_venv_is_found_without_configuration() -> None:
    """In the checkout, bin/akvvm uses .venv even with a bare PATH and no AKVVM_PYTHON."""
    env = {k: v for k, v in os.environ.items() if k != "AKVVM_PYTHON"}
    env["PATH"] = "/usr/bin:/bin"
    done = subprocess.run([str(AKVVM), "check", str(DATA / "seed_cli_settings.json")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
