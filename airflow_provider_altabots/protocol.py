"""
The AltaBots workflow API: requests, answers, statuses and errors, with no I/O.

This module is the one place that knows the wire format. The synchronous transport
(``requests``, on workers) and the asynchronous one (``httpx``, in triggers) both build their
requests, read their answers and word their errors here, so they cannot drift apart.

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
* There is no idempotency key and no cancel endpoint. So an invoke whose outcome this module
  cannot prove (a 5xx, a broken or cut-off answer, a network failure after the request may have
  been written) becomes :class:`AltaBotsInvokeUncertain`, which is never sent again.

Nothing an answer holds is trusted: every status, header and body ends as a record or as one of
this provider's errors (never a ``ValueError`` or ``RecursionError``), answers are capped at
:data:`MAX_ANSWER_BYTES` after decompression, run ids at :data:`MAX_RUN_ID_LENGTH`, and no
message quotes the API key, a redirect's target path, or the text of an HTTP library's error.
"""

from __future__ import annotations

import json
import math
import re
import time
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from enum import StrEnum
from itertools import accumulate
from typing import Any
from urllib.parse import quote, urlsplit

from airflow_provider_altabots.connection_form import (
    AUTH_SCHEMES,
    DEFAULT_REQUEST_TIMEOUT,
    MAX_ANSWER_BYTES,
    MAX_REQUESTS_PER_MINUTE,
)
from airflow_provider_altabots.exceptions import (
    AltaBotsApiError,
    AltaBotsAuthError,
    AltaBotsConfigError,
    AltaBotsError,
    AltaBotsInvokeUncertain,
    AltaBotsTransientError,
)

DEFAULT_BASE_URL = "https://altatech.ai"
INVOKE_PATH = "/v1/workflow/invoke"
RESULT_PATH = "/v1/workflow/query/result"
VERIFY_PATH = "/v1/api-key/verify"
#: The API version prefix of every path above. A base URL copied with it (``https://host/v1``)
#: is accepted and the prefix dropped, so requests do not go to ``/v1/v1/...``.
API_PREFIX = "/v1"

#: The most seconds any duration a user types may hold (a year): beyond it a number is a mistake
#: (``1e300`` overflows the socket layer); ``timeout=None`` is the way to wait without limit.
MAX_SECONDS = 366 * 24 * 3600.0

#: The longest run id accepted. The vendor's ids are short (its pages show 8-character
#: placeholders; UUIDs are 36); anything this long is a broken answer, not an id to store.
MAX_RUN_ID_LENGTH = 128

#: The API accepts at most this many webhooks per invoke.
MAX_WEBHOOKS = 5
#: Methods accepted for a webhook. The pages show POST and GET; the other usual methods of a
#: callback are allowed too, anything else is refused before a request is sent.
WEBHOOK_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})


