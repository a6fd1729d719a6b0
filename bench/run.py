"""`make bench`: the service's performance against the local stand-ins, every figure from one run.

Initial sync (ours vs the bare SDK, both as separate processes), an idle cycle's cost, the real
service process's memory and CPU over 1,000 cycles, rotation latency, and what listing saves.
Prints a table; writes bench/results/results.json and results.png.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.standins.certfactory import PEM, PKCS12, make_chain  # noqa: E402
from tests.standins.imds import ImdsStandin  # noqa: E402
from tests.standins.keyvault import KeyVaultStandin  # noqa: E402

SIZES = (10, 100, 500)
LATENCIES_S = (0.0, 0.020)
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

    def timed(self, args: list[str], env: dict[str, str] | None = None) -> float:
        """Seconds a child process takes from spawn to a successful exit."""
        start = time.perf_counter()
        done = subprocess.run(args, env=env or self.env, cwd=ROOT, capture_output=True)
        elapsed = time.perf_counter() - start
        if done.returncode:
            raise RuntimeError(f"{args[:4]} failed: {done.stderr.decode()[-800:]}")
        return elapsed

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


def initial_sync(rig: Rig, count: int, latency: float) -> dict[str, Any]:
    """Ours (`service --once`: start to the last link in place) vs the bare SDK, sequential."""
    rig.kv.latency = latency
    ours_runs, bare_runs = [], []
    for _ in range(REPEATS):
        config, store = rig.config(count)
        ours_runs.append(rig.timed([sys.executable, "-m", "handler.cli", "service", "--config",
                                    str(config), "--once"]))
        links = sum(1 for p in store.iterdir() if p.is_symlink())
        if links != count:
            raise RuntimeError(f"initial sync installed {links} of {count} certificates")
        bare_runs.append(rig.timed([sys.executable, "-c", BARE, rig.kv.url, str(count)]))
    rig.kv.latency = 0.0
    ours, bare = sorted(ours_runs)[REPEATS // 2], sorted(bare_runs)[REPEATS // 2]
    return {"n": count, "latency_ms": latency * 1000, "ours_s": round(ours, 3),
            "bare_s": round(bare, 3), "ratio": round(ours / bare, 3), "links": links}


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


def service_cycles(rig: Rig, count: int, cycles: int, budget_s: float) -> dict[str, Any]:
    """The real service process polling as fast as it can (interval 1 s x scale 0.001), for
    `cycles` idle cycles or `budget_s`, whichever comes first."""
    config, store = rig.config(count, interval="1")
    kv, imds = rig.kv, rig.imds
    kv.reset_counters()
    proc = rig.service(config, scale="0.001")
    try:
        wait_for(lambda: passes(kv, count) >= 2, 120, "the first pass and an idle cycle")
        start, tokens, files = proc_figures(proc.pid), imds.token_requests, store_snapshot(store)
        first, requests, began = passes(kv, count), kv.count(), time.monotonic()
        samples, done = [(0, round(start["rss_mib"], 2))], 0
        while done < cycles and time.monotonic() - began < budget_s:
            time.sleep(0.5)
            done = passes(kv, count) - first
            samples.append((done, round(proc_figures(proc.pid)["rss_mib"], 2)))
        end, elapsed = proc_figures(proc.pid), time.monotonic() - began
        requests = kv.count() - requests
    finally:
        stop(proc)
    changed = [k for k, v in store_snapshot(store).items() if files.get(k) != v]
    warm = next((rss for cycle, rss in samples if cycle >= WARMUP_CYCLES), end["rss_mib"])
    return {"n": count, "cycles": done, "seconds": round(elapsed, 1),
            "rss_start_mib": round(start["rss_mib"], 1), "rss_end_mib": round(end["rss_mib"], 1),
            "rss_growth_mib": round(end["rss_mib"] - start["rss_mib"], 2),
            "rss_growth_after_warmup_mib": round(end["rss_mib"] - warm, 2),
            "rss_slope_mib_per_1000_cycles": slope(samples),
            "rss_projected_1000_mib": round(end["rss_mib"] + slope(samples)
                                            * max(0, CYCLES - done) / 1000, 1),
            "cpu_s_per_cycle": round((end["cpu_s"] - start["cpu_s"]) / max(done, 1), 4),
            "requests_per_cert_per_cycle": round(requests / max(done * count, 1), 3),
            "token_requests": imds.token_requests - tokens, "store_files_changed": len(changed),
            "bytes_written_per_cycle": round((end["write_bytes"] - start["write_bytes"])
                                             / max(done, 1), 1),
            "rss_samples": samples}


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


def steady_cycle(rig: Rig, count: int) -> dict[str, Any]:
    """One sync pass with nothing changed, in this process, counted exactly."""
    from akvvm_ext.keyvault import Vaults
    from akvvm_ext.sync import sync

    settings, cred = in_process(rig, count)
    vaults = Vaults(cred)
    sync(settings, vaults, datetime.now(timezone.utc))
    store = Path(settings.observed[0].store_dir)
    files, tokens, gets = store_snapshot(store), rig.imds.token_requests, rig.kv.count()
    written = proc_figures(os.getpid())["write_bytes"]
    results = sync(settings, vaults, datetime.now(timezone.utc))
    vaults.close()
    return {"n": count, "gets_per_cert": (rig.kv.count() - gets) / count,
            "token_requests": rig.imds.token_requests - tokens,
            "store_files_changed": sum(1 for k, v in store_snapshot(store).items()
                                       if files.get(k) != v),
            "bytes_written": proc_figures(os.getpid())["write_bytes"] - written,
            "unchanged": sum(r.outcome.value == "unchanged" for r in results)}


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


def rotation(rig: Rig, rotations: int = 5) -> dict[str, Any]:
    """pollingIntervalInS 2, real time: a new version in the vault -> the link points at it."""
    config, store = rig.config(3, interval="2")
    link = store / f"localhost.{name(0)}"
    proc = rig.service(config, scale="1")
    latencies = []
    try:
        wait_for(link.exists, 60, "the initial sync")
        for _ in range(rotations):
            version = rig.kv.add_certificate(name(0), make_chain(3, key_type="ec", key_size=256))
            began = time.perf_counter()
            wait_for(lambda v=version: os.readlink(link).endswith(v), 30, "the rotation")
            latencies.append(round(time.perf_counter() - began, 3))
    finally:
        stop(proc)
    return {"interval_s": 2, "latencies_s": latencies, "max_s": max(latencies),
            "mean_s": round(sum(latencies) / len(latencies), 3)}


def listing_savings(rig: Rig, count: int) -> dict[str, Any]:
    """Requests per `sync` pass without and with a listing.ChangeDetector, in this process."""
    from akvvm_ext.keyvault import Vaults
    from akvvm_ext.listing import ChangeDetector
    from akvvm_ext.sync import sync

    settings, cred = in_process(rig, count)
    vaults, detector, kv = Vaults(cred), ChangeDetector(), rig.kv

    def cycle(listing: bool) -> tuple[int, int]:
        before = kv.count(status=200)
        results = sync(settings, vaults, datetime.now(timezone.utc),
                       detector=detector if listing else None)
        return kv.count(status=200) - before, sum(r.outcome.value == "installed" for r in results)

    cycle(listing=True)  # the initial sync: every certificate fetched, baselines recorded
    per_cert, _ = cycle(listing=False)  # what every cycle costs without listing
    quiet, _ = cycle(listing=True)
    kv.add_certificate(name(7), make_chain(3, key_type="ec", key_size=256))
    rotated, installed = cycle(listing=True)
    vaults.close()
    return {"n": count, "secrets_in_vault": count, "per_certificate_gets": per_cert,
            "listing_quiet_cycle": quiet, "listing_one_rotated": rotated,
            "installed_after_rotation": installed, "saved_per_quiet_cycle": per_cert - quiet}


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets beside the measured figures."""
    by = {(r["n"], r["latency_ms"]): r["ratio"] for r in results["initial_sync"]}
    svc, idle = results["service"], results["steady_cycle"]
    cycles = f"{svc['cycles']} cycles"
    rows = [("initial sync ratio, N=500, 20 ms", by[(500, 20.0)], 0.5),
            ("initial sync ratio, N=500, 0 ms", by[(500, 0.0)], 1.2),
            ("GETs per certificate per idle cycle", idle["gets_per_cert"], 1.0),
            ("token requests while the token is valid", idle["token_requests"]
             + svc["token_requests"], 0),
            (f"service RSS after {cycles}, N=500 (MiB)", svc["rss_end_mib"], 64.0),
            ("  projected to 1,000 cycles (MiB)", svc["rss_projected_1000_mib"], 64.0),
            (f"service RSS growth over {cycles} (MiB)", svc["rss_growth_mib"], 2.0),
            (f"  the same after cycle {WARMUP_CYCLES} (MiB)", svc["rss_growth_after_warmup_mib"],
             2.0)]
    return [{"what": what, "measured": got, "target": f"<= {limit}", "met": got <= limit}
            for what, got, limit in rows]


