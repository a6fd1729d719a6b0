"""`python3 -m handler <install|enable|disable|update|uninstall>`: the composition root of the
lifecycle commands and the only place that turns errors into error statuses and exit codes.
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence

from akvvm_ext import logs
from akvvm_ext.errors import AkvvmError, SettingsError
from handler import environment, status
from handler.lifecycle import OPERATIONS, Context, LifecycleError
from handler.supervisor import choose

log = logging.getLogger("handler")

USAGE = f"usage: python3 -m handler <{'|'.join(OPERATIONS)}>"
EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_SETTINGS = 53  # the extension guidelines' "configuration error"
BEST_EFFORT = ("disable",)  # always exit 0: a failing disable blocks the extension's removal


def main(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> int:
    """Run one lifecycle command; returns the exit code for the agent."""
    if len(argv) != 1 or argv[0] not in OPERATIONS:
        print(USAGE, file=sys.stderr)
        return EXIT_USAGE
    operation = argv[0]
    try:
        env = environment.load(environ)
    except AkvvmError as err:
        fallback = environment.extension_dir(environ)
        return _fail(operation, os.path.join(fallback, "status"),
                     environment.sequence_number(os.path.join(fallback, "config"), environ),
                     str(err), EXIT_FAILED)
    seq = environment.sequence_number(env.config_dir, environ)
    logs.setup_or_stderr(env.log_dir, "Handler", filename="extension.log")
    log.info("%s %s (seq %d) from %s", operation, env.version, seq, env.extension_dir)
    context = Context(env=env, seq=seq, environ=environ, supervisor=choose(environ))
    code = _run(operation, context)
    logs.shutdown()
    return code


def _run(operation: str, ctx: Context) -> int:
    status_dir, seq = ctx.env.status_dir, ctx.seq
    try:
        log.info("%s", OPERATIONS[operation](ctx))
        return 0
    except SettingsError as err:
        message = "Invalid settings: " + "; ".join(err.problems)
        return _fail(operation, status_dir, seq, message, EXIT_SETTINGS)
    except LifecycleError as err:
        return _fail(operation, status_dir, seq, str(err), err.exit_code)
    except AkvvmError as err:
        return _fail(operation, status_dir, seq, str(err), EXIT_FAILED)
    except ImportError as err:  # a dependency imported late, e.g. a .so that does not load
        message, code = environment.import_failure(err, environment.this_host())
        return _fail(operation, status_dir, seq, message, code)
    except Exception as err:  # the last line: a status instead of a bare traceback
        log.exception("%s failed unexpectedly", operation)
        message = (f"{operation} failed unexpectedly ({type(err).__name__}); "
                   f"details in {os.path.join(ctx.env.log_dir, 'extension.log')}")
        return _fail(operation, status_dir, seq, message, EXIT_FAILED)


def _fail(operation: str, status_dir: str, seq: int, message: str, code: int) -> int:
    """Log, tell the agent through stderr and the status file, and pick the exit code."""
    best_effort = operation in BEST_EFFORT
    if logging.getLogger().handlers:  # else logging's last resort would print it a second time
        log.log(logging.WARNING if best_effort else logging.ERROR, "%s: %s", operation, message)
    print(f"{operation}: {message}", file=sys.stderr)
    if best_effort:
        return 0
    try:
        os.makedirs(status_dir, exist_ok=True)
        status.write_error(status_dir, seq, operation.capitalize(), message, code=code)
    except OSError as err:
        log.error("cannot write the error status in %s: %s", status_dir, err)
    return code


