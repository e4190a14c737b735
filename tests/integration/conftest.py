"""
Integration fixtures: Airflow's metadata database, the emulator as a real process, and a runner
that executes an example DAG with ``dag.test()`` and keeps everything it printed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO

API_KEY = "sk-integration-7c1e9b04d2a8f6"
FAILING_KEY = "sk-integration-failing-3b8d"
ENDLESS_KEY = "sk-integration-endless-9f2a"


class EmulatorProcess:
    """``altabots-emulator`` in its own process, driven through its ``/_emulator/`` endpoints."""

    def __init__(self) -> None:
        script = Path(sys.executable).with_name("altabots-emulator")
        self.process = subprocess.Popen(
            [
                str(script),
                "--port",
                "0",
                "--api-key",
                API_KEY,
                "--run-seconds",
                "0.6",
                "--pending-seconds",
                "0.1",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        assert line.startswith("altabots-emulator listening on http://127.0.0.1:"), line
        self.url = line.rsplit(" ", 1)[-1]
        self.client = httpx.Client(base_url=self.url + "/_emulator", timeout=10)

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        response = self.client.request(method, path, json=body)
        response.raise_for_status()
        return response.json()

    def set_workflow(self, api_key: str, **config: Any) -> None:
        self._call("POST", "/workflows", {"api_key": api_key, **config})

    def set_faults(self, **faults: Any) -> None:
        self._call("POST", "/faults", faults)

    def reset(self) -> None:
        self._call("POST", "/reset")

    def requests(self, path: str | None = None) -> list[dict[str, Any]]:
        data = self._call("GET", "/requests" + (f"?path={path}" if path else ""))
        return data["requests"] if isinstance(data, dict) else data

    def invokes(self) -> list[dict[str, Any]]:
        return self.requests("/v1/workflow/invoke")

    def queries(self) -> list[dict[str, Any]]:
        return self.requests("/v1/workflow/query/result")

    def end_run_once(self, checks: int, bound: float = 180.0) -> threading.Thread:
        """
        In the background: once the single run has been checked ``checks`` times, end it (with
        SUCCEED). The run's length then depends on what the waiter did, not on the clock.
        """

        def watch() -> None:
            with httpx.Client(base_url=self.url + "/_emulator", timeout=10) as client:
                give_up = time.monotonic() + bound
                while time.monotonic() < give_up:
                    seen = client.get("/requests", params={"path": "/v1/workflow/query/result"}).json()
                    run_ids = {entry["body"]["workflowRunId"] for entry in seen["requests"]}
                    if len(seen["requests"]) >= checks and len(run_ids) == 1:
                        client.post(f"/runs/{run_ids.pop()}/end", json={"outcome": "succeed"})
                        return
                    time.sleep(0.1)

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        return thread

    def webhooks(self) -> list[dict[str, Any]]:
        data = self._call("GET", "/webhooks")
        return data["deliveries"] if isinstance(data, dict) else data

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture(scope="session")
def airflow_db() -> None:
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)


@pytest.fixture(autouse=True)
def _no_defer_race_in_dag_test(monkeypatch) -> None:
    """
    dag.test() runs a trigger in the task's own process, where Airflow's defer race (the reason
    a trigger's first check waits ``DEFERRAL_MARGIN``) cannot happen: check after 1 s, not 10.
    """
    from airflow_provider_altabots import polling

    monkeypatch.setattr(polling, "DEFERRAL_MARGIN", 1.0)


@pytest.fixture(scope="session")
def emulator_process() -> Iterator[EmulatorProcess]:
    emulator = EmulatorProcess()
    yield emulator
    emulator.stop()


@pytest.fixture
def emulator(emulator_process: EmulatorProcess, airflow_db: None, monkeypatch) -> EmulatorProcess:
    """A reset emulator, and ``altabots_default`` pointing at it."""
    emulator_process.reset()
    emulator_process.set_workflow(FAILING_KEY, outcome="fail", run_seconds=0.3, pending_seconds=0.1)
    emulator_process.set_workflow(ENDLESS_KEY, outcome="never", pending_seconds=0.1)
    use_key(monkeypatch, emulator_process, API_KEY)
    return emulator_process


def use_key(monkeypatch, emulator: EmulatorProcess, key: str, **extra: Any) -> None:
    fields: dict[str, Any] = {"conn_type": "altabots", "host": emulator.url, "password": key}
    if extra:
        fields["extra"] = extra
    monkeypatch.setenv("AIRFLOW_CONN_ALTABOTS_DEFAULT", json.dumps(fields))


@dataclass
class DagResult:
    run: Any
    printed: str
    states: dict[tuple[str, int], str] = field(default_factory=dict)

    @property
    def plain(self) -> str:
        """What was printed without colours and line wrapping (some lines print tracebacks with rich)."""
        return " ".join(re.sub(r"\x1b\[[0-9;]*m|[│╭╮╰╯─]", " ", self.printed).split())

    def ti(self, task_id: str, map_index: int = -1) -> Any:
        return self.run.get_task_instance(task_id, map_index=map_index)

    def xcom(self, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
        return self.ti(task_id, map_index).xcom_pull(task_ids=task_id, key=key, map_indexes=map_index)


EXAMPLES = REPO / "example_dags"
TEST_DAGS = Path(__file__).parent / "dags"


def load_dag(dag_id: str, folder: Path = EXAMPLES, file: str | None = None) -> Any:
    """A freshly parsed DAG (tests may change its tasks without affecting others)."""
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow before 3.2
        from airflow.models.dagbag import DagBag  # type: ignore[no-redef]

    bag = DagBag(str(folder / f"{file or dag_id}.py"))
    assert bag.import_errors == {}
    return bag.get_dag(dag_id)


@pytest.fixture
def run_dag(airflow_db: None, capfd):
    """Run an example DAG with dag.test(); ``tweak(dag)`` may adjust its tasks first."""

    def run(dag_id: str, tweak=None, folder: Path = EXAMPLES, file: str | None = None) -> DagResult:
        dag = load_dag(dag_id, folder, file)
        if tweak:
            tweak(dag)
        dag_run = dag.test()
        out, err = capfd.readouterr()
        sys.stdout.write(out)  # kept for pytest's report of a failure
        states = {(ti.task_id, ti.map_index): ti.state for ti in dag_run.get_task_instances()}
        return DagResult(dag_run, out + err, states)

    return run


def airflow_home() -> Path:
    return Path(os.environ["AIRFLOW_HOME"])
