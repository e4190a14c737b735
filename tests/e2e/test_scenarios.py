"""
The provider in a real deployment, broken on purpose.

PostgreSQL, the emulator, and Airflow's API server, scheduler (LocalExecutor), DAG processor
and triggerer run as separate processes on loopback (``tests/e2e/harness``), with the
provider installed from its wheel. Each scenario asserts on Airflow's own state (task instance
states, XCom, trigger rows, logs) and on the emulator's request log.

The long scenarios start together (fan-out, rate-limit storm, failed and endless runs, the
sync/deferred comparison) so the suite fits its time budget; the ones that kill a triggerer
run after them, then the ones measuring many runs on one rate-limited key (alone, so that
nothing else shares the machine with them: 11 together, then 12), and the one that burns
every core runs last and alone. Figures for the README are printed at the end and written to
``<deployment root>/figures.json``.
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
from dataclasses import dataclass
from datetime import UTC, datetime
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
    "altabots_rate_headers": "sk-e2e-rate-headers-e41b",
    "altabots_rate_no_headers": "sk-e2e-rate-no-headers-07fa",
    "altabots_rate_two_triggerers": "sk-e2e-rate-two-triggerers-93c5",
    "altabots_rate_unlimited": "sk-e2e-rate-unlimited-5d1e",
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
    "altabots_rate_headers": {"run_seconds": [20, 40], "pending_seconds": 0.5},
    "altabots_rate_no_headers": {"run_seconds": [20, 40], "pending_seconds": 0.5},
    "altabots_rate_two_triggerers": {"run_seconds": [20, 40], "pending_seconds": 0.5},
    "altabots_rate_unlimited": {"run_seconds": [20, 40], "pending_seconds": 0.5},
}
FIRST_WAVE = ("e2e_deferred", "e2e_sync", "e2e_failed_run", "e2e_endless_run")
FIRST_WAVE_POSTGRES = ("e2e_fanout", "e2e_storm")
SAMPLE_EVERY = 0.2
FIGURES: dict[str, Any] = {}

# -- tests 11 and 12: many runs on one rate-limited key ------------------------------------------


@dataclass(frozen=True)
class RateScenario:
    """DAG ``e2e_rate_<name>``: N mapped deferrable runs on connection, key and pool altabots_rate_<name>."""

    #: The emulator's rate-limit header style for the key ("ratelimit", "none"); None: no limit.
    headers: str | None
    #: Triggerers alive while it runs.
    triggerers: int
    #: Extras of its connection.
    extra: dict[str, Any]
    #: Goal (not asserted yet): the largest share of the key's requests answered 429.
    max_share_429: float | None


RATE_SCENARIOS = {
    "headers": RateScenario("ratelimit", 1, {}, 0.05),
    "no_headers": RateScenario("none", 1, {}, 0.10),
    "two_triggerers": RateScenario("ratelimit", 2, {}, 0.05),
    "unlimited": RateScenario(None, 1, {}, None),
}
#: Runs per scenario; the DAG file reads the same variable (make bench-rate-limits sets 100).
RATE_TASKS = int(os.environ.get("ALTABOTS_E2E_RATE_TASKS", "20"))
#: Slots of each scenario's pool (one pool per API key, the setting recommended for a rate-limited key).
RATE_POOL_SLOTS = 2
#: The emulator's limit of each limited key: requests per fixed window.
RATE_LIMIT = 30
RATE_WINDOW_S = 60.0
#: No run can do with fewer than 2 requests (its invoke and one status check): 2N requests at the
#: allowed rate is the shortest a scenario can take on a limited key.
RATE_LOWER_BOUND_S = 2 * RATE_TASKS / (RATE_LIMIT / RATE_WINDOW_S)
#: Goal (not asserted yet): a limited scenario's wall time at most this multiple of the bound.
RATE_MAX_WALL_RATIO = 1.3
#: How long a scenario's DAG run may take before the test fails: generous, since the provider's
#: behaviour under rate limits is being reworked and the machine is small and often busy.
RATE_RUN_TIMEOUT_S = 900 + 10 * RATE_LOWER_BOUND_S
#: ALTABOTS_E2E_RATE_GOALS=assert makes the goals above assertions (see check_rate_goals).
ENFORCE_RATE_GOALS = os.environ.get("ALTABOTS_E2E_RATE_GOALS") == "assert"

# What Deployment(connections=...) takes: the API key, or the key with the connection's extras.
CONNECTIONS: dict[str, str | dict[str, Any]] = {
    **KEYS,
    **{
        f"altabots_rate_{name}": {"password": KEYS[f"altabots_rate_{name}"], "extra": scenario.extra}
        for name, scenario in RATE_SCENARIOS.items()
    },
}


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
    from tests.e2e.harness import Deployment

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
        connections=CONNECTIONS,
        variables={"altabots_e2e_hook_code": WEBHOOK_CODE, "altabots_e2e_hook_url": emulator_hook},
        # "sqlite" runs the suite on the fallback backend on purpose; "auto" falls back by itself.
        backend=os.environ.get("ALTABOTS_E2E_BACKEND", "auto"),
    ) as d:
        print(f"deployment on {d.backend} ({d.backend_reason or 'PostgreSQL available'})")
        for conn_id, workflow in WORKFLOWS.items():
            d.emulator.set_workflow(KEYS[conn_id], name=conn_id, **workflow)
        for name in RATE_SCENARIOS:
            d.set_pool(f"altabots_rate_{name}", RATE_POOL_SLOTS, f"the tasks of API key altabots_rate_{name}")
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
    d.emulator.set_faults(
        rate_limit={"limit": 5, "window_seconds": 5, "headers": "ratelimit", "api_key": storm}
    )
    runs = {
        dag_id: d.trigger_dag(dag_id) for dag_id in FIRST_WAVE + (FIRST_WAVE_POSTGRES if on_postgres else ())
    }
    stop = threading.Event()
    outage = {"count": None, "status": 503, "paths": ["/v1/workflow/query/result"], "api_key": storm}

    def bursts_of_5xx() -> None:
        """Every 15 s, the API answers every status check of the storm's key with 503 for 3 s."""
        while not stop.wait(12):
            d.emulator.set_faults(server_errors=outage)
            stop.wait(3)
            d.emulator.set_faults(server_errors=None)

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
        r for r in d.emulator.requests("/v1/workflow/invoke") if key in r["headers"].get("Authorization", "")
    ]


