"""
OpenLineage facets of a workflow run, for ``get_openlineage_facets_on_complete``.

Imported only when Airflow's OpenLineage provider asks a task for its lineage (it needs the
``openlineage`` extra): never when a DAG is parsed.

A task that started or waited for a run reports it as two run facets:

* ``externalQuery`` (:class:`ExternalQueryRunFacet`, part of the OpenLineage spec): the run id,
  with the API's ``scheme://host[:port]`` as its source, so that a lineage backend links the task's
  run to the workflow run at the vendor.
* ``altaBots_workflow`` (:class:`AltaBotsWorkflowRunFacet`, a custom facet): the workflow's id,
  name and version as the API reported them for that run. It is a run facet because the version
  is known only once a run exists, and the next run of the same task may run another version.

Nothing else of the run record is copied: no input, output or error text, and never the API key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs
from airflow.providers.common.compat.openlineage.facet import ExternalQueryRunFacet, RunFacet
from airflow.providers.openlineage.extractors import OperatorLineage

from airflow_provider_altabots import __version__, protocol

#: Key of the workflow facet in a run's facets: ``{prefix}_{name}``, as the spec asks of custom facets.
WORKFLOW_FACET_KEY = "altaBots_workflow"
#: Key of the spec's external query facet.
EXTERNAL_QUERY_FACET_KEY = "externalQuery"
#: The longest workflow id, name or version copied into a facet; the rest is cut.
MAX_FIELD_LENGTH = 256

_DEFAULT_PORTS = {"http": 80, "https": 443}
_SCHEMA_URL = (
    "https://raw.githubusercontent.com/airflow-provider-altabots/airflow-provider-altabots/"
    f"{__version__}/docs/openlineage/AltaBotsWorkflowRunFacet.json#/$defs/AltaBotsWorkflowRunFacet"
)


@attrs.define
class AltaBotsWorkflowRunFacet(RunFacet):
    """
    The AltaBots (or GPTBots) workflow a run executed; its JSON schema is
    ``docs/openlineage/AltaBotsWorkflowRunFacet.json`` in the provider's repository.

    :param workflowId: the workflow's id.
    :param workflowName: the workflow's name.
    :param workflowVersion: the version of the workflow the run executed.
    """

    # camelCase: the facet's JSON names.
    workflowId: str | None = attrs.field(default=None)
    workflowName: str | None = attrs.field(default=None)
    workflowVersion: str | None = attrs.field(default=None)

    @staticmethod
    def _get_schema() -> str:
        return _SCHEMA_URL


def api_source(base_url: str) -> str | None:
    """
    The source of a run's external query facet: ``scheme://host[:port]`` of the API.

    The path (a gateway's prefix) is left out, as are any user name, password, query and fragment,
    so nothing that may hold a secret reaches lineage; a scheme's default port is left out too, so
    one API has one source however its connection spells it. ``None`` when ``base_url`` names no
    http(s) host.
    """
    try:
        parts = urlsplit(base_url)
        host, port = parts.hostname, parts.port
    except (TypeError, ValueError):
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"{scheme}://{host}{f':{port}' if port and port != _DEFAULT_PORTS[scheme] else ''}"


def workflow_facet(record: Mapping[str, Any] | None) -> AltaBotsWorkflowRunFacet | None:
    """The workflow facet of a run record (or an invoke's answer); ``None`` when it names no workflow."""
    if not isinstance(record, Mapping):
        return None
    wid, name, version = (_text(record.get(key)) for key in ("workflowId", "workflowName", "workflowVersion"))
    if wid is None and name is None and version is None:
        return None
    return AltaBotsWorkflowRunFacet(workflowId=wid, workflowName=name, workflowVersion=version)


def run_lineage(
    run_id: str | None, base_url: str | None, record: Mapping[str, Any] | None = None
) -> OperatorLineage:
    """
    The lineage of a task that started or waited for workflow run ``run_id``.

    :param run_id: the run's id; ``None`` (or anything that is no run id) when the task never
        learnt one, e.g. it failed before the invoke: the lineage is then empty.
    :param base_url: the connection's base URL; ``None`` when it could not be read, which leaves
        the external query facet out.
    :param record: what the API last said about the run (its record, or the invoke's answer).
    """
    if run_id is None or protocol.run_id_problem(run_id) is not None:
        return OperatorLineage()
    run_facets: dict[str, Any] = {}
    source = api_source(base_url) if base_url else None
    if source is not None:
        run_facets[EXTERNAL_QUERY_FACET_KEY] = ExternalQueryRunFacet(
            externalQueryId=run_id.strip(), source=source
        )
    workflow = workflow_facet(record)
    if workflow is not None:
        run_facets[WORKFLOW_FACET_KEY] = workflow
    return OperatorLineage(run_facets=run_facets)


def _text(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    text = str(value).strip()
    return text[:MAX_FIELD_LENGTH] or None
