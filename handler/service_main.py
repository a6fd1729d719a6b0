"""Composition root of the service process (`akvvm service --config <state_dir>/config.json`):
the one-instance lock and pidfile (`handler.pidlock`), logging, signals, the real identity and
vault clients and a `StatusReporter` wired into `akvvm_ext.service.Service`; `--once`: one pass.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from akvvm_ext import backoff, logs
from akvvm_ext.errors import AkvvmError
from akvvm_ext.model import CertResult, Settings
from akvvm_ext.model import Outcome as CertOutcome
from akvvm_ext.service import Service
from akvvm_ext.settings import parse
from handler import grants, status
from handler.pidlock import pidfile, single_instance

log = logging.getLogger("akvvm.main")
STOP_GRACE_S = 0.7  # SIGTERM to exit stays under a second even when a sync is in flight
# A SIGHUP before the Service exists (enable's reload right after a start): applied once it does.
_early_reload = threading.Event()


def _note_reload(signum: int, frame: Any) -> None:
    _early_reload.set()


class ConfigError(AkvvmError):
    """config.json is missing, unreadable or invalid; carries where to report, when known."""

    code = "CONFIG"

    def __init__(self, message: str, status_dir: str | None = None,
                 seq: int | None = None) -> None:
        super().__init__(message, "Run enable again (it rewrites config.json).")
        self.status_dir, self.seq = status_dir, seq


@dataclass(frozen=True)
class Outcome:
    """How `serve` ended: the exit code, and whether a sync pass was still running."""

    code: int
    in_flight: bool = False


@dataclass(frozen=True)
class Config:
    """The service's effective config, as enable wrote it (DESIGN: config.json)."""

    settings: Settings
    seq: int
    status_dir: str
    log_dir: str


def read_config(path: str) -> Config:
    """Parse config.json; raise ConfigError naming the problem (never echoing settings)."""
    try:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {path}: {type(err).__name__}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} is not a JSON object")
    seq, status_dir = raw.get("seq"), raw.get("statusFolder")
    where = (status_dir if isinstance(status_dir, str) else None,
             seq if isinstance(seq, int) and not isinstance(seq, bool) else None)
    missing = [k for k in ("statusFolder", "logFolder", "extensionPath", "handlerVersion")
               if not isinstance(raw.get(k), str)] + ([] if where[1] is not None else ["seq"])
    if missing:
        raise ConfigError(f"{path}: missing or invalid {', '.join(missing)}", *where)
    try:
        settings = parse(raw.get("settings"))
    except AkvvmError as err:
        raise ConfigError(f"invalid settings in {path}: {err}", *where) from None
    return Config(settings, int(raw["seq"]), str(status_dir), str(raw["logFolder"]))


def _arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="akvvm service", description=__doc__)
    parser.add_argument("--config", required=True, help="<state dir>/config.json")
    parser.add_argument("--once", action="store_true", help="one sync pass, print, exit 0/1")
    args = list(argv)
    return parser.parse_args(args[1:] if args[:1] == ["service"] else args)


def main(argv: Sequence[str]) -> int:
    """Run the service (or one pass with --once); 0 on a clean stop, 1 on a bad config."""
    signal.signal(signal.SIGHUP, _note_reload)  # first: SIGHUP's default action would kill us
    # bin/akvvm blocks SIGHUP before Python imports anything; one that came meanwhile is pending
    # and is delivered to `_note_reload` now
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    args = _arguments(argv)
    scale, scale_note = backoff.scale_from(os.environ)
    try:
        config = read_config(args.config)
    except ConfigError as err:
        return _config_failed(err)
    if args.once:
        logs.setup(None, "Service", None)
        try:
            return once(config, scale)
        finally:
            logs.shutdown()
    logs.setup_or_stderr(config.log_dir, "Service", config.settings.logging)
    if scale_note:
        log.warning("%s", scale_note)
    outcome = serve(args.config, config, scale)
    logs.shutdown(timeout=0.2)
    if outcome.in_flight:  # a sync's worker threads would hold the exit; the store is atomic
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(outcome.code)
    return outcome.code


def _config_failed(err: ConfigError) -> int:
    print(f"akvvm service: {err}", file=sys.stderr)
    if err.status_dir is not None and err.seq is not None:
        with suppress(OSError):  # nowhere to report then; stderr has the reason
            status.write_error(err.status_dir, err.seq, status.OPERATION, str(err))
    return 1


class Clients:
    """The real clients: one managed-identity credential and the vault clients on it."""

    def __init__(self, settings: Settings, scale: float) -> None:
        from akvvm_ext.identity import credential
        from akvvm_ext.keyvault import Vaults

        self.credential = credential(settings.identity, backoff_scale=scale)
        self.vaults = Vaults(self.credential)
        self.fetch = self.vaults.fetch
        self.client = self.vaults.client  # for vault listings (akvvm_ext.listing)

    def close(self) -> None:
        self.vaults.close()
        self.credential.close()


make_vaults = Clients  # the factory the Service gets (tests replace it)


