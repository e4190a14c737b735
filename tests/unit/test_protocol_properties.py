"""
Property-based tests of the pure protocol layer (issue 9).

Hypothesis throws hostile answers, headers, connections, inputs and run ids at ``protocol``.
Each property states an outcome that must hold for *every* value, so whole classes of bugs
(a stray ValueError or RecursionError, a leaked API key, a 3xx taken for a result, NaN sent to
the API) cannot come back unnoticed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from types import MappingProxyType
from typing import Any, NamedTuple
from urllib.parse import quote, urlsplit

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from airflow_provider_altabots import protocol
from airflow_provider_altabots.exceptions import AltaBotsConfigError, AltaBotsError

FAST = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example, HealthCheck.data_too_large],
)

RESULT_REQUEST = protocol.result_request("run-1")
INVOKE_REQUEST = protocol.invoke_request({"a": 1})
REQUESTS = st.sampled_from([RESULT_REQUEST, INVOKE_REQUEST])

# --------------------------------------------------------------------------------------------
# JSON values and answer bodies
# --------------------------------------------------------------------------------------------

#: Any JSON value Python's json module reads, NaN and +-Infinity included.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
#: Codes an error body may carry, the hostile ones first: "²" is a digit that int() refuses.
HOSTILE_CODES = st.sampled_from(
    [
        "²",
        "١٢",
        "0",
        "00",
        "200",
        " 40127 ",
        "40127",
        40127,
        "50000",
        50000,
        20022,
        40000,
        "-1",
        "1e3",
        1e308,
        -0.0,
        math.nan,
        True,
        False,
        "",
        [],
        {},
        [1],
        {"a": 1},
        10**40,
    ]
)
#: A non-zero code in a 2xx answer is an error; these are the spellings of "no error".
NO_ERROR_NUMBERS = (0.0, 200.0)


def _dumps(value: Any, *, ascii_only: bool = True) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def _nested_arrays(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


JSON_OBJECTS = st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=5)
ERROR_BODIES = st.one_of(
    st.fixed_dictionaries({"code": JSON_VALUES | HOSTILE_CODES, "message": JSON_VALUES}),
    st.fixed_dictionaries({"code": HOSTILE_CODES}, optional={"msg": JSON_VALUES, "status": JSON_VALUES}),
    st.fixed_dictionaries({"error": JSON_VALUES}),
    st.fixed_dictionaries(
        {
            "error": st.fixed_dictionaries(
                {},
                optional={"code": JSON_VALUES | HOSTILE_CODES, "message": JSON_VALUES, "status": JSON_VALUES},
            )
        }
    ),
)
RECORDS = st.fixed_dictionaries(
    {"workflowRunId": st.just("run-1") | JSON_VALUES},
    optional={"status": st.sampled_from(["SUCCEED", "FAILED", "RUNNING", "PENDING"]) | JSON_VALUES},
)
BODIES = st.one_of(
    st.binary(max_size=200),
    JSON_VALUES.map(_dumps),
    JSON_OBJECTS.map(lambda value: _dumps(value, ascii_only=False)),
    ERROR_BODIES.map(_dumps),
    RECORDS.map(_dumps),
    st.integers(1, 3000).map(_nested_arrays),
    st.integers(1, 3000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
    # A JSON object cut short, with junk after the cut.
    st.tuples(JSON_OBJECTS.map(_dumps), st.integers(0, 40), st.binary(max_size=4)).map(
        lambda cut: cut[0][: cut[1]] + cut[2]
    ),
    # The same object in another Unicode encoding json.loads may or may not detect.
    st.tuples(JSON_OBJECTS | ERROR_BODIES, st.sampled_from(["utf-16", "utf-32", "utf-8-sig", "latin-1"])).map(
        lambda pair: json.dumps(pair[0]).encode(pair[1], "replace")
    ),
)

# --------------------------------------------------------------------------------------------
# Statuses and headers
# --------------------------------------------------------------------------------------------

STATUSES = st.one_of(
    st.sampled_from(
        [200, 201, 202, 204, 299, 300, 301, 302, 303, 304, 307, 308, 400, 401, 403, 404, 429, 500, 503]
    ),
    st.integers(200, 299),
    st.integers(300, 399),
    st.integers(400, 499),
    st.integers(500, 599),
    st.integers(100, 599),
    st.integers(0, 999),
)
PRINTABLE = st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=30)
HOSTILE_NUMBERS = st.sampled_from(
    [
        "nan",
        "NaN",
        "-nan",
        "inf",
        "-inf",
        "Infinity",
        "-Infinity",
        "1e309",
        "-1e309",
        "1e400",
        "9" * 400,
        "18446744073709551616",
        "-1",
        "-0",
        "0",
        "0.0",
        "1e-320",
        " 7 ",
        "7s",
        "0x10",
        "1_000",
        "١٢٣",
        "²",
        "",
        " ",
        "12, 13",
        "86401",
        "1e11",
        "1e12",
        "1e15",
        "-1e15",
    ]
)
HTTP_DATES = st.one_of(
    st.sampled_from(
        [
            "Fri, 31 Dec 9999 23:59:59 GMT",
            "Mon, 01 Jan 0001 00:00:00 GMT",
            "Thu, 01 Jan 1970 00:00:00 -0000",
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "Wed, 32 Foo 2025 25:61:61 +9999",
            "Tue, 15 Nov 1994 08:12:31 +2400",
            "Tue, 15 Nov 99999 08:12:31 GMT",
        ]
    ),
    st.tuples(
        st.datetimes(), st.sampled_from(["GMT", "-0000", "+0000", "+2359", "-2359", "UTC", "EST", ""])
    ).map(lambda pair: f"{pair[0]:%a, %d %b %Y %H:%M:%S} {pair[1]}"),
)
LOCATIONS = st.sampled_from(
    [
        "https://evil.example/steal?token=1",
        "//evil.example/x",
        "/v1/other",
        "http://[::1",
        "https://user:pw@evil.example:99999/p?q#f",
        "",
    ]
)
HEADER_VALUES = st.one_of(
    HOSTILE_NUMBERS,
    st.integers().map(str),
    st.floats().map(repr),
    st.floats(min_value=0, max_value=1e13).map(str),
    HTTP_DATES,
    LOCATIONS,
    st.sampled_from(["application/json", "text/html; charset=utf-8", "application/json; charset=utf-16"]),
    PRINTABLE,
)
HEADER_NAMES = st.sampled_from(
    [
        "Retry-After",
        "retry-after",
        "RETRY-AFTER",
        "X-RateLimit-Reset",
        "x-ratelimit-reset",
        "Location",
        "location",
        "Content-Type",
        "content-type",
    ]
)
HEADERS = st.dictionaries(
    HEADER_NAMES | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12),
    HEADER_VALUES,
    max_size=5,
)


def _code_means_no_error(code: object) -> bool:
    """Whether a returned answer's ``code`` is one of the spellings of success."""
    if code is None or code == "" or isinstance(code, bool):
        return True  # a JSON true/false is no error code (the spec is silent on it)
    if isinstance(code, int | float):
        return code in NO_ERROR_NUMBERS
    if isinstance(code, str):
        try:
            return float(code.strip()) in NO_ERROR_NUMBERS
        except ValueError:
            return False
    return False


