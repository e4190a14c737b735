"""
Faults the emulator can inject into its API answers, for tests.

Faults are set with ``POST /_emulator/faults`` (merged by name; a name set to ``null`` is
removed), cleared with ``DELETE /_emulator/faults`` and shown by ``GET /_emulator/faults``.
Each fault may be limited to some request ``paths`` (a list) and to one ``api_key``; it then
applies only to matching requests. Faults never touch ``/_emulator/`` requests.

* ``rate_limit`` ``{"limit": N, "window_seconds": W, "headers": "ratelimit"|"retry-after"|"none"}``:
  at most N requests per key in a fixed window of W seconds; more answer 429. With
  ``"ratelimit"`` every answer to that key carries ``X-RateLimit-Limit``,
  ``X-RateLimit-Remaining`` and ``X-RateLimit-Reset`` (Unix seconds at the window's end), as
  AltaBots documents; with ``"retry-after"`` a 429 carries ``Retry-After: <seconds>``; with
  ``"none"`` nothing, as GPTBots documents (no header at all). ``rate_limit`` may also be a list
  of such objects, for limits of several keys at once (each with its own ``api_key``, headers
  style and window): a request is counted by the first limit in the list that applies to it,
  and by no other. Setting ``rate_limit`` again replaces the whole list.
* ``server_errors`` ``{"count": N, "status": 500, "after_create": false}``: the next N requests
  answer that status with an error body (code 50000, or ``code``/``message`` if given).
* ``delay`` ``{"seconds": S, "count": N or null, "after_create": false}``: answers are held S
  seconds.
* ``error_in_200`` ``{"count": N, "code": 50000, "message": "..."}``: HTTP 200 whose body is an
  error body.
* ``drop`` ``{"count": N}``: the connection is closed without an answer.

``after_create`` (on every fault but ``rate_limit``) means: handle the request for real first
(an invoke creates its run, which then exists and is billed), then hold back, replace or drop
the answer. A synchronous invoke with an ``after_create`` error or drop does not wait for its
run to end; with an ``after_create`` delay it waits for the end, then the delay.

Emulator's own choices, where the pages are silent:

* ``count`` left out means 1, except for ``delay`` where it means every request; ``null``
  means every request. A fault whose count is used up stays listed with ``remaining: 0``.
* ``rate_limit.headers`` left out means ``"ratelimit"``. Windows are per API key (as sent,
  the empty string when there is none) and start with the first request after the previous
  window ended. Requests answered 429 count in the window too. The 429 body is an error body
  with code 42900; ``Retry-After`` is the whole seconds left in the window, at least 1.
* One request meets at most one of ``drop``, ``server_errors``, ``error_in_200`` (tried in
  that order), after ``rate_limit`` and ``delay``.
* Faults are decided when a request arrives, before its key is checked: a rate limit counts
  requests with a wrong key too, and a fault answer replaces even a 401 or 400.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from .errors import INTERNAL_ERROR, RATE_LIMITED

FAULT_NAMES: Final = ("rate_limit", "server_errors", "delay", "error_in_200", "drop")
RATE_LIMIT_HEADER_STYLES: Final = ("ratelimit", "retry-after", "none")


@dataclass(frozen=True)
class Action:
    """What a fault does to an answer: ``drop`` the connection, or answer an ``error``."""

    kind: str
    status: int = 0
    code: int = 0
    message: str = ""


DROP: Final = Action("drop")


@dataclass
class FaultPlan:
    """What the faults do to one request, decided when it arrives."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    pre_delay: float = 0.0
    pre_action: Action | None = None
    post_delay: float = 0.0
    post_action: Action | None = None


def _number(data: Mapping[str, Any], key: str, default: float | None, *, minimum: float = 0) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key} must be a number")
    if value < minimum:
        raise ValueError(f"{key} must be >= {minimum}")
    return float(value)


def _integer(data: Mapping[str, Any], key: str, default: int | None) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be an integer >= 0")
    return value


