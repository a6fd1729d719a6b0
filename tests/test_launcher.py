"""bin/_python: which python runs the extension ($AKVVM_PYTHON as one path; the python the
package has wheels for before a newer one)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "tests" / "data" / "settings" / "seed_cli_settings.json"


def test_a_python_under_a_folder_with_a_space_is_the_one_that_runs(tmp_path: Path) -> None:
    """AKVVM_PYTHON="/opt/My Tools/python3": that python runs `akvvm check`, not another one."""
    folder = tmp_path / "My Tools"
    folder.mkdir()
    ran = tmp_path / "ran"
    python = folder / "python3"
    python.write_text(f'#!/bin/sh\necho "$@" >> "{ran}"\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    env = {**os.environ, "AKVVM_PYTHON": str(python)}
    done = subprocess.run([str(ROOT / "bin" / "akvvm"), "check", str(SEED)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert ran.exists(), "another python ran instead of $AKVVM_PYTHON"
    assert "from handler.cli import main" in ran.read_text()  # the command itself, not a probe


def test_a_python_the_package_has_wheels_for_is_preferred(tmp_path: Path) -> None:
    """`python3` is a 3.14 without vendored wheels and `python3.11` has them: 3.11 runs."""
    root, tools = tmp_path / "ext", tmp_path / "tools"
    (root / "bin").mkdir(parents=True)
    tools.mkdir()
    for name in ("akvvm", "_python"):
        (root / "bin" / name).write_bytes((ROOT / "bin" / name).read_bytes())
        (root / "bin" / name).chmod(0o755)
    for package in ("handler", "akvvm_ext"):
        (root / package).symlink_to(ROOT / package)
    (root / "vendor" / f"cp311-{platform.machine()}").mkdir(parents=True)
    newer = tools / "python3"
    newer.write_text(f'#!/bin/sh\n[ "$1" = -c ] && case "$2" in *version_info*)\n'
                     f'  echo cp314-{platform.machine()}; exit 0;; esac\nexit 97\n')
    supported = tools / "python3.11"
    supported.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for tool in (newer, supported):
        tool.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "AKVVM_PYTHON"}
    env["PATH"] = f"{tools}:/usr/bin:/bin"
    done = subprocess.run([str(root / "bin" / "akvvm"), "check", str(SEED)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