# --------------------------------------------------------------------------------------------
# 1. read_answer
# --------------------------------------------------------------------------------------------


@FAST
@given(request=REQUESTS, status=STATUSES, headers=HEADERS, body=BODIES)
@example(request=RESULT_REQUEST, status=400, headers={}, body=b'{"code": "\\u00b2"}')
@example(request=RESULT_REQUEST, status=200, headers={}, body='{"code": "\u00b2"}'.encode())
@example(request=RESULT_REQUEST, status=200, headers={}, body=_nested_arrays(200_000))
@example(request=INVOKE_REQUEST, status=502, headers={}, body=_nested_arrays(200_000))
@example(request=RESULT_REQUEST, status=200, headers={}, body=b'{"code": [1]}')
@example(request=RESULT_REQUEST, status=200, headers={}, body=b'{"error": "x"}')
@example(request=RESULT_REQUEST, status=200, headers={}, body=b'{"error": {"code": {"a": 1}}}')
@example(request=RESULT_REQUEST, status=400, headers={}, body=b'{"error": {"code": {"a": 1}}}')
@example(
    request=RESULT_REQUEST,
    status=301,
    headers={"Location": "https://evil.example/v1/workflow/query/result"},
    body=b'{"workflowRunId": "run-1", "status": "SUCCEED"}',
)
@example(request=INVOKE_REQUEST, status=100, headers={}, body=b'{"workflowRunId": "run-1"}')
@example(
    request=RESULT_REQUEST,
    status=200,
    headers={},
    body=b'{"workflowRunId": "run-1", "status": "FAILED", "error": {"message": "LLM node timed out"}}',
)
@example(request=RESULT_REQUEST, status=429, headers={"Retry-After": "1e400"}, body=b"")
def test_read_answer_is_a_dict_or_an_altabots_error(request, status, headers, body):
    """
    Any answer at all is a dict or an AltaBotsError naming the run: never ValueError,
    RecursionError, ...; only a 2xx is ever a result (a 1xx/3xx never), and never an error body.
    """
    try:
        answer = protocol.read_answer(request, status, headers, body)
    except AltaBotsError as error:
        refused: AltaBotsError | None = error
    else:
        refused = None
    if refused is not None:
        if request.run_id:
            assert refused.run_id == request.run_id or request.run_id in str(refused), "the run is not named"
        return
    assert isinstance(answer, dict)
    assert 200 <= status <= 299, f"HTTP {status} was taken for a result"
    assert _code_means_no_error(answer.get("code")), f"code {answer.get('code')!r} was taken for a result"
    if "workflowRunId" not in answer:  # a run record may describe its run's failure in "error"
        assert not isinstance(answer.get("error"), Mapping), "an error body was taken for a result"
    try:  # the result is the object the body holds, nothing added or dropped
        same = json.dumps(answer, sort_keys=True) == json.dumps(json.loads(body), sort_keys=True)
    except (ValueError, RecursionError):
        return
    assert same, "the result is not the answer's JSON object"


PATH_MARK = "p4th-s3cret"
QUERY_MARK = "qu3ry-s3cret"


