"""The emulator's API, faults and inspection endpoints, driven in-process over real HTTP."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from altabots_emulator import DEFAULT_API_KEY, Emulator, WorkflowConfig

KEY = "key-a"
OTHER_KEY = "key-b"
INVOKE = "/v1/workflow/invoke"
QUERY = "/v1/workflow/query/result"
VERIFY = "/v1/api-key/verify"
#: Short runs keep the file fast: PENDING 0.15 s, then RUNNING 0.35 s.
PENDING_SECONDS = 0.15
RUN_SECONDS = 0.35
RECORD_FIELDS = {
    "workflowId",
    "workflowName",
    "workflowVersion",
    "workflowRunId",
    "input",
    "output",
    "workflowExecutionTime",
    "status",
    "totalCost",
    "totalTokens",
    "startTime",
}


def bearer(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.02)


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    with Emulator(
        api_keys=[KEY, OTHER_KEY],
        run_seconds=RUN_SECONDS,
        pending_seconds=PENDING_SECONDS,
        seed=7,
        webhook_timeout=2.0,
    ) as running:
        yield running


@pytest.fixture
def client(emulator: Emulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=emulator.url, timeout=10.0) as http:
        yield http


def start_run(client: httpx.Client, key: str = KEY, **fields: Any) -> str:
    body = {"input": {"question": "What is an emulator?"}, "isAsync": True, **fields}
    answer = client.post(INVOKE, json=body, headers=bearer(key))
    assert answer.status_code == 200, answer.text
    return str(answer.json()["workflowRunId"])


def query(client: httpx.Client, run_id: str, key: str = KEY) -> httpx.Response:
    return client.post(QUERY, json={"workflowRunId": run_id}, headers=bearer(key))


def wait_for_end(client: httpx.Client, run_id: str, key: str = KEY) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        record: dict[str, Any] = query(client, run_id, key).json()
        return record if record["status"] in ("SUCCEED", "FAILED") else None

    result: dict[str, Any] = wait_until(ended)
    return result


# --------------------------------------------------------------------------- auth


@pytest.mark.parametrize("header", ["Bearer key-a", "key-a", "bearer key-a", "Bearer   key-a"])
def test_both_auth_styles_are_accepted(client: httpx.Client, header: str) -> None:
    answer = client.get(VERIFY, headers={"Authorization": header})
    assert answer.status_code == 200
    assert answer.json()["data"]["valid"] is True


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "nope"}])
def test_missing_or_unknown_key_is_refused_with_40127(client: httpx.Client, headers: dict[str, str]) -> None:
    for answer in (
        client.get(VERIFY, headers=headers),
        client.post(INVOKE, json={"input": {}}, headers=headers),
        client.post(QUERY, json={"workflowRunId": "x"}, headers=headers),
    ):
        assert answer.status_code == 401
        assert answer.headers["content-type"] == "application/json"
        assert answer.json()["code"] == 40127
        assert answer.json()["message"]


def test_verify_answers_the_keys_workflow(client: httpx.Client, emulator: Emulator) -> None:
    body = client.get(VERIFY, headers=bearer()).json()
    assert body["code"] == 0
    assert body["data"]["workflowId"].startswith("wf-")
    assert KEY not in body["data"]["workflowId"]
    other = client.get(VERIFY, headers=bearer(OTHER_KEY)).json()
    assert other["data"]["workflowId"] != body["data"]["workflowId"]


def test_default_key_when_none_given() -> None:
    with Emulator(run_seconds=0.1) as emulator, httpx.Client(base_url=emulator.url) as http:
        assert emulator.api_keys == [DEFAULT_API_KEY]
        assert http.get(VERIFY, headers={"Authorization": DEFAULT_API_KEY}).status_code == 200


# --------------------------------------------------------------------------- invoke validation


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "input"),
        ({"input": None}, "input"),
        ({"input": "text"}, "input"),
        ({"input": [1, 2]}, "input"),
        ({"input": {}, "userId": 5}, "userId"),
        ({"input": {}, "isAsync": "yes"}, "isAsync"),
        ({"input": {}, "isAsync": 1}, "isAsync"),
        ({"input": {}, "webhook": {"url": "http://127.0.0.1/"}}, "webhook"),
        ({"input": {}, "webhook": [{"method": "POST", "url": "http://127.0.0.1/"}] * 6}, "webhook"),
        ({"input": {}, "webhook": ["http://127.0.0.1/"]}, "webhook[0]"),
        ({"input": {}, "webhook": [{"url": "http://127.0.0.1/"}]}, "webhook[0].method"),
        ({"input": {}, "webhook": [{"method": 1, "url": "http://127.0.0.1/"}]}, "webhook[0].method"),
        ({"input": {}, "webhook": [{"method": "POST"}]}, "webhook[0].url"),
        (
            {"input": {}, "webhook": [{"method": "POST", "url": "http://127.0.0.1/", "headers": []}]},
            "webhook[0].headers",
        ),
        (
            {"input": {}, "webhook": [{"method": "POST", "url": "http://127.0.0.1/", "headers": {"X": 1}}]},
            "webhook[0].headers",
        ),
    ],
)
def test_bad_invoke_body_answers_40000_naming_the_field(
    client: httpx.Client, emulator: Emulator, body: dict[str, Any], field: str
) -> None:
    answer = client.post(INVOKE, json=body, headers=bearer())
    assert answer.status_code == 400
    error = answer.json()
    assert error["code"] == 40000
    assert error["message"].startswith(field)
    assert emulator.runs() == []


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1]", b'"text"'])
def test_invoke_body_that_is_not_a_json_object_is_refused(client: httpx.Client, raw: bytes) -> None:
    answer = client.post(INVOKE, content=raw, headers=bearer())
    assert answer.status_code == 400
    assert answer.json()["code"] == 40000


def test_invoke_accepts_every_documented_field(client: httpx.Client) -> None:
    body = {
        "userId": "user-1",
        "input": {"topic": "News"},
        "isAsync": True,
        "webhook": [
            {"method": "POST", "url": "http://127.0.0.1:9/", "headers": {"Accept": "application/json"}},
            {"method": "GET", "url": "http://127.0.0.1:9/?fr=x"},
        ],
    }
    assert client.post(INVOKE, json=body, headers=bearer()).status_code == 200


# --------------------------------------------------------------------------- runs


def test_async_invoke_answers_at_once_with_the_documented_shape(client: httpx.Client) -> None:
    began = time.monotonic()
    answer = client.post(INVOKE, json={"input": {"topic": "News"}, "isAsync": True}, headers=bearer())
    assert time.monotonic() - began < RUN_SECONDS
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert set(body) == {"workflowId", "workflowName", "workflowVersion", "workflowRunId", "status"}
    assert body["status"] == "PENDING"
    assert isinstance(body["workflowRunId"], str)
    assert body["workflowRunId"]


def test_run_ids_are_unique(client: httpx.Client) -> None:
    ids = {start_run(client) for _ in range(20)}
    assert len(ids) == 20


def test_status_moves_pending_running_succeed(client: httpx.Client) -> None:
    run_id = start_run(client, input={"question": "Why is the sky blue?"})
    pending = query(client, run_id).json()
    assert pending["status"] == "PENDING"
    assert pending["output"] == {}
    assert pending["totalTokens"] == 0
    assert "endTime" not in pending
    assert set(pending) == RECORD_FIELDS

    started = pending["startTime"] / 1000 + PENDING_SECONDS
    time.sleep(max(0.0, started + 0.05 - time.time()))
    running = query(client, run_id).json()
    assert running["status"] == "RUNNING"
    assert running["output"] == {}
    assert "endTime" not in running

    done = wait_for_end(client, run_id)
    assert done["status"] == "SUCCEED"
    assert set(done) == RECORD_FIELDS | {"endTime"}
    assert done["input"] == {"question": "Why is the sky blue?"}
    assert "sky blue" in done["output"]["output"]
    assert done["workflowExecutionTime"] == done["endTime"] - done["startTime"]
    assert done["workflowExecutionTime"] == pytest.approx((PENDING_SECONDS + RUN_SECONDS) * 1000, abs=5)
    assert done["totalTokens"] > 0
    assert done["totalCost"] == round(done["totalTokens"] * 0.0004, 4)
    assert query(client, run_id).json() == done


def test_failed_outcome(client: httpx.Client, emulator: Emulator) -> None:
    emulator.set_workflow("failing", outcome="fail", run_seconds=0.1, pending_seconds=0)
    run_id = start_run(client, key="failing")
    record = wait_for_end(client, run_id, key="failing")
    assert record["status"] == "FAILED"
    assert "failed" in record["output"]["error"]
    assert "endTime" in record


def test_a_run_can_be_ended_on_demand(client: httpx.Client, emulator: Emulator) -> None:
    emulator.set_workflow("stuck", outcome="never", pending_seconds=0)
    run_id = start_run(client, key="stuck")
    assert query(client, run_id, key="stuck").json()["status"] == "RUNNING"
    ended = client.post(f"/_emulator/runs/{run_id}/end", json={"outcome": "fail"})
    assert ended.status_code == 200, ended.text
    assert query(client, run_id, key="stuck").json()["status"] == "FAILED"
    again = client.post(f"/_emulator/runs/{run_id}/end", json={})
    assert again.status_code == 400
    assert "already ended" in again.json()["error"]
    assert client.post("/_emulator/runs/no-such-run/end", json={}).status_code == 404


def test_fail_rate_one_fails_every_run(client: httpx.Client, emulator: Emulator) -> None:
    emulator.set_workflow("flaky", fail_rate=1.0, run_seconds=0.05, pending_seconds=0)
    run_id = start_run(client, key="flaky")
    assert wait_for_end(client, run_id, key="flaky")["status"] == "FAILED"


def test_never_outcome_stays_running(client: httpx.Client, emulator: Emulator) -> None:
    emulator.set_workflow("stuck", outcome="never", run_seconds=0.05, pending_seconds=0)
    run_id = start_run(client, key="stuck")
    time.sleep(0.3)
    record = query(client, run_id, key="stuck").json()
    assert record["status"] == "RUNNING"
    assert record["output"] == {}
    assert "endTime" not in record
    assert record["workflowExecutionTime"] >= 250
    internal = client.get(f"/_emulator/runs/{run_id}").json()
    assert internal["ends_at"] is None


def test_fixed_output_and_workflow_identity(client: httpx.Client, emulator: Emulator) -> None:
    emulator.set_workflow(
        "news", name="todayNews", workflow_id="wf-1", version="1.0.1", output={"news": []}, run_seconds=0
    )
    answer = client.post(INVOKE, json={"input": {"topic": "News"}}, headers=bearer("news")).json()
    assert answer["workflowName"] == "todayNews"
    assert answer["workflowId"] == "wf-1"
    assert answer["workflowVersion"] == "1.0.1"
    assert answer["output"] == {"news": []}


def test_run_seconds_range_is_drawn_per_run(client: httpx.Client, emulator: Emulator) -> None:
    emulator.set_workflow("ranged", run_seconds=[0.1, 0.3], pending_seconds=0)
    runs = [start_run(client, key="ranged") for _ in range(8)]
    durations = [run["ends_at"] - run["started"] for run in emulator.runs() if run["run_id"] in runs]
    assert all(0.1 <= d <= 0.3 for d in durations)
    assert len({round(d, 6) for d in durations}) > 1


def test_sync_invoke_waits_for_the_end(client: httpx.Client) -> None:
    began = time.monotonic()
    answer = client.post(INVOKE, json={"input": {"question": "Wait for me"}}, headers=bearer())
    elapsed = time.monotonic() - began
    assert answer.status_code == 200
    record = answer.json()
    assert record["status"] == "SUCCEED"
    assert set(record) == RECORD_FIELDS | {"endTime"}
    assert elapsed >= PENDING_SECONDS + RUN_SECONDS - 0.02
    assert query(client, record["workflowRunId"]).json()["status"] == "SUCCEED"


def test_many_sync_invokes_wait_at_once(emulator: Emulator) -> None:
    """Synchronous invokes are served side by side: their runs overlap in time (served one by one,
    no two would). Judged from the runs' own start and end times, not the wall clock of a busy machine."""

    def invoke(index: int) -> dict[str, Any]:
        with httpx.Client(base_url=emulator.url, timeout=60) as http:
            answer = http.post(INVOKE, json={"input": {"n": str(index)}, "isAsync": False}, headers=bearer())
            return dict(answer.json())

    with ThreadPoolExecutor(40) as pool:
        records = list(pool.map(invoke, range(40)))
    assert [r["status"] for r in records] == ["SUCCEED"] * 40
    edges = sorted([(r["startTime"], 1) for r in records] + [(r["endTime"], -1) for r in records])
    in_flight = most = 0
    for _, step in edges:
        in_flight += step
        most = max(most, in_flight)
    assert most >= 4, f"at most {most} synchronous runs were under way at once"


