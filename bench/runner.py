"""
Run triggers through Airflow's own trigger runner, as a triggerer does, minus its supervisor.

A triggerer's child process runs each trigger as one asyncio task of
``TriggerRunner.run_trigger``: it binds the log context, opens a tracing span, enters greenback's
portal, logs the start, iterates ``trigger.run()``, queues each event and logs the end. The
benchmarks call that same method for every trigger, on one event loop. What they leave out is
the runner's supervisor link (a socket to the parent process, which reads triggers from and
writes events to the metadata database): a benchmark has no database, and that part costs the
same whichever trigger runs.

Logging is set up as in the triggerer's child process (JSON lines for the supervisor), written
to nowhere, so log calls cost what they cost there.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from typing import Any


def log_as_triggerer() -> None:
    """Configure structlog and stdlib logging as the triggerer's child process does."""
    from airflow.sdk.log import configure_logging, reset_logging

    reset_logging()
    configure_logging(json_output=True, output=open(os.devnull, "wb"), sending_to_supervisor=True)  # noqa: SIM115


async def run_triggers(triggers: list[Any]) -> list[tuple[float, dict[str, Any]]]:
    """
    Run every trigger to its end through ``TriggerRunner.run_trigger``, all on this event loop.

    :param triggers: triggers, or awaitables that make one (each is awaited in its own task, so
        a trigger can start the moment whatever it waits for exists).
    :returns: per trigger, in order, the Unix time its task ended (right after its event) and
        the event's payload.
    :raises RuntimeError: a trigger ended without an event (the runner would fail its task).
    """
    from airflow.jobs.triggerer_job_runner import TriggerRunner

    runner = TriggerRunner()
    ended: dict[int, float] = {}

    async def run(trigger_id: int, trigger: Any) -> None:
        if inspect.isawaitable(trigger):
            trigger = await trigger
        await runner.run_trigger(trigger_id, trigger)
        ended[trigger_id] = time.time()

    tasks = []
    for trigger_id, trigger in enumerate(triggers, start=1):
        name = f"bench/{trigger_id}"
        runner.triggers[trigger_id] = {"task": None, "is_watcher": False, "name": name, "events": 0}
        runner.triggers[trigger_id]["task"] = task = asyncio.create_task(run(trigger_id, trigger), name=name)
        tasks.append(task)
    await asyncio.gather(*tasks)
    payloads = {entry.trigger_id: dict(entry.event.payload) for entry in runner.events}
    missing = [trigger_id for trigger_id in runner.triggers if trigger_id not in payloads]
    if missing:
        raise RuntimeError(f"{len(missing)} triggers ended without an event (first: {missing[0]})")
    return [(ended[trigger_id], payloads[trigger_id]) for trigger_id in runner.triggers]
