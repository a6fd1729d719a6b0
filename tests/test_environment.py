"""handler.environment: HandlerEnvironment.json, derived dirs, the sequence-number rule."""
from __future__ import annotations

import json
import os
import platform
import stat
import subprocess
import sys

import pytest

from handler import environment
from handler.environment import EXTENSION_NAME, HandlerEnvironmentError, Host

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_ext(lib: str, version: str = "3.1.0", handler_env: object | None = None) -> str:
    ext = os.path.join(lib, f"{EXTENSION_NAME}-{version}")
    os.makedirs(os.path.join(ext, "config"))
    if handler_env is not None:
        with open(os.path.join(ext, "HandlerEnvironment.json"), "w") as handle:
            json.dump(handler_env, handle)
    return ext


def settings_file(ext: str, seq: int, mtime: float) -> None:
    path = os.path.join(ext, "config", f"{seq}.settings")
    with open(path, "w") as handle:
        handle.write("{}")
    os.utime(path, (mtime, mtime))


def agent_env(ext: str) -> list[dict[str, object]]:
    return [{"name": "Microsoft.Azure.KeyVault.KeyVaultForLinux", "version": 1.0,
             "handlerEnvironment": {"logFolder": "/tmp/akvvm-test-logs",
                                    "configFolder": os.path.join(ext, "config"),
                                    "statusFolder": os.path.join(ext, "status"),
                                    "heartbeatFile": os.path.join(ext, "heartbeat.log"),
                                    "eventsFolder": os.path.join(ext, "events")}}]


def test_sequence_number_comes_from_the_agent_variable_first(tmp_path):
    """`ConfigSequenceNumber` wins even when no settings file for it exists (upgrade case)."""
    ext = make_ext(str(tmp_path))
    settings_file(ext, 3, 1000)
    assert environment.sequence_number(os.path.join(ext, "config"),
                                       {"ConfigSequenceNumber": "7"}) == 7


def test_sequence_number_is_the_newest_settings_file_not_the_largest(tmp_path):
    """Without the variable, the most recently modified `<n>.settings` decides."""
    ext = make_ext(str(tmp_path))
    settings_file(ext, 9, 1000)
    settings_file(ext, 2, 2000)
    with open(os.path.join(ext, "config", "10.settings.bak"), "w") as handle:
        handle.write("x")
    assert environment.sequence_number(os.path.join(ext, "config"), {}) == 2


def test_sequence_number_tie_picks_the_highest_and_nothing_gives_zero(tmp_path):
    """Equal mtimes fall back to the highest number; no files at all mean seq 0 (agent default)."""
    ext = make_ext(str(tmp_path))
    config = os.path.join(ext, "config")
    assert environment.sequence_number(config, {"ConfigSequenceNumber": ""}) == 0
    settings_file(ext, 4, 1500)
    settings_file(ext, 5, 1500)
    assert environment.sequence_number(config, {}) == 5


def test_load_reads_the_agents_handler_environment(tmp_path):
    """The folders come from HandlerEnvironment.json; lib and state dirs derive from the path."""
    lib = str(tmp_path / "waagent")
    ext = make_ext(lib)
    ext = make_ext(lib, "3.1.1", agent_env(os.path.join(lib, f"{EXTENSION_NAME}-3.1.1")))
    env = environment.load({"AZURE_GUEST_AGENT_EXTENSION_PATH": ext})
    assert env.log_dir == "/tmp/akvvm-test-logs"
    assert env.status_dir == os.path.join(ext, "status")
    assert env.events_dir == os.path.join(ext, "events")
    assert env.lib_dir == lib
    assert env.state_dir == os.path.join(lib, f"{EXTENSION_NAME}.State")
    assert env.version == "3.1.1"


def test_load_without_handler_environment_uses_the_agent_layout(tmp_path):
    """A missing file means the agent's default folders under the extension dir."""
    ext = make_ext(str(tmp_path), "3.2.0")
    env = environment.load({"AZURE_GUEST_AGENT_EXTENSION_PATH": ext,
                            "AZURE_GUEST_AGENT_EXTENSION_VERSION": "3.2.0"})
    assert env.config_dir == os.path.join(ext, "config")
    assert env.log_dir == environment.DEFAULT_LOG_DIR


def test_malformed_handler_environment_is_a_clear_error(tmp_path):
    """A HandlerEnvironment.json that is not the agent's array names the file."""
    ext = make_ext(str(tmp_path), handler_env={"logFolder": "/x"})
    with pytest.raises(HandlerEnvironmentError, match=r"HandlerEnvironment\.json"):
        environment.load({"AZURE_GUEST_AGENT_EXTENSION_PATH": ext})


