"""The operator that runs an AltaBots workflow as a task and hands its output to the next one."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import BaseOperator, ResumableJobMixin, conf, mask_secret

from airflow_provider_altabots import polling, protocol
from airflow_provider_altabots.exceptions import (
    AltaBotsApiError,
    AltaBotsError,
    AltaBotsInvokeUncertain,
    AltaBotsStatusUnknown,
    AltaBotsTransientError,
)
from airflow_provider_altabots.hooks.altabots import AltaBotsHook
from airflow_provider_altabots.operators.run_waiter import XCOM_RUN_ID_KEY, RunWaiterMixin
from airflow_provider_altabots.polling import (
    DEFAULT_MAX_CONSECUTIVE_FAILURES,
    DEFAULT_MAX_POLL_INTERVAL,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_RUN_TIMEOUT,
    PollPolicy,
    RunWatch,
    call_with_retries,
    deadline_after,
    wait_for_run,
)
from airflow_provider_altabots.protocol import StatusKind

if TYPE_CHECKING:
    import jinja2
    from airflow.providers.common.compat.sdk import Context
    from pydantic import JsonValue

#: Status recorded when the API says a stored run id is not found; neither active nor
#: succeeded, so a new run is invoked.
_NOT_FOUND = "NOT_FOUND"
#: Task-state-store key present while an invoke's answer is outstanding.
INVOKE_MARKER_KEY = "altabots_invoke_unanswered"
#: Said once in each try's log on Airflow below 3.3, where a retry cannot resume a run.
NO_STATE_STORE = (
    "This Airflow has no task state store (it arrived in Airflow 3.3), so a retry of this task "
    "cannot resume the workflow run this try starts: it invokes a new run, billed again. The run "
    "id goes to the log and to XCom (workflow_run_id) as soon as the invoke answers."
)


class AltaBotsRunWorkflowOperator(RunWaiterMixin, ResumableJobMixin, BaseOperator):
    """
    Run an AltaBots (or GPTBots) workflow and return its output.

    ==============  ====================  ==========  ===============================================
    ``sync_invoke``  ``wait_for_termination``  ``deferrable``  what happens
    ==============  ====================  ==========  ===============================================
    True            any                   any         one invoke that answers when the run ends; holds
                                                      a worker slot for the whole run
    False           True                  False       invoke, then poll from the worker
    False           True                  True        invoke on the worker (check for a few seconds
                                                      when the key has plenty of requests), defer;
                                                      the triggerer polls; the worker resumes to
                                                      publish the record the event carries
    False           False                 any         invoke and return the run id (wait later with
                                                      ``AltaBotsWorkflowRunSensor``)
    ==============  ====================  ==========  ===============================================

    XCom, when the run is waited for: the return value is the run's ``output``; key
    ``workflow_run_id`` holds the run id (pushed as soon as the run exists); key
    ``workflow_run`` holds the record without input and output (status, workflow id, name and
    version, ``workflowExecutionTime``, ``totalCost``, ``totalTokens``, ``startTime``,
    ``endTime``). Otherwise the return value is the run id.

    A new try of the task does not pay twice: on Airflow 3.3+ the run id is kept in the task
    state store as soon as the invoke answers, and a later try resumes that run if it is
    PENDING or RUNNING, reuses its result if it SUCCEEDED, and invokes anew only if it FAILED or
    the API says the id is not found. Any other answer about it is ridden out like a failed
    status check and then fails the try naming the run, never invoking.

    On a rate-limited key no slot of a deferrable task waits for the limit: a request answered
    HTTP 429 (an invoke, which then started no run, or a read of a run) defers the task until
    the key's request budget on the triggerer allows it, then the task sends it again from the
    worker, for up to 15 minutes of refusals; a task that is not deferrable waits in its slot
    as the API says. A deferrable task checks its run from the worker first only when the key
    is known to have plenty of requests (see :meth:`_quota_plentiful`); otherwise every status
    check waits for the triggerer's budget.

    :param input: the parameters of the workflow's Start node (templated; a mapping once
        rendered).
    :param user_id: tags who started the run (templated).
    :param webhooks: up to 5 callbacks the API calls when the run ends, each
        ``{"method": "POST", "url": "https://...", "headers": {...}}`` (templated). Rendered
        fields show header values and each URL's path and query as ``***``, and the secrets
        masker hides them in logs; pass tokens through templates, e.g.
        ``"{{ var.value.webhook_token }}"``, so they are not stored with the DAG.
    :param altabots_conn_id: the Airflow connection (type ``altabots``) holding the base URL and
        the workflow's API key.
    :param sync_invoke: send one invoke that answers when the run ends. Simple, but the worker
        slot is held for the whole run and a lost answer cannot be resumed.
    :param wait_for_termination: wait for the run to end. ``False`` returns the run id at once.
    :param deferrable: wait on the triggerer instead of the worker (default: the
        ``[operators] default_deferrable`` setting). When the key has plenty of requests, the
        worker first checks the run for about 5 seconds
        (:data:`~airflow_provider_altabots.polling.CHECK_ON_WORKER_SECONDS`), so a run that ends
        that soon never defers.
    :param poll_interval: seconds before the first status check, and again before the second;
        later waits grow 1.5 times. At least 1 second.
    :param max_poll_interval: the longest wait between two status checks, in seconds.
    :param timeout: seconds to wait for the run to end (``None``: no limit; at most a year).
        When it passes, the status is checked once more and the task fails naming the run and its
        last status; the run itself goes on (the API cannot cancel it). With ``sync_invoke`` it
        bounds the one synchronous call.
    :param max_consecutive_failures: status checks in a row that may fail (5xx, network errors)
        before the task fails as "status unknown". Rate-limited checks (429) do not count.
    :param durable: keep the run id in the task state store so a new try resumes the run
        (Airflow 3.3+; default ``True`` there, no effect below).
    """

    template_fields: Sequence[str] = ("input", "user_id", "webhooks")
    template_fields_renderers = {"input": "json", "webhooks": "json"}
    ui_color = "#e8e1f7"
    external_id_key = "altabots_workflow_run_id"

    def __init__(
        self,
        *,
        input: Mapping[str, Any] | str,
        user_id: str | None = None,
        webhooks: Sequence[Mapping[str, Any]] | str | None = None,
        altabots_conn_id: str = AltaBotsHook.default_conn_name,
        sync_invoke: bool = False,
        wait_for_termination: bool = True,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        max_poll_interval: float = DEFAULT_MAX_POLL_INTERVAL,
        timeout: float | None = DEFAULT_RUN_TIMEOUT,
        max_consecutive_failures: int = DEFAULT_MAX_CONSECUTIVE_FAILURES,
        durable: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if durable is not None:
            kwargs["durable"] = durable
        super().__init__(**kwargs)
        self.input = input
        self.user_id = user_id
        self.webhooks = webhooks
        self.sync_invoke = sync_invoke
        self.wait_for_termination = wait_for_termination
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.keep_waiting_settings(altabots_conn_id, deferrable, max_poll_interval, max_consecutive_failures)
        if timeout is not None:
            self.timeout = protocol.positive_seconds(timeout, "timeout")
        self.workflow_run_id: str | None = None
        self._webhooks: Any = None  # the rendered webhooks; ``webhooks`` then shows them redacted
        self._invoke: protocol.ApiRequest | None = None
        self._record: dict[str, Any] | None = None
        self._published = False
        self._output: Any = None
        self._invoked_at: float | None = None

    @property
    def policy(self) -> PollPolicy:
        """The waiting policy built from this operator's arguments."""
        return PollPolicy(
            poll_interval=self.poll_interval,
            max_poll_interval=self.max_poll_interval,
            max_consecutive_failures=self.max_consecutive_failures,
        )

    def _do_render_template_fields(
        self,
        parent: Any,
        template_fields: Iterable[str],
        context: Context,
        jinja_env: jinja2.Environment,
        seen_oids: set[int],
    ) -> None:
        # Both plain and mapped tasks render through here (a mapped task skips
        # render_template_fields), before Airflow stores the rendered fields: hide the webhooks'
        # secrets as soon as they are known.
        super()._do_render_template_fields(parent, template_fields, context, jinja_env, seen_oids)
        if parent is self:
            self._hide_webhook_secrets()

    def execute(self, context: Context) -> Any:
        self._hide_webhook_secrets()
        # Check everything the invoke needs, the connection included, before any request is sent.
        self._invoke = protocol.invoke_request(
            self.input, user_id=self.user_id, webhooks=self._webhooks, is_async=not self.sync_invoke
        )
        self.hook.get_settings()
        if "task_state_store" not in context and self._refused_since is None:
            self.log.warning(NO_STATE_STORE)
        if self.sync_invoke:
            return self._execute_sync_invoke(context)
        return self.execute_resumable(context)

    def on_kill(self) -> None:
        if self.workflow_run_id:
            self.log.warning(
                "Task killed while workflow run %s goes on: the API has no cancel endpoint, so the run "
                "continues (and is billed) at the vendor's side. A new try of this task resumes it.",
                self.workflow_run_id,
            )

    # -- ResumableJobMixin: how to start, read and wait for one run --------------------------

    def submit_job(self, context: Context) -> str:
        """Invoke the workflow asynchronously and record the run id at once."""
        run_id, _ = self._start_run(context)
        return run_id

    def get_job_status(self, external_id: JsonValue, context: Context) -> str:
        """Read the status of a run a previous try started (on resume)."""
        run_id = str(external_id)
        self.workflow_run_id = run_id
        record = self._read_stored_run(run_id)
        if record is None:
            return _NOT_FOUND
        self._record = record
        self.note_run(run_id, record)
        return protocol.short(record.get("status"))

    def is_job_active(self, status: str) -> bool:
        # An unknown status is never success, nor a reason to start (and pay for) a second run.
        return status != _NOT_FOUND and protocol.status_kind(status) in (
            StatusKind.ACTIVE,
            StatusKind.UNKNOWN,
        )

    def is_job_succeeded(self, status: str) -> bool:
        return protocol.status_kind(status) == StatusKind.SUCCEEDED

    def poll_until_complete(self, external_id: JsonValue, context: Context) -> Any:
        """
        Wait for the run on the worker; when deferrable, only for its first few seconds, then
        defer for the rest. Return what the task returns.
        """
        run_id = str(external_id)
        self.workflow_run_id = run_id
        if not self.wait_for_termination:
            return run_id
        deadline = deadline_after(self.timeout)
        watch = RunWatch(run_id, self.policy, deadline=deadline, started_at=self._invoked_at, log=self.log)
        hand_over_after = None
        if self.deferrable:
            hand_over_after = polling.CHECK_ON_WORKER_SECONDS if self._quota_plentiful() else 0.0
        record = wait_for_run(
            watch,
            lambda check_deadline: self.hook.get_run_result(run_id, deadline=check_deadline),
            hand_over_after=hand_over_after,
        )
        if record is None:
            self.defer_until_done(run_id, deadline, interval=watch.interval, started_at=self._invoked_at)
        return self._publish(context, record)

    def execute_after_rate_limit(self, context: Context, event: Mapping[str, Any] | None = None) -> Any:
        """
        Resume once the key's budget allows the request that was answered 429 (the invoke, or the
        read of the run an earlier try stored): run the task again from the start, which sends it.
        """
        from airflow_provider_altabots import events  # on resume only, not at DAG parse

        self._refused_since = events.read_budget_event(event)
        return self.execute(context)

    def get_job_result(self, external_id: JsonValue, context: Context) -> Any:
        if not self.wait_for_termination:
            return str(external_id)
        if self._published:
            return self._output
        record = self._record if self._record is not None else self.read_record(str(external_id))
        return self._publish(context, record)

    # -- helpers ----------------------------------------------------------------------------

    def _execute_sync_invoke(self, context: Context) -> Any:
        run_id, record = self._start_run(context)
        watch = RunWatch(run_id, self.policy, log=self.log)
        if watch.observe(record) is None:
            return self._publish(context, record)
        self.log.info(
            "The invoke answered before run %s ended (%s); waiting for it.", run_id, watch.last_status
        )
        return self.poll_until_complete(run_id, context)

    def _start_run(self, context: Context) -> tuple[str, dict[str, Any]]:
        """
        Send the invoke and record the run id: in XCom, the log and the task state store.

        While the invoke's answer is outstanding, a marker in the task state store says so. A
        later try that finds the marker still unanswered (the worker died mid-invoke, e.g. during
        a long synchronous call) cannot know whether a run was started and billed, so it fails
        with :class:`AltaBotsInvokeUncertain` instead of invoking again; it removes the marker,
        so clearing the task afterwards is the user's go-ahead for a new run.
        """
        store = context.get("task_state_store") if getattr(self, "durable", False) else None
        known = None  # the run id stored before this invoke
        if store is not None:
            marker, known = store.get(INVOKE_MARKER_KEY), store.get(self.external_id_key)
            if isinstance(marker, Mapping) and marker.get("after") == known:
                store.delete(INVOKE_MARKER_KEY)
                raise AltaBotsInvokeUncertain(
                    f"An earlier try of this task sent an invoke at {marker.get('at')} and stopped before "
                    "the API answered, so a run may have started, and been billed, under an id nobody "
                    "learned. It is not invoked again automatically: look for the run in the vendor's "
                    "console, then clear this task if you want a new run."
                )
        try:
            answer = self._send_invoke(store, known=known)
            assert self._invoke is not None
            run_id = protocol.read_run_id(self._invoke, answer)
        except AltaBotsError as error:
            # The outcome is known, or the user is told it is not: the marker has done its job.
            # A 429 is such an outcome: the API started no run.
            if store is not None:
                store.delete(INVOKE_MARKER_KEY)
            if isinstance(error, AltaBotsTransientError) and error.rate_limited:
                if self.deferrable:
                    self.defer_until_budget_allows(error, method_name="execute_after_rate_limit")
                raise AltaBotsTransientError(
                    f"{error.message} The API refused this task's invoke for all of its patience "
                    f"({self.policy.rate_limit_patience:.0f} s), so no run was started. Retry the task when "
                    "the plan's quota allows, or lower the number of tasks that use this API key at once.",
                    rate_limited=True,
                    sent=False,
                ) from None
            raise
        if store is not None:
            # Once the run id is stored, the marker (whose "after" is the previous id) is stale.
            store.set(self.external_id_key, run_id)
        self._started(context, run_id, answer)
        return run_id, answer

    def _send_invoke(self, store: Any, *, known: Any) -> dict[str, Any]:
        """
        Send the invoke; retry on the worker only where it surely never reached the API, or, in a
        task that is not deferrable, after a 429 (no run started either; a deferrable task frees
        its slot instead, see :meth:`defer_until_budget_allows`).

        The unanswered-invoke marker (after the stored run id ``known``) is in ``store`` exactly
        while a request that may start a run is out: an attempt that surely started nothing
        removes it before the next, so a try killed between attempts is never mistaken for one
        killed mid-invoke. Whatever else goes wrong after the request may have been written
        arrives as :class:`AltaBotsInvokeUncertain` (see :mod:`~airflow_provider_altabots.protocol`).
        """
        request = self._invoke
        assert request is not None
        timeout = (self.timeout or protocol.MAX_SECONDS) if self.sync_invoke else None

        def attempt() -> dict[str, Any]:
            if store is not None:
                store.set(INVOKE_MARKER_KEY, {"after": known, "at": datetime.now(UTC).isoformat()})
            try:
                return self.hook.send(request, timeout=timeout)
            except AltaBotsTransientError as error:
                if store is not None and (error.rate_limited or not error.sent):
                    store.delete(INVOKE_MARKER_KEY)
                raise

        answer = call_with_retries(
            attempt,
            self.policy,
            retry_if=lambda error: not error.sent or (error.rate_limited and not self.deferrable),
            log=self.log,
        )
        self._invoked_at = time.time()
        return answer

    def _read_stored_run(self, run_id: str) -> dict[str, Any] | None:
        """
        The record of the run an earlier try stored, or ``None`` when the API says the id is not
        found (the one answer after which a new run may be invoked). Any other error answer about
        it (a proxy's page, an error code, a status that is not the API's word on this run) is
        ridden out like a failed status check; when the checks in a row run out, the try fails
        with :class:`AltaBotsStatusUnknown` naming the run, and invokes nothing.
        """

        def read() -> dict[str, Any]:
            try:
                return self.hook.get_run_result(run_id)
            except AltaBotsApiError as error:
                if error.run_not_found:
                    raise
                raise AltaBotsTransientError(error.message, run_id=run_id) from None

        try:
            return self.read_on_worker(read, method_name="execute_after_rate_limit")
        except AltaBotsApiError as error:
            self.log.warning(
                "The API says workflow run %s, started by an earlier try, is not found (%s); a new run "
                "is invoked.",
                run_id,
                error.message,
            )
            return None
        except AltaBotsTransientError as error:
            raise AltaBotsStatusUnknown(
                f"Workflow run {run_id}, started by an earlier try of this task, could not be read back: "
                f"{error.message} No new run is invoked: the run may still be going, and a second one "
                "would be billed again. A retry of this task asks again; to start a new run instead, "
                f"delete the task state store key {self.external_id_key} or clear the task with "
                "durable=False.",
                run_id=run_id,
            ) from None

    def _quota_plentiful(self) -> bool:
        """
        Whether the worker may spend requests on its first status checks: only when the key is
        known to have plenty (the invoke's ``X-RateLimit-*`` headers say at least half of the
        window and 100 requests are left, or the connection's ``requests_per_minute`` is at least
        100), and this task's invoke was never refused. A plan nobody described is taken for a
        tight one: the vendors' smallest allow 3 requests a minute.
        """
        if self._refused_since is not None:
            return False
        quota = self.hook.last_quota
        if quota is not None and quota.remaining is not None:
            return quota.plentiful
        rate = self.hook.get_settings().requests_per_minute
        return rate is not None and rate >= protocol.PLENTY_REQUESTS

    def _started(self, context: Context, run_id: str, answer: Mapping[str, Any]) -> None:
        self.workflow_run_id = run_id
        self.note_run(run_id, answer)
        self.log.info("Started workflow run %s of %s.", run_id, protocol.describe_run(answer))
        if self.do_xcom_push:
            context["ti"].xcom_push(key=XCOM_RUN_ID_KEY, value=run_id)

    def _publish(self, context: Context, record: Mapping[str, Any]) -> Any:
        assert self.workflow_run_id is not None
        self._output = self.publish_run(context, self.workflow_run_id, record)
        self._published = True
        return self._output

    def _hide_webhook_secrets(self) -> None:
        """
        Keep the rendered webhooks for the invoke, and show only a redacted copy from then on.

        Airflow stores the rendered fields as the task's attributes read; the copy hides every
        header value and each URL's path and query, however short (Airflow's secrets masker
        leaves strings under ``[logging] min_length_masked_secret`` alone). The secrets masker
        also learns each of them, so they are hidden in log lines too.
        """
        if self._webhooks is not None or not self.webhooks:
            return
        self._webhooks = self.webhooks
        for secret in protocol.webhook_secrets(self._webhooks):
            mask_secret(secret)
        self.webhooks = protocol.redacted_webhooks(self._webhooks)