class _Fault:
    """What every fault has: the requests it applies to and how many it still affects."""

    name = ""
    default_count: int | None = 1
    #: What the fault does to an answer it affects (None for faults that only count or delay).
    action: Action | None = None
    extra_fields: frozenset[str] = frozenset()

    def __init__(self, data: Mapping[str, Any]) -> None:
        allowed = {"paths", "api_key", "count", "after_create"} | self.extra_fields
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"{self.name}: unknown field(s) {', '.join(unknown)}")
        paths = data.get("paths")
        if paths is not None and (not isinstance(paths, list) or not all(isinstance(p, str) for p in paths)):
            raise ValueError(f"{self.name}.paths must be a list of strings")
        self.paths: frozenset[str] | None = frozenset(paths) if paths is not None else None
        api_key = data.get("api_key")
        if api_key is not None and not isinstance(api_key, str):
            raise ValueError(f"{self.name}.api_key must be a string")
        self.api_key: str | None = api_key
        if "count" in data and data["count"] is None:
            self.remaining: int | None = None
        elif "count" in data or self.default_count is not None:
            try:
                self.remaining = _integer(data, "count", self.default_count)
            except ValueError as exc:
                raise ValueError(f"{self.name}.{exc}") from None
        else:
            self.remaining = None
        after_create = data.get("after_create", False)
        if not isinstance(after_create, bool):
            raise ValueError(f"{self.name}.after_create must be a boolean")
        self.after_create = after_create
        self.hits = 0

    def applies(self, path: str, api_key: str) -> bool:
        """Whether this fault concerns a request to ``path`` with ``api_key``."""
        if self.paths is not None and path not in self.paths:
            return False
        return self.api_key is None or self.api_key == api_key

    def take(self) -> bool:
        """Use up one of the fault's requests; False when none is left."""
        if self.remaining is not None:
            if self.remaining <= 0:
                return False
            self.remaining -= 1
        self.hits += 1
        return True

    def describe(self) -> dict[str, Any]:
        """The fault as ``GET /_emulator/faults`` shows it."""
        return {
            "paths": sorted(self.paths) if self.paths is not None else None,
            "api_key": self.api_key,
            "remaining": self.remaining,
            "after_create": self.after_create,
            "hits": self.hits,
        }


class _ServerErrors(_Fault):
    name = "server_errors"
    extra_fields = frozenset({"status", "code", "message"})

    #: The HTTP status of the answer; None means ``status`` is read from the settings.
    fixed_status: int | None = None

    def __init__(self, data: Mapping[str, Any]) -> None:
        super().__init__(data)
        if self.fixed_status is not None:
            status = self.fixed_status
        else:
            status = data.get("status", 500)
            if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
                raise ValueError(f"{self.name}.status must be an HTTP error status (400-599)")
        code = data.get("code", INTERNAL_ERROR)
        if isinstance(code, bool) or not isinstance(code, int):
            raise ValueError(f"{self.name}.code must be an integer")
        message = data.get("message", "internal error (injected by the emulator)")
        if not isinstance(message, str):
            raise ValueError(f"{self.name}.message must be a string")
        self.error = Action("error", status, code, message)
        self.action = self.error

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "status": self.error.status,
            "code": self.error.code,
            "message": self.error.message,
        }


class _ErrorIn200(_ServerErrors):
    name = "error_in_200"
    extra_fields = frozenset({"code", "message"})
    fixed_status = 200


class _Drop(_Fault):
    name = "drop"
    action: Action | None = DROP


class _Delay(_Fault):
    name = "delay"
    default_count = None
    extra_fields = frozenset({"seconds"})

    def __init__(self, data: Mapping[str, Any]) -> None:
        super().__init__(data)
        try:
            self.seconds = _number(data, "seconds", None)
        except ValueError as exc:
            raise ValueError(f"delay.{exc}") from None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "seconds": self.seconds}


class _RateLimit(_Fault):
    name = "rate_limit"
    default_count = None
    extra_fields = frozenset({"limit", "window_seconds", "headers"})

    def __init__(self, data: Mapping[str, Any]) -> None:
        if "count" in data or "after_create" in data:
            raise ValueError("rate_limit takes no count or after_create")
        super().__init__(data)
        try:
            self.limit = _integer(data, "limit", None)
            self.window_seconds = _number(data, "window_seconds", 60, minimum=0.001)
        except ValueError as exc:
            raise ValueError(f"rate_limit.{exc}") from None
        style = data.get("headers", "ratelimit")
        if style not in RATE_LIMIT_HEADER_STYLES:
            raise ValueError(f"rate_limit.headers must be one of {', '.join(RATE_LIMIT_HEADER_STYLES)}")
        self.header_style: str = style
        # api key -> [window end (epoch s), requests counted in the window]
        self.windows: dict[str, list[float]] = {}

    def count(self, api_key: str, now: float, plan: FaultPlan) -> bool:
        """Count one request of ``api_key``; add headers to ``plan``; True when over the limit."""
        window = self.windows.get(api_key)
        if window is None or now >= window[0]:
            window = [now + self.window_seconds, 0]
            self.windows[api_key] = window
        window[1] += 1
        used = int(window[1])
        over = used > self.limit
        if over:
            self.hits += 1
        if self.header_style == "ratelimit":
            plan.headers += [
                ("X-RateLimit-Limit", str(self.limit)),
                ("X-RateLimit-Remaining", str(max(0, self.limit - used))),
                ("X-RateLimit-Reset", str(math.ceil(window[0]))),
            ]
        elif over and self.header_style == "retry-after":
            plan.headers.append(("Retry-After", str(max(1, math.ceil(window[0] - now)))))
        return over

    def describe(self) -> dict[str, Any]:
        data = super().describe()
        del data["remaining"], data["after_create"]
        return {
            **data,
            "limit": self.limit,
            "window_seconds": self.window_seconds,
            "headers": self.header_style,
            "windows": {key: {"ends": end, "count": int(n)} for key, (end, n) in self.windows.items()},
        }


