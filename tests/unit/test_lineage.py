"""
OpenLineage: the facets of a workflow run, built on their own and asked of the operator and the
sensor through Airflow's OpenLineage provider, as its listener asks them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip(
    "airflow.providers.openlineage.extractors",
    reason="Airflow's OpenLineage provider is not installed (pip install '.[openlineage]' or "
    "pip install --group dev): the OpenLineage tests do not run",
)

import jsonschema
from airflow.providers.common.compat.openlineage.facet import ExternalQueryRunFacet
from airflow.providers.openlineage.extractors import OperatorLineage
from airflow.providers.openlineage.extractors.base import DefaultExtractor
from openlineage.client.serde import Serde

from airflow_provider_altabots import __version__
from airflow_provider_altabots.exceptions import AltaBotsConfigError, AltaBotsRunFailed
from airflow_provider_altabots.lineage import (
    EXTERNAL_QUERY_FACET_KEY,
    MAX_FIELD_LENGTH,
    WORKFLOW_FACET_KEY,
    AltaBotsWorkflowRunFacet,
    api_source,
    run_lineage,
)
from airflow_provider_altabots.operators.altabots import AltaBotsRunWorkflowOperator
from airflow_provider_altabots.sensors.altabots import AltaBotsWorkflowRunSensor
from tests.conftest import REPO
from tests.fake_api import API_KEY, BASE_URL, INVOKE, RESULT, accepted, record

SCHEMA_FILE = REPO / "docs" / "openlineage" / "AltaBotsWorkflowRunFacet.json"


def operator(**kwargs) -> AltaBotsRunWorkflowOperator:
    kwargs.setdefault("input", {"topic": "News"})
    return AltaBotsRunWorkflowOperator(task_id="run_workflow", **kwargs)


def sensor(**kwargs) -> AltaBotsWorkflowRunSensor:
    kwargs.setdefault("workflow_run_id", "run-1")
    return AltaBotsWorkflowRunSensor(task_id="wait", **kwargs)


def facets_of(task) -> dict:
    """What the OpenLineage provider's extractor gets from the task when it completes (or fails)."""
    lineage = DefaultExtractor(task).extract_on_complete(task_instance=None)
    assert lineage is not None, "the extractor caught an error from get_openlineage_facets_on_complete"
    assert (lineage.inputs, lineage.outputs, lineage.job_facets) == ([], [], {})
    return lineage.run_facets


def assert_linked(facets: dict, run_id: str, source: str = BASE_URL) -> None:
    external = facets[EXTERNAL_QUERY_FACET_KEY]
    assert isinstance(external, ExternalQueryRunFacet)
    assert (external.externalQueryId, external.source) == (run_id, source)


def assert_workflow(facets: dict, wid="wf-1", name="todayNews", version="1.0.1") -> None:
    workflow = facets[WORKFLOW_FACET_KEY]
    assert isinstance(workflow, AltaBotsWorkflowRunFacet)
    assert (workflow.workflowId, workflow.workflowName, workflow.workflowVersion) == (wid, name, version)


def as_json(facets: dict) -> str:
    return json.dumps({key: json.loads(Serde.to_json(facet)) for key, facet in facets.items()})


# -- the builder ----------------------------------------------------------------------------------


def test_a_run_is_an_external_query_of_the_api_host_and_names_its_workflow():
    lineage = run_lineage("run-1", "https://altatech.ai", record("SUCCEED"))
    assert isinstance(lineage, OperatorLineage)
    assert set(lineage.run_facets) == {"externalQuery", "altaBots_workflow"}
    assert_linked(lineage.run_facets, "run-1", "https://altatech.ai")
    assert_workflow(lineage.run_facets)
    assert (lineage.inputs, lineage.outputs, lineage.job_facets) == ([], [], {})


