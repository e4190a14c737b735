"""
The AltaBots workflow API: requests, answers, statuses and errors, with no I/O.

This module is the one place that knows the wire format. The synchronous transport
(``requests``, on workers) and the asynchronous one (``httpx``, in triggers) both build their
requests and read their answers here, so they cannot drift apart.

What the vendor's pages say, and what they leave open, is summarised below; where they are
silent this module takes the safe reading and says so.

* ``POST /v1/workflow/invoke`` starts a run. With ``isAsync`` true it answers at once with the
  run id and status ``PENDING``; otherwise it answers when the run ends, with the run record.
* ``POST /v1/workflow/query/result`` answers the run record of a run id.
* ``GET /v1/api-key/verify`` checks a key (used by :meth:`AltaBotsHook.test_connection`).
* Statuses: ``PENDING``, ``RUNNING``, ``SUCCEED``, ``FAILED``. Anything else is *unknown*: it is
  never taken for success (one older page spells success ``SUCCED``; that is treated as a typo,
  so such a status keeps the task waiting and warns).
* Error bodies come in two shapes, ``{"code": 40127, "message": "..."}`` (GPTBots) and
  ``{"error": {"code": "...", "message": "...", "status": 400}}`` (AltaBots). A non-zero
  ``code`` in a 2xx answer is an error too. Which HTTP status goes with which code is not
  documented, so both are read.
* There is no idempotency key and no cancel endpoint.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from airflow_provider_altabots.exceptions import (
    AltaBotsApiError,
    AltaBotsAuthError,
    AltaBotsConfigError,
    AltaBotsTransientError,
)

DEFAULT_BASE_URL = "https://altatech.ai"
INVOKE_PATH = "/v1/workflow/invoke"
RESULT_PATH = "/v1/workflow/query/result"
VERIFY_PATH = "/v1/api-key/verify"

#: ``auth_scheme`` values: ``bearer`` sends ``Authorization: Bearer <key>`` (newer pages);
#: ``raw`` sends ``Authorization: <key>`` (older pages).
AUTH_SCHEMES = ("bearer", "raw")
DEFAULT_TIMEOUT = 30.0

#: The API accepts at most this many webhooks per invoke.
MAX_WEBHOOKS = 5
#: Methods accepted for a webhook. The pages show POST and GET; the other usual methods of a
#: callback are allowed too, anything else is refused before a request is sent.
WEBHOOK_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})

PENDING = "PENDING"
RUNNING = "RUNNING"
SUCCEED = "SUCCEED"
FAILED = "FAILED"
ACTIVE_STATUSES = frozenset({PENDING, RUNNING})

StatusKind = Literal["succeeded", "failed", "active", "unknown"]

#: What the known error codes mean and what to do about them.
CODE_HINTS: dict[int, str] = {
    40000: "parameter error: check that `input` matches the parameters of the workflow's Start node",
    40127: "authentication failed",
    20022: "insufficient credits: top up the account's credits",
    20055: "the API is switched off for this agent or workflow: enable it in the vendor's console",
    50000: "internal error on the API side",
}
AUTH_CODE = 40127
#: Codes that mean the API side failed, so asking again later may work.
SERVER_CODES = frozenset({50000})

#: Fields of the run record that are left out of the ``workflow_run`` XCom.
BULKY_FIELDS = ("input", "output")


def status_kind(status: object) -> StatusKind:
    """Classify a run status: ``succeeded``, ``failed``, ``active`` or ``unknown`` (never success)."""
    if status == SUCCEED:
        return "succeeded"
    if status == FAILED:
        return "failed"
    if status in ACTIVE_STATUSES:
        return "active"
    return "unknown"


@dataclass(frozen=True)
class ConnectionSettings:
    """
    Where and how to reach the API, read from an Airflow connection.

    :param base_url: scheme and host, e.g. ``https://altatech.ai`` or ``https://api-sg.gptbots.ai``.
    :param api_key: the workflow's API key (the connection's password). Never shown in ``repr``.
    :param auth_scheme: ``bearer`` or ``raw``.
    :param timeout: seconds allowed for each request.
    """

    conn_id: str
    base_url: str
    api_key: str = field(repr=False)
    auth_scheme: str = "bearer"
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def from_connection(
        cls, conn_id: str, host: str | None, port: int | None, password: str | None, extra: Mapping[str, Any]
    ) -> ConnectionSettings:
        """Validate the fields of an ``altabots`` connection; raise :class:`AltaBotsConfigError`."""
        if not password:
            raise AltaBotsConfigError(
                f"Connection {conn_id!r} has no API key: put the workflow's API key in its password field."
            )
        base_url = _base_url(conn_id, host, port)
        scheme = str(extra.get("auth_scheme") or "bearer").strip().lower()
        if scheme not in AUTH_SCHEMES:
            raise AltaBotsConfigError(
                f"Connection {conn_id!r}: extra auth_scheme must be one of {', '.join(AUTH_SCHEMES)}, "
                f"not {scheme!r}."
            )
        timeout = positive_seconds(extra.get("timeout", DEFAULT_TIMEOUT), f"connection {conn_id!r} timeout")
        return cls(conn_id=conn_id, base_url=base_url, api_key=password, auth_scheme=scheme, timeout=timeout)

    def url(self, path: str) -> str:
        return self.base_url + path

    @property
    def headers(self) -> dict[str, str]:
        """Headers sent with every request, the ``Authorization`` header included."""
        auth = f"Bearer {self.api_key}" if self.auth_scheme == "bearer" else self.api_key
        return {"Authorization": auth, "Content-Type": "application/json", "Accept": "application/json"}


def _base_url(conn_id: str, host: str | None, port: int | None) -> str:
    raw = (host or "").strip().rstrip("/") or DEFAULT_BASE_URL
    if "://" not in raw:
        raw = "https://" + raw
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AltaBotsConfigError(
            f"Connection {conn_id!r}: host must be a base URL such as {DEFAULT_BASE_URL} "
            "or https://api-sg.gptbots.ai."
        )
    if port and parts.port is None:
        raw = f"{parts.scheme}://{parts.netloc}:{port}{parts.path}"
    return raw


def positive_seconds(value: Any, what: str) -> float:
    """``value`` as a finite number of seconds > 0; raise :class:`AltaBotsConfigError` otherwise."""
    if isinstance(value, bool):
        value = None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not number > 0 or math.isinf(number):
        raise AltaBotsConfigError(f"{what} must be a positive number of seconds, not {value!r}.")
    return number


@dataclass(frozen=True)
class ApiRequest:
    """
    One request to the API, before any transport sends it.

    :param action: what the request does, in words, for error messages.
    :param run_id: the run it concerns, when known.
    """

    method: str
    path: str
    body: dict[str, Any] | None
    action: str
    run_id: str | None = None


def invoke_request(
    input: Any,
    *,
    user_id: str | None = None,
    webhooks: Any = None,
    is_async: bool = True,
) -> ApiRequest:
    """Build the invoke request; raise :class:`AltaBotsConfigError` for input the API would refuse."""
    body: dict[str, Any] = {"input": check_input(input), "isAsync": bool(is_async)}
    if user_id is not None:
        if not isinstance(user_id, str) or not user_id:
            raise AltaBotsConfigError(f"user_id must be a non-empty string, not {user_id!r}.")
        body["userId"] = user_id
    if webhooks:
        body["webhook"] = check_webhooks(webhooks)
    return ApiRequest("POST", INVOKE_PATH, body, action="invoke the workflow")


def result_request(run_id: Any) -> ApiRequest:
    """Build the request for a run's record."""
    run_id = check_run_id(run_id)
    return ApiRequest(
        "POST", RESULT_PATH, {"workflowRunId": run_id}, action=f"query workflow run {run_id}", run_id=run_id
    )


