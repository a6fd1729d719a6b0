"""The waagent stand-in runs a trivial package through the real WALinuxAgent 2.7.3 code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.standins.package import zip_testpkg
from tests.standins.waagent import AGENT_VERSION, ExtensionSpec, WaagentRunner

BASE = "Test.Standin.Base"
DEPENDENT = "Test.Standin.Dependent"


def _zip(tmp_path: Path, version: str) -> Path:
    """The test package (tests/standins/testpkg) as a zip, the way Azure publishes handlers."""
    return zip_testpkg(tmp_path / f"testpkg-{version}.zip")


def _ops(runner: WaagentRunner, name: str) -> list[list[str]]:
    """The lifecycle commands the test package recorded, as [op, version, key=value...]."""
    log = runner.ext_log_dir(name) / "ops.log"
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def _at(line: list[str]) -> float:
    return float(next(word for word in line if word.startswith("at="))[3:])


@pytest.fixture
def runner(tmp_path: Path) -> WaagentRunner:
    runner = WaagentRunner(tmp_path / "vm")
    for version in ("1.0.0", "1.1.0"):
        for name in (BASE, DEPENDENT):
            runner.add_package(_zip(tmp_path, version), name=name, version=version)
    return runner


def test_enable_success_is_reported_ready_with_the_extension_status(runner: WaagentRunner) -> None:
    """install + enable run; the agent reads the success status file and reports Ready."""
    runner.set_goal_state([ExtensionSpec(BASE, "1.0.0", seq=4, public={"mode": "success"})])
    handler = runner.run().handler(BASE)
    assert (handler.status, handler.version) == ("Ready", "1.0.0")
    assert handler.extension is not None
    assert (handler.extension.status, handler.extension.seq) == ("success", 4)
    assert handler.extension.message == "test extension enabled"
    assert [(s.name, s.status) for s in handler.extension.substatus] == [("detail", "success")]
    assert [line[:3] for line in _ops(runner, BASE)] == [
        ["install", "1.0.0", "seq=4"], ["enable", "1.0.0", "seq=4"]]


def test_the_report_comes_from_the_debian_agent(runner: WaagentRunner) -> None:
    """The status blob is the one WALinuxAgent 2.7.3.0 (Debian 12) would upload."""
    runner.set_goal_state([ExtensionSpec(BASE, "1.0.0")])
    report = runner.run()
    assert runner.agent_version == AGENT_VERSION == "2.7.3.0"
    assert report.blob["aggregateStatus"]["guestAgentStatus"]["version"] == AGENT_VERSION
    assert report.goal_state_status == "Success"


def test_agent_writes_handler_environment_and_settings(runner: WaagentRunner) -> None:
    """HandlerEnvironment.json and config/<seq>.settings are the agent's own files."""
    runner.set_goal_state([ExtensionSpec(BASE, "1.0.0", seq=2, public={"a": [1]})])
    runner.run()
    ext = runner.ext_dir(BASE, "1.0.0")
    (env,) = json.loads((ext / "HandlerEnvironment.json").read_text())
    assert env["name"] == BASE and env["version"] == 1.0
    assert env["handlerEnvironment"]["logFolder"] == str(runner.log_dir / BASE)
    assert env["handlerEnvironment"]["statusFolder"] == str(ext / "status")
    settings = json.loads((ext / "config" / "2.settings").read_text())
    assert settings["runtimeSettings"][0]["handlerSettings"]["publicSettings"] == {"a": [1]}


@pytest.mark.parametrize("cipher", ["des3", "aes256"])
def test_protected_settings_are_cms_encrypted_to_the_transport_certificate(
    runner: WaagentRunner, cipher: str,
) -> None:
    """protectedSettings is base64 CMS for <lib>/<THUMB>.crt; the .prv decrypts it."""
    secret = {"token": "s3cr3t"}
    runner.set_goal_state([ExtensionSpec(BASE, "1.0.0", public=None, protected=secret,
                                         cipher=cipher)])
    runner.run()
    handler_settings = json.loads(
        (runner.ext_dir(BASE, "1.0.0") / "config" / "0.settings").read_text(),
    )["runtimeSettings"][0]["handlerSettings"]
    assert handler_settings["publicSettings"] is None
    assert handler_settings["protectedSettingsCertThumbprint"] == runner.thumbprint
    assert "s3cr3t" not in json.dumps(handler_settings)
    assert runner.decrypt(handler_settings["protectedSettings"]) == secret
    assert (runner.lib_dir / f"{runner.thumbprint}.prv").stat().st_mode & 0o077 == 0


def test_error_status_is_reported_with_its_message(runner: WaagentRunner) -> None:
    """A failing enable leaves the handler NotReady and the extension's own error message."""
    runner.set_goal_state([ExtensionSpec(BASE, "1.0.0", public={"mode": "error"})])
    handler = runner.run().handler(BASE)
    assert handler.status == "NotReady"
    assert handler.message is not None and "Non-zero exit code: 3" in handler.message
    assert handler.extension is not None
    assert (handler.extension.status, handler.extension.code) == ("error", 7)
    assert handler.extension.message == "test extension failed on purpose"


def test_missing_status_file_gets_the_agents_placeholder(runner: WaagentRunner) -> None:
    """Without a status file the agent reports its own transitioning placeholder."""
    runner.set_goal_state([ExtensionSpec(BASE, "1.0.0", public={"mode": "silent"})])
    extension = runner.run().handler(BASE).extension
    assert extension is not None and extension.status == "transitioning"
    assert "no status file was reported" in (extension.message or "")


