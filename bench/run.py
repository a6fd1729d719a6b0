"""`make bench`: the service's performance against the local stand-ins, every figure from one run.

Initial sync (ours vs the bare SDK, both as separate processes), an idle cycle's cost, the real
service process's memory and CPU over 1,000 cycles, rotation latency, and what listing saves.
Prints a table; writes bench/results/results.json and results.png.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.report import LATENCIES_S, plot, table, targets  # noqa: E402
from bench.rig import (  # noqa: E402
    BARE,
    CYCLES,
    REPEATS,
    SERVICE_BUDGET_S,
    WARMUP_CYCLES,
    AgedClock,
    Rig,
    in_process,
    inode_cost_ms,
    name,
    passes,
    populate,
    proc_figures,
    slope,
    stop,
    store_snapshot,
    wait_for,
)
from tests.standins.certfactory import make_chain  # noqa: E402
from tests.standins.imds import ImdsStandin  # noqa: E402
from tests.standins.keyvault import KeyVaultStandin  # noqa: E402

SIZES = (10, 100, 500)



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
    return {"n": count, "latency_ms": latency * 1000, "ours_s": round(ours.wall, 3),
            "bare_s": round(bare.wall, 3), "ratio": round(ours.wall / bare.wall, 3),
            "ours_cpu_user_s": round(ours.user, 2), "ours_cpu_sys_s": round(ours.sys, 2),
            "bare_cpu_user_s": round(bare.user, 2), "bare_cpu_sys_s": round(bare.sys, 2),
            "links": links}


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


def main() -> int:
    began = time.monotonic()
    results: dict[str, Any] = {}
    clock = AgedClock(age=7200.0)
    with tempfile.TemporaryDirectory(prefix="akvvm-bench-") as tmp, ImdsStandin() as imds, \
            KeyVaultStandin(accept_token=imds.token_issued, clock=clock) as kv:
        rig = Rig(Path(tmp), imds, kv)
        results["environment"] = {"cpus": os.cpu_count(),
                                  "inode_create_ms_before": inode_cost_ms(Path(tmp))}
        populate(kv, max(SIZES))
        clock.age = 0.0  # versions made from now on are new
        results["initial_sync"] = [initial_sync(rig, n, lat)
                                   for lat in LATENCIES_S for n in SIZES]
        results["steady_cycle"] = steady_cycle(rig, max(SIZES))
        results["listing"] = listing_savings(rig, max(SIZES))
        results["service"] = service_cycles(rig, max(SIZES), CYCLES, SERVICE_BUDGET_S)
        results["rotation"] = rotation(rig)
        results["environment"]["inode_create_ms_after"] = inode_cost_ms(Path(tmp))
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
