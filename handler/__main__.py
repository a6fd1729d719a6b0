"""Entry point of `python3 -m handler <operation>` (what the bin/ scripts exec).

Stdlib only until `handler.main` imports: when a dependency is missing or broken (no wheels for
this machine, a .so that does not load), the agent still gets an error status and exit 51/52.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone

from akvvm_ext.errors import AkvvmError
from handler import environment, supervisor  # stdlib only: tests/test_environment.py keeps it so

BEST_EFFORT = ("disable",)  # always exit 0: a failing disable blocks the extension's removal


def run(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    """`handler.main.main`, or an error status when its dependencies do not import."""
    try:
        from handler.main import main
    except (ImportError, OSError) as err:
        return without_dependencies(argv[0] if argv else "handler", environ, err)
    return main(argv, environ)


def without_dependencies(operation: str, environ: Mapping[str, str], err: BaseException) -> int:
    """Say which module is missing (stderr, status) and exit 51/52; disable stops and exits 0."""
    message, code = environment.import_failure(err, environment.this_host())
    print(f"{operation}: {message}", file=sys.stderr)
    if operation in BEST_EFFORT:
        stop_service(environ)
        return 0
    try:
        write_error_status(environ, operation.capitalize(), message, code)
    except OSError as write_err:
        print(f"{operation}: cannot write the error status: {write_err}", file=sys.stderr)
    return code


def write_error_status(environ: Mapping[str, str], operation: str, message: str,
                       code: int) -> str:
    """`<statusFolder>/<seq>.status` with one error (the shape of handler.status.document)."""
    try:
        env = environment.load(environ)
        status_dir, config_dir = env.status_dir, env.config_dir
    except AkvvmError:  # an unreadable HandlerEnvironment.json: the agent's default layout
        ext_dir = environment.extension_dir(environ)
        status_dir, config_dir = os.path.join(ext_dir, "status"), os.path.join(ext_dir, "config")
    seq = environment.sequence_number(config_dir, environ)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {"name": environment.EXTENSION_NAME, "operation": operation, "status": "error",
            "code": code, "formattedMessage": {"lang": "en-US", "message": message[:1000]}}
    os.makedirs(status_dir, exist_ok=True)
    path = os.path.join(status_dir, f"{seq}.status")
    doc = [{"version": 1.0, "timestampUTC": now, "status": body}]
    environment.write_atomic(path, json.dumps(doc).encode(), 0o644)
    return path


def stop_service(environ: Mapping[str, str]) -> None:
    """Best effort: a service started before the dependency broke must not outlive disable."""
    try:
        env = environment.load(environ)
        spec = supervisor.spec_for(env.extension_dir, env.state_dir, env.log_dir, environ)
        supervisor.choose(environ).stop(spec)
    except (AkvvmError, OSError, subprocess.SubprocessError) as err:
        print(f"disable: could not stop the service: {err}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(run(sys.argv[1:], os.environ))