def test_sync_invoke_of_a_never_ending_run_answers_after_sync_timeout() -> None:
    with (
        Emulator(api_keys=[KEY], outcome="never", run_seconds=0.1, pending_seconds=0, sync_timeout=0.3) as em,
        httpx.Client(base_url=em.url) as http,
    ):
        began = time.monotonic()
        record = http.post(INVOKE, json={"input": {}}, headers=bearer()).json()
        assert record["status"] == "RUNNING"
        assert 0.25 <= time.monotonic() - began < 2


def test_query_of_unknown_or_other_keys_run_is_40000(client: httpx.Client) -> None:
    unknown = query(client, "no-such-run")
    assert unknown.status_code == 400
    assert unknown.json()["code"] == 40000
    run_id = start_run(client, key=KEY)
    assert query(client, run_id, key=OTHER_KEY).json() == {
        "code": 40000,
        "message": f"workflowRunId not found: {run_id}",
    }
    assert query(client, run_id, key=KEY).status_code == 200


@pytest.mark.parametrize("body", [{}, {"workflowRunId": 5}, {"workflowRunId": ""}])
def test_query_needs_a_run_id(client: httpx.Client, body: dict[str, Any]) -> None:
    answer = client.post(QUERY, json=body, headers=bearer())
    assert answer.status_code == 400
    assert "workflowRunId" in answer.json()["message"]


