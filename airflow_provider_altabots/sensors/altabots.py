"""The sensor that waits for a workflow run started elsewhere, e.g. with ``wait_for_termination=False``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import BaseSensorOperator, PokeReturnValue, conf

from airflow_provider_altabots import protocol
from airflow_provider_altabots.hooks.altabots import AltaBotsHook
from airflow_provider_altabots.operators.run_waiter import RunWaiterMixin
from airflow_provider_altabots.polling import (
    DEFAULT_MAX_CONSECUTIVE_FAILURES,
    DEFAULT_MAX_POLL_INTERVAL,
    PollPolicy,
    RunWatch,
    deadline_after,
    fetch_outcome,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from airflow.providers.common.compat.sdk import Context

DEFAULT_POKE_INTERVAL = 10.0


class AltaBotsWorkflowRunSensor(RunWaiterMixin, BaseSensorOperator):
    """
    Wait for a workflow run to end and return its output, like the operator does.

    SUCCEED ends the wait with the run's ``output`` as return value and the same XCom keys as
    the operator (``workflow_run_id``, ``workflow_run``); FAILED fails the task; any other status
    keeps waiting. The usual sensor arguments apply: ``timeout``, ``poke_interval``, ``mode``,
    ``soft_fail``.

    :param workflow_run_id: the run to wait for (templated), e.g.
        ``"{{ ti.xcom_pull(task_ids='invoke') }}"``.
    :param altabots_conn_id: the connection (type ``altabots``) holding the run's workflow key.
    :param deferrable: wait on the triggerer instead of the worker (default: the
        ``[operators] default_deferrable`` setting). The first wait is ``poke_interval`` (at
        least :data:`~airflow_provider_altabots.polling.DEFERRAL_MARGIN`); later waits grow 1.5
        times up to ``max_poll_interval``.
    :param poke_interval: seconds between checks (the first wait when deferred); at least 1.
    :param max_poll_interval: the longest wait between checks when deferred, in seconds.
    :param max_consecutive_failures: status checks in a row that may fail (5xx, network errors)
        before the task fails as "status unknown". In ``reschedule`` mode the count starts again
        at each reschedule.
    """

    template_fields: Sequence[str] = ("workflow_run_id",)
    ui_color = "#e8e1f7"

    def __init__(
        self,
        *,
        workflow_run_id: str,
        altabots_conn_id: str = AltaBotsHook.default_conn_name,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poke_interval: float = DEFAULT_POKE_INTERVAL,
        max_poll_interval: float = DEFAULT_MAX_POLL_INTERVAL,
        max_consecutive_failures: int = DEFAULT_MAX_CONSECUTIVE_FAILURES,
        **kwargs: Any,
    ) -> None:
        super().__init__(poke_interval=poke_interval, **kwargs)
        self.workflow_run_id = workflow_run_id
        self.keep_waiting_settings(altabots_conn_id, deferrable, max_poll_interval, max_consecutive_failures)
        self._watch: RunWatch | None = None

    @property
    def policy(self) -> PollPolicy:
        return PollPolicy(
            poll_interval=self.poke_interval,
            max_poll_interval=max(self.max_poll_interval, self.poke_interval),
            max_consecutive_failures=self.max_consecutive_failures,
        )

    def execute(self, context: Context) -> Any:
        self.workflow_run_id = protocol.check_run_id(self.workflow_run_id)
        if not self.deferrable:
            return super().execute(context)
        done = self.poke(context)
        if isinstance(done, PokeReturnValue):
            return done.xcom_value
        self.defer_until_done(self.workflow_run_id, deadline_after(self.timeout))

    def poke(self, context: Context) -> bool | PokeReturnValue:
        run_id = protocol.check_run_id(self.workflow_run_id)
        if self._watch is None or self._watch.run_id != run_id:
            self._watch = RunWatch(run_id, self.policy, log=self.log)
        # Each poke is one request, bounded by the connection's timeout; the sensor's own
        # ``timeout`` bounds the wait (the watch has no deadline).
        outcome = fetch_outcome(
            self._watch, lambda deadline: self.hook.get_run_result(run_id, deadline=deadline)
        )
        self.note_run(run_id, outcome if isinstance(outcome, dict) else None)
        if self._watch.observe(outcome) is not None:
            return False  # the watch logged the check
        assert self._watch.record is not None
        return PokeReturnValue(is_done=True, xcom_value=self.publish_run(context, run_id, self._watch.record))
