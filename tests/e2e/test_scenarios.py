"""
The provider in a real deployment, broken on purpose.

PostgreSQL, the emulator, and Airflow's API server, scheduler (LocalExecutor), DAG processor
and triggerer run as separate processes on loopback (``scripts/deployment.py``), with the
provider installed from its wheel. Each scenario asserts on Airflow's own state (task instance
states, XCom, trigger rows, logs) and on the emulator's request log.

The long scenarios start together (fan-out, rate-limit storm, failed and endless runs, the
sync/deferred comparison) so the suite fits its time budget; the ones that kill a triggerer
run after them, and the one that burns every core runs last and alone. Figures for the README
are printed at the end and written to ``<deployment root>/figures.json``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.e2e.waiting import wait_until

pytestmark = pytest.mark.e2e

# One API key, so one emulated workflow, per scenario; each becomes connection altabots_<name>.
KEYS = {
    "altabots_default": "sk-e2e-default-1f0a",
    "altabots_deferred": "sk-e2e-deferred-8c2d",
    "altabots_sync": "sk-e2e-sync-77b1",
    "altabots_fanout": "sk-e2e-fanout-3e9c",
    "altabots_restart": "sk-e2e-restart-5a40",
    "altabots_takeover": "sk-e2e-takeover-c4d2",
    "altabots_storm": "sk-e2e-storm-9b13",
    "altabots_crash": "sk-e2e-crash-2f6e",
    "altabots_crash_invoke": "sk-e2e-crash-invoke-d81a",
    "altabots_failing": "sk-e2e-failing-61c7",
    "altabots_endless": "sk-e2e-endless-a5e3",
    "altabots_defer_race": "sk-e2e-defer-race-6b08",
}
WEBHOOK_CODE = "whk-e2e-code-4d7f92c1"
WORKFLOWS: dict[str, dict[str, Any]] = {
    "altabots_deferred": {"run_seconds": 20, "pending_seconds": 0.5},
    "altabots_sync": {"run_seconds": 20, "pending_seconds": 0.5},
    "altabots_fanout": {"run_seconds": [20, 60], "pending_seconds": 0.5},
    "altabots_restart": {"run_seconds": [35, 45], "pending_seconds": 0.5},
    "altabots_takeover": {"run_seconds": [35, 45], "pending_seconds": 0.5},
    "altabots_storm": {"run_seconds": [20, 30], "pending_seconds": 0.5},
    "altabots_crash": {"run_seconds": 45, "pending_seconds": 0.5},
    "altabots_crash_invoke": {"run_seconds": 10, "pending_seconds": 0.5},
    "altabots_failing": {"run_seconds": 3, "pending_seconds": 0.5, "outcome": "fail"},
    "altabots_endless": {"outcome": "never", "pending_seconds": 0.5},
    "altabots_defer_race": {"run_seconds": [0.5, 5], "pending_seconds": 0.2},
}
FIRST_WAVE = ("e2e_deferred", "e2e_sync", "e2e_failed_run", "e2e_endless_run")
FIRST_WAVE_POSTGRES = ("e2e_fanout", "e2e_storm")
SAMPLE_EVERY = 0.2
FIGURES: dict[str, Any] = {}


class Sampler(threading.Thread):
    """
    Watches the deployment from outside while scenarios run: the title of every worker process
    (which task it runs, for worker-slot seconds), and the trigger rows (for the leak scan, since
    they are deleted when their task finishes).
    """

    def __init__(self, deployment: Any) -> None:
        super().__init__(daemon=True)
        self.deployment = deployment
        self.titles: list[tuple[float, int, str]] = []
        self.trigger_rows: dict[int, str] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        last_triggers = 0.0
        while not self.stopping.is_set():
            now = time.monotonic()
            for pid, title in self.deployment.worker_processes():
                self.titles.append((now, pid, title))
            if now - last_triggers >= 1.0:
                last_triggers = now
                for trigger_id, kwargs in self.deployment.sql("SELECT id, kwargs FROM trigger"):
                    self.trigger_rows[trigger_id] = kwargs
            self.stopping.wait(SAMPLE_EVERY)

    def worker_seconds(self, ti_ids: set[str]) -> float:
        """Worker-slot seconds: the sampled time LocalExecutor workers spent on these task instances."""
        busy = {
            (when, title.rsplit(" ", 1)[-1])
            for when, _, title in self.titles
            if "LocalExecutor:" in title and title.rsplit(" ", 1)[-1] in ti_ids
        }
        return len(busy) * SAMPLE_EVERY


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Iterator[Any]:
    from scripts.deployment import Deployment

    airflow_bin = REPO / ".venv-e2e" / "bin"
    if not (airflow_bin / "airflow").exists():
        pytest.skip(
            "SKIPPED LOUDLY: the end-to-end environment is missing; run `make e2e-env` (make test does)"
        )
    root = tmp_path_factory.mktemp("deployment")
    # Nothing listens on port 9: the webhook delivery fails, which does not matter here; the token
    # still travels to the API, and the leak scan checks it went nowhere else.
    emulator_hook = "http://127.0.0.1:9/unused"
    with Deployment(
        root,
        airflow_bin=airflow_bin,
        dags_folder=REPO / "tests" / "e2e" / "dags",
        connections=KEYS,
        variables={"altabots_e2e_hook_code": WEBHOOK_CODE, "altabots_e2e_hook_url": emulator_hook},
        # "sqlite" runs the suite on the fallback backend on purpose; "auto" falls back by itself.
        backend=os.environ.get("ALTABOTS_E2E_BACKEND", "auto"),
    ) as d:
        print(f"deployment on {d.backend} ({d.backend_reason or 'PostgreSQL available'})")
        for conn_id, workflow in WORKFLOWS.items():
            d.set_workflow(KEYS[conn_id], name=conn_id, **workflow)
        sampler = Sampler(d)
        sampler.start()
        d.sampler = sampler
        yield d
        sampler.stopping.set()
        sampler.join(timeout=5)
        print_figures(d)


@pytest.fixture(scope="module")
def postgres(deployment: Any) -> Any:
    if deployment.backend != "postgresql":
        pytest.skip(
            f"SKIPPED LOUDLY: needs PostgreSQL, running on {deployment.backend}: {deployment.backend_reason}"
        )
    return deployment


@pytest.fixture(scope="module")
def first_wave(deployment: Any) -> Iterator[dict[str, str]]:
    """
    Start the long scenarios together; each test then checks its own run. On SQLite only the
    scenarios that do not need PostgreSQL start.
    """
    d = deployment
    on_postgres = d.backend == "postgresql"
    storm = KEYS["altabots_storm"]
    d.set_faults(rate_limit={"limit": 5, "window_seconds": 5, "headers": "ratelimit", "api_key": storm})
    runs = {
        dag_id: d.trigger_dag(dag_id) for dag_id in FIRST_WAVE + (FIRST_WAVE_POSTGRES if on_postgres else ())
    }
    stop = threading.Event()
    outage = {"count": None, "status": 503, "paths": ["/v1/workflow/query/result"], "api_key": storm}

    def bursts_of_5xx() -> None:
        """Every 15 s, the API answers every status check of the storm's key with 503 for 3 s."""
        while not stop.wait(12):
            d.set_faults(server_errors=outage)
            stop.wait(3)
            d.set_faults(server_errors=None)

    rearming = threading.Thread(target=bursts_of_5xx, daemon=True)
    crashes = CrashDriver(d)
    if on_postgres:
        rearming.start()
        crashes.start()
    d.first_wave_stop = stop
    d.crashes = crashes
    yield runs
    stop.set()
    if on_postgres:
        rearming.join(timeout=10)
        crashes.join(timeout=10)