class RunStatus(StrEnum):
    """The statuses a run record names, spelled as the API spells them (``SUCCEED``, not ``SUCCEEDED``)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEED = "SUCCEED"
    FAILED = "FAILED"


ACTIVE_STATUSES = frozenset({RunStatus.PENDING, RunStatus.RUNNING})


class StatusKind(StrEnum):
    """What a run status means to a task waiting for it (see :func:`status_kind`)."""

    #: the run ended with ``SUCCEED``
    SUCCEEDED = "succeeded"
    #: the run ended with ``FAILED``
    FAILED = "failed"
    #: the run has not ended (``PENDING``, ``RUNNING``)
    ACTIVE = "active"
    #: a status this provider does not know: never taken for success, the task keeps waiting
    UNKNOWN = "unknown"


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

#: The vendor documents no answer for a run id it does not know (the emulator answers 400, code
#: 40000, "workflowRunId not found"). This provider's reading, the only one that lets a task that
#: stored a run id start a new, billed run: an error body of the API's own (JSON, either
#: documented shape) with one of these HTTP statuses, whose message says the run or its id is not
#: found or does not exist. A proxy's page, a message that names no run, or any other status is
#: no proof that the run is gone (see :func:`says_run_not_found`).
RUN_NOT_FOUND_STATUSES = frozenset({200, 400, 404})
_NOT_FOUND = re.compile(
    r"\bnot\s+(?:be\s+)?found\b|\bnot\s+exists?\b|n't\s+exists?\b|\bno\s+such\b", re.IGNORECASE
)
_NAMES_A_RUN = re.compile(r"\brun\b|runid|run[\s_-]id|workflow\s*run", re.IGNORECASE)

#: Fields of the run record that are left out of the ``workflow_run`` XCom.
BULKY_FIELDS = ("input", "output")

_TRUST_HINT = (
    "If the API is reached through a proxy or gateway with a private certificate authority, point "
    "SSL_CERT_FILE or REQUESTS_CA_BUNDLE at a PEM file holding that authority's certificate (and the "
    "public ones you still need) on the workers and the triggerer: either variable serves both."
)


def status_kind(status: object) -> StatusKind:
    """Classify a run status: succeeded, failed, active or unknown (never success)."""
    if status == RunStatus.SUCCEED:
        return StatusKind.SUCCEEDED
    if status == RunStatus.FAILED:
        return StatusKind.FAILED
    if isinstance(status, str) and status in ACTIVE_STATUSES:  # a list or an object is no status
        return StatusKind.ACTIVE
    return StatusKind.UNKNOWN


# -- the connection ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectionSettings:
    """
    Where and how to reach the API, read from an Airflow connection.

    :param base_url: scheme, host, port and an optional path prefix, e.g. ``https://altatech.ai``
        or ``https://api-sg.gptbots.ai``.
    :param api_key: the workflow's API key (the connection's password). Never shown in ``repr``.
    :param auth_scheme: ``bearer`` or ``raw``.
    :param timeout: seconds one request may take in all: connect, send and every read.
    :param max_answer_bytes: the largest answer read, after decompression.
    :param requests_per_minute: the plan's request rate for this key, when the user knows it
        (extra ``requests_per_minute``); ``None``: learnt from the API's answers.
    """

    conn_id: str
    base_url: str
    api_key: str = field(repr=False)
    auth_scheme: str = "bearer"
    timeout: float = DEFAULT_REQUEST_TIMEOUT
    max_answer_bytes: int = MAX_ANSWER_BYTES
    requests_per_minute: float | None = None

    @classmethod
    def from_connection(
        cls, conn_id: str, host: str | None, port: int | None, password: str | None, extra: Mapping[str, Any]
    ) -> ConnectionSettings:
        """Validate the fields of an ``altabots`` connection; raise :class:`AltaBotsConfigError`."""
        api_key = _api_key(conn_id, password)
        base_url = _base_url(conn_id, host, port)
        if not isinstance(extra, Mapping):
            raise AltaBotsConfigError(f"Connection {conn_id!r}: extra must be a JSON object.")
        # A form leaves a field it was not given empty (or null): that means the default.
        extra = {key: value for key, value in extra.items() if value is not None and value != ""}
        scheme = str(extra.get("auth_scheme") or "bearer").strip().lower()
        if scheme not in AUTH_SCHEMES:
            raise AltaBotsConfigError(
                f"Connection {conn_id!r}: extra auth_scheme must be one of {', '.join(AUTH_SCHEMES)}, "
                f"not {_snippet(scheme, 40)!r}."
            )
        timeout = positive_seconds(
            extra.get("timeout", DEFAULT_REQUEST_TIMEOUT), f"Connection {conn_id!r}: extra timeout"
        )
        max_bytes = positive_int(
            extra.get("max_answer_bytes", MAX_ANSWER_BYTES), f"Connection {conn_id!r}: extra max_answer_bytes"
        )
        rate = extra.get("requests_per_minute")
        if rate is not None:
            rate = positive_number(
                rate, f"Connection {conn_id!r}: extra requests_per_minute", MAX_REQUESTS_PER_MINUTE
            )
        return cls(conn_id, base_url, api_key, scheme, timeout, max_bytes, rate or None)

    def url(self, path: str) -> str:
        return self.base_url + path

    @property
    def authorization(self) -> str:
        """The value of the ``Authorization`` header."""
        return f"Bearer {self.api_key}" if self.auth_scheme == "bearer" else self.api_key

    @property
    def headers(self) -> dict[str, str]:
        """Headers sent with every request, the ``Authorization`` header included."""
        return {
            "Authorization": self.authorization,
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Accept-Encoding": "gzip, deflate",
        }

    @property
    def plain_http_warning(self) -> str | None:
        """A warning when the key would travel unencrypted to a host that is not this machine."""
        parts = urlsplit(self.base_url)
        if parts.scheme != "http" or _is_loopback(parts.hostname or ""):
            return None
        return (
            f"Connection {self.conn_id!r} sends the API key over plain http:// to {parts.hostname}: "
            "anyone on the network path can read it. Use https:// unless that host is a local proxy "
            "you trust."
        )


def _api_key(conn_id: str, password: str | None) -> str:
    key = password.strip() if isinstance(password, str) else ""
    if not key:
        raise AltaBotsConfigError(
            f"Connection {conn_id!r} has no API key: put the workflow's API key in its password field."
        )
    if not all(" " <= char <= "~" for char in key):
        # Never quote the key, not even escaped: an escaped key is not masked in logs.
        raise AltaBotsConfigError(
            f"Connection {conn_id!r}: the API key holds a control character (such as a line break inside "
            "it) or a non-ASCII character, so it cannot be sent in an HTTP header. Copy the key again "
            "from the vendor's console into the connection's password field."
        )
    return key


def _base_url(conn_id: str, host: str | None, port: int | None) -> str:
    """The base URL of a connection's host and port fields; refuse anything odd before any request."""
    where = f"Connection {conn_id!r}: host"
    example = f"a base URL such as {DEFAULT_BASE_URL} or https://api-sg.gptbots.ai"
    raw = host.strip() if isinstance(host, str) else ""
    raw = raw or DEFAULT_BASE_URL
    if not raw.isprintable() or any(char.isspace() for char in raw):
        raise AltaBotsConfigError(f"{where} holds spaces or control characters; it must be {example}.")
    if "://" not in raw:
        raw = "https://" + raw
    if "?" in raw or "#" in raw:
        raise AltaBotsConfigError(f"{where} must be {example}, without a ?query or #fragment.")
    try:
        parts = urlsplit(raw)
        hostname, url_port = parts.hostname, parts.port
    except ValueError:
        raise AltaBotsConfigError(
            f"{where} is not a valid URL (check brackets and the port); use {example}."
        ) from None
    if "@" in parts.netloc:
        # The secret is not quoted: it would show in the log and the UI's test message.
        raise AltaBotsConfigError(
            f"{where} holds a user name or password before '@'. Remove it: the API key belongs in the "
            "connection's password field, and a secret in the host would be shown in logs."
        )
    if parts.scheme not in ("http", "https") or not hostname:
        raise AltaBotsConfigError(f"{where} must be {example} (http:// or https://).")
    try:
        ascii_host = hostname.encode("idna").decode("ascii")
    except UnicodeError:
        raise AltaBotsConfigError(f"{where} names a host that is not a valid domain name.") from None
    if url_port == 0:
        raise AltaBotsConfigError(f"{where} has port 0; use a port from 1 to 65535.")
    if url_port is None and port not in (None, ""):
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise AltaBotsConfigError(f"Connection {conn_id!r}: port must be a number from 1 to 65535.")
        url_port = port
    if ":" in ascii_host:  # an IPv6 address
        ascii_host = f"[{ascii_host}]"
    path = parts.path.rstrip("/")
    if path.endswith(API_PREFIX):
        path = path[: -len(API_PREFIX)]
    return f"{parts.scheme}://{ascii_host}{f':{url_port}' if url_port else ''}{path}"


