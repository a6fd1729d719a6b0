"""The one zip on every CPython this machine has between 3.10 and 3.13: vendored wheels load.

The system python3 is always among them; this machine kind also carries pyenv builds of 3.10,
3.12 and 3.13, which stand in for Ubuntu 22.04, Ubuntu 24.04 / Azure Linux 3 and newer images.
"""
from __future__ import annotations

import glob
import os
import subprocess

import pytest

from tests.test_zip import built_zip, isolated_env, unpack_like_the_agent

MODULES = ("cryptography.hazmat.bindings._rust", "msgpack", "jsonschema", "rpds", "tenacity",
           "fluent.sender", "azure.identity", "azure.keyvault.secrets", "akvvm_ext.sync",
           "handler.lifecycle")


def _interpreters() -> list[str]:
    found = {os.path.realpath("/usr/bin/python3")}
    for minor in (10, 11, 12, 13):
        found.update(os.path.realpath(p) for p in
                     glob.glob(f"/root/.pyenv/versions/3.{minor}.*/bin/python3.{minor}"))
    return sorted(found)


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory: pytest.TempPathFactory) -> str:
    return unpack_like_the_agent(built_zip(), str(tmp_path_factory.mktemp("pythons")))


@pytest.mark.parametrize("python", _interpreters())
def test_vendored_dependencies_load_and_check_runs(python: str, unpacked: str) -> None:
    """Under this interpreter every dependency imports from vendor/ and `akvvm check` works."""
    env = isolated_env(AKVVM_PYTHON=python)
    probe = os.path.join(unpacked, "bin", "probe")  # a launcher like bin/enable, running imports
    with open(probe, "w") as script:
        script.write('#!/bin/sh\n. "$(dirname -- "$0")/_python"\n'
                     f'akvvm_exec Probe -c "import importlib, sys; [importlib.import_module(m) '
                     f'for m in {list(MODULES)!r}]; print(sys.executable)"\n')
    os.chmod(probe, 0o755)
    imports = subprocess.run([probe], cwd="/", env=env, capture_output=True, text=True,
                             check=False)
    assert imports.returncode == 0, imports.stderr[-1500:]
    assert os.path.realpath(imports.stdout.strip()) == python
    check = subprocess.run([os.path.join(unpacked, "bin", "akvvm"), "check",
                            os.path.join(os.path.dirname(__file__), "..", "docs", "examples",
                                         "settings.json")],
                           cwd=unpacked, env=env, capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
