from __future__ import annotations

import json
from email.utils import formatdate

import pytest

from airflow_provider_altabots import protocol
from airflow_provider_altabots.exceptions import (
    AltaBotsApiError,
    AltaBotsAuthError,
    AltaBotsConfigError,
    AltaBotsInvokeUncertain,
    AltaBotsTransientError,
)

REQUEST = protocol.result_request("run-9")


def read(status: int, body: object, headers: dict[str, str] | None = None) -> dict:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return protocol.read_answer(REQUEST, status, headers or {}, raw)


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        ("SUCCEED", "succeeded"),
        ("FAILED", "failed"),
        ("PENDING", "active"),
        ("RUNNING", "active"),
        ("SUCCED", "unknown"),  # the typo of one older page is never taken for success
        ("succeed", "unknown"),
        (None, "unknown"),
        ("", "unknown"),
        (["RUNNING"], "unknown"),  # a hostile answer's list or object is a status nobody knows
        ({"RUNNING": 1}, "unknown"),
    ],
)
def test_status_kind(status, kind):
    assert protocol.status_kind(status) == kind


def test_invoke_request_body_matches_the_pages():
    request = protocol.invoke_request(
        {"topic": "News"},
        user_id="u-1",
        webhooks=[{"method": "post", "url": "https://hooks.example/a", "headers": {"X-Token": "t"}}],
        is_async=True,
    )
    assert (request.method, request.path) == ("POST", "/v1/workflow/invoke")
    assert request.body == {
        "input": {"topic": "News"},
        "isAsync": True,
        "userId": "u-1",
        "webhook": [{"method": "POST", "url": "https://hooks.example/a", "headers": {"X-Token": "t"}}],
    }


def test_result_request_names_the_run():
    assert REQUEST.body == {"workflowRunId": "run-9"}
    assert REQUEST.path == "/v1/workflow/query/result"
    assert REQUEST.run_id == "run-9"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input": "not a mapping"}, "input must be a mapping"),
        ({"input": ["a"]}, "input must be a mapping"),
        ({"input": {"when": object()}}, "JSON"),
        ({"input": {}, "webhooks": [{"method": "POST", "url": "https://x.example"}] * 6}, "at most 5"),
        ({"input": {}, "webhooks": [{"url": "https://x.example"}]}, "method"),
        ({"input": {}, "webhooks": [{"method": "POST"}]}, "url"),
        ({"input": {}, "webhooks": [{"method": "FETCH", "url": "https://x.example"}]}, "method"),
        ({"input": {}, "webhooks": [{"method": "POST", "url": "ftp://x.example/a"}]}, "http"),
        ({"input": {}, "webhooks": [{"method": "POST", "url": "x.example/a"}]}, "http"),
        ({"input": {}, "webhooks": [{"method": "POST", "url": "https://x", "headers": {"a": 1}}]}, "headers"),
        ({"input": {}, "webhooks": {"method": "POST"}}, "list"),
        ({"input": {}, "webhooks": ["https://x.example"]}, "mapping"),
        ({"input": {}, "webhooks": [{"method": "POST", "url": "https://x", "body": "?"}]}, "unknown keys"),
        ({"input": {}, "user_id": ""}, "user_id"),
    ],
)
def test_bad_invoke_input_is_refused_before_sending(kwargs, match):
    with pytest.raises(AltaBotsConfigError, match=match):
        protocol.invoke_request(**kwargs)


@pytest.mark.parametrize("run_id", ["", "   ", None, 42])
def test_empty_run_id_is_refused(run_id):
    with pytest.raises(AltaBotsConfigError, match="run id"):
        protocol.result_request(run_id)


def test_ok_answer_is_returned():
    assert read(200, {"status": "RUNNING", "workflowRunId": "run-9"})["status"] == "RUNNING"