# -- helpers reading Airflow's state ---------------------------------------------------------------


def ti_rows(d: Any, dag_id: str, run_id: str) -> list[tuple[str, int, str, int]]:
    return d.sql(
        "SELECT task_id, map_index, state, try_number FROM task_instance WHERE dag_id = %s AND run_id = %s",
        (dag_id, run_id),
    )


def xcom(d: Any, dag_id: str, run_id: str, task_id: str, key: str, map_index: int = -1) -> Any:
    rows = d.sql(
        "SELECT value FROM xcom"
        " WHERE dag_id = %s AND run_id = %s AND task_id = %s AND key = %s AND map_index = %s",
        (dag_id, run_id, task_id, key, map_index),
    )
    assert rows, f"no XCom {key} for {dag_id}.{task_id}[{map_index}]"
    value = rows[0][0]
    # PostgreSQL's JSON column comes back decoded; SQLite's as JSON text.
    return json.loads(value) if d.backend == "sqlite" else value


def ti_ids(d: Any, dag_id: str) -> set[str]:
    return {str(ti_id) for (ti_id,) in d.sql("SELECT id FROM task_instance WHERE dag_id = %s", (dag_id,))}


def invokes(d: Any, conn_id: str) -> list[dict[str, Any]]:
    key = KEYS[conn_id]
    return [
        r for r in d.emulator_requests("/v1/workflow/invoke") if key in r["headers"].get("Authorization", "")
    ]


