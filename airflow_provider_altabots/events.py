"""
What this provider's triggers tell the worker, and how the worker reads it: the event contract.

A deferred task resumes with the event its trigger fired. Airflow keeps the trigger (its
classpath and keyword arguments) in its database while it waits, and the event until the task
resumes, so a task deferred under one version of this provider may resume under the next: the
fields and values of these events, like the triggers' keyword arguments, do not change.

:class:`~airflow_provider_altabots.triggers.altabots.AltaBotsWorkflowRunTrigger` fires a
:class:`RunEvent`: ``status`` is :data:`SUCCESS_EVENT_STATUS` when the run ended with
``SUCCEED``, else the ``event_status`` of the error that ended the wait (see
:data:`EVENT_ERRORS`). :class:`~airflow_provider_altabots.triggers.altabots.AltaBotsBudgetTrigger`
fires a :class:`BudgetEvent` when the API key's request budget allows an invoke, or a
:class:`RunEvent` of an error.

Events are plain dicts; like :mod:`~airflow_provider_altabots.protocol`, this module needs nothing
of Airflow but the exception classes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict

from airflow_provider_altabots import exceptions, protocol
from airflow_provider_altabots.exceptions import AltaBotsError, AltaBotsRunFailed, AltaBotsRunTimeout
from airflow_provider_altabots.protocol import StatusKind

#: ``status`` of the event for a run that ended with ``SUCCEED``; every other status of a
#: :class:`RunEvent` names an error (see :data:`EVENT_ERRORS`).
SUCCESS_EVENT_STATUS = "success"
#: ``status`` of the event of the budget trigger: the key's budget allows the invoke.
BUDGET_ALLOWS_EVENT_STATUS = "budget_allows"
#: The largest run record, as JSON, that travels in the success event, so the worker publishes
#: the run without reading it again. Airflow keeps the event in its database until the task
#: resumes; a larger record (a long output) is read by the worker instead.
EVENT_RECORD_MAX_BYTES = 32 * 1024

#: How far ahead of the worker's clock a time in an event may be (the clocks of the hosts that
#: deferred and resumed a task may differ); a time further ahead is not one a trigger sent.
MAX_CLOCK_SKEW = 300.0

#: Event status -> the error raised for it on the worker.
EVENT_ERRORS: dict[str, type[AltaBotsError]] = {
    cls.event_status: cls
    for cls in (
        exceptions.AltaBotsError,
        exceptions.AltaBotsConfigError,
        exceptions.AltaBotsAuthError,
        exceptions.AltaBotsApiError,
        exceptions.AltaBotsTransientError,
        exceptions.AltaBotsInvokeUncertain,
        exceptions.AltaBotsRunFailed,
        exceptions.AltaBotsRunTimeout,
        exceptions.AltaBotsStatusUnknown,
    )
}
#: Every ``status`` a :class:`RunEvent` may carry.
RUN_EVENT_STATUSES = frozenset(EVENT_ERRORS) | {SUCCESS_EVENT_STATUS}


class RunEvent(TypedDict):
    """
    The event of a wait for a run, or of an error of the budget trigger.

    :param status: :data:`SUCCESS_EVENT_STATUS`, or the ``event_status`` of an error.
    :param run_id: the run waited for (``None`` in an error of the budget trigger).
    :param message: what happened, in words, for the task's log.
    :param last_status: on a timeout, the run's status at the final check.
    :param record: on success, the run's record, when it is small enough to travel
        (:data:`EVENT_RECORD_MAX_BYTES`); otherwise the worker reads it.
    """

    status: str
    run_id: str | None
    message: str
    last_status: NotRequired[str | None]
    record: NotRequired[dict[str, Any]]


class BudgetEvent(TypedDict):
    """
    The event of the budget trigger when the key may send the invoke.

    :param status: :data:`BUDGET_ALLOWS_EVENT_STATUS`.
    :param refused_since: Unix time the task's first refused invoke was answered.
    """

    status: str
    refused_since: float


# -- building events (on the triggerer) ------------------------------------------------------------


def success_event(
    run_id: str, checks: int, record: dict[str, Any], *, secrets: tuple[str, ...] = ()
) -> RunEvent:
    """
    The event of a run that ended with ``SUCCEED``.

    :param checks: how many status checks the wait made (named in the message).
    :param record: the run's record, as the hook read it (an answer that echoes the API key
        has it replaced by ``***`` then); it travels in the event unless :func:`event_record`
        keeps it out.
    :param secrets: what the event must not hold (the API key), in any of its forms: the
        database keeps the event, so it is the last place to hide them.
    """
    event = RunEvent(
        status=SUCCESS_EVENT_STATUS,
        run_id=run_id,
        message=f"Workflow run {run_id} ended with SUCCEED after {checks} checks.",
    )
    carried = event_record(record, secrets=secrets)
    if carried is not None:
        event["record"] = carried
    return event


def error_event(error: AltaBotsError, run_id: str | None) -> RunEvent:
    """
    The event of the error that ended a trigger: the error's ``event_status`` and message.

    :param run_id: the run the trigger waited for; ``None`` for the budget trigger.
    """
    event = RunEvent(status=error.event_status, run_id=run_id, message=error.message)
    if isinstance(error, AltaBotsRunTimeout):
        event["last_status"] = error.last_status
    return event


def budget_allows_event(refused_since: float) -> BudgetEvent:
    """The budget trigger's event: the key may send the invoke refused since ``refused_since``."""
    return BudgetEvent(status=BUDGET_ALLOWS_EVENT_STATUS, refused_since=refused_since)


