"""The bench's report: the issue's targets beside the figures, the printed table and the plot."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.rig import WARMUP_CYCLES

LATENCIES_S = (0.0, 0.020)

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
    env = results["environment"]
    lines = [f"machine: {env['cpus']} CPUs; the kernel creates an inode in the bench's directory "
             f"in {env['inode_create_ms_before']} ms (start), {env['inode_create_ms_after']} ms "
             "(end)", "initial sync (start to last link in place; CPU s = user + kernel)",
             f"  {'N':>5} {'latency':>8} {'ours s':>8} {'bare SDK s':>11} {'ratio':>6} "
             f"{'ours CPU s':>12} {'bare CPU s':>12}"]
    lines += [f"  {r['n']:>5} {r['latency_ms']:>6.0f}ms {r['ours_s']:>8.2f} {r['bare_s']:>11.2f} "
              f"{r['ratio']:>6.2f} {r['ours_cpu_user_s']:>5.2f}+{r['ours_cpu_sys_s']:<5.2f} "
              f"{r['bare_cpu_user_s']:>6.2f}+{r['bare_cpu_sys_s']:<5.2f}"
              for r in results["initial_sync"]]
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