def queries(d: Any, conn_id: str) -> list[dict[str, Any]]:
    key = KEYS[conn_id]
    return [
        r
        for r in d.emulator_requests("/v1/workflow/query/result")
        if key in r["headers"].get("Authorization", "")
    ]


def task_log(d: Any, dag_id: str, task_id: str, attempt: int, map_index: int = -1) -> str:
    pattern = f"dag_id={dag_id}/**/task_id={task_id}/" + (f"map_index={map_index}/" if map_index >= 0 else "")
    files = [p for p in Path(d.airflow_home, "logs").glob(pattern + f"attempt={attempt}.log")]
    assert files, f"no log for {dag_id}.{task_id} attempt {attempt}"
    return files[0].read_text(errors="replace")


def trigger_owners(d: Any, dag_id: str) -> list[int | None]:
    rows = d.sql(
        "SELECT t.triggerer_id FROM task_instance ti JOIN trigger t ON t.id = ti.trigger_id"
        " WHERE ti.dag_id = %s",
        (dag_id,),
    )
    return [row[0] for row in rows]


def deferred_count(d: Any, dag_id: str, run_id: str) -> int:
    return sum(1 for _, _, state, _ in ti_rows(d, dag_id, run_id) if state == "deferred")


# -- 1. a deferrable run frees its worker -------------------------------------------------------------


def test_1_deferrable_run_holds_no_worker_while_it_waits(deployment: Any, first_wave: dict[str, str]) -> None:
    d, run_id = deployment, first_wave["e2e_deferred"]
    wait_until("e2e_deferred to defer", lambda: deferred_count(d, "e2e_deferred", run_id) == 1, 90)
    ((ti_id,),) = d.sql(
        "SELECT id FROM task_instance WHERE dag_id = 'e2e_deferred' AND run_id = %s", (run_id,)
    )
    # The workflow is still running at the emulator, and the task waits on the triggerer.
    workflow_run_id = xcom(d, "e2e_deferred", run_id, "deferred", "workflow_run_id")
    (emulated,) = [run for run in d.emulator_runs() if run["run_id"] == workflow_run_id]
    assert emulated["status"] in ("PENDING", "RUNNING")
    wait_until(
        "the trigger to run on a triggerer",
        lambda: (owners := trigger_owners(d, "e2e_deferred")) and None not in owners,
        30,
        every=0.2,
    )

    def holders() -> list[str]:
        return [title for _, title in d.worker_processes() if str(ti_id) in title]

    # The supervisor finishes the pre-deferral execution (a moment), then lets go of its slot
    # for the rest of the wait, while the workflow is still running.
    wait_until("the worker to let go of the deferred task", lambda: not holders(), 30, every=0.1)
    for _ in range(10):
        assert holders() == [], f"a worker process holds the deferred task: {holders()}"
        time.sleep(0.5)
    assert d.emulator_run(workflow_run_id)["status"] in ("PENDING", "RUNNING")
    assert d.wait_for_dag_run("e2e_deferred", run_id, timeout=180) == "success"
    output = xcom(d, "e2e_deferred", run_id, "deferred", "return_value")
    record = xcom(d, "e2e_deferred", run_id, "deferred", "workflow_run")
    assert output["output"]
    assert record["workflowRunId"] == xcom(d, "e2e_deferred", run_id, "deferred", "workflow_run_id")
    assert record["status"] == "SUCCEED"
    assert record["totalCost"] > 0
    assert record["totalTokens"] > 0
    assert len(invokes(d, "altabots_deferred")) == 1


def test_1b_sync_run_for_comparison(deployment: Any, first_wave: dict[str, str]) -> None:
    d, run_id = deployment, first_wave["e2e_sync"]
    assert d.wait_for_dag_run("e2e_sync", run_id, timeout=180) == "success"
    assert xcom(d, "e2e_sync", run_id, "sync", "workflow_run")["status"] == "SUCCEED"
    assert queries(d, "altabots_sync") == []


