"""Crash consistency: a writer killed at random points never lets a reader see a broken file."""
from __future__ import annotations

import datetime as dt
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from akvvm_ext import store
from akvvm_ext.chain import PEM, convert
from akvvm_ext.model import ObservedCertificate
from tests.standins import certfactory as cf

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 8

WRITER = """
import sys
from akvvm_ext import store
from akvvm_ext.model import ObservedCertificate
store_dir, round_id, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
contents = [open(p, "rb").read() for p in paths]
cert = ObservedCertificate(url="u", vault_url="v", vault_name="kv", secret_name="web",
                           version=None, store_dir=store_dir, link_name="kv.web")
i = 0
while True:
    store.apply(store.plan(cert, f"{round_id}-{i}", contents[i % len(contents)]))
    if i % 3 == 2:  # the served version rewritten with other content: the replace path
        store.apply(store.plan(cert, f"{round_id}-{i}", contents[(i + 1) % len(contents)]))
    i += 1
"""


def observed(store_dir: Path) -> ObservedCertificate:
    return ObservedCertificate(url="u", vault_url="v", vault_name="kv", secret_name="web",
                               version=None, store_dir=str(store_dir), link_name="kv.web")


class Reader(threading.Thread):
    """Opens the link as fast as it can and records anything that is not a known-good file."""

    def __init__(self, link: Path, valid: set[bytes]) -> None:
        super().__init__(daemon=True)
        self.link, self.valid = link, valid
        self.stop = threading.Event()
        self.reads, self.seen, self.problems = 0, set[bytes](), list[str]()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with open(self.link, "rb") as served:
                    data = served.read()
            except OSError as err:
                self.problems.append(f"open failed: {err}")
                continue
            self.reads += 1
            if data not in self.valid:
                self.problems.append(f"incomplete or unknown file of {len(data)} bytes")
            self.seen.add(data)


def final_files(store_dir: Path) -> list[Path]:
    """Every file at a final path: version files and the link (temp files start with a dot)."""
    return [p for p in store_dir.iterdir() if not p.name.startswith(".")]


def test_killed_writer_never_exposes_a_partial_file_or_dangling_link(tmp_path: Path) -> None:
    """SIGKILL at random points while a reader opens the link thousands of times: all whole."""
    now = dt.datetime.now(dt.timezone.utc)
    contents = [convert(cf.to_kv_pem(cf.make_chain(3, "ec")), PEM, now).pem for _ in range(3)]
    paths = []
    for number, content in enumerate(contents):
        paths.append(tmp_path / f"content-{number}.pem")
        paths[-1].write_bytes(content)
    store_dir = tmp_path / "store"
    store.apply(store.plan(observed(store_dir), "initial", contents[0]))
    reader = Reader(store_dir / "kv.web", set(contents))
    reader.start()
    rng = random.Random(os.getpid())
    try:
        for round_id in range(ROUNDS):
            writer = subprocess.Popen(
                [sys.executable, "-c", WRITER, str(store_dir), f"r{round_id}", *map(str, paths)],
                cwd=ROOT, stderr=subprocess.PIPE,
            )
            time.sleep(rng.uniform(0.15, 0.6))
            assert writer.poll() is None, writer.stderr.read() if writer.stderr else ""
            writer.send_signal(signal.SIGKILL)
            writer.wait()
            for path in final_files(store_dir):
                assert path.read_bytes() in reader.valid, f"{path.name} is not a complete file"
    finally:
        reader.stop.set()
        reader.join()
    print(f"{reader.reads} reads, {len(final_files(store_dir))} files")
    assert reader.problems == []
    assert reader.reads > 1000
    assert len(reader.seen) == len(contents)  # the link really moved under the reader
    assert len(final_files(store_dir)) > 2 * ROUNDS
