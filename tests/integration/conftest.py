"""
Integration fixtures, over the emulator's pytest plugin (``altabots_emulator``,
``altabots_dag_test``, ``altabots_airflow_db``), as a user's own tests would use it: the example
DAGs, loaded fresh, run with ``dag.test()`` against the emulator in its own process.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from altabots_emulator.pytest_plugin import DagTestResult, EmulatorFixture, load_dag

from tests.conftest import REPO

API_KEY = "sk-integration-7c1e9b04d2a8f6"
FAILING_KEY = "sk-integration-failing-3b8d"
ENDLESS_KEY = "sk-integration-endless-9f2a"


@pytest.fixture(autouse=True)
def _no_defer_race_in_dag_test(monkeypatch) -> None:
    """
    dag.test() runs a trigger in the task's own process, where Airflow's defer race (the reason
    a trigger's first check waits ``DEFERRAL_MARGIN``) cannot happen: check after 1 s, not 10.
    """
    from airflow_provider_altabots import polling

    monkeypatch.setattr(polling, "DEFERRAL_MARGIN", 1.0)


@pytest.fixture
def emulator(altabots_emulator: EmulatorFixture, altabots_airflow_db: None) -> EmulatorFixture:
    """The emulator plugin's fixture (``altabots_default`` points at it with ``API_KEY``), plus a
    key whose runs fail and one whose runs never end."""
    altabots_emulator.set_workflow(FAILING_KEY, outcome="fail", run_seconds=0.3, pending_seconds=0.1)
    altabots_emulator.set_workflow(ENDLESS_KEY, outcome="never", pending_seconds=0.1)
    return altabots_emulator


EXAMPLES = REPO / "example_dags"
TEST_DAGS = Path(__file__).parent / "dags"


@pytest.fixture
def run_dag(altabots_dag_test):
    """Run an example DAG with the plugin's dag.test(); ``tweak(dag)`` may adjust its tasks first."""

    def run(dag_id: str, tweak=None, folder: Path = EXAMPLES, file: str | None = None) -> DagTestResult:
        dag = load_dag(dag_id, folder / f"{file or dag_id}.py")
        if tweak:
            tweak(dag)
        return altabots_dag_test(dag)

    return run


def airflow_home() -> Path:
    return Path(os.environ["AIRFLOW_HOME"])