def event_record(record: dict[str, Any] | None, *, secrets: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """
    The record to carry in a success event, or ``None`` when it is larger than
    :data:`EVENT_RECORD_MAX_BYTES` as JSON (the worker then reads it). ``secrets`` are replaced
    by ``***`` in a copy (see :func:`~airflow_provider_altabots.protocol.hide_secrets_in`).
    """
    if record is None:
        return None
    text = json.dumps(record, separators=(",", ":"), default=str)
    if len(text.encode()) > EVENT_RECORD_MAX_BYTES:
        return None
    return protocol.hide_secrets_in(json.loads(text), secrets) if secrets else record


# -- reading events (on the worker) ------------------------------------------------------------------


def error_from_event(status: str, message: str, run_id: str | None) -> AltaBotsError:
    """Rebuild on the worker the error a trigger reported as an event."""
    return EVENT_ERRORS.get(status, AltaBotsError)(message, run_id=run_id)


@dataclass(frozen=True)
class RunSucceeded:
    """
    What a success event says: which run ended with ``SUCCEED``, and its record if it travelled.

    :param run_id: the run the event names.
    :param record: the run's record as the event carried it; ``None`` when it was too large (or
        held a secret) and must be read from the API.
    """

    run_id: str
    record: dict[str, Any] | None


def read_run_event(event: object, *, expected_run_id: str | None = None) -> RunSucceeded:
    """
    Check the event a task waiting for a run resumed with; raise the error it carries.

    :param expected_run_id: the run the task deferred for (``None`` for a deferral made before
        the task passed it along): an event about any other run is refused.
    :raises AltaBotsError: the event is missing, not one this provider's trigger sends, names
        no run or another run than ``expected_run_id``, or carries another run's record.
    :raises AltaBotsError: (a subclass, per :data:`EVENT_ERRORS`) the error that ended the wait.
    """
    run_id = event.get("run_id") if isinstance(event, Mapping) else None
    run_id = run_id if isinstance(run_id, str) and run_id else None
    if not isinstance(event, Mapping) or event.get("status") not in RUN_EVENT_STATUSES:
        raise AltaBotsError(
            f"The task resumed with an unexpected trigger event {_describe(event)}; it cannot tell "
            "how the workflow run ended. Check the triggerer's log; a task retry resumes the run.",
            run_id=run_id or expected_run_id,
        )
    if run_id is None:
        raise AltaBotsError(
            f"The trigger event {_describe(event)} names no workflow run id; check the triggerer's log.",
            run_id=expected_run_id,
        )
    if expected_run_id is not None and run_id != expected_run_id:
        raise AltaBotsError(
            f"The task deferred to wait for workflow run {expected_run_id}, but resumed with an event "
            f"about workflow run {protocol.short(run_id, 80)}; that event is not used. Check the "
            "triggerer's log; a task retry resumes the run it stored.",
            run_id=expected_run_id,
        )
    if event["status"] != SUCCESS_EVENT_STATUS:
        raise error_from_event(event["status"], str(event.get("message") or ""), run_id)
    carried = event.get("record")
    if carried is not None and not (
        isinstance(carried, Mapping) and carried.get("workflowRunId") in (None, run_id)
    ):
        raise AltaBotsError(
            f"The trigger event for workflow run {run_id} carries a record that is not that run's "
            f"({_describe(carried)}). Check the triggerer's log; a task retry resumes the run.",
            run_id=run_id,
        )
    return RunSucceeded(run_id, dict(carried) if carried is not None else None)


def check_succeeded(run_id: str, record: Mapping[str, Any], *, from_event: bool) -> None:
    """
    Check that the record of a run a success event named says ``SUCCEED``.

    :param from_event: the record travelled in the event (else it was read from the API after).
    :raises AltaBotsRunFailed: the record says ``FAILED``.
    :raises AltaBotsError: it says anything else.
    """
    kind = protocol.status_kind(record.get("status"))
    if kind == StatusKind.FAILED:
        raise AltaBotsRunFailed(protocol.failure_message(run_id, record), run_id=run_id)
    if kind != StatusKind.SUCCEEDED:
        raise AltaBotsError(
            f"The trigger reported workflow run {run_id} as SUCCEED, but "
            f"{'its event' if from_event else 'the API now'} reports status "
            f"{protocol.short(record.get('status'))!r}. A task retry waits for the run again.",
            run_id=run_id,
        )


def read_budget_event(event: object, *, run_id: str | None = None, now: float | None = None) -> float:
    """
    Check the event a task waiting for the key's budget resumed with; raise the error it carries.

    :param run_id: the run the task was to read when it was refused (``None``: the task was to
        invoke one, or to read the run an earlier try stored), named in messages.
    :returns: the Unix time the task's first refused request was answered, from which its
        ``rate_limit_patience`` runs out.
    :raises AltaBotsError: (a subclass, per :data:`EVENT_ERRORS`) the budget trigger's error, or
        the event is not one it sends, a time it could not have sent included (not a finite
        number, or more than :data:`MAX_CLOCK_SKEW` ahead of this worker's clock).
    """
    since = event.get("refused_since") if isinstance(event, Mapping) else None
    status = event.get("status") if isinstance(event, Mapping) else None
    if isinstance(event, Mapping) and isinstance(status, str) and status != BUDGET_ALLOWS_EVENT_STATUS:
        message = str(event.get("message") or "")
        if message:
            raise error_from_event(status, message, run_id)
    now = time.time() if now is None else now
    believable = (
        isinstance(since, int | float)
        and not isinstance(since, bool)
        and math.isfinite(since)
        and since <= now + MAX_CLOCK_SKEW
    )
    if status != BUDGET_ALLOWS_EVENT_STATUS or not believable:
        done = f"workflow run {run_id} was not read" if run_id else "no run was started"
        raise AltaBotsError(
            f"The task resumed with an unexpected trigger event {_describe(event)} while it waited for the "
            f"API key's rate limit; {done}. Check the triggerer's log, then clear the task to try again.",
            run_id=run_id,
        )
    assert isinstance(since, int | float)
    return float(since)


def _describe(event: object) -> str:
    """An event (or a record it carries) in a message: each value cut to 80 characters."""
    if isinstance(event, Mapping):
        return (
            "{" + ", ".join(f"{key!r}: {protocol.short(value, 80)!r}" for key, value in event.items()) + "}"
        )
    return protocol.short(repr(event), 200)
