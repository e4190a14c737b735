"""
One request budget per API key: when the next request of a key may go.

Every trigger of one API key in a triggerer process asks the same budget before each request,
so a plan's quota is shared instead of discovered by each trigger's own 429s. The budget learns
the plan from three sources, best first:

* **The answers' headers.** AltaBots sends ``X-RateLimit-Limit``, ``X-RateLimit-Remaining`` and
  ``X-RateLimit-Reset`` on every answer (:class:`~airflow_provider_altabots.protocol.Quota`). The
  budget spreads what remains of the window evenly until its reset, counting its own requests
  still unanswered; when nothing remains it holds every request until the reset. After a reset
  one request goes first and its answer tells the new window's figures, so a reset is not a
  stampede. The remaining count is the key's, whoever spent it (workers' invokes, other
  triggerers), so several triggerers pace themselves by the same figure.
* **The connection's ``requests_per_minute``** (the plan's rate, when the user knows it): no two
  requests closer than its inverse. It is also the ceiling of what is learnt below.
* **429 answers.** Without headers a 429 is all there is: it holds every request of the key
  until the oldest answered request of the last :data:`WINDOW_SECONDS` ages out of a per-minute
  window (the vendors' plans count per minute, hour or day; the shortest is assumed), and lowers
  the rate to :data:`DECREASE` times what was answered in that window (requests sent for other
  processes on this budget's turns included, and the workers' invokes of the runs whose
  triggers started here). Each :data:`WINDOW_SECONDS` without a 429 the
  rate grows again (see :meth:`RateBudget._raise`), never past the ``requests_per_minute``
  ceiling when set. 429s of requests sent before the last decrease do not lower it again.

:class:`RateBudget` holds those decisions with no I/O and no clock of its own;
:class:`SharedBudget` serves waiting requests in the order they asked, on the event loop;
:data:`BUDGETS` keeps one per API key and event loop. The budget lives in one process: a worker
(a process per task) invokes outside it, and an invoke answered 429 is deferred to the
triggerer's budget (see :class:`~airflow_provider_altabots.triggers.altabots.AltaBotsBudgetTrigger`).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import math
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airflow_provider_altabots.protocol import ConnectionSettings, Quota

#: The window assumed when an API says nothing of its own: the vendors' shortest plan unit.
WINDOW_SECONDS = 60.0
#: After a 429 that gave no hint, the rate becomes this share of what the window answered.
DECREASE = 0.9
#: Each window without a 429, a learnt rate grows by this factor: gently, so that on a plan of 3
#: requests a minute a probe that finds the limit costs one 429 in several windows.
GROWTH = 1.05
#: A rate the budget knows (the connection's, or what a window answered before a 429) is kept
#: this much below, for network jitter to never squeeze one request too many into a window.
HEADROOM = 0.97
#: Each window without a 429, a rate set from too few answers (other processes spent most of
#: the window) grows by this factor, until a 429 with enough answers teaches the plan.
UNSURE_GROWTH = 1.5
#: After a 429 the rate grows back to just below what was learnt; it probes past it only after
#: this many windows without a 429 (a plan may have grown).
PROBE_AFTER_WINDOWS = 3
#: The longest the budget waits for an answer it needs (the first of a key or of a window, or one
#: of the slow start) before letting the next request go anyway: a hanging request holds up
#: nothing for longer.
ANSWER_PATIENCE = 2.0
#: Requests wait this long past an announced reset, for the clocks of both sides to disagree.
RESET_MARGIN = 0.5
#: Fewer answers than this in a window say too little to set a rate from (other processes may
#: have spent most of the window): the rate is lowered and probed back up quickly.
_ENOUGH_TO_LEARN = 5
#: Answers remembered for learning: more than any window's worth at the rates plans allow.
_REMEMBERED = 4096


@dataclass(frozen=True)
class Ticket:
    """One granted request: when it was granted, and its place in the order of grants."""

    granted_at: float
    number: int


class RateBudget:
    """
    The budget's decisions for one API key, with no I/O; every method takes the current time.

    :param requests_per_minute: the plan's rate when the user knows it; ``None`` learns it.
    """

    def __init__(self, requests_per_minute: float | None = None) -> None:
        self.ceiling: float | None = None
        self.rate: float | None = None
        self.set_ceiling(requests_per_minute)
        self.quota: Quota | None = None
        self._quota_number = 0  # grants before the answer that told :attr:`quota`
        self.granted = 0
        self.refused = 0
        self.blocked_until = 0.0
        self.next_free = 0.0
        self._probe: int | None = None  # the grant whose answer is to tell the plan's figures
        self._unanswered: dict[int, float] = {}  # grant number -> when granted
        self._answered: collections.deque[float] = collections.deque(maxlen=_REMEMBERED)
        self._lowered_at = -math.inf
        self._raised_at = -math.inf
        self._learnt: float | None = None  # requests a second a window answered before its 429
        self._unsure = False  # the rate was set from too few answers to go by
        self._refused_elsewhere_at = -math.inf
        self._refusals_in_row = 0

    def set_ceiling(self, requests_per_minute: float | None) -> None:
        """Take the connection's ``requests_per_minute`` (it may have been edited since)."""
        ceiling = None if requests_per_minute is None else HEADROOM * requests_per_minute / 60.0
        if ceiling == self.ceiling:
            return
        self.ceiling = ceiling
        if ceiling is not None:
            self.rate = ceiling if self.rate is None else min(self.rate, ceiling)

    def left(self, now: float) -> int | None:
        """Requests the current window still allows, by the latest headers less those sent since."""
        quota = self.quota
        if quota is None or quota.remaining is None or quota.reset_at is None or now >= quota.reset_at:
            return None
        return quota.remaining - (self.granted - self._quota_number)

    def ready_at(self, now: float) -> float:
        """
        The earliest time the next request may go. Waiting for an answer (the first of a key or
        of a new window, or in the slow start) lasts at most :data:`ANSWER_PATIENCE`: a hanging
        request never holds up the key.
        """
        at = max(now, self.blocked_until, self.next_free)
        left = self.left(now)
        if left is not None and left <= 0 and self.quota is not None and self.quota.reset_at is not None:
            return max(at, self.quota.reset_at + RESET_MARGIN)
        if left is None and (probe_at := self._awaited(now, self._probe)) is not None:
            return max(at, probe_at + ANSWER_PATIENCE)  # the first request of a key or window goes alone
        if self.rate is None and self.quota is None:
            # Slow start while nothing is known: as many in flight as have been answered, plus
            # one, so the first requests of a busy key double each round trip instead of all
            # going at once. A request unanswered for ANSWER_PATIENCE counts as answered: a
            # hanging request holds up the others for that long at most.
            recent = sorted(at for at in self._unanswered.values() if at > now - ANSWER_PATIENCE)
            allowed = 1 + len(self._answered) + len(self._unanswered) - len(recent)
            if len(recent) >= allowed:
                return max(at, recent[len(recent) - allowed] + ANSWER_PATIENCE)
        return at

    def _awaited(self, now: float, number: int | None) -> float | None:
        """When grant ``number`` went out, while its answer is awaited (and not too long)."""
        granted = None if number is None else self._unanswered.get(number)
        return granted if granted is not None and granted > now - ANSWER_PATIENCE else None

    def grant(self, now: float) -> Ticket:
        """Let one request go now (the caller checked :meth:`ready_at`)."""
        quota = self.quota
        self.granted += 1
        self._unanswered[self.granted] = now
        if (self.rate is None and self.granted == 1) or (
            quota is not None and quota.reset_at is not None and now >= quota.reset_at
        ):
            # Nothing is known yet, or the window is over: this answer tells the plan's figures.
            self._probe = self.granted
        gap = 0.0 if self.rate is None else 1.0 / self.rate
        left = self.left(now)
        if left is not None and quota is not None and quota.reset_at is not None:
            # The ``left`` requests still allowed, spread evenly over what is left of the window.
            gap = max(gap, (quota.reset_at - now) / (max(left, 0) + 1))
        self.next_free = max(self.next_free, now) + gap
        return Ticket(now, self.granted)

    def release(self, ticket: Ticket) -> None:
        """A granted request got no answer (it failed on the way)."""
        self._unanswered.pop(ticket.number, None)

    def sent_elsewhere(self, ticket: Ticket, now: float) -> None:
        """
        Another process sends the request this turn was granted for (a worker's invoke, after its
        task waited on the triggerer): counted as answered, since it spends the key's window.
        """
        self._unanswered.pop(ticket.number, None)
        self._answered.append(now)

    def spent_elsewhere(self, at: float, now: float) -> None:
        """
        Another process spent a request of the key at ``at`` (a worker's invoke, learnt when its
        run's trigger starts): counted in the window it fell in, so what a 429 teaches is the
        key's whole window, not this process's share of it.
        """
        if now - WINDOW_SECONDS < at <= now:
            self._answered.append(at)

    def observe(
        self,
        ticket: Ticket,
        now: float,
        *,
        refused: bool,
        quota: Quota | None = None,
        retry_after: float | None = None,
    ) -> None:
        """Learn from the answer to a request this budget granted: ``refused`` for HTTP 429."""
        self._unanswered.pop(ticket.number, None)
        if quota is not None:
            self._take(quota, ticket.number)
        if not refused:
            self._refusals_in_row = 0
            self._answered.append(now)
            self._raise(now)
            return
        self._block(now, retry_after)
        counted = self.quota is not None and self.quota.remaining is not None
        if not counted and retry_after is None and ticket.granted_at >= self._lowered_at:
            self._lower(now)

    def refused_elsewhere(
        self, now: float, *, quota: Quota | None = None, retry_after: float | None = None
    ) -> None:
        """
        Learn of a 429 another process got (a worker's invoke, reported by its deferred task): it
        holds this budget too, but does not lower the rate, which this process did not cause alone.
        """
        if quota is not None:
            self._take(quota, self.granted)
        self._refused_elsewhere_at = now
        self._block(now, retry_after, in_row=False)

    def _block(self, now: float, retry_after: float | None, *, in_row: bool = True) -> None:
        """
        Hold every request after a 429: to the hint, the window's reset, or when capacity frees;
        from the second 429 in a row at least 1, 2, 4 ... s (up to a window), so an API whose
        hint keeps failing (``Retry-After: 0`` again and again) is asked less and less often.
        """
        self.refused += 1
        if in_row:
            self._refusals_in_row += 1
        until = now + (retry_after or 0.0)
        if self._refusals_in_row >= 2:
            until = max(until, now + min(2.0 ** (self._refusals_in_row - 2), WINDOW_SECONDS))
        reset = self.quota.reset_at if self.quota is not None else None
        if reset is not None and reset > now:
            until = max(until, reset + RESET_MARGIN)
        elif retry_after is None:
            until = max(until, self._capacity_frees(now))
        self.blocked_until = max(self.blocked_until, until)

    def _lower(self, now: float) -> None:
        """
        After a 429 without a hint, to a request sent at the current rate: 90% of what the last
        window answered, when it answered enough to go by and no other process was refused in
        it. Otherwise (other processes may have spent much of the window) a known rate is lowered
        by 10%, or none known set from the few answers, and probed back up quickly.
        """
        answered = len(self._in_window(now))
        if answered >= _ENOUGH_TO_LEARN and self._refused_elsewhere_at < now - WINDOW_SECONDS:
            self._learnt = answered / WINDOW_SECONDS
            rate = DECREASE * self._learnt
            self.rate = rate if self.rate is None else min(self.rate * DECREASE, rate)
            self._unsure = False
        else:
            rate = DECREASE * max(answered, 1) / WINDOW_SECONDS
            self.rate = rate if self.rate is None else max(self.rate * DECREASE, rate)
            self._unsure = True
        self._lowered_at = self._raised_at = now

    def _in_window(self, now: float) -> list[float]:
        """When the requests counted in the last :data:`WINDOW_SECONDS` were answered (or sent elsewhere)."""
        return [at for at in self._answered if now - WINDOW_SECONDS < at <= now]

    def _capacity_frees(self, now: float) -> float:
        """When a per-minute window surely has room again; backs off while nothing gets through."""
        recent = self._in_window(now)
        if recent:
            return min(recent) + WINDOW_SECONDS
        return now + min(WINDOW_SECONDS, 2.0 ** max(self._refusals_in_row, 1))

    def _take(self, quota: Quota, number: int) -> None:
        """Keep the answer's figures when they are of a later window, or leave less in this one."""
        current = self.quota
        if current is not None and quota.reset_at is not None and current.reset_at is not None:
            if quota.reset_at < current.reset_at - 1.0:
                return  # a late answer from a window already over
            same_window = abs(quota.reset_at - current.reset_at) <= 1.0
            if (
                same_window
                and quota.remaining is not None
                and current.remaining is not None
                and quota.remaining - (self.granted - number)
                >= current.remaining - (self.granted - self._quota_number)
            ):
                return  # an answer older than the one kept: it says more is left than there is
        self.quota = quota
        self._quota_number = number

    def _raise(self, now: float) -> None:
        """
        Probe back up, once per window without a 429: a rate learnt from a window that answered
        enough grows by :data:`GROWTH` to just below what it taught, and past it after
        :data:`PROBE_AFTER_WINDOWS` quiet windows (a window answering more raises what was
        learnt); a rate set from too few answers grows by :data:`UNSURE_GROWTH` until a 429
        teaches more. Never past ``requests_per_minute``.
        """
        if self.rate is None or now - self._raised_at < WINDOW_SECONDS:
            return
        self._raised_at = now
        cap = math.inf if self.ceiling is None else self.ceiling
        growth = UNSURE_GROWTH if self._unsure else GROWTH
        if self._learnt is not None and not self._unsure:
            answered = len(self._in_window(now)) / WINDOW_SECONDS
            self._learnt = max(self._learnt, answered)
            if now - self._lowered_at < PROBE_AFTER_WINDOWS * WINDOW_SECONDS:
                cap = min(cap, HEADROOM * self._learnt)
        self.rate = max(min(self.rate * growth, cap), self.rate)


