"""
Turn the three benchmarks' JSON documents into ``BENCHMARKS.md`` and the delay/requests plot.

Usage: ``python bench/report.py --results DIR --markdown BENCHMARKS.md --plot FILE.png``.
Every verdict is computed from the figures; nothing here is a hard-coded result.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

OURS = "altabots (this provider)"
PARSE_BUDGET_MS = 15.0
PARSE_RATIO_GOAL = 10.0
CPU_RATIO_GOAL = 1.5
LAG_GOAL_S = 0.2
REQUESTS_GOAL = 12
RELATIVE_DELAY_GOAL = 0.1


def _pool_limit() -> int:
    from airflow_provider_altabots.transport import ASYNC_GATE_WIDTH

    return ASYNC_GATE_WIDTH


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB"
    except OSError:
        pass
    versions = []
    from importlib.metadata import PackageNotFoundError, version

    for distribution in ("apache-airflow", "airflow-provider-altabots", "httpx", "aiohttp"):
        with contextlib.suppress(PackageNotFoundError):
            versions.append(f"{distribution} {version(distribution)}")
    return (
        f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} CPUs, {memory} RAM; "
        f"Python {platform.python_version()}; " + ", ".join(versions)
    )


def parse_section(doc: dict[str, Any]) -> list[str]:
    providers = doc["providers"]
    ours = providers[OURS].get("median_ms")
    lines = [
        "## 1. DAG-parse cost",
        "",
        f"Time that importing each provider's operator and sensor modules adds over `import airflow.sdk` "
        f"(itself a median {doc['airflow_sdk_median_ms']:.0f} ms here), in a fresh interpreter per sample, "
        f"{doc['samples']} samples per provider, taken in turns, bytecode compiled.",
        "",
        "| provider | version | median | p10 - p90 | vs this provider |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name, figures in sorted(providers.items(), key=lambda item: (item[0] != OURS, "skipped" in item[1])):
        if "skipped" in figures:
            lines.append(f"| {name} | - | skipped: {figures['skipped']} | | |")
            continue
        ratio = figures["median_ms"] / ours if ours else float("nan")
        lines.append(
            f"| {name} | {figures['version']} | {figures['median_ms']:.1f} ms | "
            f"{figures['p10_ms']:.1f} - {figures['p90_ms']:.1f} ms | {ratio:.1f}x |"
        )
    dbt = providers.get("dbt Cloud", {}).get("median_ms")
    lines += [
        "",
        f"- Goal: this provider at most {PARSE_BUDGET_MS:.0f} ms: {_verdict(ours <= PARSE_BUDGET_MS)} "
        f"({ours:.1f} ms).",
    ]
    if dbt:
        lines.append(
            f"- Goal: at least {PARSE_RATIO_GOAL:.0f}x below dbt Cloud: "
            f"{_verdict(dbt / ours >= PARSE_RATIO_GOAL)} ({dbt / ours:.0f}x)."
        )
    else:
        lines.append("- Goal: at least 10x below dbt Cloud: **not measured** (dbt Cloud provider missing).")
    lines.append(
        "- Why: the operator and sensor modules import only `airflow.sdk` names and this package's "
        "small policy modules; `requests`, `httpx` and the trigger module load when a task runs, "
        "not when a DAG file is parsed."
    )
    return lines


def _fanout_row(r: dict[str, Any], bare: dict[str, Any] | None) -> str:
    ratio = f"{r['cpu_ms_per_request'] / bare['cpu_ms_per_request']:.2f}x" if bare else "-"
    beside = ", ".join(r.get("together_with") or []) or "alone"
    return (
        f"| {r['n']:,} | {r['client']} | {r['requests_per_run']:.1f} | "
        f"{r['cpu_ms_per_request']:.2f} | {ratio} | "
        f"{r['peak_kib_per_trigger']:.1f} | {r['connections_peak']:,} | "
        f"{r['connections_opened']:,} | {r['lag_p99_s'] * 1000:.0f} ms | "
        f"{r['lag_max_s'] * 1000:.0f} ms | {r['delay_p50_s']:.1f} s | {r['delay_p99_s']:.1f} s | "
        f"{r['not_success']} | {beside} |"
    )


def fanout_section(doc: dict[str, Any]) -> list[str]:
    results = [r for r in doc["results"] if "skipped" not in r]
    skipped = [r for r in doc["results"] if "skipped" in r]
    lines = [
        "## 2. Triggerer fan-out",
        "",
        f"N triggers in one event loop, each waiting for a run of {doc['run_seconds']} s (uniformly drawn), "
        "against the emulator over TLS (a self-signed certificate trusted through `SSL_CERT_FILE`). "
        "One process per client and size; every trigger runs as a triggerer runs it, through Airflow's "
        "own `TriggerRunner.run_trigger`, with the triggerer's JSON logging (`bench/runner.py`). "
        "`bare` is the floor: a trigger whose `run()` is a bare loop over one `httpx.AsyncClient` with "
        "the same connection limit and gate as ours, the same requests on the same schedule, nothing else. "
        f"`dbt` is `DbtCloudRunJobTrigger` at its default {doc['dbt_poll_interval']:g} s interval against a "
        "dbt-Cloud-shaped status route served beside the emulator. CPU is the client process's user + system "
        "time over the wait, per status request the server answered; memory is the rise of the resident set "
        "over N; connections are those the server saw from the client, at most at once and in all; "
        "lag is how late a 0.1 s sleep "
        "wakes (the triggerer warns above 0.2 s); delay is the event's time minus the run's end.",
        "",
        "| N | client | requests / run | CPU ms / request | vs bare | peak KiB / trigger | "
        "connections open at once | TCP connections opened | "
        "loop lag p99 | lag max | delay p50 | delay p99 | failed | ran beside |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    by_key = {(r["n"], r["client"]): r for r in results}
    for r in results:
        lines.append(_fanout_row(r, by_key.get((r["n"], "bare"))))
    for r in skipped:
        lines.append(f"| {r.get('n', '?')} | {r.get('client', '?')} | skipped: {r['skipped']} |" + " |" * 11)
    lines.append("")
    sizes = sorted({r["n"] for r in results})
    for n in sizes:
        ours, bare, dbt = by_key.get((n, "ours")), by_key.get((n, "bare")), by_key.get((n, "dbt"))
        if not ours:
            continue
        if bare:
            ratio = ours["cpu_ms_per_request"] / bare["cpu_ms_per_request"]
            lines.append(
                f"- N={n:,}: CPU per request at most {CPU_RATIO_GOAL}x the bare loop: "
                f"{_verdict(ratio <= CPU_RATIO_GOAL)} ({ratio:.2f}x)."
            )
        if dbt:
            ratio = dbt["cpu_ms_per_request"] / ours["cpu_ms_per_request"]
            lines.append(
                f"- N={n:,}: cheaper per request than dbt Cloud's trigger: {_verdict(ratio > 1)} "
                f"(dbt {ratio:.1f}x ours; it opened {dbt['connections_opened']:,} connections to our "
                f"{ours['connections_opened']:,})."
            )
        lines.append(
            f"- N={n:,}: connections bounded by the pool ({_pool_limit()}), not by N: "
            f"{_verdict(ours['connections_peak'] <= _pool_limit())} "
            f"(at most {ours['connections_peak']} open at once; {ours['connections_opened']:,} opened in all "
            f"for {ours['requests']:,} requests, as httpx closes a connection idle for 5 s and the next "
            "burst of checks opens it again)."
        )
    largest = by_key.get((max(sizes), "ours")) if sizes else None
    if largest:
        lines.append(
            f"- N={largest['n']:,}: loop lag p99 under {LAG_GOAL_S} s: "
            f"{_verdict(largest['lag_p99_s'] < LAG_GOAL_S)} "
            f"({largest['lag_p99_s'] * 1000:.0f} ms; {largest['lag_over_0_2s']} of "
            f"{largest.get('lag_ticks', '?')} ticks over 0.2 s, the longest "
            f"{largest['lag_max_s'] * 1000:.0f} ms: the {largest['n']:,} triggers start in the same "
            "instant, so their checks come due together)."
        )
    failures = sum(r["not_success"] for r in results)
    lines.append(f"- Runs that did not end in a success event, all clients: {failures}.")
    lines.append(
        "- Delay differs by schedule, not by client cost: `ours` and `bare` check on the same growing "
        f"schedule; `dbt` checks every {doc['dbt_poll_interval']:g} s, so its delay spreads over that "
        "interval."
    )
    return lines


def _schedule_arithmetic(longest_s: float) -> str:
    """Why 12 requests cannot buy a 10% mean delay at every length up to ``longest_s``."""
    from airflow_provider_altabots.polling import PollPolicy

    default = PollPolicy()
    first = default.poll_interval

    need = (1 + RELATIVE_DELAY_GOAL) / (1 - RELATIVE_DELAY_GOAL)
    if longest_s <= first * need:
        return ""
    checks = 1 + math.ceil(math.log(longest_s / first) / math.log(need))
    afford = (longest_s / first) ** (1 / (REQUESTS_GOAL - 2))
    return (
        "With checks whose gaps grow by a factor g, a run that ends anywhere in a gap waits on average "
        f"(g - 1)/(g + 1) of its length. A mean delay of {RELATIVE_DELAY_GOAL:.0%} needs "
        f"g <= {need:.2f}: {checks} checks between the first at {first:g} s and {longest_s:g} s, "
        f"{checks + 1} requests with the invoke, against the {REQUESTS_GOAL} allowed. The "
        f"{REQUESTS_GOAL - 1} checks those allow reach {longest_s:g} s only with g = {afford:.2f}, a mean "
        f"delay of about {(afford - 1) / (afford + 1):.0%} of the run: the default's growth of "
        f"{default.growth:g} is that trade. "
    )


def latency_section(doc: dict[str, Any], plot_name: str | None) -> list[str]:
    rows = doc["rows"]
    lines = [
        "## 3. Completion delay against requests",
        "",
        f"{doc['repeats']} runs per (length, policy), their lengths spread evenly over the length "
        f"+/- {doc.get('spread', 0):.0%} and the same for every policy (runs of exactly 10, 30 or 120 s "
        "would flatter a fixed 5 s interval, which would then check the instant they end), "
        "all waiting at once through this provider's trigger, run by Airflow's trigger runner; only the "
        "schedule differs. `adaptive` waits as a deferrable task does: it checks from the worker for "
        "its first seconds (`polling.CHECK_ON_WORKER_SECONDS`), where a run that ended is done with, and "
        "the trigger that takes over checks no sooner than `polling.DEFERRAL_MARGIN` after the deferral. "
        "Delay: the moment the run's end is known (the trigger's event, or the worker's check) minus "
        "the run's end "
        "(the scheduler's own latency to resume the task comes on top, the same for every policy). "
        "This benchmark ran beside the fan-out benchmark (it is light and mostly waits). "
        "Requests: the invoke plus every status check.",
        "",
        "| run length | policy | mean delay | worst delay | goal max(1 s, 10%) | delay goal "
        "| requests / run |",
        "| ---: | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['length_s']:g} s | {r['policy']} | {r['delay_mean_s']:.2f} s | {r['delay_max_s']:.2f} s | "
            f"{r['goal_delay_s']:.1f} s | "
            f"{_verdict(r['delay_mean_s'] <= r['goal_delay_s'])} | {r['requests_per_run']:.1f} |"
        )
    adaptive = [r for r in rows if r["policy"] == "adaptive"]
    if plot_name:
        lines += ["", f"![completion delay against requests per run]({plot_name})"]
    lines.append("")
    missed = [r for r in adaptive if r["delay_mean_s"] > r["goal_delay_s"]]
    longest = max(adaptive, key=lambda r: r["length_s"]) if adaptive else None
    if longest:
        lines.append(
            f"- Goal: at most {REQUESTS_GOAL} requests for the {longest['length_s']:g} s run: "
            f"{_verdict(longest['requests_per_run'] <= REQUESTS_GOAL)} ({longest['requests_per_run']:.0f})."
        )
    for r in missed:
        lines.append(
            f"- Goal: delay at most {r['goal_delay_s']:.1f} s for a {r['length_s']:g} s run: **missed** by "
            f"{r['delay_mean_s'] - r['goal_delay_s']:.1f} s ({r['delay_mean_s']:.1f} s)."
        )
    if missed and longest:
        by = {(r["policy"], r["length_s"]): r for r in rows}
        shortest = min(r["length_s"] for r in adaptive)
        fixed5 = by.get(("fixed 5 s", longest["length_s"]))
        fixed60 = by.get(("fixed 60 s", shortest))
        worst = max(adaptive, key=lambda r: r["delay_mean_s"] / r["length_s"])
        compare = []
        if fixed5:
            compare.append(
                f"a fixed 5 s interval spends {fixed5['requests_per_run']:.0f} requests on the "
                f"{longest['length_s']:g} s run where the default spends {longest['requests_per_run']:.0f}"
            )
        if fixed60:
            compare.append(
                f"a fixed 60 s interval answers the {shortest:g} s run {fixed60['delay_mean_s']:.0f} s late "
                f"where the default is {by[('adaptive', shortest)]['delay_mean_s']:.1f} s late"
            )
        lines += [
            "",
            "Why the delay goal is missed, and why it is not tuned away: the API gives no estimate of how "
            "long a run will take, so a schedule is a guess at every length at once. "
            + _schedule_arithmetic(longest["length_s"])
            + "Here the default's worst mean relative delay was "
            f"{worst['delay_mean_s'] / worst['length_s']:.0%} "
            f"(the {worst['length_s']:g} s runs). Within {REQUESTS_GOAL} requests the goal can only be met "
            "at lengths chosen in advance, which would be tuning to this benchmark. "
            + ("".join(c[0].upper() + c[1:] + ". " for c in compare))
            + "On the free GPTBots plan (3 requests a minute, as the vendor documents) requests are the "
            "scarcer resource. A user who wants earlier answers on long runs lowers `max_poll_interval` "
            "and pays in requests.",
        ]
    return lines


def plot(doc: dict[str, Any], path: Path) -> str | None:
    """Draw delay against requests per run; returns why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as error:
        return f"matplotlib is not installed ({error})"
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=110)
    policies = list(dict.fromkeys(r["policy"] for r in doc["rows"]))
    for marker, policy in zip("osD^v", policies, strict=False):
        rows = [r for r in doc["rows"] if r["policy"] == policy]
        xs = [r["requests_per_run"] for r in rows]
        ys = [max(r["delay_mean_s"], 0.01) for r in rows]
        axes.plot(xs, ys, marker=marker, label=policy)
        for r, x, y in zip(rows, xs, ys, strict=True):
            axes.annotate(
                f"{r['length_s']:g} s", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8
            )
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes.set_xlabel("API requests per run (invoke + status checks)")
    axes.set_ylabel("mean completion delay (s)")
    axes.set_title("Completion delay against requests, by run length")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument(
        "--results", required=True, help="directory with parse_cost.json, fanout.json, latency.json"
    )
    parser.add_argument("--markdown", required=True)
    parser.add_argument("--plot", required=True)
    parser.add_argument("--command", default="make bench", help="how the figures were made, for the page")
    parser.add_argument("--took", type=float, help="minutes the whole run took")
    args = parser.parse_args()
    results = Path(args.results)
    markdown, plot_path = Path(args.markdown), Path(args.plot)
    docs = {
        name: json.loads((results / f"{name}.json").read_text())
        for name in ("parse_cost", "fanout", "latency")
    }
    no_plot = plot(docs["latency"], plot_path)
    plot_name = None if no_plot else os.path.relpath(plot_path, markdown.parent)
    took = f" It took {args.took:.1f} minutes." if args.took else ""
    lines = [
        "# Benchmarks",
        "",
        f"Written by `{args.command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.{took} Every figure below "
        "comes from that one run, on one machine, side by side; read the ratios, not the absolutes "
        "(the machine is shared and noisy). To reproduce: `make bench` (it builds its own virtualenv "
        "with the compared providers and matplotlib, then runs `bench/run.py`).",
        "",
        f"Machine: {machine()}.",
        "",
        *parse_section(docs["parse_cost"]),
        "",
        *fanout_section(docs["fanout"]),
        "",
        *latency_section(docs["latency"], plot_name),
    ]
    if no_plot:
        lines += ["", f"Plot not drawn: {no_plot}."]
    markdown.write_text("\n".join(lines) + "\n")
    print(f"wrote {markdown}" + ("" if no_plot else f" and {plot_path}"))
    if no_plot:
        print(f"report: plot SKIPPED: {no_plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