@FAST
@given(
    request=REQUESTS,
    status=st.sampled_from([301, 302, 303, 307, 308]),
    host=st.sampled_from(["evil.example", "10.0.0.9", "other-host.example"]),
    header=st.sampled_from(["Location", "location"]),
    quote_location_in_body=st.booleans(),
    body=BODIES | RECORDS.map(_dumps),
)
@example(
    request=RESULT_REQUEST,
    status=301,
    host="evil.example",
    header="Location",
    quote_location_in_body=False,
    body=b'{"workflowRunId": "run-1", "status": "SUCCEED"}',
)
def test_redirect_is_a_config_error_naming_status_and_host_only(
    request, status, host, header, quote_location_in_body, body
):
    """
    A redirect is never followed nor taken for a result: it is a config error naming the status
    and the Location's host, never the Location's path or query (they may hold tokens).
    """
    location = f"https://{host}/{PATH_MARK}/x?{QUERY_MARK}=1"
    if quote_location_in_body:
        body = f'<html><a href="{location}">Moved</a></html>'.encode()
    with pytest.raises(AltaBotsConfigError) as caught:
        protocol.read_answer(request, status, {header: location}, body)
    text = str(caught.value)
    assert str(status) in text
    assert host in text
    assert PATH_MARK not in text
    assert QUERY_MARK not in text


#: Keys of letters no fixed message text holds six of in a row, and the characters JSON escapes.
ECHOED_KEYS = st.text(st.sampled_from('ABCDEFGHJKLMNPQRSTUVWXYZ23456789"\\_-=+/'), min_size=8, max_size=64)
#: What an answer may surround the key with ("." and "*" left out: they would look like a cut or
#: a hidden secret).
FILLER = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters=".*"), max_size=400)


def _key_pieces(key: str) -> set[str]:
    """Every 6-character piece of the key, as it is and as JSON and repr escape it."""
    forms = {key, json.dumps(key)[1:-1], repr(key)[1:-1]}
    return {form[i : i + 6] for form in forms for i in range(len(form) - 5)}


@st.composite
def echoing_answers(draw: st.DrawFn) -> tuple[str, bytes]:
    """An answer that quotes the key at any place: in a code, a message, a page or a record."""
    key = draw(ECHOED_KEYS)
    text = draw(FILLER) + key + draw(FILLER)
    shape = draw(st.sampled_from(["code", "message", "altabots", "page", "record"]))
    body = {
        "code": {"code": text, "message": "refused"},
        "message": {"code": 40000, "message": text},
        "altabots": {"error": {"code": text, "message": text}},
        "record": {"workflowRunId": "run-1", "status": "SUCCEED", "output": {text: [text]}},
    }.get(shape)
    return key, text.encode() if body is None else json.dumps(body).encode()


@FAST
@given(answer=echoing_answers(), status=st.sampled_from([200, 400, 401, 404, 429, 500, 502]))
def test_an_echoed_key_reaches_no_message_and_no_result_whole_or_in_part(answer, status):
    """
    Wherever an answer quotes the key, and however its message is cut: no 6-character piece of
    the key is in the message, no cut ends in the key's first characters, and a result holds
    the key nowhere.
    """
    key, body = answer
    try:
        result = protocol.read_answer(RESULT_REQUEST, status, {}, body, secrets=(key,))
    except AltaBotsError as error:
        text = str(error)
        assert not {piece for piece in _key_pieces(key) if piece in text}, text
        for cut in re.finditer(re.escape("..."), text):
            before = text[: cut.start()]
            assert not any(before.endswith(key[:size]) for size in range(1, len(key) + 1)), text
        return
    dumped = json.dumps(result)
    assert not any(form in dumped for form in (key, json.dumps(key)[1:-1])), dumped


# --------------------------------------------------------------------------------------------
# 2. retry_after
# --------------------------------------------------------------------------------------------