def _is_loopback(hostname: str) -> bool:
    import ipaddress  # only when a connection is read, never at DAG parse

    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def positive_seconds(value: Any, what: str) -> float:
    """``value`` as seconds, > 0 and at most :data:`MAX_SECONDS`; raise :class:`AltaBotsConfigError`."""
    number = _at_most(value, MAX_SECONDS)
    if number is None:
        raise AltaBotsConfigError(
            f"{what} must be a number of seconds above 0 and at most {MAX_SECONDS:.0f} (a year), "
            f"not {_snippet(repr(value), 40)}."
        )
    return number


def positive_number(value: Any, what: str, most: float) -> float:
    """``value`` as a number above 0 and at most ``most``; raise :class:`AltaBotsConfigError`."""
    number = _at_most(value, most)
    if number is None:
        raise AltaBotsConfigError(
            f"{what} must be a number above 0 and at most {most:g}, not {_snippet(repr(value), 40)}."
        )
    return number


def _at_most(value: Any, most: float) -> float | None:
    """``value`` as a float in (0, ``most``], else ``None`` (booleans, text, NaN, infinities)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if 0 < number <= most else None


def positive_int(value: Any, what: str) -> int:
    """``value`` as an integer >= 1; raise :class:`AltaBotsConfigError` otherwise."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AltaBotsConfigError(f"{what} must be a whole number above 0, not {_snippet(repr(value), 40)}.")
    return value


# -- requests ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiRequest:
    """
    One request to the API, before any transport sends it.

    :param action: what the request does, in words, for error messages.
    :param run_id: the run it concerns, when known.
    :param content: the JSON body as bytes, built (and checked) when the request is made.
    """

    method: str
    path: str
    body: dict[str, Any] | None
    action: str
    run_id: str | None = None
    content: bytes | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if self.body is not None:
            object.__setattr__(self, "content", _json_bytes(self.body, "the request body"))

    @property
    def is_invoke(self) -> bool:
        return self.path == INVOKE_PATH

    @property
    def secrets(self) -> list[str]:
        """What this request carries that no message may repeat: its webhooks' secrets."""
        return webhook_secrets(self.body.get("webhook")) if self.body else []


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
            raise AltaBotsConfigError(
                f"user_id must be a non-empty string, not {_snippet(repr(user_id), 60)}."
            )
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
    """The Start node's parameters must be a mapping of JSON values (after templating)."""
    if not isinstance(value, Mapping):
        raise AltaBotsConfigError(
            "input must be a mapping of the workflow's Start-node parameters after templating, "
            f"not {type(value).__name__}. If you template it from a string, set "
            "render_template_as_native_obj=True on the DAG."
        )
    _json_bytes(value, "input")
    return dict(value)


def _json_bytes(value: Any, what: str) -> bytes:
    try:
        return json.dumps(value, allow_nan=False, ensure_ascii=False).encode()
    except (TypeError, ValueError, RecursionError) as error:
        reason = "it nests too deeply" if isinstance(error, RecursionError) else str(error)
        raise AltaBotsConfigError(
            f"{what} must hold only JSON values (the API takes JSON; NaN and infinity are not JSON): "
            f"{_snippet(reason, 120)}."
        ) from None


def check_run_id(value: Any) -> str:
    """A run id as given by a user: printable ASCII without spaces, at most :data:`MAX_RUN_ID_LENGTH`."""
    problem = run_id_problem(value)
    if problem:
        raise AltaBotsConfigError(f"A workflow run id must be {problem}.")
    return str(value).strip()


def run_id_problem(value: Any) -> str | None:
    """Why ``value`` is no run id (``None`` when it is one); never quotes more than a snippet."""
    if not isinstance(value, str) or not value.strip():
        return f"a non-empty string, not {_snippet(repr(value), 60)}"
    value = value.strip()
    if len(value) > MAX_RUN_ID_LENGTH:
        return f"at most {MAX_RUN_ID_LENGTH} characters, not {len(value)}"
    if not all("!" <= char <= "~" for char in value):
        return f"printable ASCII without spaces, not {_snippet(repr(value), 60)}"
    return None


