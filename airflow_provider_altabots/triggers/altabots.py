"""The trigger that waits for a workflow run on the triggerer, so no worker slot is held meanwhile."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_altabots.exceptions import AltaBotsError, AltaBotsRunTimeout, AltaBotsTransientError
from airflow_provider_altabots.hooks.altabots import AltaBotsHook
from airflow_provider_altabots.polling import PollPolicy, RunWatch

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

#: ``status`` of the event for a run that ended with SUCCEED; every other status names an error
#: (see :data:`airflow_provider_altabots.exceptions.EVENT_ERRORS`).
SUCCESS = "success"


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

    The event is ``{"status", "run_id", "message"}`` (plus ``last_status`` on a timeout):
    ``status`` is ``"success"`` or the ``event_status`` of the error that ended the wait. The
    worker fetches the run's output itself when it resumes, so the event stays small.

    :param run_id: the workflow run to wait for.
    :param altabots_conn_id: the connection to poll through.
    :param deadline: absolute Unix time after which the wait ends with a final check; ``None``
        waits until the run ends. Absolute, so it survives a triggerer restart.
    :param interval: the schedule's next wait, when the worker already made the first checks.
    :param not_before: absolute Unix time before which the run is not checked; ``None``: the
        first check comes ``interval`` (or ``poll_interval``) after the trigger starts.
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
        **policy: Any,
    ) -> None:
        super().__init__()
        self.run_id = run_id
        self.altabots_conn_id = altabots_conn_id
        self.deadline = deadline
        self.interval = interval
        self.not_before = not_before
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
                **self.policy.as_kwargs(),
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = AltaBotsHook(self.altabots_conn_id)
        watch = RunWatch(
            self.run_id, self.policy, deadline=self.deadline, interval=self.interval, log=self.log
        )
        try:
            async with hook.shared_client():
                wait = 0.0 if self.not_before is None else self.not_before - time.time()
                delay: float | None = watch.first_delay(at_least=wait)
                while delay is not None:
                    await asyncio.sleep(delay)
                    try:
                        outcome: dict[str, Any] | AltaBotsTransientError = await hook.aget_run_result(
                            self.run_id, deadline=watch.check_deadline
                        )
                    except AltaBotsTransientError as error:
                        outcome = error
                    delay = watch.observe(outcome)
        except AltaBotsError as error:
            event: dict[str, Any] = {
                "status": error.event_status,
                "run_id": self.run_id,
                "message": error.message,
            }
            if isinstance(error, AltaBotsRunTimeout):
                event["last_status"] = error.last_status
            yield TriggerEvent(event)
            return
        yield TriggerEvent(
            {
                "status": SUCCESS,
                "run_id": self.run_id,
                "message": f"Workflow run {self.run_id} ended with SUCCEED after {watch.checks} checks.",
            }
        )