def verify_request() -> ApiRequest:
    return ApiRequest("GET", VERIFY_PATH, None, action="verify the API key")


def check_input(value: Any) -> dict[str, Any]:
    """The Start node's parameters must be a mapping (after templating)."""
    if not isinstance(value, Mapping):
        raise AltaBotsConfigError(
            "input must be a mapping of the workflow's Start-node parameters after templating, "
            f"not {type(value).__name__}. If you template it from a string, set "
            "render_template_as_native_obj=True on the DAG."
        )
    try:
        json.dumps(value)
    except (TypeError, ValueError) as error:
        raise AltaBotsConfigError(
            f"input must hold only JSON values (the API takes JSON): {error}."
        ) from None
    return dict(value)


def check_run_id(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise AltaBotsConfigError(f"A workflow run id must be a non-empty string, not {value!r}.")
    return value.strip()


def check_webhooks(value: Any) -> list[dict[str, Any]]:
    """Validate webhooks as the API defines them: at most 5, each with a method and an http(s) url."""
    if isinstance(value, Mapping) or not isinstance(value, list | tuple):
        raise AltaBotsConfigError(f"webhooks must be a list of mappings, not {type(value).__name__}.")
    if len(value) > MAX_WEBHOOKS:
        raise AltaBotsConfigError(f"The API accepts at most {MAX_WEBHOOKS} webhooks; got {len(value)}.")
    checked = []
    for number, hook in enumerate(value, start=1):
        if not isinstance(hook, Mapping):
            raise AltaBotsConfigError(f"webhook {number} must be a mapping, not {type(hook).__name__}.")
        method, url, headers = hook.get("method"), hook.get("url"), hook.get("headers")
        if not isinstance(method, str) or method.upper() not in WEBHOOK_METHODS:
            allowed = ", ".join(sorted(WEBHOOK_METHODS))
            raise AltaBotsConfigError(f"webhook {number}: method must be one of {allowed}, not {method!r}.")
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise AltaBotsConfigError(f"webhook {number}: url must be an http:// or https:// URL.")
        if headers is not None and not (
            isinstance(headers, Mapping) and all(isinstance(v, str) for v in headers.values())
        ):
            raise AltaBotsConfigError(f"webhook {number}: headers must be a mapping of strings.")
        unknown = set(hook) - {"method", "url", "headers"}
        if unknown:
            raise AltaBotsConfigError(f"webhook {number}: unknown keys {sorted(unknown)}.")
        entry: dict[str, Any] = {"method": method.upper(), "url": url}
        if headers:
            entry["headers"] = dict(headers)
        checked.append(entry)
    return checked


def read_answer(
    request: ApiRequest, status_code: int, headers: Mapping[str, str], body: bytes
) -> dict[str, Any]:
    """
    Turn an HTTP answer into the JSON object it carries, or raise the matching error.

    :raises AltaBotsAuthError: HTTP 401/403 or code 40127.
    :raises AltaBotsTransientError: HTTP 429 or 5xx, a server-side error code, or a 2xx answer
        that is not a JSON object (a proxy page, a cut-off answer).
    :raises AltaBotsApiError: any other error answer.
    """
    data = _json_object(body)
    code, api_message = error_in(data)
    what = f"Could not {request.action}"
    said = _said(status_code, code, api_message, body if data is None else None)

    if status_code in (401, 403) or _same_code(code, AUTH_CODE):
        raise AltaBotsAuthError(
            f"{what}: the API refused the API key ({said}). Check that the connection's password holds "
            "a valid key for this workflow and that auth_scheme matches your host.",
            run_id=request.run_id,
        )
    if status_code == 429:
        wait = retry_after(headers)
        raise AltaBotsTransientError(
            f"{what}: rate limited ({said}). Your plan's request quota is used up for now.",
            run_id=request.run_id,
            retry_after=wait,
            rate_limited=True,
        )
    if status_code >= 500 or any(_same_code(code, server) for server in SERVER_CODES):
        raise AltaBotsTransientError(f"{what}: the API failed ({said}).", run_id=request.run_id)
    if status_code >= 400 or code is not None:
        raise AltaBotsApiError(f"{what}: {said}.", run_id=request.run_id, code=code, http_status=status_code)
    if data is None:
        raise AltaBotsTransientError(
            f"{what}: HTTP {status_code} answer is not a JSON object ({_snippet(body)}).",
            run_id=request.run_id,
        )
    return data


def error_in(data: Mapping[str, Any] | None) -> tuple[int | str | None, str | None]:
    """The ``(code, message)`` of an error body in either shape; ``(None, None)`` when it is none."""
    if not data:
        return None, None
    nested = data.get("error")
    if isinstance(nested, Mapping):
        return nested.get("code") or nested.get("status") or "error", _text(nested.get("message"))
    code = data.get("code")
    if code in (None, 0, "0", "", 200, "200"):
        return None, None
    return code, _text(data.get("message") or data.get("msg"))


def read_run_id(request: ApiRequest, answer: Mapping[str, Any]) -> str:
    """The run id of an asynchronous invoke's answer."""
    run_id = answer.get("workflowRunId")
    if not isinstance(run_id, str) or not run_id:
        raise AltaBotsApiError(
            f"The API accepted the request to {request.action} but its answer holds no workflowRunId "
            f"(keys: {sorted(answer)}). A run may have started: check the vendor's console before retrying."
        )
    return run_id


def run_summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """The run record without its bulky ``input`` and ``output``: status, workflow, cost, tokens, times."""
    return {key: value for key, value in record.items() if key not in BULKY_FIELDS}


def describe_run(record: Mapping[str, Any]) -> str:
    """``workflow 'name' (id, version v)`` for messages; empty parts are left out."""
    name, wid, version = record.get("workflowName"), record.get("workflowId"), record.get("workflowVersion")
    details = ", ".join(str(part) for part in (wid, f"version {version}" if version else None) if part)
    label = f"workflow {name!r}" if name else "the workflow"
    return f"{label} ({details})" if details else label


def failure_message(record: Mapping[str, Any]) -> str:
    """What to tell the user about a FAILED run: which run, which workflow, what the API said."""
    run_id = record.get("workflowRunId")
    seconds = record.get("workflowExecutionTime")
    took = f" after {seconds / 1000:.1f} s" if isinstance(seconds, int | float) else ""
    said = {k: record[k] for k in ("message", "error", "errorMessage", "output") if record.get(k)}
    detail = f" The API said: {_snippet(json.dumps(said, ensure_ascii=False))}." if said else ""
    return (
        f"Workflow run {run_id} of {describe_run(record)} FAILED{took}.{detail} "
        "Check the run in the vendor's console; a task retry starts a new, billed run."
    )


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """
    Seconds to wait before asking again, from ``Retry-After`` or ``X-RateLimit-Reset``.

    ``Retry-After`` may be seconds or an HTTP date. ``X-RateLimit-Reset`` is read as Unix time
    in seconds (AltaBots' documented form), or in milliseconds when it is that large, or as a
    number of seconds when it is too small to be a date. ``None`` when neither says.
    """
    lower = {key.lower(): value for key, value in headers.items()}
    now = time.time() if now is None else now
    seconds: float | None = None
    if (value := lower.get("retry-after")) is not None:
        try:
            seconds = float(value)
        except ValueError:
            try:
                seconds = parsedate_to_datetime(value).timestamp() - now
            except (TypeError, ValueError, IndexError):
                seconds = None
    if seconds is None and (value := lower.get("x-ratelimit-reset")) is not None:
        try:
            reset = float(value)
        except ValueError:
            return None
        if reset > 1e11:
            reset /= 1000.0
        seconds = reset - now if reset > 1e9 else reset
    if seconds is None or math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), 86400.0)


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _same_code(code: object, expected: int) -> bool:
    return code is not None and str(code) == str(expected)


def _said(status_code: int, code: object, message: str | None, raw: bytes | None) -> str:
    parts = [f"HTTP {status_code}"]
    if code is not None:
        hint = CODE_HINTS.get(int(str(code))) if str(code).isdigit() else None
        parts.append(f"code {code}" + (f", {hint}" if hint else ""))
    if message:
        parts.append(f"the API said: {_snippet(message)}")
    elif raw:
        parts.append(f"body: {_snippet(raw)}")
    return "; ".join(parts)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _snippet(value: str | bytes, limit: int = 300) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
