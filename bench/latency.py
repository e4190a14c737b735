"""
Completion delay against requests: how soon a waiting task learns its run ended, and what the
waiting costs in API requests, for runs of 2, 10, 30 and 120 s.

Three waiting policies, each driving this provider's own trigger through Airflow's trigger runner
(``bench/runner.py``), so only the schedule differs:

* ``adaptive``: the provider's default, as a deferrable task waits: checks 2 and 4 s after the
  invoke from the worker (``polling.CHECK_ON_WORKER_SECONDS``), where a run that ended is done
  with; otherwise the trigger goes on, its first check no sooner than
  ``polling.DEFERRAL_MARGIN`` after the deferral, then each wait 1.5 times the last, at most 60 s;
* ``fixed 60 s``: one check a minute (dbt Cloud's default ``check_interval``);
* ``fixed 5 s``: one check every five seconds.

A run of "L seconds" is ``--repeats`` runs whose lengths are spread evenly over L +/- ``--spread``
(20%), the same lengths for every policy. Runs of exactly L would flatter any fixed interval
that divides L: a 5 s interval would find a 10, 30 or 120 s run the instant it ends, a delay no
real run, whose length nobody knows in advance, would see. All runs wait at once, against the
emulator in this process (runs start ``RUNNING`` at once and end their length after the invoke).
Delay is the trigger's event time minus the run's end time: what the task's resumption waits
for on top of the scheduler's own, policy-independent, latency. Requests count the invoke and
every status check of the run, from the emulator's request log.

Usage: ``python bench/latency.py [--lengths 2,10,30,120] [--repeats 8] [--spread 0.2] [--out F]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runner import log_as_triggerer, run_triggers

POLICIES: dict[str, dict[str, float]] = {
    "adaptive": {},
    "fixed 60 s": {"poll_interval": 60.0, "max_poll_interval": 60.0, "growth": 1.0},
    "fixed 5 s": {"poll_interval": 5.0, "max_poll_interval": 5.0, "growth": 1.0},
}


def spread_lengths(length: float, repeats: int, spread: float) -> list[float]:
    """``repeats`` run lengths spaced evenly over ``length`` +/- ``spread`` (a fraction)."""
    return [length * (1 - spread + 2 * spread * (i + 0.5) / repeats) for i in range(repeats)]


def conn_id(index: int) -> str:
    """One connection (and API key, so one workflow with its own run length) per length."""
    return f"altabots_latency_{index}"


def _ended_on_worker() -> type:
    from airflow.triggers.base import BaseTrigger, TriggerEvent

    class EndedOnWorker(BaseTrigger):
        """A run the worker saw end before deferring: no trigger waits, the task is done now."""

        def __init__(self, run_id: str) -> None:
            super().__init__()
            self.run_id = run_id

        def serialize(self) -> tuple[str, dict[str, Any]]:
            return f"{__name__}.EndedOnWorker", {"run_id": self.run_id}

        async def run(self) -> Any:
            yield TriggerEvent({"status": "success", "run_id": self.run_id})

    return EndedOnWorker


def goal(length: float) -> float:
    """The issue's goal for the delay: at most max(1 s, 10% of the run's length)."""
    return max(1.0, 0.1 * length)


async def _measure(
    emulator: Any, runs: list[tuple[float, float]], policies: list[str]
) -> list[dict[str, Any]]:
    """Wait for every (nominal length, actual length) run under every policy; one row per pair."""
    from concurrent.futures import ThreadPoolExecutor

    from airflow_provider_altabots import polling
    from airflow_provider_altabots.hooks.altabots import AltaBotsHook
    from airflow_provider_altabots.triggers.altabots import AltaBotsWorkflowRunTrigger

    ended_on_worker = _ended_on_worker()
    plan = [(index, policy) for index in range(len(runs)) for policy in policies]
    # Every run's worker part blocks a thread of its own, as each task holds a worker slot.
    workers = ThreadPoolExecutor(max_workers=len(plan))

    async def invoke_then_wait(index: int, policy: str) -> Any:
        # As the operator does: invoke, then wait; the first check's clock starts at the invoke.
        loop, hook = asyncio.get_running_loop(), AltaBotsHook(conn_id(index))
        answer = await loop.run_in_executor(workers, hook.invoke_workflow, {"run": index})
        run_ids[(index, policy)] = run_id = str(answer["workflowRunId"])
        if policy != "adaptive":
            return AltaBotsWorkflowRunTrigger(run_id, conn_id(index), **POLICIES[policy])
        watch = polling.RunWatch(run_id, polling.PollPolicy())
        record = await loop.run_in_executor(
            workers,
            lambda: polling.wait_for_run(
                watch,
                lambda deadline: hook.get_run_result(run_id, deadline=deadline),
                hand_over_after=polling.CHECK_ON_WORKER_SECONDS,
            ),
        )
        if record is not None:
            return ended_on_worker(run_id)
        return AltaBotsWorkflowRunTrigger(
            run_id,
            conn_id(index),
            interval=watch.interval,
            not_before=time.time() + polling.DEFERRAL_MARGIN,
        )

    run_ids: dict[tuple[int, str], str] = {}
    events = await run_triggers([invoke_then_wait(index, policy) for index, policy in plan])
    ends = {run["run_id"]: run["ends_at"] for run in emulator.runs()}
    polls: dict[str, int] = {}
    for entry in emulator.requests(path="/v1/workflow/query/result"):
        run_id = (entry.get("body") or {}).get("workflowRunId")
        polls[run_id] = polls.get(run_id, 0) + 1
    # One record per run: (nominal length, policy, delay, requests, ended in success).
    records = [
        (
            runs[index][0],
            policy,
            at - ends[run_ids[(index, policy)]],
            1 + polls.get(run_ids[(index, policy)], 0),
            payload["status"] == "success",
        )
        for (index, policy), (at, payload) in zip(plan, events, strict=True)
    ]
    rows = []
    for length in dict.fromkeys(nominal for nominal, _ in runs):
        for policy in policies:
            picked = [r for r in records if r[0] == length and r[1] == policy]
            delays = [delay for _, _, delay, _, _ in picked]
            rows.append(
                {
                    "length_s": length,
                    "policy": policy,
                    "runs": len(picked),
                    "delay_mean_s": statistics.fmean(delays),
                    "delay_max_s": max(delays),
                    "requests_per_run": statistics.fmean(requests for _, _, _, requests, _ in picked),
                    "goal_delay_s": goal(length),
                    "not_success": sum(not succeeded for *_, succeeded in picked),
                }
            )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--lengths", default="2,10,30,120", help="run lengths in seconds, comma-separated")
    parser.add_argument("--repeats", type=int, default=8, help="runs per (length, policy)")
    parser.add_argument(
        "--spread", type=float, default=0.2, help="runs spread over each length +/- this fraction"
    )
    parser.add_argument("--policies", default=",".join(POLICIES), help="which of: " + ", ".join(POLICIES))
    parser.add_argument("--out", help="also write the JSON document here")
    args = parser.parse_args()
    lengths = [float(text) for text in args.lengths.split(",")]
    policies = [name.strip() for name in args.policies.split(",")]
    unknown = set(policies) - set(POLICIES)
    if unknown:
        parser.error(f"unknown policies: {sorted(unknown)}")
    if not 0 <= args.spread < 1 or args.repeats < 1:
        parser.error("--spread must be in [0, 1) and --repeats at least 1")

    from altabots_emulator import Emulator

    log_as_triggerer()
    import airflow.jobs.triggerer_job_runner  # noqa: F401 - loaded before any run starts

    runs = [
        (length, actual) for length in lengths for actual in spread_lengths(length, args.repeats, args.spread)
    ]
    workflows = {
        f"latency-{index}": {"run_seconds": actual, "pending_seconds": 0.0}
        for index, (_, actual) in enumerate(runs)
    }
    with Emulator(workflows=workflows, request_log_size=1_000_000) as emulator:
        for index in range(len(runs)):
            os.environ[f"AIRFLOW_CONN_{conn_id(index).upper()}"] = json.dumps(
                {"conn_type": "altabots", "host": emulator.url, "password": f"latency-{index}"}
            )
        rows = asyncio.run(_measure(emulator, runs, policies))
    document = {"repeats": args.repeats, "spread": args.spread, "rows": rows}
    text = json.dumps(document, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
