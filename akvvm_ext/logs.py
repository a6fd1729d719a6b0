"""Logging of the engine: one line per event, rotated files, optional fluentd that never blocks
(`akvvm_ext.forwarder`), redaction of secrets and thinning of repeated failures.

Line format: `YYYY-MM-DD hh:mm:ss: <LEVEL> [<Component>] <message>` in UTC. The component is
`extra={"component": ...}` when given, else the logger's last name segment capitalised
(`akvvm_ext.sync` -> `Sync`), else (root, `__main__`) the component given to `setup`.
"""
from __future__ import annotations

import io
import logging
import logging.handlers
import os
import re
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from akvvm_ext.model import LoggingTarget

if TYPE_CHECKING:  # fluent-logger is imported only when fluentd is configured: the standard
    from akvvm_ext.forwarder import Fluent  # library alone serves handler.__main__'s guard

FORMAT = "%(asctime)s: %(levelname)s [%(component)s] %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"
ROTATE_BYTES = 1024 * 1024
ROTATE_KEEP = 5
# The SDKs log every request at INFO (multi-line, every cycle): warnings and worse only.
QUIET = ("azure", "msal", "urllib3")

_REDACTIONS = (
    (re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
                re.DOTALL), "[REDACTED KEY]"),
    (re.compile(r"(?i)\b(Bearer|Basic)\s+[A-Za-z0-9\-._~+/]+=*"), r"\1 [REDACTED]"),
    (re.compile(r"(//[^/\s:@]+:)[^@\s/]+@"), r"\1[REDACTED]@"),  # user:password@ in a URL
    # the value: a whole quoted string (backslash escapes inside; unclosed: to the line's end),
    # else an unquoted word
    (re.compile(r"(?i)([\"']?(?:access_?token|refresh_?token|client_?secret|password)[\"']?\s*[:=]\s*)"
                r"(?:\"(?:[^\"\\\n]|\\.)*\"?|'(?:[^'\\\n]|\\.)*'?|[^\"'\s,&}]+)"),
     r"\1[REDACTED]"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"), "[REDACTED JWT]"),
    # a secret bundle's value, and base64 DER (a PFX, a key, a certificate: it starts "MII")
    (re.compile(r"(\\?[\"']value\\?[\"']\s*:\s*)\\?[\"'][^\"'\\]*"), r"\1[REDACTED]"),
    (re.compile(r"\bMII[A-Za-z0-9+/]{60,}={0,2}"), "[REDACTED DATA]"),
)


def redact(text: str) -> str:
    """Remove private keys, bearer tokens and token values from a line (last line of defence)."""
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


class RedactFilter(logging.Filter):
    """Rewrites each record's message and traceback through `redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class ComponentFilter(logging.Filter):
    """Gives every record a `component` attribute (see the module docstring)."""

    def __init__(self, default: str) -> None:
        super().__init__()
        self.default = default

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "component", None):
            last = record.name.rsplit(".", 1)[-1]
            plain = last in {"root", "__main__"} or not last
            record.component = self.default if plain else last.capitalize()
        return True


class UtcFormatter(logging.Formatter):
    """The one line format, timestamps in UTC."""

    def __init__(self) -> None:
        super().__init__(FORMAT, DATEFMT)
        self.converter = time.gmtime

    def formatMessage(self, record: logging.LogRecord) -> str:
        """One line per event: newlines inside a message are escaped (tracebacks stay)."""
        record.message = record.message.replace("\r", "").replace("\n", "\\n")
        return super().formatMessage(record)


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log whose files are born 0600 (logs name paths and hosts, nothing for others)."""

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)  # also a log an older version left readable
        return open(fd, "a", encoding="utf-8")


_state: dict[str, Any] = {"handlers": [], "fluent": None}


def setup(log_dir: str | None, component: str, target: LoggingTarget | None = None, *,
          filename: str = "akvvm_service.log", level: int = logging.INFO) -> Fluent | None:
    """Route the root logger to `<log_dir>/<filename>` (stderr when None) and fluentd.

    Calling it again replaces what an earlier call installed. Returns the fluentd forwarder.
    """
    shutdown()
    root = logging.getLogger()
    handlers = [_file_or_stderr(log_dir, filename)]
    fluent = None
    if target:
        from akvvm_ext.forwarder import Fluent

        fluent = Fluent(target)
    if fluent:
        handlers.append(fluent.handler)
    for handler in handlers:
        handler.addFilter(ComponentFilter(component))
        handler.addFilter(RedactFilter())
        handler.addFilter(REPEATS)
        root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    _state.update(handlers=handlers, fluent=fluent)
    return fluent