# -- 2. fan-out ------------------------------------------------------------------------------------


def test_2_fan_out_of_200_runs_through_one_triggerer(postgres: Any, first_wave: dict[str, str]) -> None:
    d, run_id = postgres, first_wave["e2e_fanout"]
    assert d.wait_for_dag_run("e2e_fanout", run_id, timeout=600) == "success"
    rows = ti_rows(d, "e2e_fanout", run_id)
    assert len(rows) == 200
    assert {state for _, _, state, _ in rows} == {"success"}
    assert len(invokes(d, "altabots_fanout")) == 200
    assert len({r["body"]["input"]["n"] for r in invokes(d, "altabots_fanout")}) == 200
    triggerer_jobs = d.sql("SELECT count(*) FROM job WHERE job_type = 'TriggererJob'")[0][0]
    assert triggerer_jobs == 1  # one triggerer did all the waiting (no restart has happened yet)


# -- 6. rate-limit storm and 5xx bursts ---------------------------------------------------------


def test_6_rate_limit_storm_and_5xx_bursts_are_ridden_out(postgres: Any, first_wave: dict[str, str]) -> None:
    d, run_id = postgres, first_wave["e2e_storm"]
    assert d.wait_for_dag_run("e2e_storm", run_id, timeout=480) == "success"
    d.first_wave_stop.set()
    d.clear_faults()
    assert {state for _, _, state, _ in ti_rows(d, "e2e_storm", run_id)} == {"success"}
    started = [r for r in invokes(d, "altabots_storm") if r["status"] == 200]
    assert len(started) == 10  # 429-refused invokes started nothing; each task paid once
    polls: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for request in queries(d, "altabots_storm"):
        polls[request["body"]["workflowRunId"]].append(request)
    statuses = [r["status"] for rs in polls.values() for r in rs]
    assert statuses.count(429) >= 5, "the storm did not happen"
    # The outages cover a fifth of the time; how many checks land in one is chance (6 to 10
    # seen): two are enough to test the backoff after a 5xx below.
    assert statuses.count(503) >= 2, "no 5xx burst happened"
    poll_interval = 2.0
    for requests in polls.values():
        failures = 0
        for this, following in itertools.pairwise(requests):
            gap_after_answer = following["time"] - this["answered"]
            if this["status"] == 429:
                failures = 0  # the API answered: a streak of failures is over
                reset = float(this["limit_headers"]["X-RateLimit-Reset"])
                assert following["time"] >= reset - 0.05, "a poll came back before the rate limit reset"
            elif this["status"] == 503:
                failures += 1
                least = 0.5 * min(poll_interval * 2 ** (failures - 1), 300)
                assert gap_after_answer >= least - 0.05, (
                    f"backoff after 5xx #{failures} was {gap_after_answer:.2f} s"
                )
            else:
                failures = 0
    FIGURES["storm"] = {"429": statuses.count(429), "503": statuses.count(503), "polls": len(statuses)}


# -- 7. a FAILED run ------------------------------------------------------------------------------


def test_7_failed_run_fails_the_task_and_stops_downstream(
    deployment: Any, first_wave: dict[str, str]
) -> None:
    d, run_id = deployment, first_wave["e2e_failed_run"]
    assert d.wait_for_dag_run("e2e_failed_run", run_id, timeout=180) == "failed"
    states = {task_id: state for task_id, _, state, _ in ti_rows(d, "e2e_failed_run", run_id)}
    assert states == {"failing": "failed", "downstream": "upstream_failed"}
    workflow_run_id = xcom(d, "e2e_failed_run", run_id, "failing", "workflow_run_id")
    log = task_log(d, "e2e_failed_run", "failing", 1)
    assert f"Workflow run {workflow_run_id}" in log
    assert "FAILED" in log
    assert "The API said" in log
    assert "emulated failure" in log  # the emulator's own words reach the user


# -- 8. a run that never ends ------------------------------------------------------------------------


