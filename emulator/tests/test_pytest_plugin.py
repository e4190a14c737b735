"""The pytest plugin, run as a user's test session would run it; the client and the process launcher."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from altabots_emulator.client import EmulatorClient, EmulatorError
from altabots_emulator.process import EmulatorProcess

pytest_plugins = ["pytester"]

USER_TESTS = """
import json
import os

import httpx

CONN = "AIRFLOW_CONN_MY_ALTABOTS"


def invoke(url, key):
    return httpx.post(
        url + "/v1/workflow/invoke",
        headers={"Authorization": "Bearer " + key},
        json={"input": {"topic": "x"}, "isAsync": True},
        trust_env=False,
    )


def test_the_connection_points_at_the_emulator(altabots_emulator):
    conn = json.loads(os.environ[CONN])
    assert conn == {"conn_type": "altabots", "host": altabots_emulator.url, "password": "key-from-ini"}
    assert altabots_emulator.api_key == "key-from-ini"
    assert invoke(conn["host"], "key-from-ini").status_code == 200
    (logged,) = altabots_emulator.invokes()
    assert logged["body"]["input"] == {"topic": "x"}
    with open("url.txt", "w") as out:
        out.write(altabots_emulator.url)


def test_each_test_starts_from_a_reset_emulator(altabots_emulator):
    assert altabots_emulator.invokes() == []
    assert altabots_emulator.url == open("url.txt").read()  # one process for the session
    # The ini's --run-seconds reached the command line.
    (workflow,) = altabots_emulator.workflows()
    assert workflow["run_seconds"] == 0.25


def test_use_points_the_connection_at_another_key_with_extras(altabots_emulator):
    altabots_emulator.set_workflow("other-key", outcome="fail")
    altabots_emulator.use("other-key", timeout=5)
    conn = json.loads(os.environ[CONN])
    assert (conn["password"], conn["extra"]) == ("other-key", {"timeout": 5})
    assert invoke(altabots_emulator.url, "other-key").status_code == 200


def test_faults_reach_the_api(altabots_emulator):
    altabots_emulator.set_faults(server_errors={"count": 1, "status": 503})
    assert invoke(altabots_emulator.url, "key-from-ini").status_code == 503
    assert invoke(altabots_emulator.url, "key-from-ini").status_code == 200


def test_the_connection_is_gone_after_a_test():
    assert CONN not in os.environ
"""


def test_the_fixtures_in_a_users_test_session(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        """
        [pytest]
        altabots_emulator_api_key = key-from-ini
        altabots_emulator_args = --run-seconds 0.25 --pending-seconds 0
        altabots_emulator_conn_id = my_altabots
        """
    )
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(passed=5)
    # The session's emulator stopped with the session: nothing listens on its port any more.
    url = urlsplit((pytester.path / "url.txt").read_text())
    with pytest.raises(ConnectionRefusedError), socket.create_connection((url.hostname, url.port), timeout=5):
        pass


def test_the_process_says_why_it_did_not_start() -> None:
    with pytest.raises(RuntimeError, match=r"did not start .*exit status 2"):
        EmulatorProcess(["--outcome", "maybe"], start_timeout=120)


def test_the_client_names_what_the_emulator_refused() -> None:
    with EmulatorProcess(["--api-key", "k"], start_timeout=120) as emulator:
        with pytest.raises(EmulatorError, match=r"POST /_emulator/faults with 400: .*drop"):
            emulator.client.set_faults(drop={"count": -1})
        with pytest.raises(EmulatorError, match=r"GET /_emulator/runs/nope with 404"):
            emulator.client.run("nope")
        run_id = httpx.post(
            f"{emulator.url}/v1/workflow/invoke",
            headers={"Authorization": "Bearer k"},
            json={"input": {}, "isAsync": True},
            trust_env=False,
        ).json()["workflowRunId"]
        ended = emulator.client.end_run(run_id, "fail")
        assert ended["status"] == "FAILED"
        with EmulatorClient(emulator.url) as other:  # a second client sees the same emulator
            assert [run["run_id"] for run in other.runs("FAILED")] == [run_id]
    assert emulator.process.returncode == 0  # SIGTERM ends it cleanly


# A parent that starts the emulator the way the plugin does, says where it is, and waits.
PARENT = """
import sys

from altabots_emulator.process import EmulatorProcess

