"""The installed file serves nginx as ssl_certificate and ssl_certificate_key at once."""
from __future__ import annotations

import base64
import datetime as dt
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from akvvm_ext import store
from akvvm_ext.chain import PKCS12, convert
from akvvm_ext.model import ObservedCertificate
from tests.standins import certfactory as cf

NGINX = "/usr/sbin/nginx"
HOST = "www.example.test"

CONF = """
user root root;
worker_processes 1;
error_log {tmp}/error.log;
events {{ worker_connections 16; }}
http {{
    access_log off;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name {host};
        ssl_certificate {link};
        ssl_certificate_key {link};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"nginx exited: {log.read_text() if log.exists() else ''}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    pytest.fail("nginx did not start listening")


def start(tmp: Path, port: int, link: Path) -> subprocess.Popen[bytes]:
    conf = tmp / "nginx.conf"
    conf.write_text(CONF.format(tmp=tmp, port=port, host=HOST, link=link))
    process = subprocess.Popen(
        [NGINX, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf),
         "-g", f"daemon off; pid {tmp}/nginx.pid;"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    wait_listening(port, process, tmp / "error.log")
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def handshake(port: int, root: Path) -> str:
    done = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", HOST,
         "-CAfile", str(root), "-verify_return_error", "-verify_hostname", HOST, "-showcerts"],
        input=b"", capture_output=True, timeout=20,
    )
    return done.stdout.decode(errors="replace")


def install(store_dir: Path, version: str, chain: cf.Chain) -> None:
    """Convert the chain from Key Vault's scrambled legacy PFX and install it as `version`."""
    value = base64.b64encode(cf.to_pfx(chain, order=[2, 0, 1])).decode()
    bundle = convert(value, PKCS12, dt.datetime.now(dt.timezone.utc))
    cert = ObservedCertificate(
        url="https://v.vault.azure.net/secrets/web", vault_url="https://v.vault.azure.net",
        vault_name="v", secret_name="web", version=None, store_dir=str(store_dir),
        link_name="web.pem",
    )
    store.apply(store.plan(cert, version, bundle.pem))


def root_file(tmp_path: Path, chain: cf.Chain) -> Path:
    root = tmp_path / f"root-{chain.root.serial_number}.pem"
    root.write_bytes(chain.cert_pems()[-1])
    return root


@pytest.mark.parametrize("key_type", ["rsa", "ec"])
def test_nginx_serves_the_full_chain_from_the_link(tmp_path: Path, key_type: str) -> None:
    """A Key Vault PFX installed by the store gives a verified TLS handshake through nginx."""
    chain = cf.make_chain(3, key_type, cn=HOST)
    install(tmp_path / "store", "1", chain)
    port = free_port()
    process = start(tmp_path, port, tmp_path / "store" / "web.pem")
    try:
        out = handshake(port, root_file(tmp_path, chain))
    finally:
        stop(process)
    assert "Verify return code: 0 (ok)" in out, out
    assert f"s:CN = {HOST}" in out and "i:CN = Stand-in Intermediate 1" in out
    assert out.count("-----BEGIN CERTIFICATE-----") == 3  # leaf, intermediate, root as sent


def served_leaf(out: str) -> str:
    """The first certificate the server sent, as PEM text."""
    start = out.index("-----BEGIN CERTIFICATE-----")
    end = out.index("-----END CERTIFICATE-----", start) + len("-----END CERTIFICATE-----")
    return out[start:end] + "\n"


def test_nginx_reload_after_rotation_serves_the_new_version(tmp_path: Path) -> None:
    """After the link moves, a reload (SIGHUP) serves the new chain, verified by its root."""
    old, new = cf.make_chain(3, "ec", cn=HOST), cf.make_chain(3, "ec", cn=HOST)
    install(tmp_path / "store", "1", old)
    port = free_port()
    process = start(tmp_path, port, tmp_path / "store" / "web.pem")
    try:
        assert served_leaf(handshake(port, root_file(tmp_path, old))) == old.cert_pems()[0].decode()
        install(tmp_path / "store", "2", new)
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        new_leaf, new_root = new.cert_pems()[0].decode(), root_file(tmp_path, new)
        while served_leaf(out := handshake(port, new_root)) != new_leaf:
            assert time.monotonic() < deadline, out
            time.sleep(0.05)
        assert "Verify return code: 0 (ok)" in out, out
    finally:
        stop(process)
