"""The bench's rig: the stand-ins, config.json for a run, and readings of a live process.

Shared by `bench/run.py` (the measurements) and `bench/report.py` (the table and the plot).
"""
from __future__ import annotations

import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from tests.standins.certfactory import PEM, PKCS12, make_chain
from tests.standins.imds import ImdsStandin
from tests.standins.keyvault import KeyVaultStandin

ROOT = Path(__file__).resolve().parents[1]
CYCLES = 1000
WARMUP_CYCLES = 50  # RSS settles within these (connection pool, allocator arenas of 8 threads)
REPEATS = 3  # initial-sync timings: the median of this many runs
SERVICE_BUDGET_S = float(os.environ.get("AKVVM_BENCH_SERVICE_S", "300"))  # bench stays < 10 min
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")
BARE = """
import sys
from azure.identity import ManagedIdentityCredential
from azure.keyvault.secrets import SecretClient
client = SecretClient(sys.argv[1], ManagedIdentityCredential(), verify_challenge_resource=False)
for i in range(int(sys.argv[2])):
    client.get_secret(f"cert{i:03}")
"""



class Timing(NamedTuple):
    """One child process: wall seconds, and CPU seconds in user space and in the kernel."""

    wall: float
    user: float
    sys: float


def inode_cost_ms(parent: Path, count: int = 300) -> float:
    """Milliseconds the kernel takes to create one symlink in a new directory under `parent`.
    On some disks this varies by 50x between directories (seen: 0.013 to 0.85 ms on one ext4),
    and an install creates two inodes (the version file and the link)."""
    scratch = parent / f"inode-probe-{time.monotonic_ns()}"
    scratch.mkdir()
    try:
        start = time.perf_counter()
        for i in range(count):
            os.symlink("x", scratch / str(i))
        return round((time.perf_counter() - start) / count * 1000, 3)
    finally:
        for i in range(count):
            os.unlink(scratch / str(i))
        scratch.rmdir()


def name(i: int) -> str:
    return f"cert{i:03}"


class AgedClock:
    """The vault stand-in's clock: versions made while `age` is set look that much older
    (so listing baselines are past listing.SETTLE_S, as on a VM that has run for a while)."""

    def __init__(self, age: float) -> None:
        self.age = age

    def __call__(self) -> float:
        return time.time() - self.age


class Rig:
    """The stand-ins, a temp dir and the environment every child process gets."""

    def __init__(self, tmp: Path, imds: ImdsStandin, kv: KeyVaultStandin) -> None:
        self.tmp, self.imds, self.kv = tmp, imds, kv
        self.env = {**os.environ, "AZURE_POD_IDENTITY_AUTHORITY_HOST": imds.url,
                    "REQUESTS_CA_BUNDLE": kv.ca_path, "SSL_CERT_FILE": kv.ca_path,
                    "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
                    "PYTHONPATH": str(ROOT)}
        for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
            self.env.pop(var, None)
        self.runs = 0

    def config(self, count: int, interval: str = "3600") -> tuple[Path, Path]:
        """A fresh state dir + store with config.json observing the first `count` certificates."""
        self.runs += 1
        base = self.tmp / f"run{self.runs}"
        dirs = {d: base / d for d in ("state", "status", "log", "store")}
        for path in dirs.values():
            path.mkdir(parents=True, mode=0o700)
        sms = {"pollingIntervalInS": interval, "certificateStoreLocation": str(dirs["store"]),
               "additionalVaultDnsSuffixes": ["localhost"],
               "observedCertificates": [f"{self.kv.url}/secrets/{name(i)}" for i in range(count)]}
        settings = {"secretsManagementSettings": sms, "authenticationSettings":
                    {"msiEndpoint": f"{self.imds.url}/metadata/identity"}}
        doc = {"settings": settings, "seq": 0, "statusFolder": str(dirs["status"]),
               "logFolder": str(dirs["log"]), "extensionPath": str(ROOT), "handlerVersion": "0"}
        config = dirs["state"] / "config.json"
        config.write_text(json.dumps(doc))
        return config, dirs["store"]

    def timed(self, args: list[str], env: dict[str, str] | None = None) -> Timing:
        """Wall seconds from spawn to a successful exit, and the child's CPU seconds."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(args, env=env or self.env, cwd=ROOT, capture_output=True)
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode:
            raise RuntimeError(f"{args[:4]} failed: {done.stderr.decode()[-800:]}")
        return Timing(elapsed, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime)

    def service(self, config: Path, scale: str) -> subprocess.Popen[bytes]:
        env = {**self.env, "AKVVM_BACKOFF_SCALE": scale}
        with open(config.parent / "stderr.txt", "wb") as stderr:
            return subprocess.Popen([sys.executable, "-m", "handler.cli", "service",
                                     "--config", str(config)], env=env, cwd=ROOT,
                                    stdout=subprocess.DEVNULL, stderr=stderr)


def populate(kv: KeyVaultStandin, count: int) -> None:
    """`count` certificate-backed secrets, 3-certificate chains, alternating PFX and PEM."""
    for i in range(count):
        kv.add_certificate(name(i), make_chain(3, key_type="ec", key_size=256),
                           PEM if i % 2 else PKCS12)


def proc_figures(pid: int) -> dict[str, float]:
    """RSS (MiB), CPU seconds and bytes written to storage of a live process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = int(next(line.split()[1] for line in status.splitlines()
                       if line.startswith("VmRSS:")))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return {"rss_mib": rss_kib / 1024, "cpu_s": (int(fields[11]) + int(fields[12])) / TICKS,
            "write_bytes": float(io["write_bytes"])}


def store_snapshot(store: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.lstat().st_mtime_ns, p.lstat().st_size) for p in store.iterdir()}


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return value


def passes(kv: KeyVaultStandin, count: int) -> int:
    """Sync passes the service made: GETs of its last certificate plus complete listings."""
    listing_pages = sum(1 for _, path, status in list(kv.requests)
                        if path == "/secrets" and status == 200)
    return kv.count(name(count - 1), status=200) + listing_pages // math.ceil(count / 25)


def slope(samples: list[tuple[int, float]]) -> float:
    """Least-squares RSS growth per 1,000 cycles after the warm-up."""
    points = [(c, m) for c, m in samples if c >= WARMUP_CYCLES]
    if len(points) < 2 or points[-1][0] == points[0][0]:
        return 0.0
    mean_c = sum(c for c, _ in points) / len(points)
    mean_m = sum(m for _, m in points) / len(points)
    num = sum((c - mean_c) * (m - mean_m) for c, m in points)
    den = sum((c - mean_c) ** 2 for c, _ in points)
    return round(num / den * 1000, 3)


def in_process(rig: Rig, count: int) -> tuple[Any, Any]:
    """Settings observing `count` certificates and the service's credential, in this process."""
    from akvvm_ext.identity import credential
    from akvvm_ext.settings import parse

    os.environ.update({k: rig.env[k] for k in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE",
                                                "NO_PROXY", "no_proxy")})
    config, _ = rig.config(count)
    settings = parse(json.loads(config.read_text())["settings"])
    return settings, credential(settings.identity)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