emulator = EmulatorProcess(["--quiet"], start_timeout=120)
print(emulator.url, emulator.process.pid, flush=True)
sys.stdin.read()
"""


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie waiting for a reaper counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc here: kill() found it
    return state not in ("Z", "X")


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except OSError:
        return False


def test_the_emulator_stops_when_the_process_that_started_it_is_killed() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    emulator_pid = None
    try:
        assert parent.stdout is not None
        with ThreadPoolExecutor(1) as pool:
            line = pool.submit(parent.stdout.readline).result(timeout=120)
        url, pid = line.split()
        emulator_pid = int(pid)
        address = urlsplit(url)
        assert address.hostname == "127.0.0.1"
        assert address.port is not None
        with EmulatorClient(url) as client:
            assert client.workflows()  # it serves
        parent.kill()  # SIGKILL: the parent has no chance to stop it
        assert parent.wait(timeout=60) == -signal.SIGKILL
        deadline = time.monotonic() + 60
        while (_running(emulator_pid) or _answers(address.hostname, address.port)) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.2)
        assert not _answers(address.hostname, address.port), "the emulator still answers"
        assert not _running(emulator_pid), "the emulator's process still runs"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if emulator_pid is not None and _running(emulator_pid):
            os.kill(emulator_pid, signal.SIGKILL)


# Four tests, two per worker under ``-n 2``, all on the one database.
XDIST_USER_TESTS = """
import os


def note(name):
    with open(os.environ["WORKERS_LOG"], "a") as out:
        out.write(os.environ["PYTEST_XDIST_WORKER"] + " " + name + "\\n")


def test_a(altabots_airflow_db):
    note("a")


def test_b(altabots_airflow_db):
    note("b")


def test_c_runs_a_dag(altabots_dag_test):
    note("c")
    result = altabots_dag_test("tiny")
    assert result.state("answer") == "success"
    assert result.xcom("answer") == 42


def test_d(altabots_airflow_db):
    note("d")
"""

TINY_DAG = """
import datetime

from airflow.sdk import dag, task


@dag(schedule=None, start_date=datetime.datetime(2026, 1, 1))
def tiny():
    @task
    def answer():
        return 42

    answer()


tiny()
"""

# Airflow imports this from AIRFLOW_HOME/config in each of its processes: here it notes when an
# ``airflow db migrate`` process started and when it ended.
MIGRATIONS_NOTE = """
import atexit
import json
import os
import sys
import time

if sys.argv[1:3] == ["db", "migrate"]:

    def _note(event):
        with open(os.environ["MIGRATIONS_LOG"], "a") as out:
            out.write(json.dumps({"pid": os.getpid(), "event": event, "at": time.monotonic()}) + "\\n")

    _note("start")
    atexit.register(_note, "end")
"""


def test_xdist_workers_migrate_one_airflow_home_one_at_a_time(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("airflow")
    for name in [name for name in os.environ if name.startswith(("AIRFLOW", "PYTEST_XDIST"))]:
        monkeypatch.delenv(name)
    home = pytester.path / "airflow_home"
    (home / "config").mkdir(parents=True)
    (home / "config" / "airflow_local_settings.py").write_text(MIGRATIONS_NOTE)
    (pytester.path / "dags").mkdir()
    (pytester.path / "dags" / "tiny.py").write_text(TINY_DAG)
    migrations, workers = pytester.path / "migrations.log", pytester.path / "workers.log"
    monkeypatch.setenv("AIRFLOW_HOME", str(home))
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    monkeypatch.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(pytester.path / "dags"))
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{home / 'airflow.db'}")
    monkeypatch.setenv("MIGRATIONS_LOG", str(migrations))
    monkeypatch.setenv("WORKERS_LOG", str(workers))
    pytester.makepyfile(test_user=XDIST_USER_TESTS)

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", timeout=600)

    # Each migration ended before the next began.
    events: dict[int, dict[str, float]] = {}
    for line in migrations.read_text().splitlines():
        event = json.loads(line)
        events.setdefault(event["pid"], {})[event["event"]] = event["at"]
    assert all(set(times) == {"start", "end"} for times in events.values()), events
    spans = sorted((times["start"], times["end"]) for times in events.values())
    overlaps = [(one, other) for one, other in itertools.pairwise(spans) if other[0] < one[1]]
    assert overlaps == [], f"migrations overlapped in time: {spans}"
    result.assert_outcomes(passed=4)
    # Both workers ran tests that need the database (xdist hands each two of the four).
    ran = [line.split() for line in workers.read_text().splitlines()]
    assert sorted(test for _, test in ran) == ["a", "b", "c", "d"]
    assert {worker for worker, _ in ran} == {"gw0", "gw1"}
    # The second worker found the home migrated in this run already, and did not migrate again.
    assert len(spans) == 1, spans
