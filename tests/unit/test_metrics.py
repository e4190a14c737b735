"""The metrics sent through Airflow's Stats: names, values and tags, never a key."""

from __future__ import annotations

import asyncio

import pytest
from airflow.providers.common.compat.sdk import TaskDeferred

from airflow_provider_altabots.operators.altabots import AltaBotsRunWorkflowOperator
from airflow_provider_altabots.triggers.altabots import AltaBotsWorkflowRunTrigger
from tests.fake_api import API_KEY, INVOKE, RESULT, accepted, record


@pytest.fixture
def sent(monkeypatch) -> list[tuple[str, str, float, dict[str, str]]]:
    """Every metric sent, as (kind, name, value, tags)."""
    from airflow.providers.common.compat.sdk import Stats

    calls: list[tuple[str, str, float, dict[str, str]]] = []
    for kind in ("incr", "gauge", "timing"):
        monkeypatch.setattr(
            Stats,
            kind,
            staticmethod(lambda name, value, *, tags, kind=kind: calls.append((kind, name, value, tags))),
        )
    return calls


def test_a_finished_run_sends_requests_duration_cost_and_tokens_per_workflow(api, context, sent):
    api.on(INVOKE, (200, record("SUCCEED", run_id="run-m")))
    AltaBotsRunWorkflowOperator(task_id="t", input={"a": 1}, sync_invoke=True).execute(context)
    assert (
        "incr",
        "altabots.requests",
        1,
        {"conn_id": "altabots_default", "endpoint": "invoke", "status": "200"},
    ) in sent
    tags = {"conn_id": "altabots_default", "workflow": "wf-1"}
    assert ("incr", "altabots.runs", 1, {**tags, "status": "SUCCEED"}) in sent
    assert ("timing", "altabots.run.duration", 8347.0, tags) in sent
    assert ("gauge", "altabots.run.cost", 0.6928, tags) in sent
    assert ("gauge", "altabots.run.tokens", 1745.0, tags) in sent
    assert API_KEY not in repr(sent)


def test_429s_and_time_held_by_the_budget_are_counted(api, sent):
    api.on(
        RESULT,
        (429, {"code": 42900, "message": "slow"}, {"Retry-After": "2"}),
        (200, record("SUCCEED")),
    )
    trigger = AltaBotsWorkflowRunTrigger("run-1", poll_interval=1, max_poll_interval=1)

    async def go():
        return await anext(trigger.run())

    assert asyncio.run(go()).payload["status"] == "success"
    names = [(kind, name) for kind, name, _, _ in sent]
    assert names.count(("incr", "altabots.rate_limited")) == 1
    assert names.count(("incr", "altabots.requests")) == 2
    held = [value for kind, name, value, _ in sent if name == "altabots.budget_held"]
    assert held
    assert max(held) >= 800  # milliseconds: the check due 1 s after the 429 waited for its 2 s hint


def test_a_metric_that_cannot_be_sent_fails_nothing(api, context, monkeypatch):
    from airflow.providers.common.compat.sdk import Stats

    def broken(*args, **kwargs):
        raise RuntimeError("statsd is down")

    for kind in ("incr", "gauge", "timing"):
        monkeypatch.setattr(Stats, kind, staticmethod(broken))
    api.on(INVOKE, (200, accepted("run-x")))
    with pytest.raises(TaskDeferred):
        AltaBotsRunWorkflowOperator(task_id="t", input={"a": 1}, deferrable=True).execute(context)
