"""The fluentd stand-in speaks the forward protocol: fluent-logger and @fluent-org/logger agree."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from fluent.sender import FluentSender

from tests.standins.fluentd import FluentdStandin, Record

HERE = Path(__file__).resolve().parent
CROSS = HERE / "fluent_cross"
NPM_PREFIX = HERE / ".cache" / "npm"


def _pinned_version() -> str:
    manifest = json.loads((CROSS / "package.json").read_text())
    return str(manifest["dependencies"]["@fluent-org/logger"])


@pytest.fixture(scope="module")
def node_env() -> dict[str, str]:
    """NODE_PATH to the pinned @fluent-org/logger that `make npm` installed; fail without it."""
    if shutil.which("node") is None:
        pytest.fail("node is needed for the fluentd cross-check: apt-get install nodejs npm")
    installed = NPM_PREFIX / "node_modules" / "@fluent-org" / "logger" / "package.json"
    pinned = _pinned_version()
    found = json.loads(installed.read_text())["version"] if installed.exists() else None
    if found != pinned:
        have = f"{found} is there" if found else "it is missing"
        pytest.fail(f"the cross-check needs @fluent-org/logger {pinned} in {NPM_PREFIX} "
                    f"({have}): run `make npm`")
    return {**os.environ, "NODE_PATH": str(NPM_PREFIX / "node_modules")}


@pytest.fixture
def fluentd() -> Iterator[FluentdStandin]:
    with FluentdStandin() as receiver:
        yield receiver


def test_fluent_sender_over_tcp_reaches_the_receiver(fluentd: FluentdStandin) -> None:
    """A record sent by fluent-logger over TCP arrives with its tag, time and fields."""
    sender = FluentSender("akvvm", host="127.0.0.1", port=fluentd.port)
    assert sender.emit_with_time("sync", 1700000000, {"cert": "web", "n": 1})
    sender.close()
    assert fluentd.wait_for(1) == [Record("akvvm.sync", 1700000000.0, {"cert": "web", "n": 1})]
    assert fluentd.endpoint == f"tcp://127.0.0.1:{fluentd.port}"


def test_nanosecond_event_time_is_decoded(fluentd: FluentdStandin) -> None:
    """The EventTime ext type carries sub-second precision through the receiver."""
    sender = FluentSender("akvvm", host="127.0.0.1", port=fluentd.port, nanosecond_precision=True)
    assert sender.emit_with_time("t", 1700000000.5, {"x": 1})
    sender.close()
    (record,) = fluentd.wait_for(1)
    assert record.time == pytest.approx(1700000000.5, abs=1e-6)


def test_fluent_sender_over_a_unix_socket_reaches_the_receiver(tmp_path: Path) -> None:
    """fluent-logger's unix:// form reaches a receiver listening on a unix socket."""
    path = str(tmp_path / "fluentd.sock")
    with FluentdStandin(unix_path=path) as receiver:
        assert receiver.endpoint == f"unix://{path}"
        sender = FluentSender("svc", host=receiver.endpoint)
        assert sender.emit("log", {"message": "hello"})
        sender.close()
        assert receiver.wait_for(1)[0][:1] == ("svc.log",)
    assert not os.path.exists(path)


def test_chunk_option_is_acknowledged(fluentd: FluentdStandin) -> None:
    """A Forward-mode message with a chunk id gets {"ack": chunk} back, as acking senders need."""
    with socket.create_connection(("127.0.0.1", fluentd.port), timeout=5) as conn:
        entries = [[1, {"a": 1}], [2, {"a": 2}]]
        conn.sendall(msgpack.packb(["t", entries, {"chunk": "c1", "size": 2}]))
        assert msgpack.unpackb(conn.recv(1024)) == {"ack": "c1"}
    assert [r.record for r in fluentd.wait_for(2)] == [{"a": 1}, {"a": 2}]


def test_stopped_receiver_refuses_and_the_sender_reports_failure(fluentd: FluentdStandin) -> None:
    """After stop() the port is closed and fluent-logger's emit reports failure, not a hang."""
    sender = FluentSender("akvvm", host="127.0.0.1", port=fluentd.port, timeout=1.0)
    assert sender.emit("before", {"n": 1})
    fluentd.wait_for(1)
    fluentd.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", fluentd.port), timeout=1).close()
    assert not (sender.emit("after", {"n": 2}) and sender.emit("after", {"n": 3}))
    sender.close()
    assert len(fluentd.records) == 1


def test_restarted_receiver_keeps_its_port_and_the_sender_reconnects(
    fluentd: FluentdStandin,
) -> None:
    """start() after stop() listens on the same port again; fluent-logger reconnects to it."""
    port = fluentd.port
    sender = FluentSender("akvvm", host="127.0.0.1", port=port, timeout=1.0)
    assert sender.emit("one", {"n": 1})
    fluentd.wait_for(1)
    fluentd.stop()
    sender.emit("lost", {"n": 0})
    fluentd.start()
    assert fluentd.port == port
    assert sender.emit("two", {"n": 2}) or sender.emit("two", {"n": 2})
    sender.close()
    assert fluentd.wait_for(2)[-1].record == {"n": 2}


def test_wait_for_times_out_with_a_clear_message(fluentd: FluentdStandin) -> None:
    """wait_for names how many records came when the expected ones never do."""
    with pytest.raises(TimeoutError, match="got 0 of 1"):
        fluentd.wait_for(1, timeout=0.1)


def test_node_client_in_every_mode_reaches_the_receiver(
    fluentd: FluentdStandin, node_env: dict[str, str],
) -> None:
    """@fluent-org/logger's client in all four event modes, with acks, reaches our receiver."""
    modes = ["Message", "Forward", "PackedForward", "CompressedPackedForward"]
    subprocess.run(
        ["node", str(CROSS / "cross.js"), "client", "127.0.0.1", str(fluentd.port), "node", "2",
         *modes],
        env=node_env, check=True, timeout=60, capture_output=True,
    )
    got = fluentd.wait_for(8)
    assert sorted((r.tag, r.record["mode"], r.record["i"]) for r in got) == sorted(
        (f"node.{mode}", mode, i) for mode in modes for i in range(2))
    assert {r.time for r in got} == {1700000000.25, 1700000001.25}
    assert all(r.record["text"] == "héllo" for r in got)


def test_fluent_sender_reaches_the_node_server(node_env: dict[str, str]) -> None:
    """What fluent-logger sends is what @fluent-org/logger's FluentServer receives."""
    server = subprocess.Popen(
        ["node", str(CROSS / "cross.js"), "server"], env=node_env, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    try:
        assert server.stdout is not None and server.stdin is not None
        port = json.loads(server.stdout.readline())["port"]
        sender = FluentSender("akvvm", host="127.0.0.1", port=port, nanosecond_precision=True)
        assert sender.emit_with_time("sync", 1700000000.5, {"cert": "web", "text": "héllo"})
        sender.close()
        event = json.loads(server.stdout.readline())
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(timeout=10)
    record = {"cert": "web", "text": "héllo"}
    assert event == {"tag": "akvvm.sync", "time": 1700000000.5, "record": record}