def queries(d: Any, conn_id: str) -> list[dict[str, Any]]:
    key = KEYS[conn_id]
    return [
        r
        for r in d.emulator.requests("/v1/workflow/query/result")
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
    (emulated,) = [run for run in d.emulator.runs() if run["run_id"] == workflow_run_id]
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
    assert d.emulator.run(workflow_run_id)["status"] in ("PENDING", "RUNNING")
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
    d.emulator.clear_faults()
    assert {state for _, _, state, _ in ti_rows(d, "e2e_storm", run_id)} == {"success"}
    started = [r for r in invokes(d, "altabots_storm") if r["status"] == 200]
    assert len(started) == 10  # 429-refused invokes started nothing; each task paid once
    polls: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for request in queries(d, "altabots_storm"):
        polls[request["body"]["workflowRunId"]].append(request)
    statuses = [r["status"] for rs in polls.values() for r in rs]
    # The key's budget on the triggerer paces the checks by the X-RateLimit-* headers, so the
    # storm shows mostly in the workers' invokes (outside the budget), each answered 429 and
    # deferred until the budget allowed it.
    refused = [r for r in invokes(d, "altabots_storm") + queries(d, "altabots_storm") if r["status"] == 429]
    assert len(refused) >= 5, "the storm did not happen"
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
    FIGURES["storm"] = {
        "429": len(refused),
        "429_to_polls": statuses.count(429),
        "503": statuses.count(503),
        "polls": len(statuses),
        "invokes": len(invokes(d, "altabots_storm")),
    }


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
        self.d.emulator.set_faults(delay=hold)
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
    assert [run["run_id"] for run in d.emulator.runs() if run["api_key"] == KEYS["altabots_crash"]] == [
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


# -- 11 and 12. many runs on one rate-limited key -----------------------------------------------------
#
# N mapped deferrable runs of 20-40 s per scenario, all on one API key limited to 30 requests per
# 60 s, through a pool of RATE_POOL_SLOTS slots, with the provider's default waiting policy and no
# retries. Asserted: every task succeeds, each started exactly one run, and the key really was
# limited as the scenario says. Measured (FIGURES["rate_limits"]): 429s, requests per run, wall
# time against 2N requests at the allowed rate, worker-slot seconds per run against the
# unlimited baseline. Run alone with `make bench-rate-limits` (N=100) or `-k shared_key`.

INVOKE_PATH = "/v1/workflow/invoke"
STATUS_PATH = "/v1/workflow/query/result"
LIMIT_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "Retry-After")


@dataclass(frozen=True)
class RateRun:
    scenario: str
    dag_id: str
    run_id: str
    #: Unix time just before the DAG run was triggered.
    triggered: float


def every_dag_run_ended(d: Any, before: str) -> None:
    wait_until(
        f"every other scenario's DAG run to end before {before}",
        lambda: not d.sql("SELECT dag_id FROM dag_run WHERE state IN ('queued', 'running')"),
        900,
        every=1,
        context=lambda: str(d.sql("SELECT dag_id, state FROM dag_run WHERE state IN ('queued', 'running')")),
    )


def arm_rate_limits(d: Any) -> None:
    """Remove every fault, then limit each limited scenario's key (fresh windows)."""
    limits = [
        {
            "limit": RATE_LIMIT,
            "window_seconds": RATE_WINDOW_S,
            "headers": scenario.headers,
            "api_key": KEYS[f"altabots_rate_{name}"],
        }
        for name, scenario in RATE_SCENARIOS.items()
        if scenario.headers is not None
    ]
    d.emulator.clear_faults()
    armed = d.emulator.set_faults(rate_limit=limits)
    assert armed.keys() == {"rate_limit"}
    shown = [(f["api_key"], f["limit"], f["window_seconds"], f["headers"]) for f in armed["rate_limit"]]
    wanted = [(f["api_key"], f["limit"], f["window_seconds"], f["headers"]) for f in limits]
    assert shown == wanted, "the emulator did not take the rate limits as set"


def start_rate_run(d: Any, scenario: str) -> RateRun:
    dag_id = f"e2e_rate_{scenario}"
    triggered = time.time()
    return RateRun(scenario, dag_id, d.trigger_dag(dag_id), triggered)


@pytest.fixture(scope="module")
def rate_phase_a(deployment: Any) -> dict[str, RateRun]:
    """Once every other DAG run has ended: the headers, no_headers and unlimited scenarios together."""
    d = deployment
    every_dag_run_ended(d, "the rate-limit scenarios")
    arm_rate_limits(d)
    return {name: start_rate_run(d, name) for name in ("unlimited", "headers", "no_headers")}


@pytest.fixture(scope="module")
def rate_phase_b(postgres: Any) -> tuple[RateRun, list[str]]:
    """After phase A: the triggerers left by earlier scenarios stopped, two fresh ones sharing the key."""
    d = postgres
    every_dag_run_ended(d, "the two-triggerer rate-limit scenario")
    # Airflow hands unassigned triggers to whichever triggerer asks first, up to its capacity:
    # two fresh triggerers, each with room for about half of the runs, so both share the key.
    for name in [name for name in d.components if name.startswith("triggerer") and d.running(name)]:
        d.kill(name, signal.SIGTERM)
        d.wait_stopped(name)
    count = RATE_SCENARIOS["two_triggerers"].triggerers
    triggerers = [f"triggerer-rate-{n}" for n in range(1, count + 1)]
    for name in triggerers:
        d.start_triggerer(name, capacity=RATE_TASKS // count + 1)
    arm_rate_limits(d)
    return start_rate_run(d, "two_triggerers"), triggerers


def epoch(value: Any) -> float:
    """A timestamp column as Unix time (PostgreSQL gives datetimes, SQLite text in UTC)."""
    when = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def wait_for_rate_run(d: Any, run: RateRun, owners: set[int] | None = None) -> str:
    """Wait for the run to end (noting the triggerers holding its triggers meanwhile); its state."""

    def ended() -> str | None:
        if owners is not None:
            owners.update(owner for owner in trigger_owners(d, run.dag_id) if owner is not None)
        rows = d.sql("SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s", (run.dag_id, run.run_id))
        return str(rows[0][0]) if rows and rows[0][0] in ("success", "failed") else None

    return str(
        wait_until(
            f"{run.dag_id} to end",
            ended,
            RATE_RUN_TIMEOUT_S,
            every=1,
            context=lambda: d.diagnostics(run.dag_id, run.run_id),
        )
    )


def share_429(requests: list[dict[str, Any]]) -> float | None:
    return round(sum(r["status"] == 429 for r in requests) / len(requests), 3) if requests else None


def rate_figures(d: Any, run: RateRun, requests: list[dict[str, Any]]) -> dict[str, Any]:
    """The scenario's figures, from Airflow's state and the key's requests in the emulator's log."""
    scenario = RATE_SCENARIOS[run.scenario]
    rows = ti_rows(d, run.dag_id, run.run_id)
    ((end_date,),) = d.sql(
        "SELECT end_date FROM dag_run WHERE dag_id = %s AND run_id = %s", (run.dag_id, run.run_id)
    )
    wall = epoch(end_date) - run.triggered
    invokes_ = [r for r in requests if r["path"] == INVOKE_PATH]
    checks = [r for r in requests if r["path"] == STATUS_PATH]
    limited = scenario.headers is not None
    return {
        "runs": RATE_TASKS,
        "limit": f"{RATE_LIMIT} per {RATE_WINDOW_S:g} s" if limited else None,
        "headers": scenario.headers,
        "triggerers": scenario.triggerers,
        "pool_slots": RATE_POOL_SLOTS,
        "connection_extra": scenario.extra,
        "tasks": len(rows),
        "tasks_failed": sum(1 for _, _, state, _ in rows if state != "success"),
        "tasks_retried": sum(1 for *_, try_number in rows if try_number != 1),
        "requests": len(requests),
        "requests_429": sum(r["status"] == 429 for r in requests),
        "share_429": share_429(requests),
        "requests_per_run": round(len(requests) / RATE_TASKS, 2),
        "invokes": len(invokes_),
        "invokes_200": sum(r["status"] == 200 for r in invokes_),
        "invokes_429": sum(r["status"] == 429 for r in invokes_),
        "invokes_share_429": share_429(invokes_),
        "status_checks": len(checks),
        "status_checks_429": sum(r["status"] == 429 for r in checks),
        "status_checks_share_429": share_429(checks),
        "runs_checked": len({r["body"]["workflowRunId"] for r in checks if isinstance(r["body"], dict)}),
        "other_requests": len(requests) - len(invokes_) - len(checks),
        "unanswered": sum(r["status"] is None for r in requests),
        "wall_s": round(wall, 1),
        "lower_bound_s": round(RATE_LOWER_BOUND_S, 1) if limited else None,
        "wall_ratio": round(wall / RATE_LOWER_BOUND_S, 2) if limited else None,
        "worker_slot_s_per_run": round(d.sampler.worker_seconds(ti_ids(d, run.dag_id)) / RATE_TASKS, 2),
    }


def write_rate_timeline(d: Any, run: RateRun, requests: list[dict[str, Any]]) -> None:
    """
    The key's requests, for a closer look: ``<deployment root>/rate_limits/<scenario>.json``, one
    entry a request: seconds after the trigger when sent and answered, path, status, the answer's
    rate-limit headers, and the run (input n of an invoke, run id of a status check). No headers
    of the request: nothing secret.
    """
    timeline = [
        {
            "sent_s": round(r["time"] - run.triggered, 3),
            "answered_s": round(r["answered"] - run.triggered, 3) if r["answered"] is not None else None,
            "path": r["path"],
            "status": r["status"],
            "limit_headers": r["limit_headers"],
            "run": (r["body"] or {}).get("workflowRunId") or ((r["body"] or {}).get("input") or {}).get("n"),
        }
        for r in requests
    ]
    folder = Path(d.root, "rate_limits")
    folder.mkdir(exist_ok=True)
    (folder / f"{run.scenario}.json").write_text(json.dumps(timeline, indent=1))


def rate_goals(figures: dict[str, dict[str, Any]]) -> None:
    """The goals of each limited scenario measured so far, as booleans in its figures (not asserted)."""
    baseline = figures.get("unlimited", {}).get("worker_slot_s_per_run")
    for name, measured in figures.items():
        scenario = RATE_SCENARIOS[name]
        if scenario.max_share_429 is None:
            continue
        measured["goals"] = {
            "share_429_at_most": scenario.max_share_429,
            "share_429_ok": measured["share_429"] is not None
            and measured["share_429"] <= scenario.max_share_429,
            "wall_ratio_at_most": RATE_MAX_WALL_RATIO,
            "wall_ok": measured["wall_ratio"] <= RATE_MAX_WALL_RATIO,
            # None until the unlimited baseline was measured in this session.
            "worker_slot_ok": None if baseline is None else measured["worker_slot_s_per_run"] <= baseline,
        }


def check_rate_run(d: Any, run: RateRun, owners: set[int] | None = None) -> dict[str, Any]:
    """Wait for the scenario's run, record and print its figures, assert what must hold."""
    state = wait_for_rate_run(d, run, owners)
    conn_id = f"altabots_rate_{run.scenario}"
    key = KEYS[conn_id]
    requests = [r for r in d.emulator.requests() if key in r["headers"].get("Authorization", "")]
    figures = rate_figures(d, run, requests)
    if owners is not None:
        figures["triggerer_jobs_holding_triggers"] = len(owners)
    all_figures = FIGURES.setdefault("rate_limits", {})
    all_figures[run.scenario] = figures
    rate_goals(all_figures)
    print(f"\nrate limits, {run.scenario}: {json.dumps(figures)}")
    write_rate_timeline(d, run, requests)
    summary = f"{run.dag_id}: {json.dumps(figures)}"

    # The scenario really was what it says: the key limited, with its header style, or not at all.
    scenario = RATE_SCENARIOS[run.scenario]
    answers = [r for r in requests if r["status"] is not None]
    assert answers, f"the emulator saw no request of {conn_id}"
    carrying = [r for r in answers if set(r["limit_headers"]) & set(LIMIT_HEADERS)]
    if scenario.headers == "ratelimit":
        assert all(r["limit_headers"].get("X-RateLimit-Limit") == str(RATE_LIMIT) for r in answers), summary
    else:
        assert carrying == [], f"answers to {conn_id} carried rate-limit headers: {summary}"
    if scenario.headers is None:
        assert figures["requests_429"] == 0, f"{conn_id} has no limit, yet was answered 429: {summary}"
    else:
        (limit,) = [f for f in d.emulator.faults()["rate_limit"] if f["api_key"] == key]
        assert key in limit["windows"], f"the rate limit of {conn_id} counted none of its requests"
        assert limit["hits"] == figures["requests_429"], summary

    # What must hold whatever the provider does about rate limits.
    assert state == "success", summary
    assert figures["tasks"] == RATE_TASKS, "the DAG file and the test disagree on ALTABOTS_E2E_RATE_TASKS"
    assert figures["tasks_failed"] == 0, summary
    started = [r for r in requests if r["path"] == INVOKE_PATH and r["status"] == 200]
    assert len(started) == RATE_TASKS, f"not one paid run per task: {summary}"
    assert len({r["body"]["input"]["n"] for r in started}) == RATE_TASKS, summary
    check_rate_goals(run.scenario, figures)
    return figures


def check_rate_goals(scenario: str, figures: dict[str, Any]) -> None:
    """
    GOALS, NOT ASSERTED YET: the provider's behaviour under rate limits is being reworked. When it
    is done, make these assertions by default (today ALTABOTS_E2E_RATE_GOALS=assert turns them on).
    """
    goals = figures.get("goals")
    if not ENFORCE_RATE_GOALS or goals is None:
        return
    assert goals["share_429_ok"], (
        f"{scenario}: share of 429 {figures['share_429']} > {goals['share_429_at_most']}"
    )
    assert goals["wall_ok"], (
        f"{scenario}: wall {figures['wall_ratio']}x the lower bound > {RATE_MAX_WALL_RATIO}x"
    )
    assert goals["worker_slot_ok"] is not False, (
        f"{scenario}: more worker-slot seconds per run than unlimited"
    )


def test_11a_shared_key_baseline_without_limit(deployment: Any, rate_phase_a: dict[str, RateRun]) -> None:
    check_rate_run(deployment, rate_phase_a["unlimited"])


def test_11b_shared_key_limit_with_headers(deployment: Any, rate_phase_a: dict[str, RateRun]) -> None:
    check_rate_run(deployment, rate_phase_a["headers"])


def test_11c_shared_key_limit_without_headers(deployment: Any, rate_phase_a: dict[str, RateRun]) -> None:
    check_rate_run(deployment, rate_phase_a["no_headers"])


def test_12_shared_key_limit_with_two_triggerers(
    postgres: Any, rate_phase_b: tuple[RateRun, list[str]]
) -> None:
    d, (run, triggerers) = postgres, rate_phase_b
    owners: set[int] = set()
    try:
        figures = check_rate_run(d, run, owners)
        assert all(d.running(name) for name in triggerers), "a triggerer died during the scenario"
        assert figures["triggerer_jobs_holding_triggers"] == len(triggerers), "the key was not shared"
    finally:
        # The scenarios after this one get one triggerer of Airflow's default capacity again.
        for name in triggerers:
            if d.running(name):
                d.kill(name, signal.SIGTERM)
                d.wait_stopped(name)
        d.start_triggerer("triggerer-after-rate-limits")


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
    key = d.airflow.cli("config", "get-value", "core", "fernet_key", check=False).stdout.strip()
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
    rate_goals(FIGURES.get("rate_limits", {}))
    text = json.dumps(FIGURES, indent=2)
    Path(d.airflow_home, "figures.json").write_text(text)
    print("\nEnd-to-end figures:\n" + text)
