"""
Emulated workflows and their runs.

One API key stands for one workflow, as at the vendor (a key is made per agent or workflow).
A :class:`WorkflowConfig` says how that workflow's runs behave; a :class:`Run` is one
execution. A run's status is worked out from its timestamps whenever it is asked for, so no
timer is needed per run: it is ``PENDING`` for ``pending_seconds``, then ``RUNNING`` for
``run_seconds``, then ``SUCCEED`` or ``FAILED`` (or ``RUNNING`` forever for ``outcome="never"``).

The run record has the fields the vendor's pages list: ``workflowId``, ``workflowName``,
``workflowVersion``, ``workflowRunId``, ``input``, ``output``, ``workflowExecutionTime``,
``status``, ``totalCost``, ``totalTokens``, ``startTime``, ``endTime``.

Emulator's own choices, where the pages are silent:

* ``startTime`` is the moment the invoke was accepted (epoch ms) and is always present;
  ``endTime`` appears only once the run has ended. ``workflowExecutionTime`` is the time from
  ``startTime`` to ``endTime`` (to now while the run has not ended), in ms, so it includes the
  time spent ``PENDING``.
* ``output`` is ``{}`` until the run ends. A run that succeeds answers the workflow's fixed
  ``output`` if one is configured, else ``{"output": "<a short text made from the input>"}``.
  A failed run answers ``{"error": "..."}`` saying it failed.
* ``totalTokens`` is made up: about one token per four characters of JSON input and output,
  plus 150 tokens per second spent ``RUNNING`` (it grows while the run runs; 0 while
  ``PENDING``). ``totalCost`` is ``totalTokens x 0.0004`` credits, rounded to 4 decimals.
* A ``workflow_id`` not configured is derived from the API key (a stable hash, never the key).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final

PENDING: Final = "PENDING"
RUNNING: Final = "RUNNING"
SUCCEED: Final = "SUCCEED"
FAILED: Final = "FAILED"
STATUSES: Final = (PENDING, RUNNING, SUCCEED, FAILED)

#: Values of :attr:`WorkflowConfig.outcome`.
OUTCOMES: Final = ("succeed", "fail", "never")

TOKENS_PER_RUNNING_SECOND: Final = 150
CREDITS_PER_TOKEN: Final = 0.0004

RunSeconds = float | tuple[float, float]


@dataclass(frozen=True)
class WorkflowConfig:
    """How the runs of one API key's workflow behave.

    ``run_seconds`` is a duration or a ``(low, high)`` range drawn uniformly per run;
    ``pending_seconds`` is the time a run stays ``PENDING`` before it starts ``RUNNING``;
    ``outcome`` is ``"succeed"``, ``"fail"`` or ``"never"`` (stays ``RUNNING`` forever);
    ``output`` fixes the End node output of successful runs; ``fail_rate`` (0..1) is the chance
    that a run which would succeed fails instead.
    """

    name: str = "Emulated Workflow"
    workflow_id: str = ""
    version: str = "1.0.0"
    run_seconds: RunSeconds = 2.0
    pending_seconds: float = 0.3
    outcome: str = "succeed"
    output: Mapping[str, Any] | None = field(default=None, hash=False, compare=False)
    fail_rate: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.run_seconds, list):
            if len(self.run_seconds) != 2:
                raise ValueError("run_seconds must be a number or a [low, high] pair")
            object.__setattr__(self, "run_seconds", (self.run_seconds[0], self.run_seconds[1]))
        _check_config(self)

    def for_key(self, api_key: str) -> WorkflowConfig:
        """This config with a ``workflow_id`` derived from ``api_key`` when none is set."""
        if self.workflow_id:
            return self
        digest = hashlib.sha256(api_key.encode()).hexdigest()[:24]
        return replace(self, workflow_id=f"wf-{digest}")

    def with_changes(self, changes: Mapping[str, Any]) -> WorkflowConfig:
        """A copy with the fields in ``changes`` (as JSON would give them) replaced.

        Raises ``ValueError`` naming the field when a value is wrong or a field is unknown.
        """
        known = set(self.__dataclass_fields__)
        values: dict[str, Any] = {}
        for key, value in changes.items():
            if key not in known:
                raise ValueError(f"unknown workflow field {key!r}")
            values[key] = value
        return replace(self, **values)

    def to_json(self) -> dict[str, Any]:
        """The config as JSON-ready data."""
        data = asdict(self)
        if isinstance(self.run_seconds, tuple):
            data["run_seconds"] = list(self.run_seconds)
        data["output"] = dict(self.output) if self.output is not None else None
        return data


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_config(config: WorkflowConfig) -> None:
    for name in ("name", "workflow_id", "version"):
        if not isinstance(getattr(config, name), str):
            raise ValueError(f"{name} must be a string")
    run_seconds = config.run_seconds
    if isinstance(run_seconds, tuple):
        low, high = run_seconds
        if not (_is_number(low) and _is_number(high) and 0 <= low <= high):
            raise ValueError("run_seconds range must be two numbers with 0 <= low <= high")
    elif not (_is_number(run_seconds) and run_seconds >= 0):
        raise ValueError("run_seconds must be a number >= 0 or a [low, high] pair")
    if not (_is_number(config.pending_seconds) and config.pending_seconds >= 0):
        raise ValueError("pending_seconds must be a number >= 0")
    if config.outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}")
    if config.output is not None and not isinstance(config.output, Mapping):
        raise ValueError("output must be an object")
    if not (_is_number(config.fail_rate) and 0 <= config.fail_rate <= 1):
        raise ValueError("fail_rate must be a number between 0 and 1")


def _leaf_strings(value: Any, found: list[str], limit: int = 3) -> None:
    if len(found) >= limit:
        return
    if isinstance(value, str):
        if value.strip():
            found.append(value.strip())
    elif isinstance(value, Mapping):
        for item in value.values():
            _leaf_strings(item, found, limit)
    elif isinstance(value, list):
        for item in value:
            _leaf_strings(item, found, limit)


def answer_text(workflow_name: str, run_input: Mapping[str, Any]) -> str:
    """A short, plausible text answer made from a run's input."""
    texts: list[str] = []
    _leaf_strings(run_input, texts)
    subject = "; ".join(t[:160] for t in texts) if texts else json.dumps(run_input)[:160]
    return (
        f"Here is the answer of {workflow_name} to: {subject}. "
        "(Written by the AltaBots emulator; no model ran.)"
    )