def test_unknown_path_and_wrong_method(client: httpx.Client) -> None:
    missing = client.get("/v1/nothing", headers=bearer())
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/json"
    assert client.get(INVOKE, headers=bearer()).status_code == 405
    assert client.post(VERIFY, headers=bearer()).status_code == 405


def test_altabots_error_style() -> None:
    with Emulator(api_keys=[KEY], error_style="altabots") as em, httpx.Client(base_url=em.url) as http:
        refused = http.get(VERIFY, headers=bearer("wrong"))
        assert refused.status_code == 401
        assert refused.json() == {
            "error": {"code": "40127", "message": "authentication failed: unknown API key", "status": 401}
        }
        bad = http.post(INVOKE, json={"input": 3}, headers=bearer()).json()
        assert bad["error"]["code"] == "40000"
        assert bad["error"]["status"] == 400
        assert "input" in bad["error"]["message"]


def test_workflow_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="outcome"):
        WorkflowConfig(outcome="maybe")
    with pytest.raises(ValueError, match="run_seconds"):
        WorkflowConfig(run_seconds=(3.0, 1.0))
    with pytest.raises(ValueError, match="fail_rate"):
        WorkflowConfig(fail_rate=2)
    with pytest.raises(ValueError, match="error_style"):
        Emulator(error_style="other")