@pytest.mark.parametrize(
    ("base_url", "source"),
    [
        ("https://api-sg.gptbots.ai", "https://api-sg.gptbots.ai"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("https://gateway.example.test:8443", "https://gateway.example.test:8443"),
        ("https://altatech.ai:443", "https://altatech.ai"),
        ("http://proxy.example.test:80", "http://proxy.example.test"),
        ("http://[::1]:9000", "http://[::1]:9000"),
        ("HTTPS://API.Example.Test", "https://api.example.test"),
        # A gateway's path prefix is left out: the source names the API's host, as the
        # OpenLineage naming of a data source does, and no path reaches lineage.
        ("https://gateway.example.test/altabots", "https://gateway.example.test"),
        ("https://gateway.example.test:8443/tenant-7/altabots", "https://gateway.example.test:8443"),
        (
            f"https://user:{API_KEY}@gateway.example.test/{API_KEY}?key={API_KEY}#{API_KEY}",
            "https://gateway.example.test",
        ),
    ],
)
def test_the_source_is_scheme_host_and_port_only(base_url, source):
    assert api_source(base_url) == source
    assert_linked(run_lineage("run-1", base_url).run_facets, "run-1", source)


@pytest.mark.parametrize(
    "base_url", ["", "altatech.ai", "ftp://files.example.test", "https://", "http://[::1"]
)
def test_a_base_url_without_an_http_host_has_no_source(base_url):
    assert api_source(base_url) is None
    assert EXTERNAL_QUERY_FACET_KEY not in run_lineage("run-1", base_url, record("SUCCEED")).run_facets


def test_an_unknown_base_url_still_names_the_workflow():
    facets = run_lineage("run-1", None, record("FAILED")).run_facets
    assert set(facets) == {WORKFLOW_FACET_KEY}
    assert_workflow(facets)


@pytest.mark.parametrize("run_id", [None, "", "   ", "run 1", "r" * 129, 42])
def test_no_run_id_no_lineage(run_id):
    assert run_lineage(run_id, BASE_URL, record("SUCCEED")) == OperatorLineage()


def test_no_record_links_the_run_alone():
    facets = run_lineage("run-1", BASE_URL).run_facets
    assert set(facets) == {EXTERNAL_QUERY_FACET_KEY}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"workflowId": "wf-9"}, ("wf-9", None, None)),
        ({"workflowVersion": 3}, (None, None, "3")),
        ({"workflowVersion": 1.5, "workflowName": "  news  "}, (None, "news", "1.5")),
        ({"workflowId": "", "workflowName": None, "workflowVersion": True}, None),
        ({"workflowId": {"nested": "x"}, "workflowName": ["x"]}, None),
        ({}, None),
    ],
)
def test_the_workflow_facet_takes_plain_values_only(fields, expected):
    facets = run_lineage("run-1", BASE_URL, {"workflowRunId": "run-1", **fields}).run_facets
    if expected is None:
        assert WORKFLOW_FACET_KEY not in facets
    else:
        assert_workflow(facets, *expected)


def test_long_workflow_fields_are_cut():
    facets = run_lineage("run-1", BASE_URL, {"workflowName": "n" * 10_000}).run_facets
    assert facets[WORKFLOW_FACET_KEY].workflowName == "n" * MAX_FIELD_LENGTH


def test_nothing_but_the_workflow_fields_leaves_the_record():
    leaky = record(
        "FAILED",
        input={"api_key": API_KEY},
        output={"echo": f"Bearer {API_KEY}"},
        error=f"bad key {API_KEY}",
        apiKey=API_KEY,
        Authorization=f"Bearer {API_KEY}",
    )
    text = as_json(run_lineage("run-1", f"https://{API_KEY}@api.example.test/{API_KEY}", leaky).run_facets)
    assert API_KEY not in text
    assert "todayNews" in text
    assert "run-1" in text


# -- the custom facet and its schema --------------------------------------------------------------


