"""A fluentd stand-in: a real Forward protocol v1 receiver on loopback TCP or a unix socket.

It decodes Message, Forward, PackedForward and CompressedPackedForward modes (EventTime ext
type 0 included), answers `{"ack": chunk}` when asked, and records every event as a
`Record(tag, time, record)`. `stop()` closes the listener and every open connection, so a test
can show that a sender copes with a dead receiver.

    with FluentdStandin() as fluentd:            # or FluentdStandin(unix_path=str(tmp_path / "s"))
        settings = {"endpoint": fluentd.endpoint}  # "tcp://127.0.0.1:<port>" / "unix:///path"
        ...
        (tag, time, record), = fluentd.wait_for(1)
"""

from __future__ import annotations

import gzip
import os
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple

import msgpack

EVENT_TIME_EXT = 0


class Record(NamedTuple):
    """One event as fluentd would route it."""

    tag: str
    time: float
    record: dict[str, Any]


@dataclass(frozen=True)
class _EventTime:
    seconds: int
    nanoseconds: int


def _ext_hook(code: int, data: bytes) -> Any:
    if code == EVENT_TIME_EXT and len(data) == 8:
        return _EventTime(*struct.unpack(">II", data))
    return msgpack.ExtType(code, data)


def _unpacker() -> msgpack.Unpacker:
    # surrogateescape keeps the exact bytes of a PackedForward payload sent as a str (old clients).
    return msgpack.Unpacker(
        raw=False, ext_hook=_ext_hook, unicode_errors="surrogateescape",
        timestamp=0, strict_map_key=False, max_buffer_size=64 * 1024 * 1024,
    )


def _seconds(value: Any) -> float:
    if isinstance(value, _EventTime):
        return value.seconds + value.nanoseconds / 1e9
    if isinstance(value, msgpack.Timestamp):
        return float(value.to_unix())
    if isinstance(value, int | float):
        return float(value)
    raise ValueError(f"not an event time: {value!r}")


def _packed_entries(payload: str | bytes, option: dict[str, Any]) -> Iterator[list[Any]]:
    data = payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else payload
    if option.get("compressed") == "gzip":
        data = gzip.decompress(data)
    unpacker = _unpacker()
    unpacker.feed(data)
    yield from unpacker


def decode_message(message: Any) -> tuple[list[Record], dict[str, Any]]:
    """Turn one transport message into its records and its option map. No I/O."""
    if not isinstance(message, list | tuple) or len(message) < 2 or not isinstance(message[0], str):
        raise ValueError(f"not a forward-protocol message: {message!r}"[:200])
    tag, body = message[0], message[1]
    if isinstance(body, list | tuple):
        entries, option = list(body), message[2] if len(message) > 2 else None
    elif isinstance(body, str | bytes):
        option = message[2] if len(message) > 2 else None
        entries = list(_packed_entries(body, option or {}))
    else:
        entries, option = [[body, message[2]]], message[3] if len(message) > 3 else None
    records = [Record(tag, _seconds(when), dict(record)) for when, record in entries]
    return records, dict(option or {})


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        standin = self.server.standin
        standin._track(self.request, add=True)
        unpacker = _unpacker()
        try:
            while chunk := self.request.recv(65536):
                unpacker.feed(chunk)
                for message in unpacker:
                    records, option = decode_message(message)
                    standin._add(records)
                    if "chunk" in option:
                        self.request.sendall(msgpack.packb({"ack": option["chunk"]}))
        except (OSError, ValueError, TypeError, msgpack.UnpackException):
            pass  # a broken client only loses its own connection, as with fluentd
        finally:
            standin._track(self.request, add=False)


class _Server(socketserver.ThreadingMixIn, socketserver.BaseServer):
    daemon_threads = True
    standin: FluentdStandin


class _TCPServer(_Server, socketserver.TCPServer):
    allow_reuse_address = True


class _UnixServer(_Server, socketserver.UnixStreamServer):
    pass


class FluentdStandin:
    """A forward-protocol receiver that records what it gets; see the module docstring."""

    def __init__(self, unix_path: str | None = None) -> None:
        self.unix_path = unix_path
        self._records: list[Record] = []
        self._changed = threading.Condition()
        self._clients: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        if self.unix_path is not None:
            return f"unix://{self.unix_path}"
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def records(self) -> list[Record]:
        with self._changed:
            return list(self._records)

    def start(self) -> FluentdStandin:
        server: _Server
        if self.unix_path is not None:
            if os.path.exists(self.unix_path):
                os.unlink(self.unix_path)
            server = _UnixServer(self.unix_path, _Handler)
        else:
            server = _TCPServer(("127.0.0.1", self.port), _Handler)
            self.port = server.server_address[1]
        server.standin = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every open connection (the receiver is really gone)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._changed:
            clients = list(self._clients)
        for client in clients:
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.unix_path is not None and os.path.exists(self.unix_path):
            os.unlink(self.unix_path)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Record]:
        """Wait until at least `count` records arrived; return them all, or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._records) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    got = len(self._records)
                    raise TimeoutError(f"fluentd stand-in got {got} of {count} records")
                self._changed.wait(left)
            return list(self._records)

    def clear(self) -> None:
        with self._changed:
            self._records.clear()

    def _add(self, records: list[Record]) -> None:
        with self._changed:
            self._records.extend(records)
            self._changed.notify_all()

    def _track(self, client: socket.socket, add: bool) -> None:
        with self._changed:
            if add:
                self._clients.add(client)
            else:
                self._clients.discard(client)

    def __enter__(self) -> FluentdStandin:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
