"""
Run the three benchmarks, one after the other, and write ``BENCHMARKS.md`` and its plot.

Usage: ``python bench/run.py`` (what ``make bench`` runs), or ``python bench/run.py --quick
--into DIR`` for tiny sizes (the smoke test): the scripts still run end to end, the figures mean
nothing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

FULL = {
    "parse_cost": ["--samples", "15"],
    "fanout": ["--sizes", "100,1000,5000", "--run-seconds", "30-120"],
    "latency": ["--lengths", "2,10,30,120", "--repeats", "8"],
}
QUICK = {
    "parse_cost": ["--samples", "2"],
    "fanout": ["--sizes", "4", "--run-seconds", "0.5-1.5", "--dbt-poll-interval", "1"],
    "latency": ["--lengths", "0.5", "--repeats", "2", "--policies", "adaptive,fixed 5 s"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the scripts still run")
    parser.add_argument("--into", type=Path, help="where to write (default: BENCHMARKS.md at the top)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    into = args.into or REPO
    results = (args.into or BENCH) / "results"
    results.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def command(name: str) -> list[str]:
        return [
            sys.executable,
            str(BENCH / f"{name}.py"),
            *plan[name],
            "--out",
            str(results / f"{name}.json"),
        ]

    print(f"bench: parse_cost {' '.join(plan['parse_cost'])}", file=sys.stderr, flush=True)
    # parse_cost exits 1 when this provider misses its budget: a figure, reported, not a crash.
    if subprocess.run(command("parse_cost"), stdout=subprocess.DEVNULL).returncode not in (0, 1):
        print("bench: parse_cost failed", file=sys.stderr)
        return 1
    # The delay benchmark is light (a few dozen triggers) and mostly waits: it runs beside the
    # fan-out instead of after it, to keep make bench within its time budget.
    print(f"bench: latency {' '.join(plan['latency'])} (beside the fan-out)", file=sys.stderr, flush=True)
    latency = subprocess.Popen(command("latency"), stdout=subprocess.DEVNULL)
    print(f"bench: fanout {' '.join(plan['fanout'])}", file=sys.stderr, flush=True)
    fanout = subprocess.run(command("fanout"), stdout=subprocess.DEVNULL).returncode
    if latency.wait() != 0 or fanout != 0:
        print(f"bench: fanout exit {fanout}, latency exit {latency.returncode}", file=sys.stderr)
        return 1
    print(f"bench: measured in {(time.monotonic() - started) / 60:.1f} min", file=sys.stderr, flush=True)
    return subprocess.call(
        [
            sys.executable,
            str(BENCH / "report.py"),
            "--results",
            str(results),
            "--markdown",
            str(into / "BENCHMARKS.md"),
            "--plot",
            str(results / "delay_vs_requests.png"),
            "--took",
            f"{(time.monotonic() - started) / 60:.2f}",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
