"""
Issue 9, cases 13-16: whatever bytes come back, the provider answers with one of its own errors,
reads no more than ``max_answer_bytes`` of it (after decompression), and keeps the run id it
knows.
"""

from __future__ import annotations

import gzip
import json
import tracemalloc

import pytest
from airflow.providers.common.compat.sdk import TaskDeferred

from airflow_provider_altabots import protocol
from airflow_provider_altabots.exceptions import (
    AltaBotsConfigError,
    AltaBotsError,
    AltaBotsInvokeUncertain,
    AltaBotsStatusUnknown,
    AltaBotsTransientError,
)
from tests.fake_api import record
from tests.hostile.conftest import hook, operator, raises, returns, run_trigger, sensor, trigger
from tests.hostile.server import (
    INVOKE,
    RESULT,
    VERIFY,
    answer,
    bomb,
    close,
    corrupt_tls,
    gzip_bomb,
    reset,
)

DEPTH = 200_000

# -- case 13: bodies no parser should choke on -----------------------------------------------------

HOSTILE = {
    "superscript code 400": (400, {"code": "²"}),
    "superscript code 200": (200, {"code": "²", "message": "?"}),
    "superscript nested code": (500, {"error": {"code": "²", "message": "?"}}),
    "deep array": (200, b"[" * DEPTH + b"]" * DEPTH),
    "deep object": (200, b'{"a":' * DEPTH + b"1" + b"}" * DEPTH),
    "deep error body": (400, b'{"code":' * DEPTH + b"1" + b"}" * DEPTH),
    "binary": (200, bytes(range(256)) * 4),
    "binary 502": (502, b"\xff\xfe\x00\x80garbage"),
    "invalid utf-8 json": (200, b'{"status": "\xff\xfe"}'),
    "huge number code": (400, b'{"code": 1e999999, "message": "x"}'),
    "json null": (200, b"null"),
    "json list": (200, b"[]"),
    "truncated json": (200, b'{"workflowRunId": "run-1", "status": "SUCC'),
}