def _depth(value: Any) -> int:
    pending, deepest = [(value, 0)], 0
    while pending:
        node, depth = pending.pop()
        if isinstance(node, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            pending.extend((child, depth) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


#: JSON objects whose strings are full of brackets and escapes, which must not count as nesting.
BRACKETY_TEXT = st.text(alphabet='[]{}"\\ab', max_size=12)
NESTED_OBJECTS = st.dictionaries(
    BRACKETY_TEXT,
    st.recursive(
        st.none() | st.integers() | BRACKETY_TEXT,
        lambda children: (
            st.lists(children, max_size=3) | st.dictionaries(BRACKETY_TEXT, children, max_size=3)
        ),
        max_leaves=12,
    ),
    max_size=3,
)


@FAST
@given(value=NESTED_OBJECTS, extra=st.integers(0, 2 * protocol.MAX_JSON_DEPTH))
def test_a_json_object_is_read_as_written_up_to_the_depth_limit_and_never_beyond(value, extra):
    """Nesting is counted outside strings only: any object up to the limit reads back whole, none beyond."""
    wrapped: Any = value
    for level in range(extra):
        wrapped = {"[": wrapped} if level % 2 else [wrapped]
    outer = {"{": wrapped}
    body = json.dumps(outer).encode()
    read = protocol._json_object(body)
    if _depth(outer) <= protocol.MAX_JSON_DEPTH:
        assert read == outer
    else:
        assert read is None


def test_a_deep_body_is_refused_without_leaving_a_finalizer_short_of_stack():
    """
    A body nested 200,000 deep is read as no JSON before the parser descends: the garbage
    collector, which may run at any allocation, finds the stack as deep as it was.

    Before, the parser went down to the recursion limit, a collection ran there, and the
    finalizers it called (another trigger's objects, on a triggerer) failed with RecursionError.
    """
    import gc

    def descend(levels: int) -> int:
        return 0 if levels == 0 else descend(levels - 1) + 1

    short_of_stack = []

    def probe(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            try:
                descend(50)
            except RecursionError:
                short_of_stack.append(info["generation"])

    depth = 200_000
    thresholds = gc.get_threshold()
    gc.callbacks.append(probe)
    gc.set_threshold(1)
    try:
        for body in (b'{"code":' * depth + b"1" + b"}" * depth, _nested_arrays(depth)):
            with pytest.raises(AltaBotsError):
                protocol.read_answer(RESULT_REQUEST, 400, {}, body)
    finally:
        gc.set_threshold(*thresholds)
        gc.callbacks.remove(probe)
    assert short_of_stack == [], f"{len(short_of_stack)} collections ran with no stack left for a finalizer"


@FAST
@given(headers=HEADERS, now=st.floats(min_value=0, max_value=4e9))
@example(headers={"Retry-After": "nan"}, now=1.7e9)
@example(headers={"Retry-After": "inf"}, now=1.7e9)
@example(headers={"Retry-After": "-inf"}, now=1.7e9)
@example(headers={"Retry-After": "1e400"}, now=1.7e9)
@example(headers={"X-RateLimit-Reset": "inf"}, now=1.7e9)
@example(headers={"X-RateLimit-Reset": "-1e400"}, now=1.7e9)
@example(headers={"X-RateLimit-Reset": "nan"}, now=1.7e9)
@example(headers={"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"}, now=1.7e9)
@example(headers={"Retry-After": "Mon, 01 Jan 0001 00:00:00 -0000"}, now=1.7e9)
def test_retry_after_is_none_or_a_bounded_finite_float(headers, now):
    """Whatever the headers say, the wait is None or seconds in [0, 86400]: never nan, inf or negative."""
    wait = protocol.retry_after(headers, now=now)
    if wait is not None:
        assert isinstance(wait, float)
        assert math.isfinite(wait)
        assert 0.0 <= wait <= 86400.0
    if not {name.lower() for name in headers} & {"retry-after", "x-ratelimit-reset"}:
        assert wait is None


# --------------------------------------------------------------------------------------------
# 3. ConnectionSettings.from_connection
# --------------------------------------------------------------------------------------------

#: Every key the strategies make starts with this; no message, repr or URL may ever show it.
KEY_MARK = "sk-"
ASCII_SPACE = " \t\r\n\x0b\x0c"
WHITESPACE = st.text(st.sampled_from([*ASCII_SPACE, "\x1c", "\x85", "\xa0", "\u2003", "\u3000"]), max_size=3)
KEY_BODIES = st.one_of(
    # Keys that should work: printable ASCII.
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=8, max_size=40),
    # Any text: control characters, whitespace and non-ASCII inside.
    st.text(min_size=8, max_size=40),
    # A good key with one bad character inside.
    st.tuples(
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=8, max_size=20),
        st.sampled_from(["\n", "\r", "\t", "\x00", "\x7f", "\u00e9", "\u2028", " "]),
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20),
    ).map("".join),
)
HOSTNAMES = st.one_of(
    st.sampled_from(
        [
            "127.0.0.1",
            "localhost",
            "altatech.ai",
            "api-sg.gptbots.ai",
            "[::1]",
            "[::1",
            "::1]",
            "[::ffff:127.0.0.1]",
            "[fe80::1%25eth0]",
            "bücher.example",
            "例え.jp",
            "xn--bcher-kva.example",
            "",
            " ",
            "a b",
            "h\x00",
            "h\n",
        ]
    ),
    st.text(max_size=12),
)
URL_PORTS = st.one_of(
    st.sampled_from(
        ["", ":", ":0", ":1", ":443", ":8765", ":65535", ":65536", ":99999", ":-1", ":abc", ":٣"]
    ),
    st.sampled_from([":+80", ": 80", ":80 "]),
    st.integers().map(lambda port: f":{port}"),
)
PATHS = st.sampled_from(["", "/", "/v1", "/v1/", "//", "/v1/workflow", "/a/b/"]) | st.text(max_size=8).map(
    lambda text: "/" + text
)
QUERIES = st.sampled_from(["", "", "?", "?x=1"]) | st.text(max_size=8).map(lambda text: "?" + text)
FRAGMENTS = st.sampled_from(["", "", "#", "#frag"]) | st.text(max_size=8).map(lambda text: "#" + text)
SCHEMES = st.sampled_from(["https://", "http://", "HTTPS://", "ftp://", "file://", "://", ""]) | st.text(
    max_size=5
).map(lambda text: text + "://")
FIELD_PORTS = st.one_of(
    st.none(),
    st.sampled_from([0, 1, 443, 8765, 65535, 65536, 99999, -1, -443, 2**31, 2**63, 10**30]),
    st.sampled_from(["abc", "8443", ""]),
    st.integers(),
)
SECONDS = st.sampled_from(
    [
        30,
        12,
        "12",
        0.001,
        1e-9,
        0,
        -1,
        1e300,
        math.nan,
        math.inf,
        -math.inf,
        "abc",
        "nan",
        "1e400",
        True,
        None,
        86400,
    ]
)
BYTE_COUNTS = st.sampled_from([1, 1024, 8 * 2**20, 0, -1, 2**70, math.nan, math.inf, 1.5, "1000", True, None])
EXTRAS = st.fixed_dictionaries(
    {},
    optional={
        "auth_scheme": st.sampled_from(["bearer", "raw", "Bearer", " RAW ", "basic", "", None]) | JSON_VALUES,
        "timeout": SECONDS | JSON_VALUES,
        "max_answer_bytes": BYTE_COUNTS | JSON_VALUES,
    },
)


