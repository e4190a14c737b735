"""
One request budget per API key: when the next request of a key may go.

Every trigger of one API key in a triggerer process asks the same budget before each request,
so a plan's quota is shared instead of discovered by each trigger's own 429s. The budget learns
the plan from three sources, best first:

* **The answers' headers.** AltaBots sends ``X-RateLimit-Limit``, ``X-RateLimit-Remaining`` and
  ``X-RateLimit-Reset`` on every answer (:class:`~airflow_provider_altabots.protocol.Quota`).
  ``Remaining`` with a reset is a window: the budget spreads what remains of it evenly until its
  reset, counting its own requests sent since the answer that told it; when nothing remains it
  holds every request until the reset. After a reset one request goes first and its answer
  tells the new window's figures, so a reset is not a stampede. The remaining count is the
  key's, whoever spent it (workers' invokes, other triggerers), so several triggerers pace
  themselves by the same figure. The answer to a later request is the server's newer word: it
  is taken even when its window ends sooner or its limit differs (the plan was changed); only
  within one window (same reset and limit) are two answers compared, the one leaving less
  being kept, and an answer to an earlier request whose window ends sooner is a late answer
  from a window already over. ``Remaining`` without a reset still caps what goes out before
  the next answer; when that reaches 0, every request waits as after a 429 without a hint
  (below), then one goes alone and its answer tells the new figures.
* **The connection's ``requests_per_minute``** (the plan's rate, when the user knows it): no two
  requests closer than its inverse. It is also the ceiling of what is learnt below. A changed
  value applies from the next request, either way, and replaces what 429s taught before.
* **429 answers.** Without a window (no headers, or no reset) a 429 is all there is: it holds
  every request of the key until the oldest answered request of the last
  :data:`WINDOW_SECONDS` ages out of a per-minute window (the vendors' plans count per minute,
  hour or day; the shortest is assumed), and lowers the rate to :data:`DECREASE` times what was
  answered in that window (requests sent for other processes on this budget's turns included,
  requests lost on the way, and the workers' invokes of the runs whose triggers started here).
  Each :data:`WINDOW_SECONDS` without a 429 the rate grows again (see :meth:`RateBudget._raise`),
  never past the ``requests_per_minute`` ceiling when set. 429s of requests sent before the
  last decrease do not lower it again.

Until a rate is known, and while no window is, an unknown key starts slowly (as many requests
in flight as have been answered, plus one). A request that surely never reached the server (its
connection was refused, say) is given back: it spends nothing of the window. A request that
may have reached it but got no answer (a time-out after it was written, a cancellation in
flight, an answer too large to read) counts as spent.

:class:`RateBudget` holds those decisions with no I/O and no clock of its own: every time it is
given is read on one clock. :class:`SharedBudget` serves waiting requests in the order they
asked, on the event loop, and drives its :class:`RateBudget` with a monotonic clock, so a
change of the system's clock neither lengthens nor shortens a hold: what comes in Unix time (a
reset, a deadline, an invoke's time) is converted when it arrives. :data:`BUDGETS` keeps one per
API key and event loop, at most :data:`MAX_KEYS` of them idle. The budget lives in one process: a
worker (a process per task) invokes outside it, and an invoke answered 429 is deferred to the
triggerer's budget (see :class:`~airflow_provider_altabots.triggers.altabots.AltaBotsBudgetTrigger`).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import dataclasses
import hashlib
import math
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

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
#: The most API keys whose budgets one event loop keeps: past it, the budgets least recently
#: asked for are forgotten, as long as they are idle (nothing waiting, unanswered or held back).
#: A forgotten key's next request starts a new budget, which learns the plan again.
MAX_KEYS = 256
#: Fewer answers than this in a window say too little to set a rate from (other processes may
#: have spent most of the window): the rate is lowered and probed back up quickly.
_ENOUGH_TO_LEARN = 5
#: The most answer times (and given-back grants) one budget remembers, whatever the rate.
_REMEMBERED = 4096


@dataclass(frozen=True)
class Ticket:
    """One granted request: when it was granted, and its place in the order of grants."""

    granted_at: float
    number: int


def _ceiling(requests_per_minute: float | None) -> float | None:
    """The rate, in requests a second, kept for a plan of ``requests_per_minute``."""
    return None if requests_per_minute is None else HEADROOM * requests_per_minute / 60.0


class RateBudget:
    """
    The budget's decisions for one API key, with no I/O; every method takes the current time,
    and every time given to one budget is read on the same clock.

    :param requests_per_minute: the plan's rate when the user knows it; ``None`` learns it.
    """

    def __init__(self, requests_per_minute: float | None = None) -> None:
        #: The connection's rate (requests a second, with :data:`HEADROOM`), or ``None``.
        self.ceiling: float | None = _ceiling(requests_per_minute)
        #: The rate requests go at (requests a second), or ``None`` while none is known.
        self.rate: float | None = self.ceiling
        #: The latest figures kept from the answers' headers.
        self.quota: Quota | None = None
        self._quota_number = 0  # grants before the answer that told :attr:`quota`
        #: Requests granted so far.
        self.granted = 0
        #: Requests counted as answered so far (sent for other processes on turns included).
        self.answered = 0
        #: 429s learnt of so far.
        self.refused = 0
        #: No request goes before this time (a 429's hint, or until a minute has room).
        self.blocked_until = -math.inf
        #: No request goes before this time (the pace of the rate, or of what a window has left).
        self.next_free = -math.inf
        self._held_to_reset = -math.inf  # a 429's hold until the kept window's reset
        self._exhausted_until = -math.inf  # nothing remains and no reset is known: held until then
        self._probe: int | None = None  # the grant whose answer is to tell the plan's figures
        self._unanswered: dict[int, float] = {}  # grant number -> when granted, in grant order
        self._released: list[int] = []  # given-back grants, sorted, later than any still counted
        self._answered: list[float] = []  # sorted: when requests of the last window were answered
        self._last_grant_at = -math.inf
        self._spread = 0.0  # the gap the window's figures set after the last grant
        self._lowered_at = -math.inf
        self._raised_at = -math.inf
        self._learnt: float | None = None  # requests a second a window answered before its 429
        self._unsure = False  # the rate was set from too few answers to go by
        self._refused_elsewhere_at = -math.inf
        self._refusals_in_row = 0

    def set_ceiling(self, requests_per_minute: float | None, now: float) -> None:
        """
        Take the connection's ``requests_per_minute`` (it may have been edited since). A changed
        value is the rate from the next request on, raised or lowered, and what 429s taught
        under the old one is forgotten (``None`` learns the rate again); an unchanged value
        changes nothing.
        """
        ceiling = _ceiling(requests_per_minute)
        if ceiling == self.ceiling:
            return
        self.ceiling = self.rate = ceiling
        self._learnt = None
        self._unsure = False
        # 429s to requests sent under the old value teach nothing of the new one.
        self._lowered_at = self._raised_at = now
        gap = 0.0 if ceiling is None else 1.0 / ceiling
        self.next_free = self._last_grant_at + max(gap, self._spread)

    def left(self, now: float) -> int | None:
        """
        Requests the key still allows before the next answer: the latest ``Remaining`` less the
        requests sent since the answer that told it (given-back ones not counted); ``None`` when
        no answer told a ``Remaining`` or its window's reset has passed.
        """
        quota = self.quota
        if quota is None or quota.remaining is None:
            return None
        if quota.reset_at is not None and now >= quota.reset_at:
            return None
        return quota.remaining - self._spent_since(self._quota_number)

    def ready_at(self, now: float) -> float:
        """
        The earliest time the next request may go. Waiting for an answer (the first of a key or
        of a new window, or in the slow start) lasts at most :data:`ANSWER_PATIENCE`: a hanging
        request never holds up the key.
        """
        at = max(now, self.blocked_until, self.next_free, self._held_to_reset)
        quota = self.quota
        left = self.left(now)
        if left is not None and left <= 0 and quota is not None:
            if quota.reset_at is not None:
                return max(at, quota.reset_at + RESET_MARGIN)
            # No reset told: held until a minute has room, then one request goes alone.
            at = max(at, self._exhausted_until)
            if (probe_at := self._awaited(now, self._probe)) is not None:
                at = max(at, probe_at + ANSWER_PATIENCE)
            return at
        if left is None and (probe_at := self._awaited(now, self._probe)) is not None:
            return max(at, probe_at + ANSWER_PATIENCE)  # the first request of a key or window goes alone
        if self.rate is None and not self._window_known():
            # Slow start while nothing is known: as many in flight as have been answered, plus
            # one, so the first requests of a busy key double each round trip instead of all
            # going at once. A request unanswered for ANSWER_PATIENCE counts as answered: a
            # hanging request holds up the others for that long at most.
            recent = sorted(at for at in self._unanswered.values() if at > now - ANSWER_PATIENCE)
            allowed = 1 + self.answered + len(self._unanswered) - len(recent)
            if len(recent) >= allowed:
                return max(at, recent[len(recent) - allowed] + ANSWER_PATIENCE)
        return at

    def idle(self, now: float) -> bool:
        """Nothing of this budget is under way: no request unanswered, none held back."""
        return not self._unanswered and self.ready_at(now) <= now

    def grant(self, now: float) -> Ticket:
        """Let one request go now (the caller checked :meth:`ready_at`)."""
        quota = self.quota
        before = self.left(now)
        exhausted = quota is not None and quota.reset_at is None and before is not None and before <= 0
        self.granted += 1
        self._unanswered[self.granted] = now
        self._last_grant_at = now
        if (
            (self.rate is None and self.granted == 1)
            or (quota is not None and quota.reset_at is not None and now >= quota.reset_at)
            or exhausted
        ):
            # Nothing is known yet, or the window is over, or nothing remains and no reset was
            # told: this answer tells the plan's figures.
            self._probe = self.granted
        gap = 0.0 if self.rate is None else 1.0 / self.rate
        left = self.left(now)
        self._spread = 0.0
        if left is not None and quota is not None and quota.reset_at is not None:
            # The ``left`` requests still allowed, spread evenly over what is left of the window.
            self._spread = (quota.reset_at - now) / (max(left, 0) + 1)
        self.next_free = max(self.next_free, now) + max(gap, self._spread)
        if not exhausted:
            self._note_figures(now)
        return Ticket(now, self.granted)

    def release(self, ticket: Ticket) -> None:
        """
        A granted request surely never reached the server (its connection was refused, say): it
        is given back, and spends nothing of the window.
        """
        if self._unanswered.pop(ticket.number, None) is not None:
            bisect.insort(self._released, ticket.number)
            self._forget_released()

    def lost(self, ticket: Ticket, now: float) -> None:
        """
        A granted request got no answer, though it may have reached the server (a time-out after
        it was written, a cancellation in flight, an answer too large to read): it counts as
        spent, and in the window like an answered request, with nothing to learn from.
        """
        if self._unanswered.pop(ticket.number, None) is not None:
            self._count(now, now)
            self._forget_released()

    def sent_elsewhere(self, ticket: Ticket, now: float) -> None:
        """
        Another process sends the request this turn was granted for (a worker's invoke, after its
        task waited on the triggerer): counted as answered, since it spends the key's window.
        """
        self._unanswered.pop(ticket.number, None)
        self.answered += 1
        self._count(now, now)
        self._forget_released()

    def spent_elsewhere(self, at: float, now: float) -> None:
        """
        Another process spent a request of the key at ``at`` (a worker's invoke, learnt when its
        run's trigger starts): counted in the window it fell in, so what a 429 teaches is the
        key's whole window, not this process's share of it.
        """
        if now - WINDOW_SECONDS < at <= now:
            self.answered += 1
            self._count(at, now)

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
        taken = quota is not None and self._take(quota, ticket.number)
        if not refused:
            self._refusals_in_row = 0
            self.answered += 1
            self._count(now, now)
            self._raise(now)
        else:
            self._block(now, retry_after)
            if not self._window_known() and retry_after is None and ticket.granted_at >= self._lowered_at:
                self._lower(now)
        if taken:
            self._note_figures(now)
        self._forget_released()

    def refused_elsewhere(
        self, now: float, *, quota: Quota | None = None, retry_after: float | None = None
    ) -> None:
        """
        Learn of a 429 another process got (a worker's invoke, reported by its deferred task): it
        holds this budget too, but does not lower the rate, which this process did not cause alone.
        """
        taken = quota is not None and self._take(quota, self.granted, elsewhere=True)
        self._refused_elsewhere_at = now
        self._block(now, retry_after, in_row=False)
        if taken:
            self._note_figures(now)
        self._forget_released()

    def _window_known(self) -> bool:
        """The kept figures make a window: what remains of it, and when it resets."""
        quota = self.quota
        return quota is not None and quota.remaining is not None and quota.reset_at is not None

    def _awaited(self, now: float, number: int | None) -> float | None:
        """When grant ``number`` went out, while its answer is awaited (and not too long)."""
        granted = None if number is None else self._unanswered.get(number)
        return granted if granted is not None and granted > now - ANSWER_PATIENCE else None

    def _spent_since(self, number: int) -> int:
        """Requests granted after grant ``number`` and not given back."""
        released = len(self._released) - bisect.bisect_right(self._released, number)
        return self.granted - number - released

    def _forget_released(self) -> None:
        """
        Keep only the given-back grants some count may still need: those after the answer kept
        and after the oldest grant still unanswered (an answer to come is compared from it).
        """
        floor = min(self._quota_number, next(iter(self._unanswered), self.granted))
        drop = max(bisect.bisect_right(self._released, floor), len(self._released) - _REMEMBERED)
        if drop > 0:
            del self._released[:drop]

    def _count(self, at: float, now: float) -> None:
        """Count a request answered (or spent) at ``at`` in the window; forget what is older."""
        bisect.insort(self._answered, at)
        self._in_window(now)
        if len(self._answered) > _REMEMBERED:
            del self._answered[0]

    def _note_figures(self, now: float) -> None:
        """When the kept figures leave nothing and tell no reset, hold until a minute has room."""
        quota = self.quota
        left = self.left(now)
        if quota is not None and quota.reset_at is None and left is not None and left <= 0:
            self._exhausted_until = self._capacity_frees(now)

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
            # Kept apart from the hint: figures of a new plan lift it (see _take).
            self._held_to_reset = max(self._held_to_reset, reset + RESET_MARGIN)
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
        """
        When the requests counted in the last :data:`WINDOW_SECONDS` were answered (or sent
        elsewhere, or lost); older ones are forgotten.
        """
        answered = self._answered
        del answered[: bisect.bisect_right(answered, now - WINDOW_SECONDS)]
        return answered[: bisect.bisect_right(answered, now)]

    def _capacity_frees(self, now: float) -> float:
        """When a per-minute window surely has room again; backs off while nothing gets through."""
        recent = self._in_window(now)
        if recent:
            return recent[0] + WINDOW_SECONDS
        return now + min(WINDOW_SECONDS, 2.0 ** max(self._refusals_in_row, 1))

    def _take(self, quota: Quota, number: int, *, elsewhere: bool = False) -> bool:
        """
        Keep an answer's figures (of grant ``number``) when they are the server's newer word;
        return whether they were kept.

        The answer to a later request than the kept figures' is newer, even when its window ends
        sooner or its limit differs (the plan was changed), unless it is of the same window and
        leaves more than the kept figures do (the server counted the two requests the other way
        round). An answer to an earlier request, or figures from another process, are kept when
        they are of a later window, or of the same window and leave less; their window ending
        sooner makes them a late answer from a window already over. Without a reset on both,
        nothing tells the windows apart: an answer is kept when it is to the later request, and
        figures from another process always.
        """
        current = self.quota
        same_window = False
        if current is not None:
            newer = not elsewhere and number > self._quota_number
            if quota.reset_at is not None and current.reset_at is not None:
                if not newer and quota.reset_at < current.reset_at - 1.0:
                    return False  # a late answer from a window already over
                same_window = abs(quota.reset_at - current.reset_at) <= 1.0 and (
                    quota.limit == current.limit or not newer
                )
                if (
                    same_window
                    and quota.remaining is not None
                    and current.remaining is not None
                    and quota.remaining - self._spent_since(number)
                    >= current.remaining - self._spent_since(self._quota_number)
                ):
                    return False  # it says more is left than there is
            elif not newer and not elsewhere:
                return False
        if not same_window:
            self._held_to_reset = -math.inf  # a new window's (or plan's) figures: the old reset is moot
        self.quota = quota
        self._quota_number = number
        return True

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

    The budget's decisions are read on ``clock``, which only moves forward; times that come in
    as Unix time (a window's reset, a deadline, an invoke's time) are converted by ``wall`` when
    they arrive, so setting the system's clock back or forth moves no hold.

    :param requests_per_minute: the plan's rate when the user knows it; ``None`` learns it.
    :param clock: seconds on a clock that never jumps (default :func:`time.monotonic`).
    :param wall: the current Unix time (default :func:`time.time`).
    """

    def __init__(
        self,
        requests_per_minute: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.policy = RateBudget(requests_per_minute)
        self._clock = clock
        self._wall = wall
        self._waiting: collections.deque[asyncio.Future[Ticket]] = collections.deque()
        self._changed = asyncio.Event()
        self._serving: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        """Requests waiting for their turn."""
        return sum(1 for future in self._waiting if not future.done())

    @property
    def idle(self) -> bool:
        """Nothing waits, nothing is unanswered, nothing is held back: the budget may be forgotten."""
        return self.waiting == 0 and self.policy.idle(self._clock())

    def set_ceiling(self, requests_per_minute: float | None) -> None:
        """:meth:`RateBudget.set_ceiling` now; a change wakes the waiting requests."""
        ceiling = self.policy.ceiling
        self.policy.set_ceiling(requests_per_minute, self._clock())
        if self.policy.ceiling != ceiling:
            self._changed.set()

    async def acquire(self, until: float | None = None) -> tuple[Ticket | None, float]:
        """
        Wait for this request's turn; return its ticket and the seconds it was held back.

        :param until: Unix time after which the request is no longer wanted: the ticket is then
            ``None`` (the budget did not let it go in time).
        """
        began = self._clock()
        if not self._waiting and self.policy.ready_at(began) <= began:
            return self.policy.grant(began), 0.0
        timeout = None if until is None else max(until - self._wall(), 0.0)
        turn: asyncio.Future[Ticket] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        self._serve()
        try:
            async with asyncio.timeout(timeout):
                ticket = await asyncio.shield(turn)
        except TimeoutError:
            late = self._withdraw(turn)
            if late is None:
                return None, self._clock() - began
            ticket = late
        except asyncio.CancelledError:
            granted = self._withdraw(turn)
            if granted is not None:
                self.release(granted)
            raise
        return ticket, self._clock() - began

    def observe(
        self,
        ticket: Ticket,
        *,
        refused: bool,
        quota: Quota | None = None,
        retry_after: float | None = None,
    ) -> None:
        """:meth:`RateBudget.observe` now, and wake the waiting requests to look again."""
        now = self._clock()
        local = self._local(quota, now)
        self.policy.observe(ticket, now, refused=refused, quota=local, retry_after=retry_after)
        self._changed.set()

    def refused_elsewhere(self, *, quota: Quota | None = None, retry_after: float | None = None) -> None:
        """:meth:`RateBudget.refused_elsewhere` now; ``quota`` tells its reset in Unix time."""
        now = self._clock()
        self.policy.refused_elsewhere(now, quota=self._local(quota, now), retry_after=retry_after)
        self._changed.set()

    def release(self, ticket: Ticket) -> None:
        """:meth:`RateBudget.release`, and wake the waiting requests."""
        self.policy.release(ticket)
        self._changed.set()

    def lost(self, ticket: Ticket) -> None:
        """:meth:`RateBudget.lost` now, and wake the waiting requests."""
        self.policy.lost(ticket, self._clock())
        self._changed.set()

    def sent_elsewhere(self, ticket: Ticket) -> None:
        """:meth:`RateBudget.sent_elsewhere` now, and wake the waiting requests."""
        self.policy.sent_elsewhere(ticket, self._clock())
        self._changed.set()

    def spent_elsewhere(self, at: float) -> None:
        """:meth:`RateBudget.spent_elsewhere` as of now; ``at`` is a Unix time."""
        now = self._clock()
        self.policy.spent_elsewhere(now + (at - self._wall()), now)

    def _local(self, quota: Quota | None, now: float) -> Quota | None:
        """``quota`` with its reset (Unix time) read on the budget's clock, as of ``now``."""
        if quota is None or quota.reset_at is None:
            return quota
        return dataclasses.replace(quota, reset_at=now + (quota.reset_at - self._wall()))

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
            now = self._clock()
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
    """
    One :class:`SharedBudget` per API key (base URL and key) and event loop. Past
    :data:`MAX_KEYS` keys on a loop, the idle budgets least recently asked for are forgotten; a
    budget in use is kept, however many there are.
    """

    def __init__(self) -> None:
        self._budgets: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, collections.OrderedDict[str, SharedBudget]
        ] = weakref.WeakKeyDictionary()

    def __len__(self) -> int:
        """Budgets kept, on every loop."""
        return sum(len(budgets) for budgets in self._budgets.values())

    def of(self, settings: ConnectionSettings) -> SharedBudget:
        """The budget of the connection's API key on the running loop (made on first use)."""
        key = hashlib.sha256(f"{settings.base_url}\0{settings.api_key}".encode()).hexdigest()
        budgets = self._budgets.setdefault(asyncio.get_running_loop(), collections.OrderedDict())
        budget = budgets.get(key)
        if budget is None:
            budget = budgets[key] = SharedBudget(settings.requests_per_minute)
            _forget_idle(budgets)
        else:
            budgets.move_to_end(key)
            budget.set_ceiling(settings.requests_per_minute)
        return budget

    def clear(self) -> None:
        self._budgets.clear()


def _forget_idle(budgets: collections.OrderedDict[str, SharedBudget]) -> None:
    """Past :data:`MAX_KEYS`, drop idle budgets, least recently asked for first (never the newest)."""
    excess = len(budgets) - MAX_KEYS
    if excess <= 0:
        return
    newest = next(reversed(budgets))
    idle: list[str] = []
    for key, budget in budgets.items():
        if len(idle) == excess or key == newest:
            break
        if budget.idle:
            idle.append(key)
    for key in idle:
        del budgets[key]


BUDGETS = Budgets()
