"""
The README's DAG, run as written against the emulator, on whichever Airflow line runs the tests
(make test-compat runs it on every supported one).
"""

from __future__ import annotations

import re

import pytest

from tests.conftest import README_DAGS, REPO

pytestmark = pytest.mark.integration


def dag_snippets() -> list[str]:
    text = (REPO / "README.md").read_text()
    return [block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "with DAG(" in block]


def test_the_readme_dag_runs_as_written(emulator, run_dag):
    (snippet,) = dag_snippets()
    (README_DAGS / "readme_news.py").write_text(snippet)
    result = run_dag("news", folder=README_DAGS, file="readme_news")
    assert result.dag_run.state == "success"
    assert result.states[("publish", -1)] == "success"
    record = result.xcom("summarize_news", "workflow_run")
    assert record["status"] == "SUCCEED"
    # publish() printed the output, the cost and the tokens it was handed.
    assert f"{record['totalCost']} {record['totalTokens']}" in result.printed
    (invoke,) = emulator.invokes()
    assert invoke["body"]["input"]["topic"] == "News"
