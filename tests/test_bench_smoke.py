"""
The benchmark scripts still run end to end, on tiny sizes; their figures are not asserted here.

The compared providers and matplotlib live only in ``make bench``'s own virtualenv, so here the
dbt Cloud client, the other providers' parse cost and the plot are skipped, and the report must
say so rather than leave them out silently.
"""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_bench_runs_on_tiny_sizes_and_writes_the_report(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--into", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / "BENCHMARKS.md").read_text()
    for heading in (
        "## 1. DAG-parse cost",
        "## 2. Triggerer fan-out",
        "## 3. Completion delay against requests",
    ):
        assert heading in report
    for name in ("parse_cost", "fanout", "latency"):
        assert (tmp_path / "results" / f"{name}.json").stat().st_size > 0
    assert "| altabots (this provider) |" in report
    assert "| ours |" in report
    assert "| bare |" in report
    assert "| adaptive |" in report
    try:
        import airflow.providers.dbt.cloud  # noqa: F401
    except ImportError:
        assert "| dbt | skipped: apache-airflow-providers-dbt-cloud is not installed" in report
    else:
        assert "| dbt |" in report