class Connection(NamedTuple):
    host: str | None
    port: Any
    password: str | None
    extra: dict[str, Any]
    #: The key as drawn ("sk-..."), without the whitespace around it; None when there is none.
    key: str | None = None
    #: The path part the host was built with, when it was built from parts.
    path: str | None = None
    #: Every text of the connection except the key, to rule out false alarms on KEY_MARK.
    benign: str = ""

    @property
    def key_forms(self) -> set[str]:
        """The key as it may be quoted: raw, stripped, percent-encoded."""
        if self.key is None:
            return set()
        forms = {self.key, self.key.strip(), quote(self.key.strip(), safe="")}
        if self.password:
            forms |= {self.password, self.password.strip()}
        return {form for form in forms if form}


#: Parts of a connection that should work; a "tidy" connection is drawn mostly from these, so the
#: properties of settings that come back are exercised as often as the refusals.
GOOD_PARTS = {
    "key_body": st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=8, max_size=40),
    "scheme": st.sampled_from(["https://", "http://", ""]),
    "userinfo": st.just(""),
    "hostname": st.sampled_from(["127.0.0.1", "localhost", "altatech.ai", "api-sg.gptbots.ai", "[::1]"]),
    "url_port": st.sampled_from(["", ":1", ":443", ":8765", ":65535"]),
    "path": st.sampled_from(["", "/", "/v1", "/v1/", "/api"]),
    "query": st.just(""),
    "fragment": st.just(""),
    "field_port": st.sampled_from([None, 443, 8765]),
    "extra": st.fixed_dictionaries(
        {},
        optional={
            "auth_scheme": st.sampled_from(["bearer", "raw", "Bearer", " RAW "]),
            "timeout": st.sampled_from([30, 12, "12", 0.5, 86400]),
            "max_answer_bytes": st.sampled_from([1024, 8 * 2**20, 2**40]),
        },
    ),
}
WILD_PARTS = {
    "key_body": KEY_BODIES,
    "scheme": SCHEMES,
    "userinfo": st.sampled_from(["", "", "user@", "user:pw@", "key", "user:key"]),
    "hostname": HOSTNAMES,
    "url_port": URL_PORTS,
    "path": PATHS,
    "query": QUERIES,
    "fragment": FRAGMENTS,
    "field_port": FIELD_PORTS,
    "extra": EXTRAS,
}


@st.composite
def connections(draw: st.DrawFn) -> Connection:
    """The fields of an ``altabots`` connection, the key sometimes hidden in the host's userinfo."""
    tidy = draw(st.booleans())

    def part(name: str) -> Any:
        good = draw(st.integers(0, 9)) > 0 if tidy else draw(st.integers(0, 2)) == 0
        return draw(GOOD_PARTS[name] if good else WILD_PARTS[name])

    key = None
    kind = "key" if tidy else draw(st.sampled_from(["key", "key", "key", "none", "empty", "blank"]))
    if kind == "key":
        key = KEY_MARK + part("key_body")
        password: str | None = draw(WHITESPACE) + key + draw(WHITESPACE)
    else:
        password = {"none": None, "empty": ""}.get(kind, draw(WHITESPACE.filter(bool)))

    host_kind = (
        "url" if tidy else draw(st.sampled_from(["none", "empty", "text", "url", "url", "url", "url"]))
    )
    path = None
    inserted = ""
    if host_kind == "none":
        host = None
    elif host_kind == "empty":
        host = ""
    elif host_kind == "text":
        host = draw(st.text(max_size=30))
    else:
        userinfo = part("userinfo")
        if userinfo.endswith("key"):
            if key is None:
                userinfo = ""
            else:
                inserted = draw(st.sampled_from([key.strip(), quote(key.strip(), safe="")]))
                userinfo = userinfo[:-3] + inserted + "@"
        path = part("path")
        host = "".join(
            [
                draw(WHITESPACE),
                part("scheme"),
                userinfo,
                part("hostname"),
                part("url_port"),
                path,
                part("query"),
                part("fragment"),
                draw(WHITESPACE),
            ]
        )
    port = part("field_port")
    extra = part("extra")
    benign_host = (host or "").replace(inserted, "") if inserted else (host or "")
    benign = "\n".join([benign_host, repr(port), repr(extra), str(extra)])
    return Connection(host, port, password, extra, key=key, path=path, benign=benign)


def _printed(error: BaseException) -> str:
    """What a log shows of an error: its text and the text of every error chained to it."""
    texts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts.append(f"{type(current).__name__}: {current} {current.args!r}")
        if current.__cause__ is not None:
            current = current.__cause__
        else:
            current = None if current.__suppress_context__ else current.__context__
    return "\n".join(texts)