def test_the_workflow_facet_follows_the_spec_naming_and_its_shipped_schema():
    facet = AltaBotsWorkflowRunFacet(workflowId="wf-1", workflowName="todayNews", workflowVersion="1.0.1")
    data = json.loads(Serde.to_json(facet))
    assert data["_schemaURL"] == (
        "https://raw.githubusercontent.com/airflow-provider-altabots/airflow-provider-altabots/"
        f"{__version__}/docs/openlineage/AltaBotsWorkflowRunFacet.json#/$defs/AltaBotsWorkflowRunFacet"
    )
    assert data["_producer"]
    # {prefix}{name}{entity}Facet, attached under {prefix}_{name}.
    assert WORKFLOW_FACET_KEY == "altaBots_workflow"
    schema = json.loads(SCHEMA_FILE.read_text())
    definition = schema["$defs"]["AltaBotsWorkflowRunFacet"]
    assert definition["allOf"][0] == {
        "$ref": "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunFacet"
    }
    own = definition["allOf"][1]
    assert set(own["properties"]) == {"workflowId", "workflowName", "workflowVersion"}
    jsonschema.validate(data, own)
    assert {field["maxLength"] for field in own["properties"].values()} == {MAX_FIELD_LENGTH}
    assert schema["properties"] == {WORKFLOW_FACET_KEY: {"$ref": "#/$defs/AltaBotsWorkflowRunFacet"}}


# -- the operator ---------------------------------------------------------------------------------


def test_operator_links_its_synchronous_run(api, context):
    api.on(INVOKE, (200, record("SUCCEED", run_id="run-s")))
    op = operator(sync_invoke=True)
    op.execute(context)
    facets = facets_of(op)
    assert_linked(facets, "run-s")
    assert_workflow(facets)


def test_operator_links_the_run_it_polled(api, context):
    api.on(INVOKE, (200, accepted("run-p")))
    api.on(
        RESULT,
        (200, record("RUNNING", run_id="run-p")),
        (200, record("SUCCEED", run_id="run-p", workflowVersion="2.0")),
    )
    op = operator(deferrable=False)
    op.execute(context)
    facets = facets_of(op)
    assert_linked(facets, "run-p")
    assert_workflow(facets, version="2.0")  # the finished run's record, not the invoke's answer


def test_operator_resumed_after_deferral_links_the_run_of_the_event(api, context):
    carried = record("SUCCEED", run_id="run-d")
    op = operator(deferrable=True)  # the task is built anew from the DAG file when it resumes
    op.execute_complete(context, {"status": "success", "run_id": "run-d", "message": "ok", "record": carried})
    facets = facets_of(op)
    assert_linked(facets, "run-d")
    assert_workflow(facets)


def test_operator_fire_and_forget_links_the_run_it_started(api, context):
    api.on(INVOKE, (200, accepted("run-f")))
    op = operator(wait_for_termination=False)
    assert op.execute(context) == "run-f"
    facets = facets_of(op)
    assert_linked(facets, "run-f")
    assert_workflow(facets)  # the invoke's answer names the workflow


def test_operator_resuming_an_earlier_try_links_that_run(api, context):
    context["task_state_store"].data[AltaBotsRunWorkflowOperator.external_id_key] = "run-old"
    api.on(RESULT, (200, record("SUCCEED", run_id="run-old")))
    op = operator(deferrable=False)
    op.execute(context)
    assert_linked(facets_of(op), "run-old")
    assert api.count(INVOKE) == 0


def test_operator_whose_run_failed_still_links_it(api, context):
    # The OpenLineage provider asks for the same facets when the task fails.
    api.on(INVOKE, (200, record("FAILED", run_id="run-x", workflowVersion="7")))
    op = operator(sync_invoke=True)
    with pytest.raises(AltaBotsRunFailed):
        op.execute(context)
    facets = facets_of(op)
    assert_linked(facets, "run-x")
    assert_workflow(facets, version="7")