def setup_or_stderr(log_dir: str, component: str, target: LoggingTarget | None = None, *,
                    filename: str = "akvvm_service.log") -> Fluent | None:
    """`setup` into `log_dir`, else (read-only, a file in its place) on stderr, saying why once:
    a log folder that cannot be used never stops a command or the service."""
    try:
        return setup(log_dir, component, target, filename=filename)
    except OSError as err:
        fluent = setup(None, component, target)
        logging.getLogger("akvvm").warning("cannot log to %s (%s); logging to stderr", log_dir,
                                           err.strerror or err)
        return fluent


def _file_or_stderr(log_dir: str | None, filename: str) -> logging.Handler:
    handler: logging.Handler
    if log_dir is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        os.makedirs(log_dir, mode=0o755, exist_ok=True)
        handler = PrivateRotatingFileHandler(os.path.join(log_dir, filename),
                                             maxBytes=ROTATE_BYTES, backupCount=ROTATE_KEEP,
                                             encoding="utf-8")
    handler.setFormatter(UtcFormatter())
    return handler


def shutdown(timeout: float = 2.0) -> None:
    """Remove the handlers `setup` installed, flushing fluentd for at most `timeout` s."""
    root = logging.getLogger()
    fluent: Fluent | None = _state["fluent"]
    if fluent is not None:
        root.removeHandler(fluent.handler)
        fluent.stop(timeout)
        if fluent.dropped:
            logging.getLogger("akvvm_ext.logging").warning(
                "fluentd: %d log records dropped in total", fluent.dropped)
    for handler in _state["handlers"]:
        root.removeHandler(handler)
        handler.close()
    _state.update(handlers=[], fluent=None)


class RepeatFilter(logging.Filter):
    """Thins out a WARNING+ line repeated verbatim every cycle (see `Throttle`).

    One instance serves every handler: the decision is made once per record.
    `forget(text)` (a certificate recovered) makes its next failure log at once.
    """

    MAX_KEYS = 10_000

    def __init__(self) -> None:
        super().__init__()
        self._throttle = Throttle()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        decided = getattr(record, "akvvm_repeat", None)
        if decided is not None or record.levelno < logging.WARNING:
            return decided is not False
        message = record.getMessage()
        with self._lock:
            text = self._throttle.check(message, message)
            self._throttle.trim(self.MAX_KEYS)
        record.akvvm_repeat = text is not None
        if text is not None and text != message:
            record.msg, record.args = text, None
        return text is not None

    def forget(self, text: str) -> None:
        with self._lock:
            self._throttle.forget_containing(text)


class Throttle:
    """Logs a failure repeated every cycle at growing intervals, and always when it changes.

    `check(key, message)` returns the text to log or None: the 1st, 2nd, 4th, 8th... repeat of
    the same message for a key (then every 64th), each with its repeat count. `clear(key)` on
    success, so the next failure is logged at once.
    """

    def __init__(self) -> None:
        self._seen: dict[str, tuple[str, int]] = {}

    def check(self, key: str, message: str) -> str | None:
        last, count = self._seen.get(key, ("", 0))
        count = count + 1 if last == message else 1
        self._seen[key] = (message, count)
        if count == 1:
            return message
        if (count & (count - 1)) == 0 or count % 64 == 0:
            return f"{message} (same failure {count} times in a row)"
        return None

    def clear(self, key: str) -> bool:
        """Forget `key`; True if it was failing (worth a "recovered" line)."""
        return self._seen.pop(key, None) is not None

    def forget_containing(self, text: str) -> None:
        """Forget every key that contains `text` (e.g. a certificate's URL)."""
        for key in [k for k in self._seen if text in k]:
            del self._seen[key]

    def trim(self, limit: int) -> None:
        """Keep at most `limit` keys, dropping the oldest."""
        while len(self._seen) > limit:
            del self._seen[next(iter(self._seen))]


REPEATS = RepeatFilter()


def forget_repeats(text: str) -> None:
    """A failure mentioning `text` is over: its next occurrence is logged at once."""
    REPEATS.forget(text)