class Run:
    """One execution of a workflow, from its invoke onwards.

    Times are epoch seconds. ``ends_at`` is None for a run that never ends. ``succeeds`` is
    decided when the run is made (outcome and ``fail_rate`` drawn then).
    """

    __slots__ = (
        "_final_bytes",
        "_final_record",
        "_input_tokens",
        "api_key",
        "created",
        "ends_at",
        "input",
        "is_async",
        "run_id",
        "started_at",
        "succeeds",
        "user_id",
        "webhooks",
        "workflow",
    )

    def __init__(
        self,
        *,
        run_id: str,
        api_key: str,
        workflow: WorkflowConfig,
        run_input: dict[str, Any],
        user_id: str | None,
        is_async: bool,
        webhooks: list[dict[str, Any]],
        created: float,
        run_seconds: float,
        succeeds: bool | None,
    ) -> None:
        self.run_id = run_id
        self.api_key = api_key
        self.workflow = workflow
        self.input = run_input
        self.user_id = user_id
        self.is_async = is_async
        self.webhooks = webhooks
        self.created = created
        self.started_at = created + workflow.pending_seconds
        self.succeeds = succeeds
        self.ends_at: float | None = None if succeeds is None else self.started_at + run_seconds
        self._input_tokens = math.ceil(len(json.dumps(run_input, ensure_ascii=False)) / 4)
        self._final_record: dict[str, Any] | None = None
        self._final_bytes: bytes | None = None

    def status(self, now: float) -> str:
        """The run's status at epoch time ``now``."""
        if now < self.started_at:
            return PENDING
        if self.ends_at is None or now < self.ends_at:
            return RUNNING
        return SUCCEED if self.succeeds else FAILED

    def end_now(self, now: float, succeeds: bool) -> None:
        """End the run at ``now`` (``POST /_emulator/runs/<id>/end``); ValueError if it has ended."""
        if self.ended(now):
            raise ValueError(f"run {self.run_id} has already ended")
        self.started_at = min(self.started_at, now)
        self.succeeds = succeeds
        self.ends_at = now

    def ended(self, now: float) -> bool:
        """Whether the run has ended (SUCCEED or FAILED) at ``now``."""
        return self.ends_at is not None and now >= self.ends_at

    def accepted(self) -> dict[str, Any]:
        """The answer to an asynchronous invoke."""
        workflow = self.workflow
        return {
            "workflowId": workflow.workflow_id,
            "workflowName": workflow.name,
            "workflowVersion": workflow.version,
            "workflowRunId": self.run_id,
            "status": PENDING,
        }

    def record(self, now: float) -> dict[str, Any]:
        """The run record at ``now``, as the query endpoint answers it."""
        if self._final_record is not None:
            return self._final_record
        status = self.status(now)
        workflow = self.workflow
        start_ms = int(self.created * 1000)
        if status == PENDING:
            tokens = 0
            output: Mapping[str, Any] = {}
        elif status == RUNNING:
            tokens = self._input_tokens + int(TOKENS_PER_RUNNING_SECOND * (now - self.started_at))
            output = {}
        else:
            ended_at = self.ends_at if self.ends_at is not None else now
            running_tokens = int(TOKENS_PER_RUNNING_SECOND * (ended_at - self.started_at))
            if status == SUCCEED:
                if workflow.output is not None:
                    output = workflow.output
                else:
                    output = {"output": answer_text(workflow.name, self.input)}
                output_tokens = math.ceil(len(json.dumps(output, ensure_ascii=False)) / 4)
            else:
                output = {"error": f"The workflow run failed in {workflow.name} (emulated failure)."}
                output_tokens = 0
            tokens = self._input_tokens + running_tokens + output_tokens
        end_ms = int(self.ends_at * 1000) if status in (SUCCEED, FAILED) and self.ends_at else None
        record: dict[str, Any] = {
            "workflowId": workflow.workflow_id,
            "workflowName": workflow.name,
            "workflowVersion": workflow.version,
            "workflowRunId": self.run_id,
            "input": self.input,
            "output": dict(output),
            "workflowExecutionTime": (end_ms if end_ms is not None else int(now * 1000)) - start_ms,
            "status": status,
            "totalCost": round(tokens * CREDITS_PER_TOKEN, 4),
            "totalTokens": tokens,
            "startTime": start_ms,
        }
        if end_ms is not None:
            record["endTime"] = end_ms
            self._final_record = record
        return record

    def record_bytes(self, now: float) -> bytes:
        """The run record encoded as JSON (cached once the run has ended)."""
        if self._final_bytes is not None:
            return self._final_bytes
        data = json.dumps(self.record(now), separators=(",", ":"), ensure_ascii=False).encode()
        if self._final_record is not None:
            self._final_bytes = data
        return data

    def internal(self, now: float) -> dict[str, Any]:
        """The emulator's own view of the run, for ``/_emulator/runs``."""
        return {
            "run_id": self.run_id,
            "api_key": self.api_key,
            "workflow_id": self.workflow.workflow_id,
            "workflow_name": self.workflow.name,
            "status": self.status(now),
            "created": self.created,
            "started": self.started_at,
            "ends_at": self.ends_at,
            "is_async": self.is_async,
            "user_id": self.user_id,
            "webhooks": len(self.webhooks),
            "input": self.input,
        }
