"""
The emulated API: its endpoints, its state, and the ``/_emulator/`` inspection endpoints.

Vendor endpoints (as the vendor's pages describe them):

* ``POST /v1/workflow/invoke`` starts a run of the key's workflow. ``isAsync: true`` answers at
  once ``{workflowId, workflowName, workflowVersion, workflowRunId, status: "PENDING"}``;
  otherwise the answer is held until the run ends and is the whole run record.
* ``POST /v1/workflow/query/result`` with ``{"workflowRunId": "..."}`` answers the run record.
* ``GET /v1/api-key/verify`` checks the key.

The key is read from ``Authorization: Bearer <key>`` (newer pages) or ``Authorization: <key>``
(older pages). A missing or unknown key answers 401 with code 40127.

Emulator's own choices, where the pages are silent:

* A body that is not a JSON object, or a field of the wrong type, answers 400 with code 40000
  and a message naming the field. ``null`` counts as absent for the optional fields
  (``userId``, ``isAsync``, ``webhook``, ``webhook[].headers``); webhook header values must be
  strings. The input is not checked against a Start node (the emulator has none).
* A run id that is unknown, or that belongs to another key's workflow, answers 400 with code
  40000 (``workflowRunId not found``); the two cases are not told apart.
* A synchronous invoke answers 200 with the run record whether the run succeeded or failed.
  It waits at most ``sync_timeout`` seconds (300 by default), then answers the record as it
  stands (``RUNNING``), which the client must then poll.
* ``GET /v1/api-key/verify`` answers 200 ``{"code": 0, "message": "OK", "data": {"valid": true,
  "workflowId": ..., "workflowName": ..., "workflowVersion": ...}}``.
* An unknown path answers 404 (code 40400); a wrong method answers 405 (code 40500).
* Runs are kept until ``POST /_emulator/reset``; there is no retention limit.

Inspection endpoints (no auth; the emulator's own, not the vendor's); they answer
``{"error": "..."}`` with 400, 404 or 405 when asked wrongly:

* ``GET /_emulator/health``: ``{"status": "ok", ...}``.
* ``GET|POST /_emulator/workflows``: list, or add/replace one with
  ``{"api_key": "...", "name": ..., "run_seconds": ..., ...}`` (fields left out take the
  start-up defaults).
* ``GET|POST|DELETE /_emulator/faults``: see :mod:`.faults`.
* ``GET|DELETE /_emulator/requests``: the log of API requests received (``seq``, ``time``,
  ``method``, ``path``, ``headers``, ``body``, ``status``, ``dropped``, and ``answered``: when the
  answer was sent, ``limit_headers``: its ``Retry-After``/``X-RateLimit-*`` headers), oldest first, the last
  200,000 kept; filters ``?path=``, ``?since=<seq>``, ``?limit=<n>`` (the last n).
* ``GET /_emulator/stats``: request counts (total, by path, by status), invokes, runs by status.
* ``GET /_emulator/runs`` (``?status=``) and ``GET /_emulator/runs/<id>``: the emulator's view
  of runs (created, started and ends-at times in epoch seconds, status).
* ``POST /_emulator/runs/<id>/end`` (body ``{"outcome": "succeed"|"fail"}``, default succeed):
  end a run that is still going, now; for tests that end a run when a condition holds rather
  than after a time. Its webhooks are not called.
* ``GET|DELETE /_emulator/webhooks``: the webhook delivery log.
* ``POST /_emulator/reset``: forget runs, logs, counters and faults; workflows go back to the
  start-up config.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter, deque
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs

from . import errors
from .faults import Faults
from .server import Request, Response, json_response
from .webhooks import WebhookDeliveries
from .workflows import STATUSES, Run, WorkflowConfig

if TYPE_CHECKING:
    from collections.abc import Awaitable, Mapping

    from .faults import Action, FaultPlan

INVOKE_PATH: Final = "/v1/workflow/invoke"
QUERY_PATH: Final = "/v1/workflow/query/result"
VERIFY_PATH: Final = "/v1/api-key/verify"
ADMIN_PREFIX: Final = "/_emulator"
MAX_WEBHOOKS: Final = 5


def api_key_from(authorization: str | None) -> str:
    """The API key in an ``Authorization`` header, with or without ``Bearer``; "" if none."""
    if not authorization:
        return ""
    value = authorization.strip()
    if value[:7].lower() == "bearer ":
        return value[7:].strip()
    return value


def invoke_body_error(data: Mapping[str, Any]) -> str | None:
    """What is wrong with an invoke body, naming the field; None when it is valid."""
    run_input = data.get("input")
    if run_input is None:
        return "input is required"
    if not isinstance(run_input, dict):
        return "input must be an object"
    user_id = data.get("userId")
    if user_id is not None and not isinstance(user_id, str):
        return "userId must be a string"
    is_async = data.get("isAsync")
    if is_async is not None and not isinstance(is_async, bool):
        return "isAsync must be a boolean"
    webhooks = data.get("webhook")
    if webhooks is None:
        return None
    if not isinstance(webhooks, list):
        return "webhook must be an array"
    if len(webhooks) > MAX_WEBHOOKS:
        return f"webhook accepts at most {MAX_WEBHOOKS} entries"
    for index, webhook in enumerate(webhooks):
        where = f"webhook[{index}]"
        if not isinstance(webhook, dict):
            return f"{where} must be an object"
        for name in ("method", "url"):
            if not isinstance(webhook.get(name), str) or not webhook[name].strip():
                return f"{where}.{name} is required and must be a non-empty string"
        headers = webhook.get("headers")
        if headers is not None:
            if not isinstance(headers, dict):
                return f"{where}.headers must be an object"
            if not all(isinstance(value, str) for value in headers.values()):
                return f"{where}.headers values must be strings"
    return None


def _header_dict(raw: tuple[tuple[bytes, bytes], ...]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in raw:
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


#: Answer headers kept in the request log, so tests can check a client waited as it was told.
_LIMIT_HEADERS = frozenset({"retry-after", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"})


class LoggedRequest:
    """One API request in the request log (kept compact; decoded when shown)."""

    __slots__ = (
        "answered",
        "body",
        "dropped",
        "limit_headers",
        "method",
        "path",
        "raw_headers",
        "seq",
        "status",
        "time",
    )

    def __init__(
        self,
        seq: int,
        when: float,
        method: str,
        path: str,
        raw_headers: tuple[tuple[bytes, bytes], ...],
        body: bytes,
    ) -> None:
        self.seq = seq
        self.time = when
        self.method = method
        self.path = path
        self.raw_headers = raw_headers
        self.body = body
        self.status: int | None = None
        self.dropped = False
        self.answered: float | None = None
        self.limit_headers: dict[str, str] = {}

    def to_json(self) -> dict[str, Any]:
        """The entry as ``GET /_emulator/requests`` shows it."""
        try:
            body = json.loads(self.body) if self.body else None
        except ValueError:
            body = None
        return {
            "seq": self.seq,
            "time": self.time,
            "method": self.method,
            "path": self.path,
            "headers": _header_dict(self.raw_headers),
            "body": body,
            "status": self.status,
            "dropped": self.dropped,
            "answered": self.answered,
            "limit_headers": self.limit_headers,
        }


class EmulatorApp:
    """The emulator's state and request handling (runs inside one event loop; not thread-safe).

    ``workflows`` maps each API key to its workflow; ``defaults`` fills the fields a workflow
    added later leaves out.
    """

    def __init__(
        self,
        workflows: Mapping[str, WorkflowConfig],
        *,
        defaults: WorkflowConfig | None = None,
        error_style: str = "gptbots",
        sync_timeout: float = 300.0,
        webhook_timeout: float = 5.0,
        request_log_size: int = 200_000,
        seed: int | None = None,
    ) -> None:
        if error_style not in errors.ERROR_STYLES:
            raise ValueError(f"error_style must be one of {', '.join(errors.ERROR_STYLES)}")
        self.defaults = defaults or WorkflowConfig()
        self._initial_workflows = {key: config.for_key(key) for key, config in workflows.items()}
        self.workflows = dict(self._initial_workflows)
        self.error_style = error_style
        self.sync_timeout = sync_timeout
        self.faults = Faults()
        self.webhooks = WebhookDeliveries(webhook_timeout)
        self.runs: dict[str, Run] = {}
        self.requests: deque[LoggedRequest] = deque(maxlen=request_log_size)
        # Draws run times and failures; nothing secret depends on it.
        self._rng = random.Random(seed)  # noqa: S311
        self.started = time.time()
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._seq = 0
        self.total_requests = 0
        self.by_path: Counter[str] = Counter()
        self.by_status: Counter[int] = Counter()
        self.invokes = 0
        self.dropped = 0
        self.sync_waiting = 0

    # ------------------------------------------------------------------ requests

    def handle(self, request: Request) -> Response | Awaitable[Response]:
        """Answer one HTTP request (the server's handler)."""
        path = request.path
        if path.startswith(ADMIN_PREFIX):
            return self._admin(request)
        now = time.time()
        self._seq += 1
        entry = LoggedRequest(self._seq, now, request.method, path, request.raw_headers, request.body)
        self.requests.append(entry)
        self.total_requests += 1
        self.by_path[path] += 1
        key = api_key_from(request.headers.get("authorization"))
        if self.faults.active:
            plan = self.faults.plan(path, key, now)
            if plan is not None:
                return self._faulted(request, key, entry, plan)
        result = self._route(request, key, now, hold=True)
        if isinstance(result, Response):
            self._answered(entry, result)
            return result
        return self._answer_later(entry, result)

    def _answered(self, entry: LoggedRequest, response: Response) -> None:
        entry.answered = time.time()
        entry.limit_headers = {
            name: value for name, value in response.headers if name.lower() in _LIMIT_HEADERS
        }
        if response.drop:
            entry.dropped = True
            self.dropped += 1
        else:
            entry.status = response.status
            self.by_status[response.status] += 1

    async def _answer_later(self, entry: LoggedRequest, pending: Awaitable[Response]) -> Response:
        response = await pending
        self._answered(entry, response)
        return response

    async def _faulted(self, request: Request, key: str, entry: LoggedRequest, plan: FaultPlan) -> Response:
        if plan.pre_delay:
            await asyncio.sleep(plan.pre_delay)
        if plan.pre_action is not None:
            response = self._action_response(plan.pre_action)
        else:
            result = self._route(request, key, time.time(), hold=plan.post_action is None)
            response = result if isinstance(result, Response) else await result
            if plan.post_delay:
                await asyncio.sleep(plan.post_delay)
            if plan.post_action is not None:
                response = self._action_response(plan.post_action)
        if not response.drop:
            response.headers.extend(plan.headers)
        self._answered(entry, response)
        return response

    def _action_response(self, action: Action) -> Response:
        if action.kind == "drop":
            return Response(0, drop=True)
        body = errors.encode_error(self.error_style, action.code, action.message, action.status)
        return Response(action.status, body)

    def error(self, status: int, message: str, code: int | None = None) -> Response:
        """An error answer in the emulator's error style."""
        if code is None:
            code = errors.code_for_status(status)
        return Response(status, errors.encode_error(self.error_style, code, message, status))

    def error_body(self, status: int, message: str) -> bytes:
        """The body of an error the HTTP layer answers itself (malformed requests)."""
        return errors.encode_error(self.error_style, errors.code_for_status(status), message, status)

    def _route(self, request: Request, key: str, now: float, *, hold: bool) -> Response | Awaitable[Response]:
        path = request.path
        if path == QUERY_PATH:
            if request.method != "POST":
                return self.error(405, f"{path} accepts POST only")
            return self._query(request, key, now)
        if path == INVOKE_PATH:
            if request.method != "POST":
                return self.error(405, f"{path} accepts POST only")
            return self._invoke(request, key, now, hold=hold)
        if path == VERIFY_PATH:
            if request.method != "GET":
                return self.error(405, f"{path} accepts GET only")
            return self._verify(key)
        return self.error(404, f"no such endpoint: {request.method} {path}")

    def _unauthorized(self, key: str) -> Response:
        if not key:
            return self.error(401, "authentication failed: no API key in the Authorization header")
        return self.error(401, "authentication failed: unknown API key")

    def _json_object(self, request: Request) -> dict[str, Any] | Response:
        try:
            data = json.loads(request.body) if request.body else None
        except ValueError:
            return self.error(400, "the request body is not valid JSON")
        if not isinstance(data, dict):
            return self.error(400, "the request body must be a JSON object")
        return data

    def _query(self, request: Request, key: str, now: float) -> Response:
        if key not in self.workflows:
            return self._unauthorized(key)
        data = self._json_object(request)
        if isinstance(data, Response):
            return data
        run_id = data.get("workflowRunId")
        if not isinstance(run_id, str) or not run_id:
            return self.error(400, "workflowRunId is required and must be a string")
        run = self.runs.get(run_id)
        if run is None or run.api_key != key:
            return self.error(400, f"workflowRunId not found: {run_id}")
        return Response(200, run.record_bytes(now))

    def _invoke(
        self, request: Request, key: str, now: float, *, hold: bool
    ) -> Response | Awaitable[Response]:
        workflow = self.workflows.get(key) if key else None
        if workflow is None:
            return self._unauthorized(key)
        data = self._json_object(request)
        if isinstance(data, Response):
            return data
        problem = invoke_body_error(data)
        if problem is not None:
            return self.error(400, problem)
        self.invokes += 1
        run_seconds = workflow.run_seconds
        if isinstance(run_seconds, tuple):
            run_seconds = self._rng.uniform(run_seconds[0], run_seconds[1])
        succeeds: bool | None
        if workflow.outcome == "never":
            succeeds = None
        elif workflow.outcome == "fail":
            succeeds = False
        else:
            succeeds = not (workflow.fail_rate > 0 and self._rng.random() < workflow.fail_rate)
        is_async = bool(data.get("isAsync"))
        run = Run(
            run_id=str(uuid.uuid4()),
            api_key=key,
            workflow=workflow,
            run_input=data["input"],
            user_id=data.get("userId"),
            is_async=is_async,
            webhooks=list(data.get("webhook") or []),
            created=now,
            run_seconds=float(run_seconds),
            succeeds=succeeds,
        )
        self.runs[run.run_id] = run
        if is_async:
            self.webhooks.schedule(run)
            return json_response(200, run.accepted())
        if not hold:
            return Response(200, run.record_bytes(now))
        return self._wait_for_end(run)

    async def _wait_for_end(self, run: Run) -> Response:
        self.sync_waiting += 1
        try:
            deadline = time.time() + self.sync_timeout
            while True:
                now = time.time()
                if run.ended(now) or now >= deadline:
                    break
                until = deadline if run.ends_at is None else min(run.ends_at, deadline)
                await asyncio.sleep(max(0.0, until - now) + 0.0005)
        finally:
            self.sync_waiting -= 1
        return Response(200, run.record_bytes(time.time()))

    def _verify(self, key: str) -> Response:
        workflow = self.workflows.get(key) if key else None
        if workflow is None:
            return self._unauthorized(key)
        return json_response(
            200,
            {
                "code": 0,
                "message": "OK",
                "data": {
                    "valid": True,
                    "workflowId": workflow.workflow_id,
                    "workflowName": workflow.name,
                    "workflowVersion": workflow.version,
                },
            },
        )

    # ------------------------------------------------------------------ inspection

    def set_workflow(self, api_key: str, config: Mapping[str, Any]) -> dict[str, Any]:
        """Add or replace the workflow of ``api_key`` (fields left out take the defaults)."""
        if not isinstance(api_key, str) or not api_key.strip():
            raise ValueError("api_key must be a non-empty string")
        workflow = self.defaults.with_changes(config).for_key(api_key)
        self.workflows[api_key] = workflow
        return {"api_key": api_key, **workflow.to_json()}

    def list_workflows(self) -> list[dict[str, Any]]:
        """Every API key with its workflow."""
        return [{"api_key": key, **config.to_json()} for key, config in self.workflows.items()]

    def list_requests(
        self, path: str | None = None, since: int = 0, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """The request log, oldest first.

        Only requests to ``path`` if given, only those after sequence number ``since``, and only
        the last ``limit`` of them if given.
        """
        chosen = [
            entry for entry in self.requests if entry.seq > since and (path is None or entry.path == path)
        ]
        if limit is not None:
            chosen = chosen[-limit:] if limit > 0 else []
        return [entry.to_json() for entry in chosen]

    def list_runs(self, status: str | None = None) -> list[dict[str, Any]]:
        """The emulator's view of every run, oldest first (only ``status`` if given)."""
        now = time.time()
        views = (run.internal(now) for run in self.runs.values())
        return [view for view in views if status is None or view["status"] == status]

    def run_detail(self, run_id: str) -> dict[str, Any] | None:
        """One run's internal state and its current record; None if unknown."""
        run = self.runs.get(run_id)
        if run is None:
            return None
        now = time.time()
        return {**run.internal(now), "record": run.record(now)}

    def stats(self) -> dict[str, Any]:
        """Counts of requests, answers and runs."""
        now = time.time()
        runs_by_status = dict.fromkeys(STATUSES, 0)
        for run in self.runs.values():
            runs_by_status[run.status(now)] += 1
        return {
            "requests": self.total_requests,
            "by_path": dict(self.by_path),
            "by_status": {str(status): n for status, n in sorted(self.by_status.items())},
            "dropped": self.dropped,
            "invokes": self.invokes,
            "runs": len(self.runs),
            "runs_by_status": runs_by_status,
            "sync_waiting": self.sync_waiting,
            "webhook_deliveries": len(self.webhooks.log),
        }

    def reset(self) -> None:
        """Forget runs, logs, counters and faults; workflows go back to the start-up config."""
        self.webhooks.cancel_all()
        self.webhooks.log.clear()
        self.faults.clear()
        self.runs.clear()
        self.requests.clear()
        self.workflows = dict(self._initial_workflows)
        self._reset_counters()

    def health(self) -> dict[str, Any]:
        """A small liveness answer."""
        return {
            "status": "ok",
            "uptime_seconds": round(time.time() - self.started, 3),
            "error_style": self.error_style,
            "api_keys": len(self.workflows),
        }

    def _admin(self, request: Request) -> Response:
        method = request.method
        parts = request.path[len(ADMIN_PREFIX) :].strip("/").split("/")
        name = parts[0]
        query = {k: v[-1] for k, v in parse_qs(request.query).items()}
        try:
            if name == "health" and method == "GET":
                return json_response(200, self.health())
            if name == "workflows":
                if method == "GET":
                    return json_response(200, {"workflows": self.list_workflows()})
                if method == "POST":
                    data = self._admin_body(request)
                    return json_response(200, self.set_workflow(data.pop("api_key", ""), data))
            elif name == "faults":
                if method == "POST":
                    self.faults.configure(self._admin_body(request))
                elif method == "DELETE":
                    self.faults.clear()
                if method in ("GET", "POST", "DELETE"):
                    return json_response(200, {"faults": self.faults.describe()})
            elif name == "requests":
                if method == "GET":
                    since = int(query.get("since", "0"))
                    limit = int(query["limit"]) if "limit" in query else None
                    listed = self.list_requests(query.get("path"), since, limit)
                    return json_response(200, {"requests": listed})
                if method == "DELETE":
                    self.requests.clear()
                    return json_response(200, {"requests": []})
            elif name == "stats" and method == "GET":
                return json_response(200, self.stats())
            elif name == "runs" and method == "POST" and len(parts) == 3 and parts[2] == "end":
                run = self.runs.get(parts[1])
                if run is None:
                    return json_response(404, {"error": f"no such run: {parts[1]}"})
                outcome = self._admin_body(request).get("outcome", "succeed")
                if outcome not in ("succeed", "fail"):
                    raise ValueError("outcome must be 'succeed' or 'fail'")
                run.end_now(time.time(), succeeds=outcome == "succeed")
                return json_response(200, self.run_detail(run.run_id))
            elif name == "runs" and method == "GET":
                if len(parts) == 1:
                    return json_response(200, {"runs": self.list_runs(query.get("status"))})
                detail = self.run_detail(parts[1]) if len(parts) == 2 else None
                if detail is None:
                    return json_response(404, {"error": f"no such run: {'/'.join(parts[1:])}"})
                return json_response(200, detail)
            elif name == "webhooks":
                if method == "GET":
                    return json_response(200, {"deliveries": self.webhooks.entries()})
                if method == "DELETE":
                    self.webhooks.log.clear()
                    return json_response(200, {"deliveries": []})
            elif name == "reset" and method == "POST":
                self.reset()
                return json_response(200, {"status": "reset"})
            elif name not in ("health", "stats", "reset"):
                return json_response(404, {"error": f"no such emulator endpoint: {request.path}"})
        except ValueError as exc:
            return json_response(400, {"error": str(exc)})
        return json_response(405, {"error": f"{method} not allowed on {request.path}"})

    @staticmethod
    def _admin_body(request: Request) -> dict[str, Any]:
        try:
            data = json.loads(request.body) if request.body else {}
        except ValueError:
            raise ValueError("the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ValueError("the request body must be a JSON object")
        return data