def test_extension_dir_defaults_to_the_package(monkeypatch):
    """Run by hand (no agent variable) the extension dir is where this code lives."""
    assert environment.extension_dir({}) == environment.package_dir()
    assert os.path.isdir(os.path.join(environment.package_dir(), "handler"))


def test_state_dir_is_private(tmp_path):
    """The state dir (config with protected settings) is created 0700, even if it existed wider."""
    ext = make_ext(str(tmp_path))
    env = environment.load({"AZURE_GUEST_AGENT_EXTENSION_PATH": ext})
    os.makedirs(env.state_dir, mode=0o755)
    os.chmod(env.state_dir, 0o755)
    environment.ensure_state_dir(env)
    assert stat.S_IMODE(os.stat(env.state_dir).st_mode) == 0o700


def test_newer_versions_compare_numerically(tmp_path):
    """3.10.0 is newer than 3.9.0; older dirs, other extensions and files do not count."""
    lib = str(tmp_path)
    ext = make_ext(lib, "3.9.0")
    make_ext(lib, "3.10.0")
    make_ext(lib, "3.1.0")
    os.makedirs(os.path.join(lib, "Microsoft.Azure.Other.Thing-9.0.0"))
    env = environment.load({"AZURE_GUEST_AGENT_EXTENSION_PATH": ext})
    assert [os.path.basename(p) for p in environment.newer_versions(env)] == [
        f"{EXTENSION_NAME}-3.10.0"]


def test_the_dependency_guard_imports_the_standard_library_only():
    """`python3 -m handler` must import its guard (environment, supervisor) with no site-packages:
    that is how it reports a missing dependency instead of a traceback."""
    probe = ("import sys\n"
             f"sys.path.insert(0, {REPO!r})\n"
             "import handler.__main__\n"
             "ours = ('handler', 'akvvm_ext', '__main__')\n"
             "foreign = sorted(n for n in sys.modules if n.split('.')[0] not in ours\n"
             "                 and n.split('.')[0] not in sys.stdlib_module_names)\n"
             "try:\n"
             "    import handler.main\n"
             "    print('handler.main imported without site-packages')\n"
             "except ImportError:\n"
             "    pass\n"
             "print(foreign)\n")
    done = subprocess.run([sys.executable, "-S", "-s", "-c", probe], capture_output=True,
                          text=True, timeout=60, env={"PATH": os.environ["PATH"]})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"


@pytest.mark.parametrize(("host", "unsupported"), [
    (Host("linux", "x86_64", "glibc 2.35", "3.10.12"), None),
    (Host("linux", "aarch64", "glibc 2.39", "3.12.3"), None),
    (Host("linux", "ppc64le", "glibc 2.35", "3.10.12"), "not x86_64 or aarch64"),
    (Host("linux", "x86_64", "", "3.12.1"), "not glibc"),
    (Host("freebsd14", "amd64", "", "3.11.6"), "not Linux"),
])
def test_unsupported_hosts_are_those_without_vendored_wheels(host, unsupported):
    """Linux on x86_64/aarch64 with glibc is supported; other machines and musl are not."""
    assert (host.unsupported is None) if unsupported is None else (unsupported in host.unsupported)


def test_an_import_failure_is_52_on_a_supported_host_and_51_elsewhere():
    """The sentence names the module and the machine; the exit code follows the host."""
    err = ModuleNotFoundError("No module named 'fluent'", name="fluent")
    message, code = environment.import_failure(err, Host("linux", "x86_64", "glibc 2.36", "3.11.2"))
    assert code == 52
    assert "fluent" in message and "x86_64, glibc 2.36, Python 3.11.2" in message
    message, code = environment.import_failure(err, Host("linux", "s390x", "glibc 2.36", "3.11.2"))
    assert code == 51
    assert "fluent" in message and "s390x" in message


def test_this_host_describes_the_running_machine():
    """uname -m and the python version of this process."""
    host = environment.this_host()
    assert host.machine == platform.machine()
    assert host.python == platform.python_version()


FULL_DISK = """
import resource, signal, sys
from handler.environment import write_atomic
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full file system: write(2) stops part-way
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    write_atomic(sys.argv[1], b'{"seq": 3, "settings": "%s"}' % (b"y" * 20000), 0o600)
except OSError as err:
    print("refused:", err.strerror)
"""


def test_a_disk_filling_part_way_never_replaces_a_state_file_with_a_truncated_one(tmp_path):
    """config.json written while the disk fills up: the call fails, the old file stays whole."""
    target = tmp_path / "config.json"
    target.write_text('{"seq": 2, "settings": "good"}')
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(target)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused:")
    assert json.loads(target.read_text()) == {"seq": 2, "settings": "good"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no temp left behind