def check_webhooks(value: Any) -> list[dict[str, Any]]:
    """Validate webhooks as the API defines them: at most 5, each with a method and an http(s) url."""
    if isinstance(value, Mapping) or not isinstance(value, list | tuple):
        raise AltaBotsConfigError(f"webhooks must be a list of mappings, not {type(value).__name__}.")
    if len(value) > MAX_WEBHOOKS:
        raise AltaBotsConfigError(f"The API accepts at most {MAX_WEBHOOKS} webhooks; got {len(value)}.")
    checked = []
    for number, webhook in enumerate(value, start=1):
        if not isinstance(webhook, Mapping):
            raise AltaBotsConfigError(f"webhook {number} must be a mapping, not {type(webhook).__name__}.")
        method, url, headers = webhook.get("method"), webhook.get("url"), webhook.get("headers")
        if not isinstance(method, str) or method.upper() not in WEBHOOK_METHODS:
            allowed = ", ".join(sorted(WEBHOOK_METHODS))
            raise AltaBotsConfigError(
                f"webhook {number}: method must be one of {allowed}, not {_snippet(repr(method), 40)}."
            )
        if not _is_web_url(url):
            raise AltaBotsConfigError(f"webhook {number}: url must be an http:// or https:// URL.")
        if headers is not None and not (
            isinstance(headers, Mapping)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())
        ):
            raise AltaBotsConfigError(f"webhook {number}: headers must be a mapping of strings to strings.")
        unknown = set(webhook) - {"method", "url", "headers"}
        if unknown:
            raise AltaBotsConfigError(f"webhook {number}: unknown keys {sorted(map(str, unknown))}.")
        entry: dict[str, Any] = {"method": method.upper(), "url": url}
        if headers:
            entry["headers"] = dict(headers)
        checked.append(entry)
    return checked


def _is_web_url(url: Any) -> bool:
    if not isinstance(url, str):
        return False
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def webhook_secrets(webhooks: Any) -> list[str]:
    """What a webhook may hide a secret in: every header value, and each URL's path and query."""
    secrets: list[str] = []
    for webhook in webhooks if isinstance(webhooks, list | tuple) else ():
        if not isinstance(webhook, Mapping):
            continue
        headers = webhook.get("headers")
        if isinstance(headers, Mapping):
            secrets.extend(value for value in headers.values() if isinstance(value, str) and value)
        if _is_web_url(webhook.get("url")):
            parts = urlsplit(webhook["url"])
            secrets.extend(part for part in (parts.path.strip("/"), parts.query) if part)
    return secrets


def redacted_webhooks(webhooks: Any) -> Any:
    """
    ``webhooks`` as they may be shown: header values and each URL's path and query as ``***``.

    Method, header names and the URL's scheme, host and port stay readable. Anything that is not
    a list of webhooks (a template that rendered to a string, say) is hidden whole.
    """
    if not isinstance(webhooks, list | tuple):
        return "***" if webhooks else webhooks
    shown: list[Any] = []
    for webhook in webhooks:
        if not isinstance(webhook, Mapping):
            shown.append("***")
            continue
        entry = dict(webhook)
        if _is_web_url(entry.get("url")):
            parts = urlsplit(entry["url"])
            hidden = (parts.path.strip("/") or parts.query) and "/***"
            entry["url"] = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{hidden or ''}"
        elif "url" in entry:
            entry["url"] = "***"
        if isinstance(entry.get("headers"), Mapping):
            entry["headers"] = {name: "***" for name in entry["headers"]}
        shown.append(entry)
    return shown


# -- answers ----------------------------------------------------------------------------------------


class AnswerBody:
    """
    An answer's body as a transport reads it, chunk by chunk: decoded here and capped.

    The transports hand over the bytes as they came off the wire. ``gzip`` and ``deflate`` are
    decoded here, never more than ``limit`` bytes plus one: a small compressed answer that would
    inflate to gigabytes (a "zip bomb") stops at the cap. Any other ``Content-Encoding`` is a
    broken answer.

    :raises AltaBotsConfigError: (:meth:`feed`) the answer is larger than ``limit`` (for an
        invoke, :class:`AltaBotsInvokeUncertain`).
    """

    def __init__(self, request: ApiRequest, headers: Mapping[str, str], limit: int) -> None:
        self.request = request
        self.limit = limit
        self.size = 0
        self._parts: list[bytes] = []
        lower = _lower_keys(headers)
        codings = [c.strip().lower() for c in str(lower.get("content-encoding", "")).split(",")]
        codings = [c for c in codings if c and c != "identity"]
        self._inflater: Any = None
        if codings in (["gzip"], ["x-gzip"], ["deflate"]):
            # MAX_WBITS | 32 reads both the gzip and the zlib ("deflate") framing.
            self._inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)
        elif codings:
            raise broken_answer(
                request, f"its Content-Encoding {_snippet(', '.join(codings), 40)!r} is not gzip or deflate"
            )
        declared = str(lower.get("content-length", "")).strip()
        if not codings and declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise self._too_large()

    def feed(self, chunk: bytes) -> None:
        """Take the next chunk of bytes as read from the connection."""
        if self._inflater is None:
            self._add(chunk)
            return
        data = chunk
        try:
            while data:
                self._add(self._inflater.decompress(data, self.limit - self.size + 1))
                data = self._inflater.unconsumed_tail
        except zlib.error:
            raise broken_answer(self.request, "its compressed body is corrupt") from None

    def finish(self) -> bytes:
        """The whole decoded body, once the transport read the last chunk."""
        if self._inflater is not None:
            try:
                self._add(self._inflater.flush())
            except zlib.error:
                raise broken_answer(self.request, "its compressed body is corrupt") from None
            if self.size and not self._inflater.eof:
                raise broken_answer(self.request, "its compressed body is cut off")
        return b"".join(self._parts)

    def _add(self, part: bytes) -> None:
        self.size += len(part)
        if self.size > self.limit:
            raise self._too_large()
        if part:
            self._parts.append(part)

    def _too_large(self) -> AltaBotsError:
        return _uncertain_if_invoke(
            self.request,
            AltaBotsConfigError(
                f"Could not {self.request.action}: the API's answer is larger than {self.limit} bytes, "
                "the connection's max_answer_bytes. If the workflow's output is really that large, raise "
                "the extra max_answer_bytes of the connection, then clear the task"
                + (
                    f": a new try resumes workflow run {self.request.run_id}." if self.request.run_id else "."
                ),
                run_id=self.request.run_id,
            ),
        )


