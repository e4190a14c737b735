"""
A scripted stand-in for the API, patched in at the HTTP boundary of ``requests`` and ``httpx``.

Only the socket is replaced: the hook's session, adapters, clients and transports all run, so
unit tests see the same requests and answers a real server would. Each path answers from a
queue of scripted answers; the last one repeats. An answer is ``(status, body)`` or
``(status, body, headers)``, an exception instance to raise as the network error, or a callable
that makes the answer from the request's JSON body.
"""

from __future__ import annotations

import io
import json
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any

import httpx
import requests
import urllib3
import urllib3.exceptions
from requests.structures import CaseInsensitiveDict

API_KEY = "sk-unit-test-key-0123456789"
BASE_URL = "https://api.example.test"
INVOKE = "/v1/workflow/invoke"
RESULT = "/v1/workflow/query/result"
VERIFY = "/v1/api-key/verify"


@dataclass
class Call:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float  # time.monotonic() when the request arrived


def record(status: str, run_id: str = "run-1", **extra: Any) -> dict[str, Any]:
    """A run record shaped as the vendor's pages show it."""
    data: dict[str, Any] = {
        "workflowId": "wf-1",
        "workflowName": "todayNews",
        "workflowVersion": "1.0.1",
        "workflowRunId": run_id,
        "input": {"topic": "News"},
        "output": {"answer": "42"} if status == "SUCCEED" else {},
        "workflowExecutionTime": 8347,
        "status": status,
        "totalCost": 0.6928,
        "totalTokens": 1745,
        "startTime": 1758765323024,
        "endTime": 1758765331373,
    }
    data.update(extra)
    return data


def record_of(status: str, **extra: Any) -> Any:
    """An answer for any status check: the record of the run the request asked for."""
    return lambda body: (200, record(status, run_id=body["workflowRunId"], **extra))


def accepted(run_id: str = "run-1") -> dict[str, Any]:
    """The answer to an asynchronous invoke."""
    return {
        "workflowId": "wf-1",
        "workflowName": "todayNews",
        "workflowVersion": "1.0.1",
        "workflowRunId": run_id,
        "status": "PENDING",
    }


#: The ``X-RateLimit-*`` headers of an answer from a key with plenty of requests left: a
#: deferrable task checks such a run from the worker before deferring.
PLENTY = {"X-RateLimit-Limit": "1000", "X-RateLimit-Remaining": "990", "X-RateLimit-Reset": "3000"}


def refused() -> requests.ConnectionError:
    """What ``requests`` raises when nothing listens: the request surely never left."""
    reason = urllib3.exceptions.NewConnectionError(None, "Connection refused")  # type: ignore[arg-type]
    return requests.ConnectionError(urllib3.exceptions.MaxRetryError(None, BASE_URL, reason))  # type: ignore[arg-type]


class FakeAPI:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._answers: dict[str, deque[Any]] = defaultdict(deque)

    def on(self, path: str, *answers: Any) -> FakeAPI:
        self._answers[path].extend(answers)
        return self

    def count(self, path: str) -> int:
        return sum(1 for call in self.calls if call.path == path)

    def answer(
        self, method: str, url: str, headers: dict[str, str], body: bytes | None
    ) -> tuple[int, dict, bytes]:
        path = url.removeprefix(BASE_URL)
        self.calls.append(Call(method, path, headers, json.loads(body) if body else None, time.monotonic()))
        queue = self._answers.get(path)
        if not queue:
            raise AssertionError(f"FakeAPI: no answer scripted for {method} {path}")
        answer = queue.popleft() if len(queue) > 1 else queue[0]
        if isinstance(answer, BaseException):
            raise answer
        if callable(answer):  # an answer made from the request's body
            answer = answer(self.calls[-1].body)
        status, payload, *rest = answer
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return status, (rest[0] if rest else {}), raw

    # -- the patches ------------------------------------------------------------------------

    def install(self, mocker: Any) -> None:
        api = self

        def send(adapter: Any, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
            body = request.body.encode() if isinstance(request.body, str) else request.body
            status, headers, raw = api.answer(
                request.method or "", request.url or "", dict(request.headers), body
            )
            all_headers = {"Content-Type": "application/json", **headers}
            response = requests.Response()
            response.status_code = status
            response.headers = CaseInsensitiveDict(all_headers)
            response.raw = urllib3.HTTPResponse(
                body=io.BytesIO(raw), headers=all_headers, status=status, preload_content=False
            )
            response.url = request.url or ""
            response.request = request
            return response

        async def handle(transport: Any, request: httpx.Request) -> httpx.Response:
            status, headers, raw = api.answer(
                request.method, str(request.url), dict(request.headers), request.content
            )
            return httpx.Response(
                status, headers={"Content-Type": "application/json", **headers}, stream=httpx.ByteStream(raw)
            )

        mocker.patch("requests.adapters.HTTPAdapter.send", autospec=True, side_effect=send)
        mocker.patch("httpx.AsyncHTTPTransport.handle_async_request", autospec=True, side_effect=handle)
