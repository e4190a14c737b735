"""
How long to wait between status checks, how to back off, and when to give up.

One policy serves the operator (polling from the worker), the sensor and the trigger (polling
from the triggerer); it holds no I/O, so both the blocking and the asyncio loops drive the same
decisions. The loops are here too, each given the check to make: :func:`wait_for_run` blocks
(the operator on the worker), :func:`await_run` does not (the trigger), and a sensor's poke makes
one check with :func:`fetch_outcome`; each feeds every outcome to a :class:`RunWatch`.

* The first check comes ``poll_interval`` seconds after the wait starts, the second as long
  after that; from then on each wait is ``growth`` (1.5) times the one before, up to
  ``max_poll_interval``. Short runs are seen quickly and long runs cost few requests: with the
  defaults the checks fall at 2, 4, 7, 11.5, 18, 28, 44, 66, 100 and 152 s, then every 60 s,
  so a 10-minute run takes 18 checks (figures against fixed intervals: ``BENCHMARKS.md``).
* On HTTP 429 from a worker the wait doubles from ``poll_interval`` with jitter, up to
  :attr:`PollPolicy.backoff_cap`, and is never shorter than what ``Retry-After`` or
  ``X-RateLimit-Reset`` says: an API whose hint keeps failing (``Retry-After: 0`` again and
  again) is asked less and less often. In a trigger the API key's request budget
  (:mod:`airflow_provider_altabots.budget`) holds every check of the key instead, and the run
  keeps its schedule; a deferrable task's first checks on the worker hand over at a 429.
* Every check logs one line: the status, the time since the run started, the next wait.
* No wait between two requests is shorter than :data:`MIN_POLL_INTERVAL`.
* A 5xx answer or a network error is retried the same way. Only ``max_consecutive_failures``
  failed checks in a row end the wait, as :class:`AltaBotsStatusUnknown`: the run's fate is
  unknown, which is not the same as failed. A 429 is not a failure: the API answered, so it
  also ends a streak of failures.
* A deadline (absolute Unix time, so it survives a triggerer restart) bounds the wait. The last
  wait is cut short to end at the deadline, the status is checked once more, and only then is
  :class:`AltaBotsRunTimeout` raised, naming the last status seen. Every check must end by
  :attr:`RunWatch.check_deadline` (the deadline plus :data:`DEADLINE_GRACE`), so the wait ends
  on time whatever the server does.
* A deferrable wait first checks the run from the worker for :data:`CHECK_ON_WORKER_SECONDS`
  and defers only when it is still going; the trigger then checks no sooner than
  :data:`DEFERRAL_MARGIN` after the deferral. Both keep a short run clear of Airflow's defer race
  (a trigger that fires within seconds of the deferral can get the task failed by the
  scheduler, apache/airflow issues 66374, 67287, 71580 and 72716).
* A status this provider does not know is never taken for success: it warns and keeps waiting.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from airflow_provider_altabots import protocol
from airflow_provider_altabots.exceptions import (
    AltaBotsConfigError,
    AltaBotsRunFailed,
    AltaBotsRunTimeout,
    AltaBotsStatusUnknown,
    AltaBotsTransientError,
)
from airflow_provider_altabots.protocol import StatusKind

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    #: Reads a run's record once, given the Unix time by which the request must have ended.
    StatusCheck = Callable[[float | None], Mapping[str, Any]]
    #: :data:`StatusCheck` as a coroutine function, for triggers.
    AsyncStatusCheck = Callable[[float | None], Awaitable[Mapping[str, Any]]]

T = TypeVar("T")
Logger = logging.Logger | logging.LoggerAdapter[Any] | Any

DEFAULT_POLL_INTERVAL = 2.0
DEFAULT_MAX_POLL_INTERVAL = 60.0
DEFAULT_MAX_CONSECUTIVE_FAILURES = 8
DEFAULT_RUN_TIMEOUT = 24 * 60 * 60.0

#: The shortest wait between two requests for one run, and the smallest ``poll_interval``
#: accepted. Every request spends a plan's quota (GPTBots' free plan allows 3 a minute), and an
#: answer sooner than a second after the last one is rarely news. The one exception is the final
#: check at a deadline, which may follow the previous check sooner.
MIN_POLL_INTERVAL = 1.0
#: A deferrable wait checks the run from the worker while the next check falls within this many
#: seconds of the wait's start (with the defaults: at 2 and 4 s), and defers only after. A run
#: that ends that soon never defers: no trigger can race the deferral, and the deferral's own
#: cost (about 8 worker-seconds, most of it starting the task again; docs/e2e.md) is saved.
CHECK_ON_WORKER_SECONDS = 5.0
#: A trigger's first status check comes no sooner than this many seconds after the deferral, so
#: its event cannot reach the scheduler before the worker that deferred is known to have exited.
#: Airflow 3.2 and 3.3 fail a task whose trigger fires within seconds of its deferral (the
#: executor's late "success" for the deferring process meets the resumed task); the race
#: windows reported in apache/airflow issues 66374, 71580 and 72716 span 3 to 7 seconds.
DEFERRAL_MARGIN = 10.0
#: A wait with a deadline ends at most this many seconds after it: the final check gets this
#: long, and a check still in flight then is cut off.
DEADLINE_GRACE = 5.0


@dataclass(frozen=True)
class PollPolicy:
    """
    The waiting policy; every field is a plain number so it can travel inside a trigger.

    :param poll_interval: seconds before the first status check.
    :param max_poll_interval: the longest wait between two checks.
    :param max_consecutive_failures: failed checks in a row (5xx, network errors) that end the
        wait as "status unknown".
    :param growth: factor by which the wait grows after each check that finds the run active.
    :param backoff_cap: the longest wait after an error or a 429 that said nothing about when to
        come back.
    :param rate_limit_patience: how long one API call (an invoke, the final read of a result)
        keeps waiting out 429s before giving up. A wait for a run is bounded by its deadline
        instead.
    """

    poll_interval: float = DEFAULT_POLL_INTERVAL
    max_poll_interval: float = DEFAULT_MAX_POLL_INTERVAL
    max_consecutive_failures: int = DEFAULT_MAX_CONSECUTIVE_FAILURES
    growth: float = 1.5
    backoff_cap: float = 300.0
    rate_limit_patience: float = 900.0

    def __post_init__(self) -> None:
        for name in ("poll_interval", "max_poll_interval", "growth", "backoff_cap", "rate_limit_patience"):
            object.__setattr__(self, name, protocol.positive_seconds(getattr(self, name), name))
        if self.poll_interval < MIN_POLL_INTERVAL:
            raise AltaBotsConfigError(
                f"poll_interval must be at least {MIN_POLL_INTERVAL} s (every check spends the plan's "
                f"request quota), not {self.poll_interval}."
            )
        if self.max_poll_interval < self.poll_interval:
            raise AltaBotsConfigError(
                f"max_poll_interval ({self.max_poll_interval}) must not be below "
                f"poll_interval ({self.poll_interval})."
            )
        if self.growth < 1:
            raise AltaBotsConfigError(f"growth must be >= 1, not {self.growth}.")
        count = self.max_consecutive_failures
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise AltaBotsConfigError(f"max_consecutive_failures must be an integer >= 1, not {count!r}.")

    def as_kwargs(self) -> dict[str, Any]:
        return asdict(self)

    def next_interval(self, interval: float) -> float:
        """The wait after ``interval`` when the run is still active."""
        return min(interval * self.growth, self.max_poll_interval)

    def delay_after_error(self, error: AltaBotsTransientError, attempt: int) -> float:
        """
        Seconds to wait after the ``attempt``-th failure (or 429) in a row.

        Exponential backoff with jitter, never shorter than the API's own
        ``Retry-After``/``X-RateLimit-Reset`` (plus a little jitter, so that many waiting tasks do
        not come back at the same instant), nor than :data:`MIN_POLL_INTERVAL`. When the API's
        hint keeps failing, the backoff outgrows it.
        """
        jitter = random.uniform(0.5, 1.0)  # noqa: S311 - spreading retries, not security
        delay = jitter * min(self.poll_interval * 2.0 ** (attempt - 1), self.backoff_cap)
        if error.retry_after is not None:
            delay = max(delay, error.retry_after + jitter * min(self.poll_interval, 1.0))
        return max(delay, MIN_POLL_INTERVAL)


def deadline_after(timeout: float | None, now: float | None = None) -> float | None:
    """The absolute Unix time ``timeout`` seconds from now (``None``: no deadline)."""
    if timeout is None:
        return None
    return (time.time() if now is None else now) + timeout


class ErrorStreak:
    """
    How long to wait after each transient error of a row, and when the row is too long.

    A 429 means the API is up and answering: it ends a streak of failures and waits as the API
    asked. A 5xx or a network error extends the streak; the ``max_consecutive_failures``-th
    error of a streak gives up. :meth:`reset` after a successful call.
    """

    def __init__(self, policy: PollPolicy) -> None:
        self.policy = policy
        self.failures = 0
        self.rate_limited = 0

    def reset(self) -> None:
        self.failures = self.rate_limited = 0

    def delay(self, error: AltaBotsTransientError) -> float | None:
        """Seconds to wait before trying again, or ``None`` when the streak of failures is too long."""
        if error.rate_limited:
            self.failures = 0
            self.rate_limited += 1
            return self.policy.delay_after_error(error, self.rate_limited)
        self.failures += 1
        if self.failures >= self.policy.max_consecutive_failures:
            return None
        return self.policy.delay_after_error(error, self.failures)


class RunWatch:
    """
    The state of one wait for one run: feed it each check's outcome, it says how long to wait.

    :param run_id: the run being waited for (named in every message).
    :param policy: intervals and limits.
    :param deadline: absolute Unix time after which the wait ends; ``None`` waits forever.
    :param interval: the wait before the next check, when the wait goes on from an earlier one
        (a trigger taking over from the worker's first checks); default ``policy.poll_interval``.
    :param started_at: Unix time the run was started (or first waited for), for the elapsed
        time in each check's log line; default now.
    :param budgeted: every check waits for the API key's request budget (in a trigger), which
        honours a 429's hint for every run of the key: a 429 then keeps this run's schedule
        instead of backing off on its own.
    :param log: where each check's line goes (status, elapsed time, next check), and warnings
        about unknown statuses and retried errors.
    :param clock: returns the current Unix time; replaceable in tests.
    """

    def __init__(
        self,
        run_id: str,
        policy: PollPolicy,
        *,
        deadline: float | None = None,
        interval: float | None = None,
        started_at: float | None = None,
        budgeted: bool = False,
        log: Logger | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.run_id = run_id
        self.budgeted = budgeted
        self.policy = policy
        self.deadline = deadline
        self.log = log or logging.getLogger(__name__)
        self.clock = clock
        self.started_at = clock() if started_at is None else started_at
        self.interval = policy.poll_interval if interval is None else max(interval, policy.poll_interval)
        self.errors = ErrorStreak(policy)
        self.checks = 0
        self.last_status: str | None = None
        self.record: dict[str, Any] | None = None

    def first_delay(self, at_least: float = 0.0) -> float:
        """The wait before the first check: at least ``at_least`` seconds, unless the deadline is sooner."""
        return self._until_deadline(max(self.interval, at_least))

    @property
    def check_deadline(self) -> float | None:
        """
        The Unix time by which a check must have ended: the deadline plus :data:`DEADLINE_GRACE`
        (a check made after the deadline, as by a triggerer restarted late, gets the grace too).
        """
        return None if self.deadline is None else max(self.deadline, self.clock()) + DEADLINE_GRACE

    def observe(self, outcome: Mapping[str, Any] | AltaBotsTransientError) -> float | None:
        """
        Take one check's outcome: the run record, or the transient error the check raised.

        :returns: ``None`` when the run succeeded (its record is then in :attr:`record`), else
            the seconds to wait before the next check.
        :raises AltaBotsRunFailed: the run ended FAILED.
        :raises AltaBotsStatusUnknown: too many failed checks in a row.
        :raises AltaBotsRunTimeout: the deadline has passed and the run has not ended.
        """
        self.checks += 1
        if isinstance(outcome, AltaBotsTransientError):
            delay = self._after_error(outcome)
        else:
            self.errors.reset()
            self.record = dict(outcome)
            status = outcome.get("status")
            self.last_status = protocol.short(status)
            kind = protocol.status_kind(status)
            if kind in (StatusKind.SUCCEEDED, StatusKind.FAILED):
                self._log_check(None)
            if kind == StatusKind.SUCCEEDED:
                return None
            if kind == StatusKind.FAILED:
                raise AltaBotsRunFailed(
                    protocol.failure_message(self.run_id, self.record), run_id=self.run_id
                )
            if kind == StatusKind.UNKNOWN:
                self.log.warning(
                    "Workflow run %s reports status %r, which this provider does not know; it is not "
                    "taken for success, so the task keeps waiting.",
                    self.run_id,
                    self.last_status,
                )
            delay = self.interval
            self.interval = self.policy.next_interval(self.interval)
        if self.deadline is not None and self.clock() >= self.deadline:
            raise AltaBotsRunTimeout(
                f"Workflow run {self.run_id} had not ended when the timeout passed; last status seen: "
                f"{self.last_status or 'none (no check succeeded)'}. The run goes on at the vendor's side "
                "(the API cannot cancel it): raise the operator's timeout, or wait for it with "
                "AltaBotsWorkflowRunSensor.",
                run_id=self.run_id,
                last_status=self.last_status,
            )
        delay = self._until_deadline(delay)
        if not isinstance(outcome, AltaBotsTransientError):
            self._log_check(delay)
        return delay

    def _log_check(self, delay: float | None) -> None:
        self.log.info(
            "Workflow run %s is %s after %.1f s (check %d)%s",
            self.run_id,
            self.last_status,
            max(self.clock() - self.started_at, 0.0),
            self.checks,
            "." if delay is None else f"; next check in {delay:.1f} s.",
        )

    def _after_error(self, error: AltaBotsTransientError) -> float:
        if error.rate_limited and self.budgeted:
            # The key's budget holds every check of the key as long as the 429 says; this run
            # keeps its schedule and waits its turn there.
            self.errors.failures = 0
            self.log.info(
                "Status check of workflow run %s was rate limited; the API key's request budget holds "
                "the next check (due in %.1f s) until the key may ask again.",
                self.run_id,
                self.interval,
            )
            return self.interval
        delay = self.errors.delay(error)
        if delay is None:
            raise AltaBotsStatusUnknown(
                f"The status of workflow run {self.run_id} is unknown: {self.errors.failures} checks in a "
                f"row failed, the last with: {error.message} The run itself may still be going or may have "
                "ended; a task retry resumes waiting for the same run. Raise max_consecutive_failures "
                "to ride out longer outages.",
                run_id=self.run_id,
            )
        if error.rate_limited:
            self.log.warning(
                "Status check of workflow run %s was rate limited; next check in %.1f s.", self.run_id, delay
            )
        else:
            self.log.warning(
                "Status check %d of %d allowed failures for workflow run %s: %s Next check in %.1f s.",
                self.errors.failures,
                self.policy.max_consecutive_failures,
                self.run_id,
                error.message,
                delay,
            )
        return delay

    def _until_deadline(self, delay: float) -> float:
        if self.deadline is None:
            return delay
        return max(0.0, min(delay, self.deadline - self.clock()))


def fetch_outcome(watch: RunWatch, check: StatusCheck) -> Mapping[str, Any] | AltaBotsTransientError:
    """
    Make one status check for ``watch``: the run's record, or the transient error the check
    raised, for :meth:`RunWatch.observe` to take (any other error goes up).

    :param check: fetches the record once; it is given :attr:`RunWatch.check_deadline`, the Unix
        time by which the request must have ended (``None``: no deadline).
    """
    try:
        return check(watch.check_deadline)
    except AltaBotsTransientError as error:
        return error


async def afetch_outcome(
    watch: RunWatch, check: AsyncStatusCheck
) -> Mapping[str, Any] | AltaBotsTransientError:
    """:func:`fetch_outcome` for async code (triggers): ``check`` is a coroutine function."""
    try:
        return await check(watch.check_deadline)
    except AltaBotsTransientError as error:
        return error


def wait_for_run(
    watch: RunWatch,
    check: StatusCheck,
    sleep: Callable[[float], None] | None = None,
    *,
    hand_over_after: float | None = None,
) -> dict[str, Any] | None:
    """
    Block until the watched run succeeds; return its record.

    :param check: fetches the record once (see :func:`fetch_outcome`).
    :param hand_over_after: stop and return ``None`` when the next check would come later than
        this many seconds after the wait began, or at once when a check is rate limited: the
        caller hands the rest of the wait over (to a trigger), which goes on with
        :attr:`RunWatch.interval`, the schedule's next wait.
    """
    sleep = sleep or time.sleep
    began, slept = time.monotonic(), 0.0
    delay = watch.first_delay()
    while True:
        # The schedule, or the clock when requests themselves took long, decides the hand-over.
        if hand_over_after is not None and max(slept, time.monotonic() - began) + delay > hand_over_after:
            return None
        sleep(delay)
        slept += delay
        outcome = fetch_outcome(watch, check)
        if (
            hand_over_after is not None
            and isinstance(outcome, AltaBotsTransientError)
            and outcome.rate_limited
        ):
            # The key's quota is spent: the triggerer's budget waits for it, not a worker slot.
            watch.log.info(
                "Status check of workflow run %s was rate limited; the triggerer takes the wait over.",
                watch.run_id,
            )
            return None
        next_delay = watch.observe(outcome)
        if next_delay is None:
            assert watch.record is not None
            return watch.record
        delay = next_delay


async def await_run(watch: RunWatch, check: AsyncStatusCheck, *, at_least: float = 0.0) -> dict[str, Any]:
    """
    Wait without blocking the event loop until the watched run succeeds; return its record.

    :param check: fetches the record once, as a coroutine function (see :func:`fetch_outcome`).
    :param at_least: seconds before the first check, at the least (unless the deadline is
        sooner); the schedule's own first wait applies when it is longer.
    :raises AltaBotsError: as :meth:`RunWatch.observe` raises, or any error of ``check`` that
        is not transient.
    """
    delay: float | None = watch.first_delay(at_least=at_least)
    while delay is not None:
        await asyncio.sleep(delay)
        delay = watch.observe(await afetch_outcome(watch, check))
    assert watch.record is not None
    return watch.record


def call_with_retries(
    call: Callable[[], T],
    policy: PollPolicy,
    *,
    retry_if: Callable[[AltaBotsTransientError], bool] = lambda error: True,
    log: Logger | None = None,
    sleep: Callable[[float], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """
    Make one API call, retrying transient errors for which ``retry_if`` holds.

    The same rules as a wait for a run (:class:`ErrorStreak`): 429s are waited out as the API
    asks, for up to ``policy.rate_limit_patience`` seconds in all; ``max_consecutive_failures``
    5xx or network errors in a row give up. The last error, or the first one ``retry_if``
    refuses, is raised.
    """
    sleep = sleep or time.sleep
    streak = ErrorStreak(policy)
    give_up_at = clock() + policy.rate_limit_patience
    while True:
        try:
            return call()
        except AltaBotsTransientError as error:
            delay = streak.delay(error) if retry_if(error) else None
            if delay is None or clock() + delay > give_up_at:
                raise
            (log or logging.getLogger(__name__)).warning("%s Trying again in %.1f s.", error.message, delay)
            sleep(delay)
