"""bin/_python: the python named by $AKVVM_PYTHON is used as one path, spaces and all."""
from __future__ import annotations

import os
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
