"""The trigger that waits for a workflow run on the triggerer, so no worker slot is held meanwhile."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_altabots import events, protocol
from airflow_provider_altabots.budget import BUDGETS
from airflow_provider_altabots.exceptions import AltaBotsError, AltaBotsTransientError
from airflow_provider_altabots.hooks.altabots import AltaBotsHook
from airflow_provider_altabots.polling import PollPolicy, RunWatch, await_run

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


class AltaBotsWorkflowRunTrigger(BaseTrigger):
    """
    Poll a workflow run until it ends, then fire one small event.

    It never invokes anything: the invoke is sent from the worker before deferring, so a
    triggerer restart cannot start a second run. It holds only ids and numbers, never a key;
    the connection is read when the trigger starts. Waits follow
    :class:`~airflow_provider_altabots.polling.PollPolicy`, and every trigger of one connection in
    the process shares one pooled HTTP client.

    Its first check comes no sooner than ``not_before`` (the operator and the sensor pass the
    deferral's time plus :data:`~airflow_provider_altabots.polling.DEFERRAL_MARGIN`), so it never
    fires inside Airflow's defer race; every check must end by the
    deadline plus :data:`~airflow_provider_altabots.polling.DEADLINE_GRACE`, so the event comes
    on time whatever the server does.

    The event is a :class:`~airflow_provider_altabots.events.RunEvent`,
    ``{"status", "run_id", "message"}`` (plus ``last_status`` on a timeout): ``status`` is
    ``"success"`` or the ``event_status`` of the error that ended the wait. A success event also
    carries ``record``, the run's record, when its JSON is at most
    :data:`~airflow_provider_altabots.events.EVENT_RECORD_MAX_BYTES`, so the worker needs no
    request to publish it; a larger record is read by the worker when it resumes.

    Every status check waits for the API key's request budget
    (:mod:`airflow_provider_altabots.budget`), shared with every other trigger of that key.

    :param run_id: the workflow run to wait for.
    :param altabots_conn_id: the connection to poll through.
    :param deadline: absolute Unix time after which the wait ends with a final check; ``None``
        waits until the run ends. Absolute, so it survives a triggerer restart.
    :param interval: the schedule's next wait, when the worker already made the first checks.
    :param not_before: absolute Unix time before which the run is not checked; ``None``: the
        first check comes ``interval`` (or ``poll_interval``) after the trigger starts.
    :param started_at: Unix time the run was invoked, for the elapsed time in each check's log line.
    :param policy: the fields of :class:`~airflow_provider_altabots.polling.PollPolicy`
        (``poll_interval``, ``max_poll_interval``, ``max_consecutive_failures``, ...): plain
        numbers, as the operator passes them.
    """

    def __init__(
        self,
        run_id: str,
        altabots_conn_id: str = AltaBotsHook.default_conn_name,
        *,
        deadline: float | None = None,
        interval: float | None = None,
        not_before: float | None = None,
        started_at: float | None = None,
        **policy: Any,
    ) -> None:
        super().__init__()
        self.run_id = run_id
        self.altabots_conn_id = altabots_conn_id
        self.deadline = deadline
        self.interval = interval
        self.not_before = not_before
        self.started_at = started_at
        self.policy = PollPolicy(**policy)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "run_id": self.run_id,
                "altabots_conn_id": self.altabots_conn_id,
                "deadline": self.deadline,
                "interval": self.interval,
                "not_before": self.not_before,
                "started_at": self.started_at,
                **self.policy.as_kwargs(),
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = AltaBotsHook(self.altabots_conn_id)
        watch = RunWatch(
            self.run_id,
            self.policy,
            deadline=self.deadline,
            interval=self.interval,
            started_at=self.started_at,
            budgeted=True,
            log=self.log,
        )
        try:
            async with hook.shared_client():
                if self.started_at is not None:
                    # The worker's invoke spent a request of the key: the budget counts it.
                    BUDGETS.of(await hook.aget_settings()).spent_elsewhere(self.started_at)
                wait = 0.0 if self.not_before is None else self.not_before - time.time()
                record = await await_run(
                    watch,
                    lambda deadline: hook.aget_run_result(self.run_id, deadline=deadline),
                    at_least=wait,
                )
        except AltaBotsError as error:
            yield TriggerEvent(events.error_event(error, self.run_id))
            return
        settings = await hook.aget_settings()
        yield TriggerEvent(
            events.success_event(self.run_id, watch.checks, record, secrets=(settings.api_key,))
        )


class AltaBotsBudgetTrigger(BaseTrigger):
    """
    Wait until the API key's request budget allows one more request, then fire; send nothing.

    A deferrable task whose request was answered 429 (an invoke, or a read of a run from the
    worker) defers to this trigger instead of sleeping in its worker slot, and sends the request
    again from the worker when it resumes: the triggerer never sends it, and never an invoke.
    The 429 it got holds the budget of every trigger of that key in the process, and the turn it
    takes counts as a request, so the request is paced with the status checks.

    The event is a :class:`~airflow_provider_altabots.events.BudgetEvent`,
    ``{"status": "budget_allows", "refused_since": ...}``, when the budget gave the request its
    turn; when ``deadline`` passes first (a hint may ask for longer than the task's patience),
    it is the error event of an :class:`~airflow_provider_altabots.exceptions.AltaBotsTransientError`.

    :param altabots_conn_id: the connection whose key was refused.
    :param refused_since: Unix time the task's first refused invoke was answered (the task gives
        up after ``rate_limit_patience`` seconds of refusals).
    :param not_before: Unix time before which the trigger does not fire (the 429's hint, and a
        margin after the deferral).
    :param limit: the refusal's ``X-RateLimit-Limit``, when it had one.
    :param remaining: its ``X-RateLimit-Remaining``.
    :param reset_at: its ``X-RateLimit-Reset``, as Unix time.
    :param retry_at: Unix time its ``Retry-After`` (or reset) pointed to, when it said.
    :param deadline: Unix time by which the trigger fires, with a turn or with the error (the
        end of the task's patience), whatever ``not_before`` says.
    """

    def __init__(
        self,
        altabots_conn_id: str = AltaBotsHook.default_conn_name,
        *,
        refused_since: float,
        not_before: float,
        limit: int | None = None,
        remaining: int | None = None,
        reset_at: float | None = None,
        retry_at: float | None = None,
        deadline: float | None = None,
    ) -> None:
        super().__init__()
        self.altabots_conn_id = altabots_conn_id
        self.refused_since = refused_since
        self.not_before = not_before
        self.limit = limit
        self.remaining = remaining
        self.reset_at = reset_at
        self.retry_at = retry_at
        self.deadline = deadline

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "altabots_conn_id": self.altabots_conn_id,
                "refused_since": self.refused_since,
                "not_before": self.not_before,
                "limit": self.limit,
                "remaining": self.remaining,
                "reset_at": self.reset_at,
                "retry_at": self.retry_at,
                "deadline": self.deadline,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = AltaBotsHook(self.altabots_conn_id)
        try:
            settings = await hook.aget_settings()
        except AltaBotsError as error:
            yield TriggerEvent(events.error_event(error, None))
            return
        budget = BUDGETS.of(settings)
        quota = None
        if (self.limit, self.remaining, self.reset_at) != (None, None, None):
            quota = protocol.Quota(self.limit, self.remaining, self.reset_at)
        hint = None if self.retry_at is None else max(self.retry_at - time.time(), 0.0)
        budget.refused_elsewhere(quota=quota, retry_after=hint)
        # The task's patience ends at the deadline, whatever the hint said.
        wake = self.not_before if self.deadline is None else min(self.not_before, self.deadline)
        await asyncio.sleep(max(wake - time.time(), 0.0))
        ticket, held = await budget.acquire(until=self.deadline)
        if ticket is None:
            yield TriggerEvent(events.error_event(self._patience_ran_out(), None))
            return
        budget.sent_elsewhere(ticket)  # the worker sends this request, and reads its answer
        self.log.info(
            "The request budget of connection %s's API key allows the request after %.1f s more; the task "
            "resumes to send it.",
            self.altabots_conn_id,
            held,
        )
        yield TriggerEvent(events.budget_allows_event(self.refused_since))

    def _patience_ran_out(self) -> AltaBotsTransientError:
        """The error of a wait whose deadline passed before the key's budget let a request go."""
        refused_for = time.time() - self.refused_since
        return AltaBotsTransientError(
            f"The request budget of connection {self.altabots_conn_id}'s API key let no request go before "
            f"this task's patience ran out (its first request was refused {refused_for:.0f} s ago): nothing "
            "was sent while it waited, so no run was started by it. Retry the task when the plan's quota "
            "allows, or lower the number of tasks that use this API key at once.",
            rate_limited=True,
            sent=False,
        )