@pytest.mark.parametrize(("status", "body"), list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_status_answer_on_the_worker_is_a_provider_error(server, connect, status, body):
    server.on(RESULT, answer(status, body))
    connect(server)
    raises(AltaBotsError, hook().get_run_result, "run-1")


@pytest.mark.parametrize(("status", "body"), list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_status_answer_in_the_trigger_is_an_event_naming_the_run(server, connect, status, body):
    server.on(RESULT, answer(status, body))
    connect(server)
    event, _ = run_trigger(trigger("run-h", max_consecutive_failures=1), 10)
    assert event["status"] != "success", event
    assert event["run_id"] == "run-h"


@pytest.mark.parametrize(("status", "body"), list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_status_answer_to_the_sensor(server, connect, context, status, body):
    server.on(RESULT, answer(status, body))
    connect(server)
    try:
        outcome = sensor("run-h").poke(context)
    except AltaBotsError as error:
        outcome = error
    returns(lambda: outcome)
    assert outcome is False or isinstance(outcome, AltaBotsError), outcome


@pytest.mark.parametrize(
    ("tls", "cut"),
    [("trusted", corrupt_tls()), ("trusted", reset()), (None, reset()), (None, close())],
    ids=["tls-corrupt-record", "tls-reset", "tcp-reset", "tcp-close"],
)
def test_status_check_cut_off_is_a_provider_error(make_server, trust, connect, tls, cut):
    """A status check whose answer is lost: a transient error on the worker, an event in the trigger."""
    trust()
    server = make_server(tls=tls)
    server.on(RESULT, cut)
    connect(server)
    raises(AltaBotsTransientError, hook().get_run_result, "run-c")
    event, _ = run_trigger(trigger("run-c", max_consecutive_failures=1), 10)
    assert event["status"] in ("unknown", "transient"), event
    assert event["run_id"] == "run-c"


@pytest.mark.parametrize(
    "name", ["superscript code 400", "deep array", "deep error body", "binary", "truncated json"]
)
def test_hostile_invoke_answer_is_a_provider_error_after_one_invoke(server, connect, context, name):
    status, body = HOSTILE[name]
    server.on(INVOKE, answer(status, body))
    connect(server)
    raises(AltaBotsError, operator(wait_for_termination=False).execute, context)
    assert server.count(INVOKE) == 1


@pytest.mark.parametrize("name", ["superscript code 400", "deep array", "binary"])
def test_hostile_verify_answer_fails_test_connection(server, connect, name):
    status, body = HOSTILE[name]
    server.on(VERIFY, answer(status, body))
    connect(server)
    ok, _ = returns(hook().test_connection)
    assert not ok


# -- case 14: answers bigger than max_answer_bytes -----------------------------------------------

SMALL_CAP = 64 * 1024


def padded(run_id: str, size: int) -> bytes:
    """A SUCCEED record of ``run_id``, at least ``size`` bytes of JSON."""
    return json.dumps(record("SUCCEED", run_id=run_id, output={"pad": "x" * size})).encode()


def assert_names_the_cap(text: str, run_id: str) -> None:
    assert "max_answer_bytes" in text, text
    assert run_id in text, text


def test_status_answer_over_the_default_cap(server, connect):
    cap = getattr(protocol, "MAX_ANSWER_BYTES", 8 * 1024 * 1024)
    server.on(RESULT, answer(200, padded("run-big", cap + 1024)))
    connect(server)
    error = raises(AltaBotsConfigError, hook().get_run_result, "run-big")
    assert_names_the_cap(str(error), "run-big")


def test_status_answer_over_the_connection_cap_on_the_worker(server, connect):
    server.on(RESULT, answer(200, padded("run-big", 2 * SMALL_CAP)))
    connect(server, max_answer_bytes=SMALL_CAP)
    error = raises(AltaBotsConfigError, hook().get_run_result, "run-big")
    assert_names_the_cap(str(error), "run-big")


def test_status_answer_over_the_connection_cap_in_the_trigger(server, connect):
    server.on(RESULT, answer(200, padded("run-big", 2 * SMALL_CAP)))
    connect(server, max_answer_bytes=SMALL_CAP)
    event, _ = run_trigger(trigger("run-big"), 10)
    assert event["status"] == "config", event
    assert_names_the_cap(event["message"], "run-big")


def test_answer_under_the_connection_cap_is_read(server, connect):
    server.on(RESULT, answer(200, padded("run-ok", SMALL_CAP // 2)))
    connect(server, max_answer_bytes=SMALL_CAP)
    assert returns(hook().get_run_result, "run-ok")["status"] == "SUCCEED"


@pytest.mark.parametrize("sync_invoke", [False, True], ids=["async_invoke", "sync_invoke"])
def test_invoke_answer_over_the_cap_is_uncertain(server, connect, context, sync_invoke):
    server.on(INVOKE, answer(200, padded("run-big", 2 * SMALL_CAP)))
    connect(server, max_answer_bytes=SMALL_CAP)
    op = operator(sync_invoke=sync_invoke, wait_for_termination=False)
    raises(AltaBotsInvokeUncertain, op.execute, context)
    assert server.count(INVOKE) == 1


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_answer_under_the_cap_is_decoded(server, connect, encoding):
    body = padded("run-z", 1000)
    packed = gzip.compress(body) if encoding == "gzip" else __import__("zlib").compress(body)
    server.on(RESULT, answer(200, packed, {"Content-Encoding": encoding}))
    connect(server)
    assert returns(hook().get_run_result, "run-z")["status"] == "SUCCEED"


BOMB_CAP = 1024 * 1024
#: Peak memory a capped read may use: the cap, a copy or two of it, chunks, bookkeeping. A read
#: that inflates the bomb needs 128 MiB at least.
BOMB_PEAK = BOMB_CAP + 16 * 1024 * 1024


def peak_memory(call):
    bomb("gzip"), bomb("deflate")  # built before measuring
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        outcome = call()
        return outcome, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_gzip_bomb_on_the_worker_stops_at_the_cap(server, connect, encoding):
    server.on(RESULT, gzip_bomb(encoding))
    connect(server, max_answer_bytes=BOMB_CAP)
    error, peak = peak_memory(lambda: raises(AltaBotsConfigError, hook().get_run_result, "run-bomb"))
    assert_names_the_cap(str(error), "run-bomb")
    assert peak < BOMB_PEAK, f"peak {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_gzip_bomb_in_the_trigger_stops_at_the_cap(server, connect, encoding):
    server.on(RESULT, gzip_bomb(encoding))
    connect(server, max_answer_bytes=BOMB_CAP)
    (event, _), peak = peak_memory(lambda: run_trigger(trigger("run-bomb"), 10))
    assert event["status"] == "config", event
    assert_names_the_cap(event["message"], "run-bomb")
    assert peak < BOMB_PEAK, f"peak {peak / 2**20:.0f} MiB"


def test_gzip_bomb_as_invoke_answer_is_uncertain(server, connect, context):
    server.on(INVOKE, gzip_bomb())
    connect(server)
    raises(AltaBotsInvokeUncertain, operator(wait_for_termination=False).execute, context)
    assert server.count(INVOKE) == 1


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "x-hostile", "gzip, x-hostile"])
def test_unknown_content_encoding_is_a_provider_error(server, connect, encoding):
    server.on(RESULT, answer(200, record("SUCCEED", run_id="run-1"), {"Content-Encoding": encoding}))
    connect(server)
    raises(AltaBotsError, hook().get_run_result, "run-1")
    event, _ = run_trigger(trigger("run-1", max_consecutive_failures=1), 10)
    assert event["status"] != "success", event


# -- case 15: a run id longer than MAX_RUN_ID_LENGTH from the user ---------------------------------


@pytest.mark.parametrize("deferrable", [False, True])
def test_sensor_refuses_an_overlong_run_id_before_any_request(server, connect, context, deferrable):
    long_id = "r" * (getattr(protocol, "MAX_RUN_ID_LENGTH", 128) + 1)
    connect(server)
    raises(AltaBotsConfigError, sensor(long_id, deferrable=deferrable).execute, context)
    raises(AltaBotsConfigError, sensor(long_id).poke, context)
    assert server.count() == 0
    assert context["ti"].xcom == {}


def test_run_id_of_the_longest_length_is_fine(server, connect, context):
    longest = "r" * getattr(protocol, "MAX_RUN_ID_LENGTH", 128)
    connect(server)
    assert returns(sensor(longest).poke, context).xcom_value == {"answer": "42"}


# -- case 16: the run id in the record ---------------------------------------------------------------


def without_run_id(run_id: str) -> dict:
    data = record("SUCCEED", run_id=run_id)
    del data["workflowRunId"]
    return data


def test_resumed_run_whose_final_record_lacks_its_id_keeps_the_id(server, connect, context):
    op = operator()
    context["task_state_store"].data[op.external_id_key] = "run-old"
    server.on(RESULT, answer(200, without_run_id("run-old")), run_id="run-old")
    connect(server)
    assert returns(op.execute, context) == {"answer": "42"}
    assert server.count(INVOKE) == 0
    assert context["ti"].xcom["workflow_run_id"] == "run-old"


def test_deferred_run_whose_final_record_lacks_its_id_keeps_the_id(server, connect, context):
    server.default_statuses = ["RUNNING"]
    connect(server)
    op = operator(deferrable=True)
    deferred = raises(TaskDeferred, op.execute, context)
    server.statuses("run-1", "SUCCEED")
    event, _ = run_trigger(deferred.trigger, 10)
    assert event["status"] == "success", event
    server.on(RESULT, answer(200, without_run_id("run-1")), run_id="run-1")
    assert returns(op.execute_complete, context, event) == {"answer": "42"}
    assert context["ti"].xcom["workflow_run_id"] == "run-1"


def test_record_of_another_run_is_a_broken_answer_on_the_worker(server, connect, context):
    server.on(RESULT, answer(200, record("SUCCEED", run_id="run-other")), run_id="run-1")
    connect(server)
    error = raises(AltaBotsError, operator(max_consecutive_failures=2).execute, context)
    assert isinstance(error, AltaBotsStatusUnknown | AltaBotsTransientError), error
    assert server.count(RESULT) == 2  # both checks counted as failed, none as the result


def test_record_of_another_run_is_a_broken_answer_in_the_trigger(server, connect):
    server.on(RESULT, answer(200, record("SUCCEED", run_id="run-other")), run_id="run-1")
    connect(server)
    event, _ = run_trigger(trigger("run-1", max_consecutive_failures=2), 10)
    assert event["status"] == "unknown", event
    assert server.count(RESULT) == 2