# --------------------------------------------------------------------------- faults


def set_faults(client: httpx.Client, **faults: Any) -> dict[str, Any]:
    answer = client.post("/_emulator/faults", json=faults)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()["faults"]
    return result


def test_rate_limit_with_ratelimit_headers(client: httpx.Client) -> None:
    set_faults(client, rate_limit={"limit": 2, "window_seconds": 30, "headers": "ratelimit"})
    answers = [client.get(VERIFY, headers=bearer()) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert [a.headers["X-RateLimit-Remaining"] for a in answers] == ["1", "0", "0"]
    assert all(a.headers["X-RateLimit-Limit"] == "2" for a in answers)
    reset = int(answers[0].headers["X-RateLimit-Reset"])
    assert time.time() + 28 < reset <= math.ceil(time.time() + 30)
    assert answers[2].json()["code"] == 42900
    assert "Retry-After" not in answers[2].headers
    # The window is per key.
    assert client.get(VERIFY, headers=bearer(OTHER_KEY)).status_code == 200


def test_rate_limit_with_retry_after(client: httpx.Client) -> None:
    set_faults(client, rate_limit={"limit": 1, "window_seconds": 5, "headers": "retry-after"})
    first = client.get(VERIFY, headers=bearer())
    second = client.get(VERIFY, headers=bearer())
    assert first.status_code == 200
    assert "Retry-After" not in first.headers
    assert second.status_code == 429
    assert 1 <= int(second.headers["Retry-After"]) <= 5
    assert "X-RateLimit-Limit" not in second.headers


def test_rate_limit_without_headers_and_window_reopens(client: httpx.Client) -> None:
    set_faults(client, rate_limit={"limit": 1, "window_seconds": 0.3, "headers": "none"})
    assert client.get(VERIFY, headers=bearer()).status_code == 200
    limited = client.get(VERIFY, headers=bearer())
    assert limited.status_code == 429
    assert not any(h.lower().startswith(("x-ratelimit", "retry-after")) for h in limited.headers)
    time.sleep(0.35)
    assert client.get(VERIFY, headers=bearer()).status_code == 200


def test_rate_limit_only_on_given_paths(client: httpx.Client) -> None:
    set_faults(client, rate_limit={"limit": 0, "window_seconds": 30, "paths": [QUERY]})
    assert client.get(VERIFY, headers=bearer()).status_code == 200
    assert client.post(QUERY, json={"workflowRunId": "x"}, headers=bearer()).status_code == 429


def test_rate_limits_of_several_keys_as_a_list(client: httpx.Client) -> None:
    third = "key-c"
    faults = set_faults(
        client,
        rate_limit=[
            {"limit": 2, "window_seconds": 30, "headers": "ratelimit", "api_key": KEY},
            {"limit": 1, "window_seconds": 30, "headers": "none", "api_key": OTHER_KEY},
        ],
    )
    assert [(f["api_key"], f["limit"], f["headers"]) for f in faults["rate_limit"]] == [
        (KEY, 2, "ratelimit"),
        (OTHER_KEY, 1, "none"),
    ]
    # Each key has its own limit and header style; the two windows fill apart.
    other = [client.get(VERIFY, headers=bearer(OTHER_KEY)) for _ in range(2)]
    mine = [client.get(VERIFY, headers=bearer(KEY)) for _ in range(3)]
    assert [a.status_code for a in mine] == [200, 200, 429]
    assert [a.headers["X-RateLimit-Remaining"] for a in mine] == ["1", "0", "0"]
    assert [a.status_code for a in other] == [200, 429]
    assert not any(h.lower().startswith(("x-ratelimit", "retry-after")) for a in other for h in a.headers)
    # A key no limit of the list names is not limited (its 401 is the emulator's own answer).
    assert [client.get(VERIFY, headers=bearer(third)).status_code for _ in range(3)] == [401] * 3
    shown = client.get("/_emulator/faults").json()["faults"]["rate_limit"]
    assert [(f["hits"], set(f["windows"])) for f in shown] == [(1, {KEY}), (1, {OTHER_KEY})]
    # Setting rate_limit again replaces the whole list.
    assert set_faults(client, rate_limit={"limit": 5, "window_seconds": 30})["rate_limit"]["limit"] == 5
    assert client.get(VERIFY, headers=bearer(OTHER_KEY)).status_code == 200


def test_first_rate_limit_of_the_list_that_applies_counts_a_request(client: httpx.Client) -> None:
    set_faults(
        client,
        rate_limit=[
            {"limit": 1, "window_seconds": 30, "api_key": KEY, "paths": [QUERY]},
            {"limit": 3, "window_seconds": 30},
        ],
    )
    queries = [query(client, "run-x").status_code for _ in range(2)]
    assert queries == [400, 429]  # the first limit: one request (an unknown run answers 400)
    # Other paths of that key, and other keys, meet the catch-all limit (and only it).
    assert [client.get(VERIFY, headers=bearer()).status_code for _ in range(4)] == [200, 200, 200, 429]
    assert [client.get(VERIFY, headers=bearer(OTHER_KEY)).status_code for _ in range(4)] == [200] * 3 + [429]


@pytest.mark.parametrize(
    "limits",
    [
        [],
        [{"limit": 1}, "not an object"],
        [{"limit": 1}, {"limit": 1, "headers": "x-custom"}],
        [{"count": 1}],
    ],
)
def test_bad_rate_limit_list_is_refused_whole(client: httpx.Client, limits: list[Any]) -> None:
    answer = client.post("/_emulator/faults", json={"rate_limit": limits})
    assert answer.status_code == 400
    assert "rate_limit" in answer.json()["error"]
    assert client.get("/_emulator/faults").json() == {"faults": {}}


def test_server_errors(client: httpx.Client, emulator: Emulator) -> None:
    set_faults(client, server_errors={"count": 2, "status": 503})
    first = client.post(INVOKE, json={"input": {}, "isAsync": True}, headers=bearer())
    second = client.get(VERIFY, headers=bearer())
    third = client.get(VERIFY, headers=bearer())
    assert (first.status_code, second.status_code, third.status_code) == (503, 503, 200)
    assert first.json()["code"] == 50000
    assert emulator.runs() == []
    assert client.get("/_emulator/faults").json()["faults"]["server_errors"]["remaining"] == 0


def test_server_error_after_create_leaves_a_billed_run(client: httpx.Client, emulator: Emulator) -> None:
    set_faults(client, server_errors={"count": 1, "status": 500, "after_create": True, "paths": [INVOKE]})
    answer = client.post(INVOKE, json={"input": {"q": "ambiguous"}, "isAsync": True}, headers=bearer())
    assert answer.status_code == 500
    assert answer.json()["code"] == 50000
    runs = emulator.runs()
    assert len(runs) == 1
    assert runs[0]["input"] == {"q": "ambiguous"}
    assert wait_for_end(client, runs[0]["run_id"])["totalCost"] > 0


def test_server_error_after_create_on_sync_invoke_does_not_wait(
    client: httpx.Client, emulator: Emulator
) -> None:
    set_faults(client, server_errors={"status": 502, "after_create": True})
    began = time.monotonic()
    answer = client.post(INVOKE, json={"input": {}}, headers=bearer())
    assert answer.status_code == 502
    assert time.monotonic() - began < PENDING_SECONDS
    assert len(emulator.runs()) == 1


def test_delay(client: httpx.Client) -> None:
    set_faults(client, delay={"seconds": 0.3, "count": 1})
    began = time.monotonic()
    assert client.get(VERIFY, headers=bearer()).status_code == 200
    assert time.monotonic() - began >= 0.29
    began = time.monotonic()
    client.get(VERIFY, headers=bearer())
    assert time.monotonic() - began < 0.2


def test_delay_after_create_holds_the_answer_of_a_created_run(
    client: httpx.Client, emulator: Emulator
) -> None:
    set_faults(client, delay={"seconds": 0.6, "count": 1, "after_create": True, "paths": [INVOKE]})
    result: dict[str, Any] = {}

    def invoke() -> None:
        with httpx.Client(base_url=emulator.url, timeout=10) as http:
            began = time.monotonic()
            answer = http.post(INVOKE, json={"input": {}, "isAsync": True}, headers=bearer())
            result.update(answer.json(), elapsed=time.monotonic() - began)

    thread = threading.Thread(target=invoke)
    thread.start()
    runs = wait_until(emulator.runs, timeout=0.5)
    assert not result  # the run exists, the answer is still held back
    thread.join()
    assert result["workflowRunId"] == runs[0]["run_id"]
    assert result["elapsed"] >= 0.58


def test_error_in_200(client: httpx.Client, emulator: Emulator) -> None:
    set_faults(client, error_in_200={"count": 1, "code": 50000, "message": "busy"})
    answer = client.post(INVOKE, json={"input": {}, "isAsync": True}, headers=bearer())
    assert answer.status_code == 200
    assert answer.json() == {"code": 50000, "message": "busy"}
    assert emulator.runs() == []
    assert client.get(VERIFY, headers=bearer()).json()["code"] == 0


def test_drop_closes_the_connection_without_answer(client: httpx.Client, emulator: Emulator) -> None:
    set_faults(client, drop={"count": 1})
    with pytest.raises(httpx.TransportError):
        client.get(VERIFY, headers=bearer())
    assert client.get(VERIFY, headers=bearer()).status_code == 200
    logged = emulator.requests(VERIFY)
    assert [(r["dropped"], r["status"]) for r in logged] == [(True, None), (False, 200)]


def test_drop_after_create(client: httpx.Client, emulator: Emulator) -> None:
    set_faults(client, drop={"after_create": True, "paths": [INVOKE]})
    with pytest.raises(httpx.TransportError):
        client.post(INVOKE, json={"input": {}, "isAsync": True}, headers=bearer())
    assert len(emulator.runs()) == 1


def test_fault_limited_to_one_key(client: httpx.Client) -> None:
    set_faults(client, server_errors={"count": None, "api_key": OTHER_KEY})
    assert client.get(VERIFY, headers=bearer(KEY)).status_code == 200
    assert client.get(VERIFY, headers=bearer(OTHER_KEY)).status_code == 500
    assert client.get(VERIFY, headers=bearer(OTHER_KEY)).status_code == 500


def test_faults_merge_show_and_clear(client: httpx.Client) -> None:
    set_faults(client, delay={"seconds": 0.01})
    faults = set_faults(client, drop={"count": 3})
    assert set(faults) == {"delay", "drop"}
    assert faults["delay"]["remaining"] is None
    assert faults["drop"]["remaining"] == 3
    assert set(set_faults(client, delay=None)) == {"drop"}
    assert client.delete("/_emulator/faults").json() == {"faults": {}}
    assert client.get("/_emulator/faults").json() == {"faults": {}}


@pytest.mark.parametrize(
    "faults",
    [
        {"lightning": {}},
        {"delay": {}},
        {"delay": {"seconds": -1}},
        {"server_errors": {"status": 200}},
        {"rate_limit": {"limit": 1, "headers": "x-custom"}},
        {"drop": {"count": "many"}},
        {"drop": []},
    ],
)
def test_bad_fault_settings_are_refused(client: httpx.Client, faults: dict[str, Any]) -> None:
    answer = client.post("/_emulator/faults", json=faults)
    assert answer.status_code == 400
    assert answer.json()["error"]
    assert client.get("/_emulator/faults").json() == {"faults": {}}


def test_faults_do_not_touch_emulator_endpoints(client: httpx.Client) -> None:
    set_faults(client, server_errors={"count": None}, rate_limit={"limit": 0, "window_seconds": 60})
    assert client.get("/_emulator/health").status_code == 200


# --------------------------------------------------------------------------- inspection


def test_request_log(client: httpx.Client) -> None:
    client.get(VERIFY, headers={"Authorization": "Bearer key-a", "X-Trace": "t-1"})
    client.post(INVOKE, json={"input": {"a": "b"}, "isAsync": True}, headers=bearer())
    client.post(QUERY, content=b"broken", headers=bearer())
    log = client.get("/_emulator/requests").json()["requests"]
    assert [entry["seq"] for entry in log] == [1, 2, 3]
    assert [entry["path"] for entry in log] == [VERIFY, INVOKE, QUERY]
    assert [entry["status"] for entry in log] == [200, 200, 400]
    assert log[0]["method"] == "GET"
    assert log[0]["headers"]["X-Trace"] == "t-1"
    assert log[0]["headers"]["Authorization"] == "Bearer key-a"
    assert log[0]["body"] is None
    assert log[1]["body"] == {"input": {"a": "b"}, "isAsync": True}
    assert log[2]["body"] is None
    assert log[0]["time"] <= log[1]["time"] <= log[2]["time"] <= time.time()
    only = client.get("/_emulator/requests", params={"path": INVOKE}).json()["requests"]
    assert [entry["seq"] for entry in only] == [2]
    last = client.get("/_emulator/requests", params={"limit": 2}).json()["requests"]
    assert [entry["seq"] for entry in last] == [2, 3]
    later = client.get("/_emulator/requests", params={"since": 2}).json()["requests"]
    assert [entry["seq"] for entry in later] == [3]
    assert client.delete("/_emulator/requests").status_code == 200
    assert client.get("/_emulator/requests").json() == {"requests": []}


def test_request_log_is_bounded() -> None:
    with Emulator(api_keys=[KEY], request_log_size=5) as em, httpx.Client(base_url=em.url) as http:
        for _ in range(8):
            http.get(VERIFY, headers=bearer())
        assert [entry["seq"] for entry in em.requests()] == [4, 5, 6, 7, 8]


def test_stats(client: httpx.Client, emulator: Emulator) -> None:
    emulator.set_workflow("slow", run_seconds=30)
    start_run(client)
    slow_run = start_run(client, key="slow")
    client.get(VERIFY, headers=bearer("nope"))
    stats = client.get("/_emulator/stats").json()
    assert stats["requests"] == 3
    assert stats["by_path"] == {INVOKE: 2, VERIFY: 1}
    assert stats["by_status"] == {"200": 2, "401": 1}
    assert stats["invokes"] == 2
    assert stats["runs"] == 2
    assert sum(stats["runs_by_status"].values()) == 2
    wait_for_end(client, start_run(client))
    stats = client.get("/_emulator/stats").json()
    assert stats["runs_by_status"]["SUCCEED"] >= 1
    assert query(client, slow_run, key="slow").json()["status"] in ("PENDING", "RUNNING")


def test_runs_inspection(client: httpx.Client) -> None:
    run_id = start_run(client, userId="u-1")
    runs = client.get("/_emulator/runs").json()["runs"]
    assert len(runs) == 1
    run = runs[0]
    assert run["run_id"] == run_id
    assert run["user_id"] == "u-1"
    assert run["started"] == pytest.approx(run["created"] + PENDING_SECONDS)
    assert run["ends_at"] == pytest.approx(run["started"] + RUN_SECONDS)
    assert run["status"] in ("PENDING", "RUNNING")
    detail = client.get(f"/_emulator/runs/{run_id}").json()
    assert detail["record"]["workflowRunId"] == run_id
    assert client.get("/_emulator/runs/nope").status_code == 404
    assert client.get("/_emulator/runs", params={"status": "FAILED"}).json() == {"runs": []}


def test_workflows_endpoint(client: httpx.Client) -> None:
    added = client.post(
        "/_emulator/workflows", json={"api_key": "new-key", "name": "Summariser", "run_seconds": [1, 2]}
    )
    assert added.status_code == 200
    assert added.json()["run_seconds"] == [1, 2]
    assert added.json()["pending_seconds"] == PENDING_SECONDS
    keys = {w["api_key"]: w for w in client.get("/_emulator/workflows").json()["workflows"]}
    assert set(keys) == {KEY, OTHER_KEY, "new-key"}
    assert keys["new-key"]["name"] == "Summariser"
    assert client.get(VERIFY, headers=bearer("new-key")).json()["data"]["workflowName"] == "Summariser"
    bad = client.post("/_emulator/workflows", json={"api_key": "k", "outcome": "maybe"})
    assert bad.status_code == 400
    assert "outcome" in bad.json()["error"]
    assert client.post("/_emulator/workflows", json={"name": "no key"}).status_code == 400
    assert client.post("/_emulator/workflows", json={"api_key": "k", "colour": "red"}).status_code == 400


def test_reset(client: httpx.Client, emulator: Emulator) -> None:
    emulator.set_workflow("temporary")
    start_run(client)
    set_faults(client, delay={"seconds": 0.01})
    assert client.post("/_emulator/reset").json() == {"status": "reset"}
    assert client.get("/_emulator/runs").json() == {"runs": []}
    assert client.get("/_emulator/requests").json() == {"requests": []}
    assert client.get("/_emulator/faults").json() == {"faults": {}}
    assert client.get("/_emulator/stats").json()["requests"] == 0
    assert client.get(VERIFY, headers=bearer("temporary")).status_code == 401
    assert client.get(VERIFY, headers=bearer()).status_code == 200


def test_health_and_unknown_emulator_endpoints(client: httpx.Client) -> None:
    health = client.get("/_emulator/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert client.get("/_emulator/nothing").status_code == 404
    assert client.delete("/_emulator/stats").status_code == 405


def test_python_helpers(emulator: Emulator, client: httpx.Client) -> None:
    assert emulator.set_faults(error_in_200={"count": 1})["error_in_200"]["remaining"] == 1
    assert client.get(VERIFY, headers=bearer()).json()["code"] == 50000
    emulator.clear_faults()
    assert emulator.stats()["requests"] == 1
    emulator.reset()
    assert emulator.requests() == []


# --------------------------------------------------------------------------- webhooks


class _Receiver:
    """A loopback HTTP server that records the webhook calls it gets."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        calls = self.calls

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                calls.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "headers": dict(self.headers),
                        "body": json.loads(body) if body else None,
                    }
                )
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "/landed")
                    self.send_header("Content-Length", "0")
                else:
                    self.send_response(204)
                self.end_headers()

            do_POST = do_GET = do_PUT = _record

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    running = _Receiver()
    yield running
    running.close()


def test_webhooks_are_delivered_to_loopback_with_their_headers(
    client: httpx.Client, receiver: _Receiver
) -> None:
    hooks = [
        {
            "method": "POST",
            "url": f"{receiver.url}/hook?x=1",
            "headers": {"Authorization": "Bearer hook-token", "X-Extra": "yes", "Content-Length": "999"},
        },
        {"method": "GET", "url": f"{receiver.url}/ping", "headers": {"Accept": "application/json"}},
    ]
    run_id = start_run(client, webhook=hooks, input={"topic": "hooks"})
    deliveries = wait_until(
        lambda: len(d := client.get("/_emulator/webhooks").json()["deliveries"]) == 2 and d
    )
    assert {(d["method"], d["status"], d["refused"]) for d in deliveries} == {
        ("POST", 204, False),
        ("GET", 204, False),
    }
    assert all(d["run_id"] == run_id for d in deliveries)
    calls = {call["method"]: call for call in receiver.calls}
    post = calls["POST"]
    assert post["path"] == "/hook?x=1"
    assert post["headers"]["Authorization"] == "Bearer hook-token"
    assert post["headers"]["X-Extra"] == "yes"
    assert post["headers"]["Content-Type"] == "application/json"
    assert post["body"]["workflowRunId"] == run_id
    assert post["body"]["status"] == "SUCCEED"
    assert post["body"]["input"] == {"topic": "hooks"}
    assert post["body"] == query(client, run_id).json()
    assert post["headers"]["User-Agent"] == "altabots-emulator"
    assert post["headers"]["Connection"] == "close"
    assert post["headers"]["Content-Length"] == str(len(json.dumps(post["body"], separators=(",", ":"))))
    assert calls["GET"]["body"] is None
    assert calls["GET"]["headers"]["Accept"] == "application/json"
    assert "Content-Type" not in calls["GET"]["headers"]


def test_webhook_redirect_is_not_followed(client: httpx.Client, receiver: _Receiver) -> None:
    start_run(client, webhook=[{"method": "POST", "url": f"{receiver.url}/redirect"}])
    deliveries = wait_until(lambda: client.get("/_emulator/webhooks").json()["deliveries"])
    assert deliveries[0]["status"] == 302
    assert [call["path"] for call in receiver.calls] == ["/redirect"]


def test_localhost_resolving_elsewhere_is_refused(
    client: httpx.Client, monkeypatch: pytest.MonkeyPatch, receiver: _Receiver
) -> None:
    real_getaddrinfo = socket.getaddrinfo

    def elsewhere(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "localhost":
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("10.9.9.9", int(port)))]
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", elsewhere)
    port = receiver.url.rsplit(":", 1)[1]
    start_run(client, webhook=[{"method": "POST", "url": f"http://localhost:{port}/"}])
    deliveries = wait_until(lambda: client.get("/_emulator/webhooks").json()["deliveries"])
    assert deliveries[0]["refused"] is True
    assert "does not resolve to a loopback address" in deliveries[0]["error"]
    assert receiver.calls == []


def test_stop_cancels_a_webhook_call_in_flight() -> None:
    """A receiver that never answers: stopping does not wait for the call's timeout."""
    accepted = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/"

        def accept() -> None:
            connection, _ = silent.accept()
            accepted.set()
            with connection:
                connection.recv(65536)
                time.sleep(30)

        threading.Thread(target=accept, daemon=True).start()

        async def scenario() -> tuple[list[dict[str, Any]], set[Any]]:
            emulator = Emulator(api_keys=[KEY], run_seconds=0, pending_seconds=0, webhook_timeout=600)
            base = await emulator.start_async()
            async with httpx.AsyncClient(base_url=base) as http:
                body = {"input": {}, "isAsync": True, "webhook": [{"method": "POST", "url": url}]}
                assert (await http.post(INVOKE, json=body, headers=bearer())).status_code == 200
            assert await asyncio.to_thread(accepted.wait, 30)
            await asyncio.wait_for(emulator.stop_async(), 30)
            return emulator.webhook_deliveries(), asyncio.all_tasks() - {asyncio.current_task()}

        deliveries, left = asyncio.run(scenario())
    assert deliveries == []
    assert left == set()


def test_webhook_to_non_loopback_host_is_refused_and_never_contacted(
    client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    looked_up: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def recording_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        looked_up.append(str(host))
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording_getaddrinfo)
    hooks = [
        {"method": "POST", "url": "http://example.com/"},
        {"method": "POST", "url": "http://10.1.2.3:8080/hook"},
        {"method": "POST", "url": "ftp://127.0.0.1/"},
    ]
    run_id = start_run(client, webhook=hooks)
    deliveries = wait_until(
        lambda: len(d := client.get("/_emulator/webhooks").json()["deliveries"]) == 3 and d
    )
    assert all(d["refused"] and d["status"] is None and d["run_id"] == run_id for d in deliveries)
    assert {d["url"] for d in deliveries} == {h["url"] for h in hooks}
    assert "example.com" not in looked_up


def test_webhook_error_is_logged(client: httpx.Client) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    start_run(client, webhook=[{"method": "POST", "url": f"http://localhost:{port}/"}])
    deliveries = wait_until(lambda: client.get("/_emulator/webhooks").json()["deliveries"])
    assert deliveries[0]["status"] is None
    assert deliveries[0]["refused"] is False
    assert deliveries[0]["error"]


def test_webhooks_of_sync_invokes_and_never_ending_runs_are_not_called(
    client: httpx.Client, emulator: Emulator, receiver: _Receiver
) -> None:
    hook = [{"method": "POST", "url": receiver.url}]
    client.post(INVOKE, json={"input": {}, "webhook": hook}, headers=bearer())
    emulator.set_workflow("stuck", outcome="never", run_seconds=0.05, pending_seconds=0)
    start_run(client, key="stuck", webhook=hook)
    time.sleep(0.3)
    assert receiver.calls == []
    assert client.get("/_emulator/webhooks").json() == {"deliveries": []}


def test_request_log_records_answer_time_and_rate_limit_headers() -> None:
    with Emulator(api_keys=["k-limit"], run_seconds=0.2) as emulator:
        emulator.set_faults(rate_limit={"limit": 1, "window_seconds": 30, "headers": "retry-after"})
        with httpx.Client(base_url=emulator.url) as http:
            for _ in range(2):
                http.get("/v1/api-key/verify", headers=bearer("k-limit"))
        first, second = emulator.requests()
    assert first["status"] == 200
    assert first["answered"] >= first["time"]
    assert second["status"] == 429
    assert 1 <= int(second["limit_headers"]["Retry-After"]) <= 30