def test_code_zero_in_2xx_is_success():
    assert read(200, {"code": 0, "status": "RUNNING"})["status"] == "RUNNING"


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (401, {"code": 40127, "message": "authentication failed"}),
        (403, {"error": {"code": "forbidden", "message": "no", "status": 403}}),
        (200, {"code": 40127, "message": "authentication failed"}),
        (400, {"code": "40127", "message": "authentication failed"}),
    ],
)
def test_refused_key_is_an_auth_error_without_the_key(status, body):
    with pytest.raises(AltaBotsAuthError) as caught:
        read(status, body)
    assert "refused the API key" in caught.value.message
    assert caught.value.run_id == "run-9"


def test_rate_limit_is_transient_and_reads_retry_after():
    with pytest.raises(AltaBotsTransientError) as caught:
        read(429, {"code": 42900, "message": "slow down"}, {"Retry-After": "7"})
    assert caught.value.rate_limited
    assert caught.value.retry_after == 7.0


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, {"code": 50000, "message": "internal"}),
        (503, b"<html>Service Unavailable</html>"),
        (200, {"code": 50000, "message": "internal error"}),
        (200, b"<html>captive portal</html>"),
        (200, b""),
        (200, b"[1, 2]"),
    ],
)
def test_server_side_failures_are_transient(status, body):
    with pytest.raises(AltaBotsTransientError) as caught:
        read(status, body)
    assert not caught.value.rate_limited
    assert "query workflow run run-9" in caught.value.message


@pytest.mark.parametrize(
    ("status", "body", "code", "hint"),
    [
        (400, {"code": 40000, "message": "input.topic missing"}, 40000, "Start node"),
        (200, {"code": 20022, "message": "no credits"}, 20022, "top up"),
        (200, {"code": 20055, "message": "api off"}, 20055, "enable it"),
        (
            400,
            {"error": {"code": "invalid_request", "message": "bad", "status": 400}},
            "invalid_request",
            "bad",
        ),
        (404, b"not found", None, "not found"),
    ],
)
def test_api_errors_in_both_body_shapes(status, body, code, hint):
    with pytest.raises(AltaBotsApiError) as caught:
        read(status, body)
    assert caught.value.code == code
    assert caught.value.http_status == status
    assert hint in caught.value.message


def test_retry_after_forms():
    now = 1_760_000_000.0
    assert protocol.retry_after({"retry-after": "12"}, now) == 12.0
    assert protocol.retry_after({"Retry-After": formatdate(now + 10, usegmt=True)}, now) == 10.0
    assert protocol.retry_after({"X-RateLimit-Reset": str(now + 30)}, now) == 30.0
    assert protocol.retry_after({"X-RateLimit-Reset": str((now + 30) * 1000)}, now) == 30.0
    assert protocol.retry_after({"X-RateLimit-Reset": "45"}, now) == 45.0
    assert protocol.retry_after({"X-RateLimit-Reset": str(now - 5)}, now) == 0.0
    assert protocol.retry_after({"X-RateLimit-Reset": "soon"}, now) is None
    assert protocol.retry_after({}, now) is None


def test_run_summary_drops_input_and_output():
    summary = protocol.run_summary(
        {"input": {"a": 1}, "output": {"b": 2}, "status": "SUCCEED", "totalCost": 1}
    )
    assert summary == {"status": "SUCCEED", "totalCost": 1}


def test_failure_message_names_run_workflow_and_what_the_api_said():
    message = protocol.failure_message(
        "run-7",
        {
            "workflowRunId": "run-7",
            "workflowName": "todayNews",
            "workflowId": "wf-1",
            "workflowVersion": "1.0.1",
            "status": "FAILED",
            "workflowExecutionTime": 1500,
            "output": {"error": "LLM node timed out"},
        },
    )
    assert "run-7" in message
    assert "todayNews" in message
    assert "LLM node timed out" in message
    assert "1.5 s" in message


@pytest.mark.parametrize(
    "run_id", [None, "", "   ", 42, ["run-1"], "x" * (protocol.MAX_RUN_ID_LENGTH + 1), "run\n1", "rün-1"]
)
def test_an_invoke_answer_without_a_usable_run_id_is_uncertain(run_id):
    """200 but no usable id: a run may exist, so the invoke is never sent again (issue 9, cases 2 and 15)."""
    with pytest.raises(AltaBotsInvokeUncertain, match="workflowRunId is no run id") as caught:
        protocol.read_run_id(protocol.invoke_request({}), {"status": "PENDING", "workflowRunId": run_id})
    assert len(caught.value.message) < 1000  # a 5 MB id is described, never repeated


