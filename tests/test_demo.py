"""`make demo` (tests/demo.py) runs to the end: install, enable, a rotation, status, uninstall."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.test_zip import REPO, built_zip


def test_demo_runs_end_to_end():
    """Exit 0; the link moves to the rotated version, the agent sees success, no service left."""
    done = subprocess.run([sys.executable, "-m", "tests.demo", "--zip", built_zip()], cwd=REPO,
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "agent ran install + enable; handler Ready, extension success" in out
    assert "(moved after" in out
    assert "the agent parses it (parse_ext_status) as: handler Ready, extension success" in out
    assert "service processes left: none; extension dir exists: False; state dir exists: False" \
        in out
    assert "Done in" in out and "Traceback" not in done.stderr