def read_answer(
    request: ApiRequest,
    status_code: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    secrets: Iterable[str] = (),
) -> dict[str, Any]:
    """
    Turn an HTTP answer into the JSON object it carries, or raise the matching error.

    :param body: the decoded body (see :class:`AnswerBody`).
    :param secrets: what the answer must never hand on (the API key), should the API echo it:
        every string of the returned object has it replaced by ``***`` (see
        :func:`hide_secrets_in`), and messages hide it, and the request's webhook secrets, whole,
        escaped or in part, before anything is cut (see :func:`_snippet`).
    :raises AltaBotsConfigError: a 3xx: this provider follows no redirect.
    :raises AltaBotsAuthError: HTTP 401/403 or code 40127.
    :raises AltaBotsTransientError: HTTP 429 or 5xx, a server-side error code, or a 2xx answer
        that is not a JSON object (a proxy page, a cut-off answer).
    :raises AltaBotsApiError: any other error answer.
    :raises AltaBotsInvokeUncertain: instead of a transient error, for an invoke (a run may exist).
    """
    secrets = tuple(secrets)
    data = _json_object(body)
    if data is not None:
        hide_secrets_in(data, secrets)
    code, api_message = error_in(data)
    what = f"Could not {request.action}"
    hidden = (*secrets, *request.secrets)
    said = _said(status_code, code, api_message, body if data is None else None, hidden)

    if 300 <= status_code < 400:
        raise redirect_error(request, status_code, headers, secrets=hidden)
    if status_code in (401, 403) or _same_code(code, AUTH_CODE):
        raise AltaBotsAuthError(
            f"{what}: the API refused the API key ({said}). Check that the connection's password holds "
            "a valid key for this workflow and that auth_scheme matches your host.",
            run_id=request.run_id,
        )
    if status_code == 429:
        raise AltaBotsTransientError(
            f"{what}: rate limited ({said}). Your plan's request quota is used up for now.",
            run_id=request.run_id,
            retry_after=retry_after(headers),
            rate_limited=True,
        )
    if status_code >= 500 or any(_same_code(code, server) for server in SERVER_CODES):
        raise _uncertain_if_invoke(
            request, AltaBotsTransientError(f"{what}: the API failed ({said}).", run_id=request.run_id)
        )
    if status_code >= 400 or code is not None:
        raise AltaBotsApiError(
            f"{what}: {said}.",
            run_id=request.run_id,
            code=code,
            http_status=status_code,
            run_not_found=says_run_not_found(request, status_code, api_message),
        )
    if not 200 <= status_code < 300:
        raise broken_answer(request, f"HTTP {status_code} is not an answer this API gives")
    if data is None:
        raise broken_answer(request, f"the HTTP {status_code} answer is not a JSON object ({said})")
    return data


def says_run_not_found(request: ApiRequest, status_code: int, api_message: str | None) -> bool:
    """
    Whether an error answer to a run's query is the API saying that run id is unknown: HTTP
    :data:`RUN_NOT_FOUND_STATUSES`, a message from the API's own error body, saying "not found"
    (or "does not exist", "no such") of a run or of the id asked for.
    """
    if request.path != RESULT_PATH or status_code not in RUN_NOT_FOUND_STATUSES or not api_message:
        return False
    names_run = bool(_NAMES_A_RUN.search(api_message)) or bool(
        request.run_id and request.run_id in api_message
    )
    return names_run and bool(_NOT_FOUND.search(api_message))


def read_record(request: ApiRequest, answer: Mapping[str, Any]) -> dict[str, Any]:
    """A run record asked for with :func:`result_request`; one naming another run is a broken answer."""
    named = answer.get("workflowRunId")
    if named is not None and named != request.run_id:
        raise broken_answer(request, "it is the record of another workflow run")
    return dict(answer)


def read_run_id(request: ApiRequest, answer: Mapping[str, Any]) -> str:
    """The run id of an invoke's answer; without a usable one the invoke's outcome is uncertain."""
    problem = run_id_problem(answer.get("workflowRunId"))
    if problem:
        raise broken_answer(request, f"its workflowRunId is no run id (it must be {problem})")
    return str(answer["workflowRunId"]).strip()