def test_operator_resumed_on_a_failed_run_links_it(api, context):
    op = operator(deferrable=True)
    with pytest.raises(AltaBotsRunFailed):
        op.execute_complete(
            context, {"status": "failed", "run_id": "run-d", "message": "Workflow run run-d FAILED."}
        )
    facets = facets_of(op)
    assert set(facets) == {EXTERNAL_QUERY_FACET_KEY}
    assert_linked(facets, "run-d")


def test_operator_that_failed_before_the_invoke_has_no_lineage(api, context):
    op = operator(input="{'topic': 'News'}")
    with pytest.raises(AltaBotsConfigError):
        op.execute(context)
    assert op.get_openlineage_facets_on_complete(None) == OperatorLineage()
    assert facets_of(op) == {}
    assert api.calls == []


def test_operator_never_run_has_no_lineage():
    assert operator().get_openlineage_facets_on_complete(None) == OperatorLineage()


def test_a_connection_that_cannot_be_read_leaves_the_source_out(api, context, monkeypatch):
    op = operator(deferrable=True)
    event = {"status": "success", "run_id": "run-d", "record": record("SUCCEED", run_id="run-d")}
    op.execute_complete(context, event)
    # The resumed task read no connection; by the time lineage is asked, it has lost its key.
    monkeypatch.setenv(
        "AIRFLOW_CONN_ALTABOTS_DEFAULT", json.dumps({"conn_type": "altabots", "host": BASE_URL})
    )
    facets = op.get_openlineage_facets_on_complete(None).run_facets
    assert set(facets) == {WORKFLOW_FACET_KEY}
    assert facets_of(op).keys() == facets.keys()


def test_the_key_is_in_no_facet_of_a_task(api, context):
    api.on(INVOKE, (200, record("SUCCEED", run_id="run-s", apiKey=API_KEY, output={"echo": API_KEY})))
    op = operator(sync_invoke=True)
    op.execute(context)
    text = as_json(facets_of(op))
    assert "run-s" in text
    assert API_KEY not in text


# -- the sensor -----------------------------------------------------------------------------------


def test_sensor_links_the_run_it_waited_for(api, context):
    api.on(RESULT, (200, record("RUNNING")), (200, record("SUCCEED")))
    s = sensor(deferrable=False, poke_interval=1)
    s.execute(context)
    facets = facets_of(s)
    assert_linked(facets, "run-1")
    assert_workflow(facets)


def test_sensor_resumed_after_deferral_links_the_run(api, context):
    api.on(RESULT, (200, record("SUCCEED", run_id="run-d")))
    s = sensor(workflow_run_id="run-d")
    s.execute_complete(context, {"status": "success", "run_id": "run-d"})
    assert_linked(facets_of(s), "run-d")


def test_sensor_whose_run_failed_still_links_it(api, context):
    api.on(RESULT, (200, record("FAILED", output={"error": "bad input"})))
    s = sensor()
    with pytest.raises(AltaBotsRunFailed):
        s.poke(context)
    facets = facets_of(s)
    assert_linked(facets, "run-1")
    assert_workflow(facets)


def test_sensor_that_never_reached_the_api_has_no_lineage(api, context):
    s = sensor(workflow_run_id=" ")
    with pytest.raises(AltaBotsConfigError):
        s.execute(context)
    assert facets_of(s) == {}


# -- parse cost -----------------------------------------------------------------------------------


def test_importing_the_operator_and_sensor_imports_nothing_of_openlineage():
    # Airflow itself reads each installed provider's description (the OpenLineage provider's
    # get_provider_info among them) when it is imported: only what the provider adds counts.
    code = (
        "import sys\n"
        "import airflow.sdk\n"
        "from airflow.providers.common.compat import sdk\n"
        "before = set(sys.modules)\n"
        "import airflow_provider_altabots.operators.altabots, airflow_provider_altabots.sensors.altabots\n"
        "added = set(sys.modules) - before\n"
        "assert 'airflow_provider_altabots.operators.altabots' in added, sorted(added)\n"
        "print(sorted(m for m in added if 'lineage' in m))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
