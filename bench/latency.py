"""
Completion delay against requests: how soon a waiting task learns its run ended, and what the
waiting costs in API requests, for runs of 2, 10, 30 and 120 s.

Three waiting policies, each driving this provider's own trigger, so only the schedule differs:

* ``adaptive``: the provider's default (checks 2 and 4 s after the invoke, then each wait 1.5
  times the last, at most 60 s);
* ``fixed 60 s``: one check a minute (dbt Cloud's default ``check_interval``);
* ``fixed 5 s``: one check every five seconds.

Every (length, policy) pair runs ``--repeats`` times, all at once, against the emulator in this
process (runs start ``RUNNING`` at once and end exactly ``length`` seconds after the invoke).
Delay is the trigger's event time minus the run's end time: what the task's resumption waits
for on top of the scheduler's own, policy-independent, latency. Requests count the invoke and
every status check of the run, from the emulator's request log.

Usage: ``python bench/latency.py [--lengths 2,10,30,120] [--repeats 3] [--out F]``.
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

POLICIES: dict[str, dict[str, float]] = {
    "adaptive": {},
    "fixed 60 s": {"poll_interval": 60.0, "max_poll_interval": 60.0, "growth": 1.0},
    "fixed 5 s": {"poll_interval": 5.0, "max_poll_interval": 5.0, "growth": 1.0},
}


def conn_id(length: float) -> str:
    """One connection (and API key, so one workflow) per run length."""
    return f"altabots_latency_{length:g}".replace(".", "_")


def goal(length: float) -> float:
    """The issue's goal for the delay: at most max(1 s, 10% of the run's length)."""
    return max(1.0, 0.1 * length)


async def _wait(trigger: Any) -> tuple[float, dict[str, Any]]:
    events = trigger.run()
    try:
        event = await events.__anext__()
    finally:
        await events.aclose()
    return time.time(), dict(event.payload)


async def _measure(
    emulator: Any, lengths: list[float], policies: list[str], repeats: int
) -> list[dict[str, Any]]:
    from airflow_provider_altabots.hooks.altabots import AltaBotsHook
    from airflow_provider_altabots.triggers.altabots import AltaBotsWorkflowRunTrigger

    async def one(length: float, policy: str) -> tuple[str, tuple[float, dict[str, Any]]]:
        # As the operator does: invoke, then wait; the first check's clock starts at the invoke.
        hook = AltaBotsHook(conn_id(length))
        answer = await asyncio.to_thread(hook.invoke_workflow, {"length": length})
        run_id = str(answer["workflowRunId"])
        return run_id, await _wait(AltaBotsWorkflowRunTrigger(run_id, conn_id(length), **POLICIES[policy]))

    plan = [(length, policy) for length in lengths for policy in policies for _ in range(repeats)]
    finished = await asyncio.gather(*(one(length, policy) for length, policy in plan))
    runs = {run["run_id"]: run for run in emulator.runs()}
    polls: dict[str, int] = {}
    for entry in emulator.requests(path="/v1/workflow/query/result"):
        run_id = (entry.get("body") or {}).get("workflowRunId")
        polls[run_id] = polls.get(run_id, 0) + 1
    rows = []
    for length in lengths:
        for policy in policies:
            picked = [
                (outcome, run_id)
                for (each_length, each_policy), (run_id, outcome) in zip(plan, finished, strict=True)
                if each_length == length and each_policy == policy
            ]
            delays = [at - runs[run_id]["ends_at"] for (at, _payload), run_id in picked]
            requests = [1 + polls.get(run_id, 0) for _, run_id in picked]
            rows.append(
                {
                    "length_s": length,
                    "policy": policy,
                    "delay_mean_s": statistics.fmean(delays),
                    "delay_max_s": max(delays),
                    "requests_per_run": statistics.fmean(requests),
                    "goal_delay_s": goal(length),
                    "not_success": sum(payload["status"] != "success" for (_, payload), _ in picked),
                }
            )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--lengths", default="2,10,30,120", help="run lengths in seconds, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--policies", default=",".join(POLICIES), help="which of: " + ", ".join(POLICIES))
    parser.add_argument("--out", help="also write the JSON document here")
    args = parser.parse_args()
    lengths = [float(text) for text in args.lengths.split(",")]
    policies = [name.strip() for name in args.policies.split(",")]
    unknown = set(policies) - set(POLICIES)
    if unknown:
        parser.error(f"unknown policies: {sorted(unknown)}")

    from airflow_provider_altabots.emulator import Emulator

    workflows = {f"latency-{length:g}": {"run_seconds": length, "pending_seconds": 0.0} for length in lengths}
    with Emulator(workflows=workflows, request_log_size=1_000_000) as emulator:
        for length in lengths:
            os.environ[f"AIRFLOW_CONN_{conn_id(length).upper()}"] = json.dumps(
                {"conn_type": "altabots", "host": emulator.url, "password": f"latency-{length:g}"}
            )
        rows = asyncio.run(_measure(emulator, lengths, policies, args.repeats))
    document = {"repeats": args.repeats, "rows": rows}
    text = json.dumps(document, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