class _RateLimits:
    """``rate_limit`` given as a list: several limits, each request counted by the first that applies."""

    def __init__(self, items: list[Any]) -> None:
        if not items:
            raise ValueError("rate_limit: the list is empty (null removes the fault)")
        self.limits: list[_RateLimit] = []
        for number, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise ValueError(f"rate_limit[{number}] must be an object")
            try:
                self.limits.append(_RateLimit(item))
            except ValueError as exc:
                raise ValueError(f"rate_limit[{number}]: {exc}") from None

    def applying(self, path: str, api_key: str) -> _RateLimit | None:
        """The limit that counts a request to ``path`` with ``api_key``; None when none does."""
        return next((limit for limit in self.limits if limit.applies(path, api_key)), None)

    def describe(self) -> list[dict[str, Any]]:
        return [limit.describe() for limit in self.limits]


_FAULT_TYPES: Final[dict[str, type[_Fault]]] = {
    "rate_limit": _RateLimit,
    "server_errors": _ServerErrors,
    "delay": _Delay,
    "error_in_200": _ErrorIn200,
    "drop": _Drop,
}


class Faults:
    """The faults in force, and the decision of what they do to each request."""

    def __init__(self) -> None:
        self._faults: dict[str, _Fault | _RateLimits] = {}

    @property
    def active(self) -> bool:
        """Whether any fault is set (when none is, requests skip fault handling entirely)."""
        return bool(self._faults)

    def configure(self, data: Mapping[str, Any]) -> None:
        """Merge ``data`` (fault name -> settings, or None to remove) into the faults in force.

        All of ``data`` is checked before anything changes; ``ValueError`` names the wrong field.
        """
        if not isinstance(data, Mapping):
            raise ValueError("faults must be an object")
        made: dict[str, _Fault | _RateLimits | None] = {}
        for name, settings in data.items():
            fault_type = _FAULT_TYPES.get(name)
            if fault_type is None:
                raise ValueError(f"unknown fault {name!r}; known: {', '.join(FAULT_NAMES)}")
            if settings is None:
                made[name] = None
                continue
            if name == "rate_limit" and isinstance(settings, list):
                made[name] = _RateLimits(settings)
                continue
            if not isinstance(settings, Mapping):
                raise ValueError(f"{name} must be an object")
            made[name] = fault_type(settings)
        for name, fault in made.items():
            if fault is None:
                self._faults.pop(name, None)
            else:
                self._faults[name] = fault

    def clear(self) -> None:
        """Remove every fault."""
        self._faults.clear()

    def describe(self) -> dict[str, Any]:
        """The faults in force, by name (``rate_limit`` as a list when it was set as one)."""
        return {name: self._faults[name].describe() for name in FAULT_NAMES if name in self._faults}

    def plan(self, path: str, api_key: str, now: float) -> FaultPlan | None:
        """Decide what the faults do to a request (using up counts); None when nothing."""
        faults = self._faults
        plan = FaultPlan()
        touched = False
        rate_limit = faults.get("rate_limit")
        if isinstance(rate_limit, _RateLimits):
            rate_limit = rate_limit.applying(path, api_key)
        if isinstance(rate_limit, _RateLimit) and rate_limit.applies(path, api_key):
            touched = True
            if rate_limit.count(api_key, now, plan):
                message = (
                    f"rate limit exceeded: at most {rate_limit.limit} requests "
                    f"per {rate_limit.window_seconds:g} seconds"
                )
                plan.pre_action = Action("error", 429, RATE_LIMITED, message)
                return plan
        delay = faults.get("delay")
        if isinstance(delay, _Delay) and delay.applies(path, api_key) and delay.take():
            touched = True
            if delay.after_create:
                plan.post_delay = delay.seconds
            else:
                plan.pre_delay = delay.seconds
        for name in ("drop", "server_errors", "error_in_200"):
            fault = faults.get(name)
            if not isinstance(fault, _Fault) or fault.action is None or not fault.applies(path, api_key):
                continue
            if fault.take():
                touched = True
                action = fault.action
                if fault.after_create:
                    plan.post_action = action
                else:
                    plan.pre_action = action
                break
        return plan if touched else None
