"""
DAG-parse cost: the time importing a provider's operator and sensor modules adds to a DAG file,
over ``import airflow.sdk`` (which every Airflow 3 DAG file pays anyway).

Each sample is a fresh interpreter that imports ``airflow.sdk``, then the provider's modules,
timing both with ``time.perf_counter``. Providers take turns sample by sample, so a slow spell
of a shared machine hits all of them alike. Bytecode is compiled first for every provider, as a
pip-installed wheel has it (an editable install under ``PYTHONDONTWRITEBYTECODE`` would
otherwise recompile the source on every parse). A provider that is not installed is reported as
skipped, with the reason.

Usage: ``python bench/parse_cost.py [--samples 21] [--out F]``. Prints a JSON document; exits 1
if this provider's median is above the budget (15 ms).
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

BUDGET_MS = 15.0
#: provider -> (distribution, the modules a DAG file imports for its operator and sensor)
PROVIDERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "altabots (this provider)": (
        "airflow-provider-altabots",
        ("airflow_provider_altabots.operators.altabots", "airflow_provider_altabots.sensors.altabots"),
    ),
    "dbt Cloud": (
        "apache-airflow-providers-dbt-cloud",
        ("airflow.providers.dbt.cloud.operators.dbt", "airflow.providers.dbt.cloud.sensors.dbt"),
    ),
    "Airbyte": (
        "apache-airflow-providers-airbyte",
        ("airflow.providers.airbyte.operators.airbyte", "airflow.providers.airbyte.sensors.airbyte"),
    ),
    "HTTP": (
        "apache-airflow-providers-http",
        ("airflow.providers.http.operators.http", "airflow.providers.http.sensors.http"),
    ),
}

SAMPLE = """
import json, time
t0 = time.perf_counter()
import airflow.sdk
t1 = time.perf_counter()
{imports}
t2 = time.perf_counter()
print(json.dumps({{"base_ms": (t1 - t0) * 1000, "added_ms": (t2 - t1) * 1000}}))
"""


def _sample(modules: tuple[str, ...], env: dict[str, str]) -> dict[str, float]:
    code = SAMPLE.format(imports="\n".join(f"import {module}" for module in modules))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module.split(".")[0] if module.startswith("airflow_") else module)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "?"


def measure(samples: int) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    present: dict[str, tuple[str, ...]] = {}
    report: dict[str, Any] = {}
    for name, (distribution, modules) in PROVIDERS.items():
        try:
            directories = {_package_dir(module) for module in modules}
        except ModuleNotFoundError as error:
            report[name] = {"skipped": f"{distribution} is not installed ({error})"}
            continue
        if None in directories:
            report[name] = {"skipped": f"{distribution} is not installed"}
            continue
        for directory in directories:
            compileall.compile_dir(str(directory), quiet=1)
        present[name] = modules
        _sample(modules, env)  # warm the file-system cache
    added: dict[str, list[float]] = {name: [] for name in present}
    base: list[float] = []
    for _ in range(samples):
        for name, modules in present.items():
            result = _sample(modules, env)
            added[name].append(result["added_ms"])
            base.append(result["base_ms"])
    for name, values in added.items():
        values.sort()
        report[name] = {
            "version": _version(PROVIDERS[name][0]),
            "modules": list(PROVIDERS[name][1]),
            "median_ms": statistics.median(values),
            "p10_ms": values[len(values) // 10],
            "p90_ms": values[-1 - len(values) // 10],
            "samples": len(values),
        }
    return {
        "samples": samples,
        "python": sys.version.split()[0],
        "airflow_sdk_median_ms": statistics.median(base) if base else None,
        "providers": report,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--samples", type=int, default=21)
    parser.add_argument("--out", help="also write the JSON document here")
    args = parser.parse_args()
    document = measure(args.samples)
    text = json.dumps(document, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    ours = document["providers"]["altabots (this provider)"]
    for name, figures in document["providers"].items():
        if "skipped" in figures:
            print(f"parse cost: SKIPPED {name}: {figures['skipped']}", file=sys.stderr)
        else:
            print(f"parse cost: {name}: median {figures['median_ms']:.1f} ms", file=sys.stderr)
    return 0 if ours.get("median_ms", BUDGET_MS + 1) <= BUDGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