def test_a_record_of_another_run_is_a_broken_answer():
    request = protocol.result_request("run-1")
    assert protocol.read_record(request, {"status": "RUNNING"}) == {"status": "RUNNING"}
    with pytest.raises(AltaBotsTransientError, match="another workflow run"):
        protocol.read_record(request, {"workflowRunId": "run-2", "status": "SUCCEED"})


class TestConnectionSettings:
    def make(self, host="https://altatech.ai", port=None, password="k", **extra):
        return protocol.ConnectionSettings.from_connection("c", host, port, password, extra)

    def test_defaults(self):
        settings = self.make(host=None)
        assert settings.base_url == "https://altatech.ai"
        assert settings.auth_scheme == "bearer"
        assert settings.timeout == 30.0
        assert settings.headers["Authorization"] == "Bearer k"

    def test_gptbots_raw_key(self):
        settings = self.make(host="https://api-sg.gptbots.ai/", auth_scheme="raw", timeout="12")
        assert settings.url("/v1/workflow/invoke") == "https://api-sg.gptbots.ai/v1/workflow/invoke"
        assert settings.headers["Authorization"] == "k"
        assert settings.timeout == 12.0

    def test_bare_host_and_port(self):
        assert self.make(host="altatech.ai").base_url == "https://altatech.ai"
        assert self.make(host="http://127.0.0.1", port=8765).base_url == "http://127.0.0.1:8765"

    def test_fields_a_form_left_empty_take_their_defaults(self):
        """Airflow 2.11's form stores an empty integer field as null; other forms send ""."""
        settings = self.make(auth_scheme="", timeout="", max_answer_bytes=None, requests_per_minute="")
        assert (settings.auth_scheme, settings.timeout) == ("bearer", 30.0)
        assert settings.max_answer_bytes == protocol.MAX_ANSWER_BYTES
        assert settings.requests_per_minute is None

    def test_numbers_typed_in_a_form_arrive_as_text(self):
        settings = self.make(timeout="12.5", max_answer_bytes="1024", requests_per_minute="3")
        assert (settings.timeout, settings.max_answer_bytes, settings.requests_per_minute) == (
            12.5,
            1024,
            3.0,
        )

    def test_key_never_in_repr(self):
        assert "secret-key" not in repr(self.make(password="secret-key"))

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"password": None}, "no API key"),
            ({"auth_scheme": "basic"}, "auth_scheme"),
            ({"timeout": 0}, "timeout"),
            ({"timeout": "soon"}, "timeout"),
            ({"host": "ftp://altatech.ai"}, "base URL"),
        ],
    )
    def test_bad_connection(self, kwargs, match):
        with pytest.raises(AltaBotsConfigError, match=match):
            self.make(**kwargs)


def test_redacted_webhooks_hide_header_values_and_url_paths_however_short():
    hooks = [
        {
            "method": "POST",
            "url": "https://hooks.example:8443/T0/B0/XXXX?token=abc",
            "headers": {"X-C": "ab"},
        },
        {"method": "GET", "url": "https://cb.example"},
    ]
    assert protocol.redacted_webhooks(hooks) == [
        {"method": "POST", "url": "https://hooks.example:8443/***", "headers": {"X-C": "***"}},
        {"method": "GET", "url": "https://cb.example"},
    ]
    assert protocol.webhook_secrets(hooks) == ["ab", "T0/B0/XXXX", "token=abc"]


@pytest.mark.parametrize(
    "rendered", ['[{"url": "https://hooks.example/T0/secret"}]', ["https://a.example/x"]]
)
def test_webhooks_that_are_not_a_list_of_mappings_are_hidden_whole(rendered):
    """A template that rendered to a string fails the task, and its text never reaches a rendered field."""
    shown = protocol.redacted_webhooks(rendered)
    assert "secret" not in str(shown)
    assert "a.example/x" not in str(shown)