def _sync_pass(state_dir: str) -> Callable[[Settings, Any, datetime], list[CertResult]]:
    """The engine's sync for the service's whole life: one change detector (vault listings
    instead of a GET per certificate where that costs less), and ancestor ACL grants recorded
    in the state dir for uninstall."""
    from akvvm_ext.listing import ChangeDetector
    from akvvm_ext.sync import sync

    return functools.partial(sync, record_grants=grants.recorder(state_dir),
                             detector=ChangeDetector())


def once(config: Config, scale: float) -> int:
    """One sync pass, a summary line per certificate on stdout; 1 when any failed."""
    from akvvm_ext.sync import sync

    clients = make_vaults(config.settings, scale)
    try:
        results = sync(config.settings, clients, datetime.now(timezone.utc))
    finally:
        clients.close()
    for result in results:
        detail = status.substatus_for(result)["formattedMessage"]["message"]
        print(f"{result.outcome.value:9} {result.url}: {detail}")
    return 1 if any(r.outcome is CertOutcome.FAILED for r in results) else 0


def serve(config_path: str, config: Config, scale: float) -> Outcome:
    """Run the service until SIGTERM/SIGINT; SIGHUP re-reads config.json (settings and seq)."""
    state_dir = os.path.dirname(os.path.abspath(config_path))
    with single_instance(state_dir) as first:
        if not first:
            log.info("another service instance is already running; exiting")
            return Outcome(0)
        reporter = status.StatusReporter(config.status_dir, config.seq)
        loader = _Loader(config_path, config, reporter)
        service = Service(loader.load, lambda s: make_vaults(s, scale), reporter,
                          sync=_sync_pass(state_dir), backoff_scale=scale)
        previous = signal.signal(signal.SIGHUP, lambda *_: service.request_reload())
        if _early_reload.is_set():  # checked after the handler moved: none is lost in between
            _early_reload.clear()
            service.request_reload()
        try:
            with pidfile(state_dir):
                return _run(service, loader)
        finally:
            signal.signal(signal.SIGHUP, previous)


class _StopRequested(Exception):
    """Raised by the SIGTERM/SIGINT handler to end the main thread's wait at once."""


def _run(service: Service, loader: _Loader) -> Outcome:
    """The loop runs in a thread; the main thread only waits for it or for a stop signal."""
    stop, done = threading.Event(), threading.Event()
    failure: list[BaseException] = []
    log.info("service started (pid %d, seq %d, %d observed certificate(s))", os.getpid(),
             loader.config.seq, len(loader.config.settings.observed))
    worker = _guard(service, stop, done, failure)
    threading.Thread(target=worker, name="service", daemon=True).start()
    with _stop_signals() as stopping:
        try:
            done.wait()  # the SIGTERM handler raises here (not Thread.join: 3.11 mis-marks it)
        except _StopRequested:
            pass
        stopping.append(True)
        stop.set()
        done.wait(STOP_GRACE_S)
    in_flight = not done.is_set()
    log.info("service stopped%s", " (a sync was in flight)" if in_flight else "")
    if failure:
        _report_failure(loader.config, failure[0])
    return Outcome(1 if failure else 0, in_flight)


@contextmanager
def _stop_signals() -> Iterator[list[bool]]:
    """SIGTERM/SIGINT raise `_StopRequested` once; later ones (and after stopping) are ignored."""
    stopping: list[bool] = []

    def handler(signum: int, frame: Any) -> None:
        if not stopping:
            stopping.append(True)
            raise _StopRequested
    saved = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stopping
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


def _report_failure(config: Config, err: BaseException) -> None:
    """The service cannot go on: say why in the current status before exiting non-zero."""
    reason = str(err) if isinstance(err, AkvvmError) else f"internal error ({type(err).__name__})"
    try:
        status.write_error(config.status_dir, config.seq, status.OPERATION,
                           f"The Key Vault extension service stopped: {reason}. "
                           "See the service log.")
    except OSError as write_err:
        log.error("cannot write the error status: %s", write_err)


def _guard(service: Service, stop: threading.Event, done: threading.Event,
           failure: list[BaseException]) -> Callable[[], None]:
    def run() -> None:
        try:
            service.run(stop)
        except BaseException as err:  # reported, then the process exits 1
            log.exception("service failed: %s", err)
            failure.append(err)
        finally:
            done.set()
    return run


class _Loader:
    """`load_settings` for the Service: config.json at start, re-read on every reload."""

    def __init__(self, path: str, config: Config, reporter: status.StatusReporter) -> None:
        self.path, self.config, self.reporter, self.first = path, config, reporter, True

    def load(self) -> Settings:
        if self.first:
            self.first = False
            return self.config.settings
        fresh = read_config(self.path)
        self.reporter.retarget(fresh.status_dir, fresh.seq)
        if fresh.settings.logging != self.config.settings.logging:
            logs.setup_or_stderr(fresh.log_dir, "Service", fresh.settings.logging)
        log.info("config reloaded (seq %d)", fresh.seq)
        self.config = fresh
        return fresh.settings