def _assert_no_key(text: str, conn: Connection) -> None:
    for form in conn.key_forms:
        assert form not in text, "the API key is shown"
    if conn.key is not None and KEY_MARK not in conn.benign:
        assert KEY_MARK not in text, "a piece of the API key is shown"


def _settings(conn: Connection) -> protocol.ConnectionSettings:
    return protocol.ConnectionSettings.from_connection("c", conn.host, conn.port, conn.password, conn.extra)


def _clearly_not_a_positive_number(value: Any) -> bool:
    """Extra values no reading can take for a positive amount: bool, list, nan, 0, -1, 'abc'..."""
    if value is None:
        return False
    if isinstance(value, bool | list | dict):
        return True
    try:
        number = float(value)
    except (TypeError, ValueError):
        return True
    except OverflowError:  # an int beyond any float: positive or not, by its sign
        return value < 0
    return not (math.isfinite(number) and number > 0)


LEAKY_HOST = "https://user:sk-LEAKED-KEY-0123@127.0.0.1:8765"


@FAST
@given(conn=connections())
@example(conn=Connection(LEAKY_HOST, None, "sk-LEAKED-KEY-0123", {}, key="sk-LEAKED-KEY-0123"))
@example(
    conn=Connection(
        "https://sk-LEAKED-KEY-0123@127.0.0.1", None, "sk-LEAKED-KEY-0123", {}, key="sk-LEAKED-KEY-0123"
    )
)
@example(conn=Connection("https://h", None, "sk-LEAKED\n-KEY-0123", {}, key="sk-LEAKED\n-KEY-0123"))
@example(conn=Connection("https://h", None, "sk-LEAKED-KEY-\u00e90123", {}, key="sk-LEAKED-KEY-\u00e90123"))
@example(
    conn=Connection("https://h:sk-LEAKED-KEY-0123", 443, "sk-LEAKED-KEY-0123", {}, key="sk-LEAKED-KEY-0123")
)
def test_connection_is_settings_or_a_config_error_never_showing_the_key(conn):
    """A connection is settings or an AltaBotsConfigError; no error (chain), repr or URL shows the key."""
    try:
        conn_settings = _settings(conn)
    except AltaBotsConfigError as error:
        _assert_no_key(_printed(error), conn)
        return
    _assert_no_key(repr(conn_settings), conn)
    _assert_no_key(str(conn_settings), conn)
    _assert_no_key(conn_settings.base_url, conn)
    _assert_no_key(conn_settings.url(protocol.RESULT_PATH), conn)


@FAST
@given(conn=connections())
@example(conn=Connection("https://altatech.ai", None, " sk-abcdefgh\r\n", {}, key="sk-abcdefgh"))
@example(conn=Connection("https://altatech.ai/v1/", None, "sk-abcdefgh", {}, key="sk-abcdefgh", path="/v1/"))
@example(conn=Connection("altatech.ai", 8443, "sk-abcdefgh", {"auth_scheme": "raw"}, key="sk-abcdefgh"))
@example(conn=Connection("https://h.example:abc", None, "sk-abcdefgh", {}, key="sk-abcdefgh"))
@example(conn=Connection("https://h.example", 99999, "sk-abcdefgh", {}, key="sk-abcdefgh"))
@example(conn=Connection("https://h.example?x=1#f", None, "sk-abcdefgh", {}, key="sk-abcdefgh"))
@example(conn=Connection("https://h.example", None, "sk-abc\x00defgh", {}, key="sk-abc\x00defgh"))
@example(conn=Connection("https://h.example", None, "sk-abcdefgh", {"timeout": 1e300}, key="sk-abcdefgh"))
def test_connection_settings_are_safe_to_send(conn):
    """
    Settings that come back are sendable: a trimmed printable-ASCII key, a valid Authorization
    header, a base URL without userinfo/query/fragment and with a valid port, a bounded timeout.
    """
    try:
        conn_settings = _settings(conn)
    except AltaBotsConfigError:
        return
    key = conn_settings.api_key
    assert key
    assert key == key.strip()
    assert all(" " <= char <= "~" for char in key), "the key is not printable ASCII"
    assert conn.password is not None
    assert key in {conn.password.strip(), conn.password.strip(ASCII_SPACE)}, "the key was altered"

    auth = conn_settings.headers["Authorization"]
    assert auth.isascii()
    assert not {"\r", "\n", "\x00"} & set(auth)
    assert all(" " <= char <= "~" for char in auth)
    assert auth == auth.strip()
    assert conn_settings.auth_scheme in protocol.AUTH_SCHEMES
    assert auth == (f"Bearer {key}" if conn_settings.auth_scheme == "bearer" else key)

    base_url = conn_settings.base_url
    parts = urlsplit(base_url)
    assert parts.scheme in ("http", "https")
    assert parts.hostname
    assert "@" not in parts.netloc, "the base URL keeps userinfo"
    assert "?" not in base_url
    assert "#" not in base_url
    try:
        port = parts.port
    except ValueError as error:
        pytest.fail(f"the base URL {base_url!r} has an invalid port: {error}")
    assert port is None or 1 <= port <= 65535
    if conn.host and conn.host.strip() and "://" not in conn.host:
        assert base_url.startswith("https://"), "a bare host did not get https://"
    if conn.path in ("/v1", "/v1/"):
        assert urlsplit(conn_settings.url(protocol.INVOKE_PATH)).path == "/v1/workflow/invoke"

    for name in ("timeout", "max_answer_bytes"):
        if name in conn.extra:
            assert not _clearly_not_a_positive_number(conn.extra[name]), f"extra {name} was accepted"
    timeout = conn_settings.timeout
    assert isinstance(timeout, float)
    assert math.isfinite(timeout)
    assert 0 < timeout <= protocol.MAX_SECONDS
    if "timeout" not in conn.extra:
        assert timeout == protocol.DEFAULT_REQUEST_TIMEOUT