def test_run_until_follows_a_status_that_changes_later(runner: WaagentRunner) -> None:
    """transitioning first; later passes pick up the success the extension writes afterwards."""
    runner.set_goal_state([ExtensionSpec(BASE, "1.0.0", public={"mode": "slow", "delay": "0.3"})])
    first_report = runner.run()
    first = first_report.handler(BASE).extension
    assert first is not None and first.status == "transitioning"
    assert not first_report.converged
    final = runner.run_until(lambda report: report.converged, timeout=10)
    extension = final.handler(BASE).extension
    assert extension is not None and extension.message == "done late"


def test_dependent_extension_runs_only_after_its_dependency_succeeds(
    runner: WaagentRunner,
) -> None:
    """A dependency level 1 handler is installed only once level 0 reported success."""
    runner.set_goal_state([
        ExtensionSpec(DEPENDENT, "1.0.0", dependency_level=1),
        ExtensionSpec(BASE, "1.0.0", public={"mode": "slow", "delay": "0.5"}),
    ])
    report = runner.run()
    base_done = next(line for line in _ops(runner, BASE) if line[0] == "done")
    dependent_install = _ops(runner, DEPENDENT)[0]
    assert dependent_install[0] == "install"
    assert _at(dependent_install) > _at(base_done)
    assert report.handler(DEPENDENT).status == "Ready"


def test_failed_dependency_skips_the_dependent(runner: WaagentRunner) -> None:
    """When level 0 fails, level 1 never runs and reports why."""
    runner.set_goal_state([
        ExtensionSpec(BASE, "1.0.0", public={"mode": "error"}),
        ExtensionSpec(DEPENDENT, "1.0.0", dependency_level=1),
    ])
    dependent = runner.run().handler(DEPENDENT)
    assert _ops(runner, DEPENDENT) == []
    assert dependent.status == "NotReady"
    assert dependent.message is not None and BASE in dependent.message


def test_dependency_stuck_without_terminal_status_times_out(tmp_path: Path) -> None:
    """A level 0 handler that never reports success or error holds level 1 until the timeout."""
    runner = WaagentRunner(tmp_path / "vm", goal_state_timeout=1.0)
    for name in (BASE, DEPENDENT):
        runner.add_package(_zip(tmp_path, "1.0.0"), name=name, version="1.0.0")
    runner.set_goal_state([
        ExtensionSpec(BASE, "1.0.0", public={"mode": "silent"}),
        ExtensionSpec(DEPENDENT, "1.0.0", dependency_level=1),
    ])
    dependent = runner.run().handler(DEPENDENT)
    assert _ops(runner, DEPENDENT) == []
    assert "did not reach a terminal state within the allowed timeout" in (dependent.message or "")


def test_upgrade_runs_the_agents_sequence(runner: WaagentRunner) -> None:
    """disable old, update new (told the old version), uninstall old, install new, enable new."""
    runner.set_goal_state([ExtensionSpec(BASE, "1.0.0", seq=0)])
    runner.run()
    runner.set_goal_state([ExtensionSpec(BASE, "1.1.0", seq=1)])
    handler = runner.run().handler(BASE)
    steps = [(line[0], line[1], line[2], line[3]) for line in _ops(runner, BASE)[2:]]
    assert steps == [
        ("disable", "1.0.0", "seq=1", "from=unset"),
        ("update", "1.1.0", "seq=1", "from=1.0.0"),
        ("uninstall", "1.0.0", "seq=1", "from=unset"),
        ("install", "1.1.0", "seq=1", "from=unset"),
        ("enable", "1.1.0", "seq=1", "from=unset"),
    ]
    assert "disable_rc=0" in _ops(runner, BASE)[3]
    assert not runner.ext_dir(BASE, "1.0.0").exists()
    assert handler.version == "1.1.0" and handler.status == "Ready"


def test_agent_restart_runs_enable_again_and_only_enable(runner: WaagentRunner) -> None:
    """After an agent restart the same goal state is processed again: enable runs once more."""
    runner.set_goal_state([ExtensionSpec(BASE, "1.0.0", seq=3)])
    runner.run()
    runner.run()
    runner.restart_agent()
    assert runner.run().handler(BASE).status == "Ready"
    assert [line[:3] for line in _ops(runner, BASE)] == [
        ["install", "1.0.0", "seq=3"], ["enable", "1.0.0", "seq=3"], ["enable", "1.0.0", "seq=3"]]


def test_uninstall_state_disables_uninstalls_and_removes(runner: WaagentRunner) -> None:
    """Goal state 'uninstall' runs disable then uninstall and deletes the extension dir."""
    runner.set_goal_state([ExtensionSpec(BASE, "1.0.0")])
    runner.run()
    runner.set_goal_state([ExtensionSpec(BASE, "1.0.0", state="uninstall")])
    runner.run()
    assert [line[0] for line in _ops(runner, BASE)] == ["install", "enable", "disable",
                                                        "uninstall"]
    assert not runner.ext_dir(BASE, "1.0.0").exists()


def test_unpublished_version_is_reported_not_run(runner: WaagentRunner) -> None:
    """A goal state naming a version the manifest lacks fails in the agent, nothing runs."""
    runner.set_goal_state([ExtensionSpec(BASE, "9.0.0")])
    handler = runner.run().handler(BASE)
    assert handler.status == "NotReady"
    assert "Unable to find version 9.0.0" in (handler.message or "")
    assert _ops(runner, BASE) == []
