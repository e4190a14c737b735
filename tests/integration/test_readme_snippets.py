"""
The README's DAG, run as written against the emulator, on whichever Airflow line runs the tests
(make test-compat runs it on every supported one).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

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


def readme_test_files() -> dict[str, str]:
    """The files of the README's "Testing your DAGs" example, by the path each one's first line names."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Testing your DAGs", 1)[1].split("\n## ", 1)[0]
    files = {}
    for block in re.findall(r"```python\n(.*?)```", section, re.S):
        first = block.splitlines()[0]
        assert first.startswith("# tests/"), first
        files[first[2:].split(":")[0]] = block
    return files


def test_the_readme_testing_example_passes_as_written(tmp_path):
    """The README's example tests, in a project of their own, with the README's DAG in dags/."""
    files = readme_test_files()
    assert set(files) == {"tests/conftest.py", "tests/test_news.py"}
    (snippet,) = dag_snippets()
    (tmp_path / "dags").mkdir()
    (tmp_path / "dags" / "news.py").write_text(snippet)
    (tmp_path / "tests").mkdir()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    # A user's shell: none of this suite's Airflow settings.
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-6000:]
    assert re.search(r"\b2 passed\b", said), said[-3000:]