def test_8_endless_run_times_out_and_leaves_no_trigger(deployment: Any, first_wave: dict[str, str]) -> None:
    d, run_id = deployment, first_wave["e2e_endless_run"]
    assert d.wait_for_dag_run("e2e_endless_run", run_id, timeout=180) == "failed"
    workflow_run_id = xcom(d, "e2e_endless_run", run_id, "endless", "workflow_run_id")
    log = task_log(d, "e2e_endless_run", "endless", 1)
    assert (
        f"Workflow run {workflow_run_id} had not ended when the timeout passed; last status seen: RUNNING"
        in log
    )
    wait_until(
        "the trigger of the endless run to be removed",
        lambda: (
            not any(workflow_run_id in str(kwargs) for _, kwargs in d.sql("SELECT id, kwargs FROM trigger"))
            and d.sql("SELECT trigger_id FROM task_instance WHERE dag_id = 'e2e_endless_run'") == [(None,)]
        ),
        60,
    )


# -- 5. a worker killed between invoke and deferral --------------------------------------------------


def kill_worker_of(d: Any, dag_id: str, run_id: str) -> None:
    """SIGKILL the task's process and the LocalExecutor worker supervising it (both carry its id)."""
    ((ti_id,),) = d.sql("SELECT id FROM task_instance WHERE dag_id = %s AND run_id = %s", (dag_id, run_id))
    pids = [pid for pid, title in d.worker_processes() if title.endswith(str(ti_id))]
    assert pids, f"no worker process runs {dag_id}"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


class CrashDriver(threading.Thread):
    """
    Kills two workers early in the suite, while other scenarios run: one after its invoke was
    answered and its run id stored (the emulator holds the status check that follows), one
    while its invoke is held unanswered. The tests check what happened next.
    """

    def __init__(self, deployment: Any) -> None:
        super().__init__(daemon=True)
        self.d = deployment
        self.runs: dict[str, str] = {}
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self.crash(
                "e2e_worker_crash",
                "altabots_crash",
                "/v1/workflow/query/result",
                lambda: queries(self.d, "altabots_crash"),
            )
            self.crash(
                "e2e_worker_crash_mid_invoke",
                "altabots_crash_invoke",
                "/v1/workflow/invoke",
                lambda: invokes(self.d, "altabots_crash_invoke"),
            )
        except BaseException as error:
            self.error = error
        finally:
            self.done.set()

    def crash(self, dag_id: str, conn_id: str, path: str, held: Callable[[], Any]) -> None:
        hold = {"seconds": 300, "count": 1, "paths": [path], "api_key": KEYS[conn_id], "after_create": True}
        self.d.set_faults(delay=hold)
        run_id = self.runs[dag_id] = self.d.trigger_dag(dag_id)
        wait_until(f"{dag_id}: the emulator to hold {path}", held, 120, every=0.1)
        kill_worker_of(self.d, dag_id, run_id)

    def run_id(self, dag_id: str) -> str:
        assert self.done.wait(300), "the crash driver did not finish"
        if self.error is not None:
            raise self.error
        return self.runs[dag_id]


def test_5_worker_killed_after_invoke_resumes_the_same_run(postgres: Any, first_wave: dict[str, str]) -> None:
    d = postgres
    run_id = d.crashes.run_id("e2e_worker_crash")
    assert d.wait_for_dag_run("e2e_worker_crash", run_id, timeout=300) == "success"
    ((state, try_number),) = d.sql(
        "SELECT state, try_number FROM task_instance WHERE dag_id = 'e2e_worker_crash' AND run_id = %s",
        (run_id,),
    )
    assert (state, try_number) == ("success", 2)
    workflow_run_id = xcom(d, "e2e_worker_crash", run_id, "crash", "workflow_run_id")
    assert len(invokes(d, "altabots_crash")) == 1
    assert [run["run_id"] for run in d.emulator_runs() if run["api_key"] == KEYS["altabots_crash"]] == [
        workflow_run_id
    ]
    # The second try found the run still going in the task state store, and waited for it.
    assert "Reconnecting to existing job" in task_log(d, "e2e_worker_crash", "crash", 2)
    assert {q["body"]["workflowRunId"] for q in queries(d, "altabots_crash")} == {workflow_run_id}


def test_5b_worker_killed_mid_invoke_is_not_invoked_again(postgres: Any, first_wave: dict[str, str]) -> None:
    d = postgres
    run_id = d.crashes.run_id("e2e_worker_crash_mid_invoke")
    assert d.wait_for_dag_run("e2e_worker_crash_mid_invoke", run_id, timeout=300) == "failed"
    assert len(invokes(d, "altabots_crash_invoke")) == 1  # the run that may exist was not paid for twice
    log = task_log(d, "e2e_worker_crash_mid_invoke", "crash", 2)
    assert "sent an invoke at" in log
    assert "stopped before the API answered" in log


