"""
What this provider adds to every DAG parse: the time to import its operator and sensor modules
after ``import airflow.sdk``.

Each sample is a fresh interpreter that imports ``airflow.sdk`` and then the modules, timing
both with ``time.perf_counter``. Bytecode is compiled first, as a wheel installed by pip has it;
otherwise the figure would include compiling the source on every import (which happens when
``PYTHONDONTWRITEBYTECODE`` is set on an editable install).

Usage: ``python bench/import_cost.py [--samples 21]``. Prints the median and spread, and exits
non-zero if the median is above the budget (15 ms).
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import airflow_provider_altabots

BUDGET_MS = 15.0
MODULES = ("airflow_provider_altabots.operators.altabots", "airflow_provider_altabots.sensors.altabots")

SAMPLE = """
import json, time
t0 = time.perf_counter()
import airflow.sdk
t1 = time.perf_counter()
{imports}
t2 = time.perf_counter()
print(json.dumps({{"base_ms": (t1 - t0) * 1000, "added_ms": (t2 - t1) * 1000}}))
"""


def sample(imports: str, env: dict[str, str]) -> dict[str, float]:
    code = SAMPLE.format(imports=imports)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--samples", type=int, default=21)
    args = parser.parse_args()

    compileall.compile_dir(str(Path(airflow_provider_altabots.__file__).parent), quiet=1)
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    imports = "\n".join(f"import {module}" for module in MODULES)
    sample(imports, env)  # warm the file-system cache
    results = [sample(imports, env) for _ in range(args.samples)]
    added = sorted(r["added_ms"] for r in results)
    base = statistics.median(r["base_ms"] for r in results)
    median = statistics.median(added)
    low, high = added[len(added) // 10], added[-1 - len(added) // 10]
    print(f"samples: {args.samples} fresh interpreters")
    print(f"import airflow.sdk: median {base:.0f} ms")
    print(f"operator + sensor modules add: median {median:.1f} ms (p10 {low:.1f}, p90 {high:.1f})")
    print(f"budget: {BUDGET_MS:.0f} ms -> {'met' if median <= BUDGET_MS else 'MISSED'}")
    return 0 if median <= BUDGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
