"""Forwarding of log records to fluentd (forward protocol): a bounded queue and a background
thread, so logging never blocks or fails a sync; what cannot be sent is dropped and counted.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time

import msgpack  # fluent-logger's own wire format
from fluent.sender import FluentSender

from akvvm_ext.model import LoggingTarget

QUEUE_SIZE = 1000
FLUENT_TIMEOUT_S = 1.0


class Fluent:
    """Forwards records to fluentd from a background thread through a bounded queue.

    `handler` only enqueues (never blocks); when the queue is full the record is dropped and
    counted. The sender uses short timeouts; its own buffer overflow counts as drops too.
    """

    def __init__(self, target: LoggingTarget, maxsize: int = QUEUE_SIZE,
                 timeout: float = FLUENT_TIMEOUT_S) -> None:
        host = f"unix://{target.unix_path}" if target.unix_path else (target.host or "localhost")
        self.sender = FluentSender(target.servicename, host=host, port=target.port or 24224,
                                   timeout=timeout, buffer_overflow_handler=self._overflow,
                                   nanosecond_precision=True)
        self.queue: queue.Queue[logging.LogRecord | None] = queue.Queue(maxsize)
        self.dropped = 0
        self._reported = 0
        self.handler = _Enqueue(self)
        self._thread = threading.Thread(target=self._pump, name="fluentd", daemon=True)
        self._thread.start()

    def _overflow(self, pending: bytes) -> None:
        self.dropped += _records(pending)

    def _pump(self) -> None:
        while (record := self.queue.get()) is not None:
            self._send(record)
            if self.dropped > self._reported and self.queue.empty():
                note = f"{self.dropped - self._reported} log records dropped (fluentd slow or down)"
                self._reported = self.dropped
                self._send(logging.makeLogRecord({"msg": note, "levelname": "WARNING",
                                                  "component": "Logging"}))

    def _send(self, record: logging.LogRecord) -> None:
        try:
            data = {"level": record.levelname, "component": getattr(record, "component", ""),
                    "message": record.getMessage()}
            self.sender.emit_with_time(None, record.created, data)
        except Exception:  # noqa: BLE001 - fluentd must never take the service down
            self.dropped += 1

    def stop(self, timeout: float = 2.0) -> None:
        """Flush what is queued within `timeout`, then close; never hangs the service's exit."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(queue.Full):
            self.queue.put(None, timeout=timeout / 2)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if not self._thread.is_alive():
            self._close_sender()

    def _close_sender(self) -> None:
        """Close without the sender's last resend of what failed before (its reconnect and send
        take up to a socket timeout each, past the caller's budget): dropped and counted."""
        with self.sender.lock:
            pending, self.sender.pendings = self.sender.pendings, None
        if pending:
            self.dropped += _records(pending)
        self.sender.close()


def _records(pending: bytes) -> int:
    """How many forward-protocol messages a buffer of the sender holds."""
    unpacker = msgpack.Unpacker(max_buffer_size=len(pending) + 1, raw=True)
    try:
        unpacker.feed(pending)
        return max(1, sum(1 for _ in unpacker))
    except (ValueError, msgpack.UnpackException):
        return 1


class _Enqueue(logging.Handler):
    def __init__(self, fluent: Fluent) -> None:
        super().__init__()
        self.fluent = fluent

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.fluent.queue.put_nowait(record)
        except queue.Full:
            self.fluent.dropped += 1