# -- 3. the triggerer dies ------------------------------------------------------------------------------


def test_3_triggerer_killed_and_restarted(postgres: Any, first_wave: dict[str, str]) -> None:
    d = postgres
    run_id = d.trigger_dag("e2e_triggerer_restart")
    wait_until("20 tasks to defer", lambda: deferred_count(d, "e2e_triggerer_restart", run_id) == 20, 240)
    wait_until("triggers to be assigned", lambda: None not in trigger_owners(d, "e2e_triggerer_restart"), 60)
    polled_by_all = lambda: len({q["body"]["workflowRunId"] for q in queries(d, "altabots_restart")}) == 20  # noqa: E731
    wait_until("every trigger to have polled its run (mid-wait)", polled_by_all, 60)
    before = set(trigger_owners(d, "e2e_triggerer_restart"))
    killed = time.monotonic()
    d.kill("triggerer", signal.SIGKILL)
    d.restart("triggerer")
    wait_until(
        "a new triggerer to take the triggers",
        lambda: (
            (owners := trigger_owners(d, "e2e_triggerer_restart"))
            and not set(owners) & (before | {None})
            and len(owners) == 20
        ),
        180,
        every=0.2,
    )
    FIGURES["triggerer_restart_recovery_s"] = round(time.monotonic() - killed, 1)
    assert d.wait_for_dag_run("e2e_triggerer_restart", run_id, timeout=300) == "success"
    assert {state for _, _, state, _ in ti_rows(d, "e2e_triggerer_restart", run_id)} == {"success"}
    assert len(invokes(d, "altabots_restart")) == 20


# -- 4. one of two triggerers dies -----------------------------------------------------------------------


def test_4_second_triggerer_takes_over(postgres: Any, first_wave: dict[str, str]) -> None:
    d = postgres
    d.start_triggerer("triggerer-2")
    run_id = d.trigger_dag("e2e_triggerer_takeover")
    wait_until("20 tasks to defer", lambda: deferred_count(d, "e2e_triggerer_takeover", run_id) == 20, 240)
    wait_until("triggers to be assigned", lambda: None not in trigger_owners(d, "e2e_triggerer_takeover"), 60)
    polled_by_all = lambda: len({q["body"]["workflowRunId"] for q in queries(d, "altabots_takeover")}) == 20  # noqa: E731
    wait_until("every trigger to have polled its run (mid-wait)", polled_by_all, 60)
    owners = trigger_owners(d, "e2e_triggerer_takeover")
    # The victim is the triggerer holding the most triggers; the other one must take them.
    victim, survivor = sorted(("triggerer", "triggerer-2"), key=lambda name: -owners.count(d.job_id(name)))
    victim_job = d.job_id(victim)
    killed = time.monotonic()
    d.kill(victim, signal.SIGKILL)
    wait_until(
        f"{survivor} to take the triggers of {victim}",
        lambda: (
            (now := trigger_owners(d, "e2e_triggerer_takeover"))
            and set(now) == {d.job_id(survivor)}
            and len(now) == 20
        ),
        180,
        every=0.2,
    )
    FIGURES["triggerer_takeover_recovery_s"] = round(time.monotonic() - killed, 1)
    FIGURES["triggerer_takeover_moved_triggers"] = owners.count(victim_job)
    assert d.wait_for_dag_run("e2e_triggerer_takeover", run_id, timeout=300) == "success"
    assert {state for _, _, state, _ in ti_rows(d, "e2e_triggerer_takeover", run_id)} == {"success"}
    assert len(invokes(d, "altabots_takeover")) == 20


# -- 10. runs that end moments after their task deferred, on a busy machine ---------------------------

DEFER_RACE_TASKS = 100
# Airflow's own line in a task's log each time the task defers; it does not depend on the provider.
DEFERRED_LINE = "Pausing task as DEFERRED"
STATE_MISMATCH = re.compile(r"finished with state (\w+), but the task instance's state attribute is (\w+)")
# A scheduler whose own heartbeat stalls past [scheduler] scheduler_health_check_threshold marks
# itself failed and resets the tasks it queued: a starved machine, not issue 9. Told apart here.
# Airflow logs the stall only when it passed that threshold.
HEARTBEAT_STALL = re.compile(r"Heartbeat recovered after ([\d.]+) seconds")
ORPHANS_RESET = re.compile(r"Reset the following (\d+) orphaned TaskInstances")