class SharedBudget:
    """
    The requests of one API key waiting on one event loop, let go one by one in the order they
    asked, each when its :class:`RateBudget` allows.
    """

    def __init__(self, requests_per_minute: float | None = None) -> None:
        self.policy = RateBudget(requests_per_minute)
        self._waiting: collections.deque[asyncio.Future[Ticket]] = collections.deque()
        self._changed = asyncio.Event()
        self._serving: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        """Requests waiting for their turn."""
        return sum(1 for future in self._waiting if not future.done())

    async def acquire(self, until: float | None = None) -> tuple[Ticket | None, float]:
        """
        Wait for this request's turn; return its ticket and the seconds it was held back.

        :param until: Unix time after which the request is no longer wanted: the ticket is then
            ``None`` (the budget did not let it go in time).
        """
        began = time.time()
        if not self._waiting and self.policy.ready_at(began) <= began:
            return self.policy.grant(began), 0.0
        turn: asyncio.Future[Ticket] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        self._serve()
        try:
            async with asyncio.timeout(None if until is None else max(until - began, 0.0)):
                ticket = await asyncio.shield(turn)
        except TimeoutError:
            late = self._withdraw(turn)
            if late is None:
                return None, time.time() - began
            ticket = late
        except asyncio.CancelledError:
            granted = self._withdraw(turn)
            if granted is not None:
                self.release(granted)
            raise
        return ticket, time.time() - began

    def observe(
        self,
        ticket: Ticket,
        *,
        refused: bool,
        quota: Quota | None = None,
        retry_after: float | None = None,
    ) -> None:
        """:meth:`RateBudget.observe` now, and wake the waiting requests to look again."""
        self.policy.observe(ticket, time.time(), refused=refused, quota=quota, retry_after=retry_after)
        self._changed.set()

    def refused_elsewhere(self, *, quota: Quota | None = None, retry_after: float | None = None) -> None:
        """:meth:`RateBudget.refused_elsewhere` now."""
        self.policy.refused_elsewhere(time.time(), quota=quota, retry_after=retry_after)
        self._changed.set()

    def release(self, ticket: Ticket) -> None:
        """:meth:`RateBudget.release`, and wake the waiting requests."""
        self.policy.release(ticket)
        self._changed.set()

    def sent_elsewhere(self, ticket: Ticket) -> None:
        """:meth:`RateBudget.sent_elsewhere` now, and wake the waiting requests."""
        self.policy.sent_elsewhere(ticket, time.time())
        self._changed.set()

    def spent_elsewhere(self, at: float) -> None:
        """:meth:`RateBudget.spent_elsewhere`, as of now."""
        self.policy.spent_elsewhere(at, time.time())

    def _withdraw(self, turn: asyncio.Future[Ticket]) -> Ticket | None:
        """A waiter leaves: a ticket granted meanwhile is kept (returned) or the turn cancelled."""
        if turn.done() and not turn.cancelled():
            return turn.result()
        turn.cancel()
        self._changed.set()
        return None

    def _serve(self) -> None:
        if self._serving is None or self._serving.done():
            self._serving = asyncio.get_running_loop().create_task(self._serve_in_order())
        self._changed.set()

    async def _serve_in_order(self) -> None:
        while self._waiting:
            head = self._waiting[0]
            if head.done():
                self._waiting.popleft()
                continue
            now = time.time()
            at = self.policy.ready_at(now)
            if at <= now:
                self._waiting.popleft()
                head.set_result(self.policy.grant(now))
                continue
            self._changed.clear()
            try:
                async with asyncio.timeout(None if math.isinf(at) else at - now):
                    await self._changed.wait()
            except TimeoutError:
                pass


class Budgets:
    """One :class:`SharedBudget` per API key (base URL and key) and event loop."""

    def __init__(self) -> None:
        self._budgets: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, SharedBudget]] = (
            weakref.WeakKeyDictionary()
        )

    def of(self, settings: ConnectionSettings) -> SharedBudget:
        """The budget of the connection's API key on the running loop (made on first use)."""
        key = hashlib.sha256(f"{settings.base_url}\0{settings.api_key}".encode()).hexdigest()
        budgets = self._budgets.setdefault(asyncio.get_running_loop(), {})
        budget = budgets.get(key)
        if budget is None:
            budget = budgets[key] = SharedBudget(settings.requests_per_minute)
        else:
            budget.policy.set_ceiling(settings.requests_per_minute)
        return budget

    def clear(self) -> None:
        self._budgets.clear()


BUDGETS = Budgets()