def broken_answer(request: ApiRequest, why: str) -> AltaBotsError:
    """An answer that makes no sense: asking again may help; for an invoke, a run may exist."""
    return _uncertain_if_invoke(
        request,
        AltaBotsTransientError(
            f"Could not {request.action}: the API's answer is unusable: {why}.", run_id=request.run_id
        ),
    )


def redirect_error(
    request: ApiRequest, status_code: int, headers: Mapping[str, str], *, secrets: Iterable[str] = ()
) -> AltaBotsConfigError:
    """A 3xx: never followed (it would carry the key and webhook tokens on), never a result."""
    location = str(_lower_keys(headers).get("location", ""))
    try:
        target = urlsplit(location).hostname
    except ValueError:
        target = None
    where = f"to host {_snippet(target, 80, secrets)}" if target else "elsewhere"
    return AltaBotsConfigError(
        f"Could not {request.action}: the API answered HTTP {status_code}, redirecting {where}. This "
        "provider follows no redirect, since that would send the API key and webhook tokens on. If that "
        "host is the API's own address, put it in the connection's host.",
        run_id=request.run_id,
    )


def network_error(request: ApiRequest, url: str, failure: str, *, sent: bool) -> AltaBotsError:
    """
    A request that failed on the way: ``failure`` says how, in this provider's own words.

    ``sent`` is ``False`` only when the request surely never left (connect refused or timed out,
    name not resolved, TLS handshake failed); only then may an invoke be sent again.
    """
    where = "after it may have reached the API" if sent else "before it reached the API"
    error = AltaBotsTransientError(
        f"Could not {request.action} at {url}: {failure}, {where}.", run_id=request.run_id, sent=sent
    )
    return _uncertain_if_invoke(request, error) if sent else error


def certificate_error(request: ApiRequest, url: str) -> AltaBotsConfigError:
    """The server's TLS certificate is not trusted: configuration, not bad luck; nothing was sent."""
    return AltaBotsConfigError(
        f"Could not {request.action} at {url}: the server's TLS certificate is not trusted (unknown "
        f"authority, expired, or issued for another host name); nothing was sent. {_TRUST_HINT}",
        run_id=request.run_id,
    )


def request_error(request: ApiRequest, url: str, what: str) -> AltaBotsConfigError:
    """The HTTP library refused to build the request (it never left): a configuration problem."""
    return AltaBotsConfigError(
        f"Could not {request.action} at {url}: the request could not be built ({what}); nothing was sent. "
        "Check the connection's host and password.",
        run_id=request.run_id,
    )


def _uncertain_if_invoke(request: ApiRequest, error: AltaBotsError) -> AltaBotsError:
    if not request.is_invoke:
        return error
    return AltaBotsInvokeUncertain(
        f"{error.message} The invoke may have started a run, and been billed, but no usable run id came "
        "back. The API has no idempotency key, so it is not sent again: look for the run in the vendor's "
        "console, then clear this task if you want a new run."
    )


def error_in(data: Mapping[str, Any] | None) -> tuple[int | str | None, str | None]:
    """The ``(code, message)`` of an error body in either shape; ``(None, None)`` when it is none."""
    if not data:
        return None, None
    nested = data.get("error")
    if isinstance(nested, Mapping) and "workflowRunId" not in data:
        code = nested.get("code") or nested.get("status") or "error"
        return _code(code), _text(nested.get("message"))
    code = data.get("code")
    if code is None or isinstance(code, bool) or code in (0, "0", "", 200, "200"):
        return None, None
    return _code(code), _text(data.get("message") or data.get("msg"))


def run_summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """The run record without its bulky ``input`` and ``output``: status, workflow, cost, tokens, times."""
    return {key: value for key, value in record.items() if key not in BULKY_FIELDS}


def describe_run(record: Mapping[str, Any]) -> str:
    """``workflow 'name' (id, version v)`` for messages; empty parts are left out."""
    name, wid, version = record.get("workflowName"), record.get("workflowId"), record.get("workflowVersion")
    details = ", ".join(
        _snippet(str(part), 80) for part in (wid, f"version {version}" if version else None) if part
    )
    label = f"workflow {_snippet(str(name), 80)!r}" if name else "the workflow"
    return f"{label} ({details})" if details else label


def failure_message(run_id: str, record: Mapping[str, Any]) -> str:
    """What to tell the user about a FAILED run: which run, which workflow, what the API said."""
    seconds = record.get("workflowExecutionTime")
    took = (
        f" after {seconds / 1000:.1f} s"
        if isinstance(seconds, int | float) and not isinstance(seconds, bool) and math.isfinite(seconds)
        else ""
    )
    said = {k: record[k] for k in ("message", "error", "errorMessage", "output") if record.get(k)}
    detail = f" The API said: {_snippet(_dump(said))}." if said else ""
    return (
        f"Workflow run {run_id} of {describe_run(record)} FAILED{took}.{detail} "
        "Check the run in the vendor's console; a task retry starts a new, billed run."
    )