# --------------------------------------------------------------------------------------------
# 4. invoke_request
# --------------------------------------------------------------------------------------------


def _children(value: Any) -> list[Any]:
    if isinstance(value, Mapping):
        return [*value.keys(), *value.values()]
    if isinstance(value, list | tuple):
        return list(value)
    return []


def _walk(value: Any) -> list[Any]:
    """Every value inside ``value`` (keys included), without recursion: inputs may be 100,000 deep."""
    found, stack, seen = [], [value], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        found.append(item)
        stack.extend(_children(item))
    return found


def _has_non_finite(value: Any) -> bool:
    return any(isinstance(item, float) and not math.isfinite(item) for item in _walk(value))


def _plain_json(value: Any, depth: int = 0) -> bool:
    """JSON the API surely takes: str keys, finite numbers, a sane depth."""
    if depth > 50:
        return False
    if value is None or isinstance(value, bool | int | str):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_plain_json(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_json(v, depth + 1) for k, v in value.items())
    return False


class _Deep(dict):
    """``{"a": [[[...]]]}`` nested ``depth`` deep, with a short repr (Hypothesis prints examples)."""

    def __init__(self, depth: int) -> None:
        nested: Any = []
        for _ in range(depth):
            nested = [nested]
        super().__init__(a=nested)
        self.depth = depth

    def __repr__(self) -> str:
        return f"<{{'a': [...]}} nested {self.depth:,} deep>"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


def _circular() -> dict[str, Any]:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    return loop


NOT_JSON = st.sampled_from(
    [b"bytes", {1, 2}, frozenset(), 1 + 2j, Decimal("1.5"), Decimal("NaN"), datetime(2025, 1, 1)]
)
JSONISH_KEYS = st.text(max_size=8) | st.integers() | st.floats() | st.booleans() | st.none() | st.just((1, 2))
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10) | NOT_JSON,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
        st.dictionaries(JSONISH_KEYS, children, max_size=3),
        st.dictionaries(st.text(max_size=8), children, max_size=3).map(MappingProxyType),
    ),
    max_leaves=25,
)
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
WRAPPERS = st.sampled_from([lambda v: v, lambda v: [v], lambda v: (1, v), lambda v: {"x": [{"y": v}]}])
INPUTS = st.one_of(
    st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=6),
    # A plain input with NaN or infinity hidden somewhere in it.
    st.builds(
        lambda plain, key, wrap, bad: {**plain, key: wrap(bad)},
        st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4),
        st.text(max_size=8),
        WRAPPERS,
        NON_FINITE,
    ),
    st.dictionaries(st.text(max_size=8), JSONISH, max_size=4),
    JSONISH,
    st.sampled_from(['{"topic": "News"}', "", [("a", 1)], None]),
)
PLAIN_USER_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
USER_IDS = st.one_of(
    st.none(), st.from_regex(PLAIN_USER_ID, fullmatch=True), st.text(max_size=8), st.integers(), st.just("")
)


@FAST
@given(value=INPUTS, user_id=USER_IDS, is_async=st.booleans())
@example(value={"a": math.nan}, user_id=None, is_async=True)
@example(value={"a": [1, {"b": -math.inf}]}, user_id=None, is_async=True)
@example(value={"a": (math.inf,)}, user_id=None, is_async=False)
@example(value=MappingProxyType({"a": {"b": [math.nan]}}), user_id=None, is_async=True)
@example(value={math.nan: 1}, user_id=None, is_async=True)
@example(value=_Deep(100_000), user_id=None, is_async=True)
@example(value=_circular(), user_id=None, is_async=True)
@example(value='{"topic": "News"}', user_id=None, is_async=True)
def test_invoke_request_is_a_request_or_a_config_error(value, user_id, is_async):
    """
    Any input is an invoke request whose body is strict JSON, or an AltaBotsConfigError before
    anything is sent: NaN/inf anywhere and non-mappings always are; plain JSON input never is.
    """
    plain = isinstance(value, dict) and _plain_json(value)
    good_user = user_id is None or (isinstance(user_id, str) and PLAIN_USER_ID.fullmatch(user_id) is not None)
    try:
        request = protocol.invoke_request(value, user_id=user_id, is_async=is_async)
    except AltaBotsConfigError:
        assert not (plain and good_user), "a plain JSON input was refused"
        return
    assert isinstance(value, Mapping), "a non-mapping input was accepted"
    assert not _has_non_finite(value), "an input holding NaN or infinity was accepted"
    assert (request.method, request.path) == ("POST", protocol.INVOKE_PATH)
    assert request.body is not None
    wire = json.loads(json.dumps(request.body, allow_nan=False))
    assert isinstance(wire["input"], dict)
    assert request.body["input"] == dict(value)
    assert request.body["isAsync"] is bool(is_async)
    assert request.body.get("userId") == user_id


