"""
``make demo``: run the deferrable example DAG against the local emulator and show its result.

Starts the emulator (``altabots-emulator``) on a free loopback port, runs ``airflow dags test
example_altabots_deferrable`` with a private AIRFLOW_HOME (``.demo/airflow``) and a connection
pointing at the emulator, then reads the run's output, cost and tokens back from XCom and
stops the emulator. The full Airflow output is kept in ``.demo/dags-test.log``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from altabots_emulator.process import EmulatorProcess

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / ".demo"
DAG_ID = "example_altabots_deferrable"
TASK_ID = "summarize_news"
API_KEY = "demo-key-not-a-secret"


def main() -> int:
    bin_dir = Path(sys.executable).parent
    DEMO.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(DEMO / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "example_dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
    }
    with EmulatorProcess(["--api-key", API_KEY, "--run-seconds", "3"], start_timeout=120) as emulator:
        print(f"emulator: listening on {emulator.url}")
        env["AIRFLOW_CONN_ALTABOTS_DEFAULT"] = json.dumps(
            {"conn_type": "altabots", "host": emulator.url, "password": API_KEY}
        )
        airflow = str(bin_dir / "airflow")
        subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True)
        print(f"running: airflow dags test {DAG_ID} (log: {(DEMO / 'dags-test.log').relative_to(REPO)})")
        with open(DEMO / "dags-test.log", "w") as log:
            result = subprocess.run(
                [airflow, "dags", "test", DAG_ID], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        if result.returncode != 0:
            print(f"airflow dags test failed; see {DEMO / 'dags-test.log'}")
            return result.returncode
        return subprocess.run([sys.executable, __file__, "--report"], env=env).returncode


def report() -> int:
    """Print the latest run's state, output, cost and tokens from Airflow's metadata database."""
    from airflow.models.dagrun import DagRun

    (run,) = sorted(DagRun.find(dag_id=DAG_ID), key=lambda dr: dr.start_date)[-1:]
    ti = run.get_task_instance(TASK_ID)
    output = ti.xcom_pull(task_ids=TASK_ID)
    record = ti.xcom_pull(task_ids=TASK_ID, key="workflow_run")
    print()
    print(f"DAG run {run.run_id}: {run.state}")
    print(f"task {TASK_ID}: {ti.state} (deferred while the workflow ran, then resumed)")
    print(f"workflow run id: {record['workflowRunId']} ({record['status']})")
    print(f"output: {json.dumps(output, ensure_ascii=False)}")
    print(f"cost: {record['totalCost']} credits, tokens: {record['totalTokens']}")
    return 0 if run.state == "success" else 1


if __name__ == "__main__":
    sys.exit(report() if sys.argv[1:] == ["--report"] else main())