def short(value: Any, limit: int = 40) -> str:
    """``value`` as a short one-line string, for a status or a field in a log line."""
    return _snippet(str(value), limit)


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """
    Seconds to wait before asking again, from ``Retry-After`` or ``X-RateLimit-Reset``.

    ``Retry-After`` may be seconds or an HTTP date. ``X-RateLimit-Reset`` is read as Unix time
    in seconds (AltaBots' documented form), or in milliseconds when it is that large, or as a
    number of seconds when it is too small to be a date. ``None`` when neither says; at most a day.
    """
    lower = _lower_keys(headers)
    now = time.time() if now is None else now
    seconds: float | None = None
    if (value := lower.get("retry-after")) is not None:
        seconds = _number(value)
        if seconds is None:
            try:
                seconds = parsedate_to_datetime(str(value)).timestamp() - now
            except (TypeError, ValueError, IndexError, OverflowError):
                seconds = None
        if seconds is not None and not math.isnan(seconds):
            return min(max(seconds, 0.0), MAX_HINT_SECONDS)
    if (value := lower.get("x-ratelimit-reset")) is not None:
        return _reset_seconds(value, now)
    return None


@dataclass(frozen=True)
class Quota:
    """
    What an answer's ``X-RateLimit-*`` headers say of the key's plan (AltaBots sends them on
    every answer; GPTBots documents none). Each part is ``None`` when absent or unreadable.

    :param limit: requests the plan allows per window (``X-RateLimit-Limit``).
    :param remaining: requests left in the current window (``X-RateLimit-Remaining``), at most
        ``limit``.
    :param reset_at: Unix time at which the window ends (``X-RateLimit-Reset``, read as
        :func:`retry_after` reads it), at most a day away.
    """

    limit: int | None
    remaining: int | None
    reset_at: float | None

    @property
    def plentiful(self) -> bool:
        """At least half of the window's requests are left, and at least :data:`PLENTY_REQUESTS`."""
        if self.remaining is None:
            return False
        return self.remaining >= max(PLENTY_REQUESTS, (self.limit or 0) / 2)


def quota(headers: Mapping[str, str], now: float | None = None) -> Quota | None:
    """The plan's figures from an answer's ``X-RateLimit-*`` headers; ``None`` when it has none."""
    lower = _lower_keys(headers)
    now = time.time() if now is None else now
    limit = _count(lower.get("x-ratelimit-limit"))
    remaining = _count(lower.get("x-ratelimit-remaining"))
    reset = lower.get("x-ratelimit-reset")
    seconds = None if reset is None else _reset_seconds(reset, now)
    if limit is None and remaining is None and seconds is None:
        return None
    if limit is not None and remaining is not None:
        remaining = min(remaining, limit)
    return Quota(limit, remaining, None if seconds is None else now + seconds)


#: A window with fewer requests left than this (or a plan rate under this many a minute) is
#: tight: a task spends none of them on checks it can leave to the triggerer's budget.
PLENTY_REQUESTS = 100
#: The longest wait an answer's hint (``Retry-After``, ``X-RateLimit-Reset``) is believed for.
MAX_HINT_SECONDS = 86400.0
#: The largest request count read from a rate-limit header.
_MAX_COUNT = 10**9


def _reset_seconds(value: Any, now: float) -> float | None:
    """Seconds until an ``X-RateLimit-Reset`` value: Unix seconds, Unix milliseconds, or seconds."""
    reset = _number(value)
    if reset is None:
        return None
    if reset > 1e11:
        reset /= 1000.0
    seconds = reset - now if reset > 1e9 else reset
    return min(max(seconds, 0.0), MAX_HINT_SECONDS)


def _count(value: Any) -> int | None:
    """A header's request count: a whole number >= 0 before any ``,`` or ``;`` (``"30, 30;w=60"``)."""
    if value is None:
        return None
    number = _number(str(value).split(",")[0].split(";")[0])
    if number is None or not 0 <= number <= _MAX_COUNT or number != int(number):
        return None
    return int(number)


def _number(value: Any) -> float | None:
    try:
        number = float(str(value).strip())
    except (TypeError, ValueError, OverflowError):
        return None
    return None if math.isnan(number) else number


def _lower_keys(headers: Mapping[str, str]) -> dict[str, str]:
    return {str(key).lower(): value for key, value in headers.items()}


#: The deepest nesting of an answer's JSON that is parsed; a deeper body is read as no JSON at
#: all. Python's parser would otherwise descend to the interpreter's recursion limit, and any
#: finalizer the garbage collector runs at that depth (on a triggerer, another trigger's) fails.
MAX_JSON_DEPTH = 256

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
#: Maps ``[`` and ``{`` to +1 and ``]`` and ``}`` to -1 (as signed bytes); every other byte is
#: deleted by :func:`_nests_too_deeply`.
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[{]}"))


def _nests_too_deeply(body: bytes) -> bool:
    """Whether ``body`` opens more than :data:`MAX_JSON_DEPTH` arrays or objects at once."""
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return False
    steps = _JSON_STRING.sub(b"", body).translate(_BRACKET_STEPS, _NOT_BRACKETS)
    return max(accumulate(memoryview(steps).cast("b")), default=0) > MAX_JSON_DEPTH


def _json_object(body: bytes) -> dict[str, Any] | None:
    if not body or _nests_too_deeply(body):
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _code(code: Any) -> int | str:
    """An error code as an int, or a short string for anything else."""
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    if isinstance(code, str):
        return _snippet(code, 40)
    return _snippet(_dump(code), 40)


def _same_code(code: object, expected: int) -> bool:
    return code is not None and str(code) == str(expected)