WEBHOOK_URLS = st.one_of(
    st.sampled_from(
        [
            "https://hooks.example/a",
            "http://[::1",
            "https://[",
            "http://[::1]:abc/x",
            "http://h:99999/x",
            "ftp://hooks.example",
            "hooks.example/a",
            "https://",
            "",
            "https://user:pw@hooks.example/?t=1#f",
        ]
    ),
    st.text(max_size=20),
    st.text(max_size=20).map(lambda text: "https://" + text),
    JSON_VALUES,
)
GOOD_WEBHOOKS = st.lists(
    st.fixed_dictionaries(
        {
            "method": st.sampled_from(["POST", "get", "Put", "patch", "DELETE"]),
            "url": st.sampled_from(
                ["https://hooks.example/a", "http://127.0.0.1:8080/cb?t=1", "https://[::1]/x"]
            ),
        },
        optional={"headers": st.dictionaries(st.text(max_size=8), st.text(max_size=12), max_size=3)},
    ),
    min_size=1,
    max_size=6,
)
WEBHOOKS = st.one_of(
    st.none(),
    GOOD_WEBHOOKS,
    GOOD_WEBHOOKS.flatmap(
        lambda hooks: st.tuples(
            st.integers(0, len(hooks) - 1),
            st.sampled_from(["method", "url", "headers"]),
            JSON_VALUES | WEBHOOK_URLS,
        ).map(
            lambda spoil: [
                *hooks[: spoil[0]],
                {**hooks[spoil[0]], spoil[1]: spoil[2]},
                *hooks[spoil[0] + 1 :],
            ]
        )
    ),
    JSON_VALUES,
    st.lists(
        st.fixed_dictionaries(
            {
                "method": st.sampled_from(["POST", "get", "Put", "FETCH", "", 1]) | JSON_VALUES,
                "url": WEBHOOK_URLS,
            },
            optional={
                "headers": st.dictionaries(st.text(max_size=8), st.text(max_size=8) | JSON_VALUES, max_size=3)
                | JSON_VALUES,
                "body": JSON_VALUES,
            },
        ),
        max_size=7,
    ),
)


@FAST
@given(webhooks=WEBHOOKS)
@example(webhooks=[{"method": "POST", "url": "http://[::1"}])
@example(webhooks=[{"method": "POST", "url": "https://["}])
@example(webhooks=[{"method": "POST", "url": "https://hooks.example/a", "headers": {"X-T": math.nan}}])
def test_invoke_webhooks_are_checked_or_a_config_error(webhooks):
    """Any webhooks value is a checked list of at most 5 http(s) hooks, or an AltaBotsConfigError."""
    try:
        request = protocol.invoke_request({"a": 1}, webhooks=webhooks)
    except AltaBotsConfigError:
        return
    assert request.body is not None
    assert json.loads(json.dumps(request.body, allow_nan=False)) == request.body
    hooks = request.body.get("webhook", [])
    assert bool(hooks) == bool(webhooks)
    assert len(hooks) <= protocol.MAX_WEBHOOKS
    for hook in hooks:
        assert hook["method"] in protocol.WEBHOOK_METHODS
        parts = urlsplit(hook["url"])
        assert parts.scheme in ("http", "https")
        assert parts.hostname


# --------------------------------------------------------------------------------------------
# 5. check_run_id
# --------------------------------------------------------------------------------------------

RUN_IDS = st.one_of(
    st.text(max_size=20),
    st.tuples(WHITESPACE, st.from_regex(r"[A-Za-z0-9-]{1,40}", fullmatch=True), WHITESPACE).map("".join),
    st.text(min_size=100, max_size=300),
    st.integers(100, 300).map(lambda length: "r" * length),
    st.integers() | st.floats() | st.none() | st.booleans() | st.binary(max_size=10),
    st.lists(st.text(max_size=5), max_size=2)
    | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
)


def _ordinary_run_id(value: Any) -> bool:
    """A run id the API hands out: short, plain ASCII, perhaps with whitespace around it."""
    if not isinstance(value, str):
        return False
    core = value.strip()
    return 1 <= len(core) <= 40 and core.isascii() and core.replace("-", "").isalnum()


@FAST
@given(value=RUN_IDS)
@example(value="x" * 128)
@example(value="x" * 129)
@example(value=" " + "x" * 128 + " ")
@example(value="r" * 100_000)
@example(value=" run-1 \n")
@example(value="\u3000")
@example(value=None)
@example(value=b"run-1")
def test_check_run_id_is_a_short_stripped_string_or_a_config_error(value):
    """A run id is a stripped string of 1..MAX_RUN_ID_LENGTH chars, or an AltaBotsConfigError."""
    try:
        run_id = protocol.check_run_id(value)
    except AltaBotsConfigError:
        assert not _ordinary_run_id(value), f"the run id {value!r} was refused"
        with pytest.raises(AltaBotsConfigError):
            protocol.result_request(value)
        return
    assert isinstance(value, str)
    assert isinstance(run_id, str)
    assert run_id == value.strip()
    assert 1 <= len(run_id) <= protocol.MAX_RUN_ID_LENGTH
    request = protocol.result_request(value)
    assert request.run_id == run_id
    assert request.body == {"workflowRunId": run_id}
