"""Entry point of `python3 -m handler <operation>` (what the bin/ scripts exec).

Stdlib only until `handler.main` imports: when a dependency is missing or broken (no wheels for
this machine, a .so that does not load), install and enable exit 51/52 with an error status, while
disable, update and uninstall, which need no third-party package, still do their work and exit 0.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone

from akvvm_ext import logs
from akvvm_ext.errors import AkvvmError
from handler import environment, supervisor  # stdlib only: tests/test_environment.py keeps it so

BEST_EFFORT = ("disable",)  # always exit 0: a failing disable blocks the extension's removal
# An old version's failing uninstall aborts the upgrade that brings the missing wheels.
STDLIB_ONLY = ("update", "uninstall")
EXIT_FAILED = 1  # handler.main's code for a command that failed
log = logging.getLogger("handler")


def run(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    """`handler.main.main`, or an error status when its dependencies do not import."""
    try:
        from handler.main import main
    except Exception as err:  # noqa: BLE001 - an old library on a new python may raise anything
        return without_dependencies(argv[0] if argv else "handler", environ, err)
    return main(argv, environ)


def without_dependencies(operation: str, environ: Mapping[str, str], err: BaseException) -> int:
    """Say which module is missing (stderr); install and enable write an error status and exit
    51/52; disable stops the service, update and uninstall run as usual (all three exit 0)."""
    message, code = environment.import_failure(err, environment.this_host())
    print(f"{operation}: {message}", file=sys.stderr)
    if operation in BEST_EFFORT:
        stop_service(environ)
        return 0
    if operation in STDLIB_ONLY:
        return run_stdlib_only(operation, environ, message, code)
    return report(environ, operation, "error", message, code)


def run_stdlib_only(operation: str, environ: Mapping[str, str], why: str, code: int) -> int:
    """update or uninstall as `handler.main` runs them, with a status saying what was done."""
    try:
        from handler import lifecycle
    except Exception:  # noqa: BLE001 - lifecycle grew a third-party import (see its tests)
        return report(environ, operation, "error", why, code)
    try:
        env = environment.load(environ)
        seq = environment.sequence_number(env.config_dir, environ)
        ctx = lifecycle.Context(env=env, seq=seq, environ=environ,
                                supervisor=supervisor.choose(environ))
        with handler_log(env.log_dir):
            log.info("%s %s (seq %d) from %s without its dependencies", operation, env.version,
                     seq, env.extension_dir)
            done = lifecycle.OPERATIONS[operation](ctx)
            log.info("%s", done)
    except Exception as err:  # noqa: BLE001 - an error status, never a traceback, for the agent
        return report(environ, operation, "error", f"{operation} failed: {err}", EXIT_FAILED)
    print(done)
    report(environ, operation, "success", f"{done} (ran without its dependencies: {why})", 0)
    return 0


def report(environ: Mapping[str, str], operation: str, state: str, message: str,
           code: int) -> int:
    """Write the status (saying so on stderr when that fails); returns `code`."""
    try:
        write_status(environ, operation.capitalize(), state, message, code)
    except OSError as err:
        print(f"{operation}: cannot write the status: {err}", file=sys.stderr)
    return code


def write_status(environ: Mapping[str, str], operation: str, state: str, message: str,
                 code: int) -> str:
    """`<statusFolder>/<seq>.status` with one status (the shape of handler.status.document)."""
    try:
        env = environment.load(environ)
        status_dir, config_dir = env.status_dir, env.config_dir
    except AkvvmError:  # an unreadable HandlerEnvironment.json: the agent's default layout
        ext_dir = environment.extension_dir(environ)
        status_dir, config_dir = os.path.join(ext_dir, "status"), os.path.join(ext_dir, "config")
    seq = environment.sequence_number(config_dir, environ)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {"name": environment.EXTENSION_NAME, "operation": operation, "status": state,
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
    except Exception as err:  # noqa: BLE001 - disable always exits 0
        print(f"disable: could not stop the service: {err}", file=sys.stderr)


@contextlib.contextmanager
def handler_log(log_dir: str) -> Iterator[None]:
    """extension.log as `handler.main` writes it (akvvm_ext.logs needs the standard library only
    while no fluentd is configured)."""
    logs.setup_or_stderr(log_dir, "Handler", filename="extension.log")
    try:
        yield
    finally:
        logs.shutdown()


if __name__ == "__main__":
    raise SystemExit(run(sys.argv[1:], os.environ))