@contextlib.contextmanager
def cpu_burners(count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """A neighbour keeping every core busy: ``count`` processes each running a tight loop."""
    # Each loop also ends by itself once this process is gone, should the finally below not run.
    code = f"import os\nwhile os.getppid() == {os.getpid()}:\n    for _ in range(1_000_000): pass"
    burners: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            burners.append(subprocess.Popen([sys.executable, "-c", code]))
        yield burners
    finally:
        for burner in burners:
            burner.kill()
        for burner in burners:
            burner.wait(timeout=30)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a live process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_10_runs_ending_right_after_the_deferral_succeed_on_a_busy_machine(postgres: Any) -> None:
    """
    Issue 9: Airflow 3.2/3.3 fail a deferred task whose trigger fires within seconds of the
    deferral, when the executor's "success" for the worker process that deferred reaches the
    scheduler after the task was queued again to resume ("finished with state success, but the
    task instance's state attribute is queued"). A busy machine widens that window. 100 runs of
    0.7-5.2 s, the provider's default waiting policy, no retries: every task must succeed at its
    first try, with one invoke each.

    It runs alone: the burner would slow the other scenarios' workers and triggerers past the
    heartbeat thresholds this deployment sets (triggerers 5 s, tasks 10 s), and skew their figures.
    """
    d, dag_id = postgres, "e2e_defer_race"
    wait_until(
        "every other scenario's DAG run to end before the cores are burned",
        lambda: not d.sql("SELECT dag_id FROM dag_run WHERE state IN ('queued', 'running')"),
        900,
        every=1,
        context=lambda: str(d.sql("SELECT dag_id, state FROM dag_run WHERE state IN ('queued', 'running')")),
    )
    cores = os.cpu_count() or 1
    scheduler_log = d.logs_dir / "scheduler.log"
    log_offset = scheduler_log.stat().st_size
    with cpu_burners(cores) as burners:
        began = time.monotonic()
        run_id = d.trigger_dag(dag_id)
        state = d.wait_for_dag_run(dag_id, run_id, timeout=900)
        wall = time.monotonic() - began
        burned = sum(cpu_seconds(burner.pid) for burner in burners)
    rows = ti_rows(d, dag_id, run_id)
    logs = d.task_logs(dag_id, run_id, "run")
    # Tasks that deferred at least once, in any attempt (trigger logs are files of their own).
    deferred = len({path.split("/")[0] for path, text in logs.items() if DEFERRED_LINE in text})
    with scheduler_log.open("rb") as handle:
        handle.seek(log_offset)
        said = handle.read().decode(errors="replace")  # by the scheduler during this run only
    mismatches = [line for line in said.splitlines() if dag_id in line and STATE_MISMATCH.search(line)]
    failed = sum(1 for _, _, ti_state, _ in rows if ti_state != "success")
    figures = FIGURES["defer_race"] = {
        "tasks": len(rows),
        "failed": failed,
        "retried": sum(1 for *_, try_number in rows if try_number != 1),
        "deferred": deferred,
        "finished_on_worker": len(rows) - deferred,
        "wall_s": round(wall, 1),
        "cores_burned": cores,
        "burner_cpu_s": round(burned, 1),
        "load_average_1m": round(os.getloadavg()[0], 1),
        "scheduler_state_mismatches": dict(
            Counter(" while ".join(STATE_MISMATCH.findall(line)[0]) for line in mismatches)
        ),
        "scheduler_heartbeat_stall_s": max(map(float, HEARTBEAT_STALL.findall(said)), default=0.0),
        "scheduler_reset_orphans": sum(map(int, ORPHANS_RESET.findall(said))),
    }
    print(f"\ndefer race: {json.dumps(figures)}")
    evidence = "\n".join(line[:400] for line in mismatches[:5]) or "(no state mismatch)"
    if figures["scheduler_reset_orphans"]:
        evidence += (
            f"\nthe scheduler's heartbeat stalled {figures['scheduler_heartbeat_stall_s']} s and it reset"
            f" {figures['scheduler_reset_orphans']} of its own tasks: the machine was starved (not issue 9)"
        )
    summary = (
        f"of {len(rows)} tasks {failed} failed and {figures['retried']} ran more than once;"
        f" the scheduler said:\n{evidence}"
    )
    assert state == "success", summary
    assert len(rows) == DEFER_RACE_TASKS
    assert {(ti_state, try_number) for _, _, ti_state, try_number in rows} == {("success", 1)}, summary
    assert mismatches == [], summary
    assert figures["scheduler_reset_orphans"] == 0, summary
    started = invokes(d, "altabots_defer_race")
    assert len(started) == DEFER_RACE_TASKS  # one invoke each: no task started a second run
    assert {r["status"] for r in started} == {200}
    assert len({r["body"]["input"]["n"] for r in started}) == DEFER_RACE_TASKS


# -- 9. no secret anywhere ----------------------------------------------------------------------------


def test_9_no_key_or_webhook_token_in_logs_or_tables(deployment: Any, first_wave: dict[str, str]) -> None:
    d = deployment
    everything_ran = d.backend == "postgresql"  # on SQLite only the scenarios above ran
    secrets = [*KEYS.values(), WEBHOOK_CODE]
    # The token really travelled: the API got it in the webhook header.
    (invoke,) = invokes(d, "altabots_deferred")
    assert invoke["body"]["webhook"][0]["headers"]["X-Callback-Code"] == WEBHOOK_CODE

    # Airflow's own logs, every component and every task. Not the emulator's: it plays the vendor,
    # which holds the keys by definition (they are on its command line).
    airflow_logs = [p for p in d.logs_dir.glob("*.log") if p.stem not in ("emulator", "postgres")]
    files = airflow_logs + [p for p in Path(d.airflow_home, "logs").rglob("*") if p.is_file()]
    components = {p.stem for p in airflow_logs}
    assert {"scheduler", "triggerer", "api-server", "dag-processor"} <= components
    assert sum(1 for p in files if "attempt=" in p.name) >= (200 if everything_ran else 4)  # logs to scan
    for path in files:
        text = path.read_text(errors="replace")
        for secret in secrets:
            assert secret not in text, f"a secret leaked into {path.name}"

    fernet = decryptor(d)
    triggers = [fernet(kwargs) for kwargs in d.sampler.trigger_rows.values()]
    assert len(triggers) >= (200 if everything_ran else 2)
    assert any("altabots" in text for text in triggers)
    tables = {
        "trigger": triggers,
        "xcom": [str(v) for (v,) in d.sql("SELECT value FROM xcom")],
        "rendered_task_instance_fields": [
            str(v) for (v,) in d.sql("SELECT rendered_fields FROM rendered_task_instance_fields")
        ],
    }
    assert tables["xcom"]
    assert tables["rendered_task_instance_fields"]
    for table, values in tables.items():
        for value in values:
            for secret in secrets:
                assert secret not in value, f"a secret leaked into the {table} table"


def decryptor(d: Any) -> Callable[[str], str]:
    """Trigger kwargs are Fernet-encrypted when a key is set: decrypt them, or the scan proves nothing."""
    key = d.airflow("config", "get-value", "core", "fernet_key", check=False).stdout.strip()
    if not key:
        return lambda text: text
    from cryptography.fernet import Fernet

    fernet = Fernet(key.encode())
    return lambda text: text if text.startswith("{") else fernet.decrypt(text.encode()).decode()


def print_figures(d: Any) -> None:
    if not hasattr(d, "sampler"):
        return
    FIGURES["worker_slot_seconds"] = {
        "deferrable": round(d.sampler.worker_seconds(ti_ids(d, "e2e_deferred")), 1),
        "sync_invoke": round(d.sampler.worker_seconds(ti_ids(d, "e2e_sync")), 1),
        "workflow_run_seconds": WORKFLOWS["altabots_deferred"]["run_seconds"],
        "sampled_every_s": SAMPLE_EVERY,
    }
    fanout = d.sampler.worker_seconds(ti_ids(d, "e2e_fanout"))
    FIGURES["fanout_worker_slot_seconds_per_task"] = round(fanout / 200, 2)
    text = json.dumps(FIGURES, indent=2)
    Path(d.airflow_home, "figures.json").write_text(text)
    print("\nEnd-to-end figures:\n" + text)
