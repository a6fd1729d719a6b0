"""Loopback plumbing for the stand-ins: the per-run CA and a threaded HTTP(S) server.

API:
    run_ca() -> RunCA                 one CA per test process; .ca_path (PEM, world-readable)
    RunCA.server_context() -> ssl.SSLContext   server cert for localhost + 127.0.0.1
    Reply(status, body, headers) / json_reply(status, document, headers=())
    Responder: anything with respond(method, target, headers) -> Reply | None (None: TCP reset)
    LoopbackServer(responder, context=None, port=0)   .start() / .stop() / .port
"""

from __future__ import annotations

import atexit
import datetime as dt
import functools
import ipaddress
import json
import shutil
import socket
import ssl
import struct
import tempfile
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.standins.certfactory import (
    CA_USAGE,
    PrivateKey,
    cached_key,
    certificate_builder,
    key_pem,
)

_DAY = dt.timedelta(days=1)
JSON = (("Content-Type", "application/json; charset=utf-8"),)


@dataclass(frozen=True)
class Reply:
    """One HTTP answer."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = JSON


def json_reply(status: int, document: object, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(status, json.dumps(document, separators=(",", ":")).encode(), JSON + headers)


class Responder(Protocol):
    def respond(self, method: str, target: str, headers: Any) -> Reply | None: ...


@dataclass(frozen=True)
class RunCA:
    """The CA every HTTPS stand-in of this process presents, and where its PEM lives."""

    directory: Path
    cert: x509.Certificate
    key: PrivateKey

    @property
    def ca_path(self) -> str:
        return str(self.directory / "ca.pem")

    @functools.cached_property
    def _server_files(self) -> tuple[str, str]:
        cert_path, key_path = self.directory / "server.pem", self.directory / "server.key"
        key = cached_key("ec", 256, 50)
        cert_path.write_bytes(_server_cert(self, key).public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key_pem(key))
        key_path.chmod(0o600)
        return str(cert_path), str(key_path)

    def server_context(self) -> ssl.SSLContext:
        """A TLS server context with a certificate for localhost and 127.0.0.1."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*self._server_files)
        return context


@functools.cache
def run_ca() -> RunCA:
    """Create (once per process) the CA and write its PEM to a readable temporary file."""
    directory = Path(tempfile.mkdtemp(prefix="standin-ca-"))
    directory.chmod(0o755)  # services under test may run as another user and must read ca.pem
    atexit.register(shutil.rmtree, directory, True)
    key = cached_key("ec", 256, 51)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Stand-in Run CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        _base(name, key, name, key, now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        .add_extension(CA_USAGE, True)
        .sign(key, hashes.SHA256())
    )
    (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return RunCA(directory, cert, key)


def _base(subject: x509.Name, key: PrivateKey, issuer: x509.Name, issuer_key: PrivateKey,
          now: dt.datetime) -> x509.CertificateBuilder:
    """Valid from a day ago for 30 days: the lifetime of one test run's certificates."""
    return certificate_builder(subject, key, issuer, issuer_key, now - _DAY, now + 30 * _DAY)


def _server_cert(ca: RunCA, key: PrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    san = x509.SubjectAlternativeName([
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ])
    now = dt.datetime.now(dt.timezone.utc)
    return (
        _base(name, key, ca.cert.subject, ca.key, now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(san, False)
        .sign(ca.key, hashes.SHA256())
    )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects
    disable_nagle_algorithm = True  # headers and body go out separately; avoid 40 ms ACK stalls

    def do_GET(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        responder: Responder = self.server.responder  # type: ignore[attr-defined]
        reply = responder.respond(self.command, self.path, self.headers)
        if reply is None:
            self._reset()
            return
        self.send_response(reply.status)
        for key, value in reply.headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    do_PUT = do_POST = do_PATCH = do_DELETE = do_GET

    def _reset(self) -> None:
        # SO_LINGER 0 makes close() send a TCP RST: the client sees a reset, not a clean EOF.
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the engine fetches in parallel; 5 would drop SYNs under load
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], responder: Responder,
                 context: ssl.SSLContext | None) -> None:
        self.context = context
        self.responder = responder
        self.open_sockets: set[socket.socket] = set()
        self.lock = threading.Lock()
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, addr = super().get_request()
        if self.context is not None:
            # Handshake in the handler thread, not here, so one slow client cannot stall accept().
            sock = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        with self.lock:
            self.open_sockets.add(sock)
        return sock, addr

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # resets and aborted handshakes are expected in fault tests; keep test output clean


class LoopbackServer:
    """A threaded HTTP(S) server on 127.0.0.1 answering with `responder`."""

    def __init__(self, responder: Responder, context: ssl.SSLContext | None = None,
                 port: int = 0) -> None:
        self._server = _Server(("127.0.0.1", port), responder, context)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, close every kept-alive connection, release the port."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        with self._server.lock:
            sockets = list(self._server.open_sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()