def _said(
    status_code: int, code: int | str | None, message: str | None, raw: bytes | None, secrets: Iterable[str]
) -> str:
    """What an error answer said, in words; each part hides ``secrets`` before it is cut."""
    parts = [f"HTTP {status_code}"]
    if code is not None:
        number = code if isinstance(code, int) else int(code) if code.isascii() and code.isdigit() else None
        hint = CODE_HINTS.get(number) if number is not None else None
        parts.append(f"code {_snippet(str(code), 40, secrets)}" + (f", {hint}" if hint else ""))
    if message:
        parts.append(f"the API said: {_snippet(message, 300, secrets)}")
    elif raw:
        parts.append(f"body: {_snippet(raw, 300, secrets)}")
    return "; ".join(parts)


# -- secrets in what an answer says -------------------------------------------------------------------

#: Any run of this many characters of a secret is hidden wherever a message holds it, so an answer
#: that quotes part of the key shows no usable piece of it (the whole key is hidden at any length).
MIN_SECRET_PIECE = 6
#: Secrets shorter than this are not looked for: a webhook path such as ``cb`` would hide every
#: ``cb`` of a message, and a key is far longer.
MIN_SECRET_LENGTH = 4


def secret_forms(secrets: Iterable[str]) -> list[str]:
    """
    Each secret as text may carry it, longest first: as it is, escaped as JSON and as Python's
    ``repr`` escape it (a key may hold ``"`` or ``\\``), and percent-encoded.
    """
    forms: set[str] = set()
    for secret in secrets:
        if isinstance(secret, str) and len(secret) >= MIN_SECRET_LENGTH:
            forms.update((secret, json.dumps(secret)[1:-1], repr(secret)[1:-1], quote(secret, safe="")))
    return sorted(forms, key=len, reverse=True)


def _hide(text: str, forms: list[str]) -> str:
    """
    ``text`` with each of ``forms`` (see :func:`secret_forms`), and every run of
    :data:`MIN_SECRET_PIECE` or more characters of one, replaced by ``***``.
    """
    for form in forms:
        text = text.replace(form, "***")
    runs: list[list[int]] = []  # [start, end) of each run of pieces, in order
    for start, end in sorted(
        (found, found + MIN_SECRET_PIECE)
        for form in forms
        for piece in {form[i : i + MIN_SECRET_PIECE] for i in range(len(form) - MIN_SECRET_PIECE + 1)}
        for found in _occurrences(text, piece)
    ):
        if runs and start <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], end)
        else:
            runs.append([start, end])
    kept, done = [], 0
    for start, end in runs:
        kept += [text[done:start], "***"]
        done = end
    return "".join(kept) + text[done:]


def _occurrences(text: str, piece: str) -> list[int]:
    found, at = [], text.find(piece)
    while at != -1:
        found.append(at)
        at = text.find(piece, at + 1)
    return found


def hide_secrets_in(data: Any, secrets: Iterable[str]) -> Any:
    """
    Replace each secret, in each of its :func:`secret_forms`, by ``***`` in every string of
    ``data`` (a freshly parsed JSON value, changed in place; returned), keys included.

    Only the whole secret is replaced, never a piece: a piece of a key may turn up by chance in
    a long output, which must reach the user as the workflow wrote it.
    """
    forms = secret_forms(secrets)
    if not forms:
        return data

    def clean(text: str) -> str:
        for form in forms:
            if form in text:
                text = text.replace(form, "***")
        return text

    pending = [data]
    while pending:  # no recursion: a body may nest as deeply as the JSON parser allows
        node = pending.pop()
        if isinstance(node, dict):
            for key, value in list(node.items()):
                if isinstance(value, str):
                    value = clean(value)
                elif isinstance(value, dict | list):
                    pending.append(value)
                if isinstance(key, str) and (shown := clean(key)) != key:
                    del node[key]
                    key = shown
                node[key] = value
        elif isinstance(node, list):
            for index, value in enumerate(node):
                if isinstance(value, str):
                    node[index] = clean(value)
                elif isinstance(value, dict | list):
                    pending.append(value)
    return data


def _dump(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (ValueError, RecursionError):
        return "(unprintable)"


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else _dump(value)


def _snippet(value: str | bytes | None, limit: int = 300, secrets: Iterable[str] = ()) -> str:
    """
    ``value`` on one printable line of at most ``limit`` characters, for a message. ``secrets``
    are hidden (:func:`_hide`) before anything is cut, and a cut that ends in the first
    characters of one hides those too, so no cut leaves a piece of a secret behind.
    """
    if value is None:
        return ""
    forms = secret_forms(secrets)
    # Cut before collapsing whitespace: a hostile answer may be megabytes long. The first cut
    # leaves room for a secret that starts just before the limit, so that it is hidden whole.
    keep = limit * 4 + (2 * len(forms[0]) if forms else 0)
    early = len(value) > keep
    text = value[:keep].decode("utf-8", "replace") if isinstance(value, bytes) else value[:keep]
    text = _hide(text, forms)
    text = " ".join(text.split())
    text = "".join(char if char.isprintable() else "?" for char in text)
    cut = len(text) > limit
    if cut:
        text = text[: limit - 3]
    if cut or early:
        for form in forms:  # the first characters of a secret, left at the cut: hidden as the secret
            begun = next((n for n in range(min(len(form), len(text)), 0, -1) if text.endswith(form[:n])), 0)
            if begun:
                text = text[:-begun] + "***"
    return text + "..." if cut else text