def table(results: dict[str, Any]) -> str:
    lines = ["initial sync (start to last link in place)",
             f"  {'N':>5} {'latency':>8} {'ours s':>8} {'bare SDK s':>11} {'ratio':>6}"]
    lines += [f"  {r['n']:>5} {r['latency_ms']:>6.0f}ms {r['ours_s']:>8.2f} {r['bare_s']:>11.2f} "
              f"{r['ratio']:>6.2f}" for r in results["initial_sync"]]
    svc, lst, rot = results["service"], results["listing"], results["rotation"]
    idle = results["steady_cycle"]
    lines += [
        f"idle cycle, N={idle['n']}: GETs/certificate {idle['gets_per_cert']}, token requests "
        f"{idle['token_requests']}, store files changed {idle['store_files_changed']}, "
        f"bytes written {idle['bytes_written']}",
        f"service process, N={svc['n']}, {svc['cycles']} idle cycles in {svc['seconds']} s: "
        f"requests/certificate/cycle {svc['requests_per_cert_per_cycle']}, "
        f"token requests {svc['token_requests']}, store files changed "
        f"{svc['store_files_changed']}, bytes written/cycle {svc['bytes_written_per_cycle']}",
        f"  RSS {svc['rss_start_mib']} -> {svc['rss_end_mib']} MiB (growth "
        f"{svc['rss_growth_mib']}, {svc['rss_growth_after_warmup_mib']} after cycle "
        f"{WARMUP_CYCLES}, slope {svc['rss_slope_mib_per_1000_cycles']} MiB/1000 cycles), "
        f"CPU {svc['cpu_s_per_cycle']} s/cycle",
        f"rotation at pollingIntervalInS 2: mean {rot['mean_s']} s, max {rot['max_s']} s",
        f"listing, {lst['n']} certificates: {lst['per_certificate_gets']} GETs/cycle -> "
        f"{lst['listing_quiet_cycle']} pages (quiet), {lst['listing_one_rotated']} "
        f"(one rotated)", "targets:"]
    lines += [f"  {'met ' if t['met'] else 'MISS'} {t['what']}: {t['measured']} "
              f"(target {t['target']})" for t in results["targets"]]
    lines.append(f"({results['seconds']} s)")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for latency in LATENCIES_S:
        rows = [r for r in results["initial_sync"] if r["latency_ms"] == latency * 1000]
        sizes = [r["n"] for r in rows]
        label = f"{latency * 1000:.0f} ms/request"
        left.plot(sizes, [r["ours_s"] for r in rows], "o-", label=f"ours, {label}")
        left.plot(sizes, [r["bare_s"] for r in rows], "s--", label=f"bare SDK, {label}")
    left.set(xlabel="observed certificates", ylabel="initial sync, s", xscale="log",
             yscale="log", title="Initial sync vs the bare SDK (sequential)")
    left.legend(fontsize=8)
    samples = results["service"]["rss_samples"]
    right.plot([c for c, _ in samples], [m for _, m in samples])
    right.axhline(64, color="red", linestyle=":", label="target 64 MiB")
    right.set(xlabel="idle cycles (N=500)", ylabel="RSS, MiB", title="Service process RSS",
              ylim=(0, 80))
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    began = time.monotonic()
    results: dict[str, Any] = {}
    clock = AgedClock(age=7200.0)
    with tempfile.TemporaryDirectory(prefix="akvvm-bench-") as tmp, ImdsStandin() as imds, \
            KeyVaultStandin(accept_token=imds.token_issued, clock=clock) as kv:
        rig = Rig(Path(tmp), imds, kv)
        populate(kv, max(SIZES))
        clock.age = 0.0  # versions made from now on are new
        results["initial_sync"] = [initial_sync(rig, n, lat)
                                   for lat in LATENCIES_S for n in SIZES]
        results["steady_cycle"] = steady_cycle(rig, max(SIZES))
        results["listing"] = listing_savings(rig, max(SIZES))
        results["service"] = service_cycles(rig, max(SIZES), CYCLES, SERVICE_BUDGET_S)
        results["rotation"] = rotation(rig)
    results["seconds"] = round(time.monotonic() - began, 1)
    results["targets"] = targets(results)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "results.png")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
