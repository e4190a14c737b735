"""
The metrics this provider sends through Airflow's own ``Stats`` (StatsD, Datadog or
OpenTelemetry, as Airflow's ``[metrics]`` section configures; nothing is sent when it is off).

=========================  =======  ==============================  ==========================================
name                       kind     tags                            what
=========================  =======  ==============================  ==========================================
``altabots.requests``      counter  ``conn_id``, ``endpoint``,      each request sent (``endpoint``: invoke,
                                    ``status``                      result or verify; ``status``: the HTTP
                                                                    status, or ``none`` when no answer came)
``altabots.rate_limited``  counter  ``conn_id``, ``endpoint``       each answer HTTP 429
``altabots.budget_held``   timer    ``conn_id``                     how long a request of the triggerer waited
                                                                    for its key's budget (milliseconds)
``altabots.run.duration``  timer    ``conn_id``, ``workflow``       a finished run's ``workflowExecutionTime``
``altabots.run.cost``      gauge    ``conn_id``, ``workflow``       the credits a finished run cost
``altabots.run.tokens``    gauge    ``conn_id``, ``workflow``       the tokens a finished run used
``altabots.runs``          counter  ``conn_id``, ``workflow``,      each run seen to end
                                    ``status``
=========================  =======  ==============================  ==========================================

``workflow`` is the run record's ``workflowId``. Tags carry connection ids and workflow ids,
never a key. A metric that cannot be sent never fails a task or a trigger.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from airflow_provider_altabots import protocol

if TYPE_CHECKING:
    from collections.abc import Mapping

    from airflow_provider_altabots.protocol import ApiRequest, ConnectionSettings

log = logging.getLogger(__name__)

_ENDPOINTS = {protocol.INVOKE_PATH: "invoke", protocol.RESULT_PATH: "result", protocol.VERIFY_PATH: "verify"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def request_sent(settings: ConnectionSettings, request: ApiRequest, status: int | None) -> None:
    """Count one request and, for a 429, one refusal."""
    endpoint = _ENDPOINTS.get(request.path, "other")
    tags = {"conn_id": _tag(settings.conn_id), "endpoint": endpoint}
    _send("incr", "altabots.requests", 1, {**tags, "status": str(status) if status else "none"})
    if status == 429:
        _send("incr", "altabots.rate_limited", 1, tags)


def budget_held(settings: ConnectionSettings, seconds: float) -> None:
    """Time one request waited for its key's budget."""
    _send("timing", "altabots.budget_held", seconds * 1000.0, {"conn_id": _tag(settings.conn_id)})


def run_ended(conn_id: str, record: Mapping[str, Any]) -> None:
    """Duration, cost and tokens of a finished run, tagged with its workflow."""
    tags = {"conn_id": _tag(conn_id), "workflow": _tag(record.get("workflowId") or "unknown")}
    _send("incr", "altabots.runs", 1, {**tags, "status": _tag(record.get("status") or "unknown")})
    for name, field, kind in (
        ("altabots.run.duration", "workflowExecutionTime", "timing"),
        ("altabots.run.cost", "totalCost", "gauge"),
        ("altabots.run.tokens", "totalTokens", "gauge"),
    ):
        value = _finite(record.get(field))
        if value is not None:
            _send(kind, name, value, tags)


def _send(kind: str, name: str, value: float, tags: dict[str, str]) -> None:
    try:
        from airflow.providers.common.compat.sdk import Stats

        getattr(Stats, kind)(name, value, tags=tags)
    except Exception:  # a metric must never fail a task or a trigger
        log.debug("Could not send metric %s.", name, exc_info=True)


def _tag(value: object) -> str:
    return _UNSAFE.sub("_", str(value))[:64] or "_"


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if number == number and abs(number) != float("inf") else None
