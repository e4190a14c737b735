"""Airflow finds the provider through its entry point, and the metadata is what Airflow's schemas allow."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import airflow
import jsonschema
import pytest

from airflow_provider_altabots import connection_form
from airflow_provider_altabots.get_provider_info import get_provider_info
from tests.conftest import AIRFLOW_VERSION

AIRFLOW_DIR = Path(airflow.__file__).parent


def test_entry_point_is_registered():
    (entry,) = [
        ep
        for ep in entry_points(group="apache_airflow_provider")
        if ep.value.startswith("airflow_provider_altabots")
    ]
    assert entry.load() is get_provider_info


def test_provider_info_validates_against_airflows_schema():
    schema = json.loads((AIRFLOW_DIR / "provider_info.schema.json").read_text())
    jsonschema.validate(get_provider_info(), schema)


def test_connection_form_validates_against_the_provider_yaml_schema():
    """conn-fields and ui-field-behaviour are checked by provider.yaml's schema, not provider_info's."""
    schema = json.loads((AIRFLOW_DIR / "provider.yaml.schema.json").read_text())
    item_schema = schema["properties"]["connection-types"]["items"]
    for connection_type in get_provider_info()["connection-types"]:
        jsonschema.validate(connection_type, item_schema)


def test_every_listed_module_imports():
    import importlib

    info = get_provider_info()
    for section in ("operators", "sensors", "hooks", "triggers"):
        for entry in info[section]:
            for module in entry["python-modules"]:
                importlib.import_module(module)


@pytest.fixture(scope="module")
def providers_manager():
    from airflow.providers_manager import ProvidersManager

    return ProvidersManager()


def test_providers_manager_sees_the_provider(providers_manager):
    assert "airflow-provider-altabots" in providers_manager.providers


def test_airflow_finds_the_hook_for_the_connection_type(providers_manager):
    """Workers find the hook by connection type: the task SDK's registry from 3.2, the core's before."""
    try:
        from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime
    except ImportError:  # Airflow before 3.2
        hooks = providers_manager.hooks
    else:
        hooks = ProvidersManagerTaskRuntime().hooks
    hook = hooks["altabots"]
    assert hook is not None
    assert hook.hook_class_name == "airflow_provider_altabots.hooks.altabots.AltaBotsHook"
    assert hook.connection_id_attribute_name == "altabots_conn_id"
    assert hook.hook_name == "AltaBots"


HOOK_META = """
import json
from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService
(meta,) = [m for m in HookMetaService.hook_meta_data() if m.connection_type == "altabots"]
standard = meta.standard_fields.model_dump() if meta.standard_fields else None
print("HOOK_META " + json.dumps({"standard": standard, "extra": meta.extra_fields}, default=str))
"""
RUN = {"capture_output": True, "text": True, "check": True, "timeout": 120}


def test_the_connection_form_has_its_fields_on_this_airflow(providers_manager):
    """
    The form the UI shows: from 3.0 the API's hook metadata (what the React UI renders; 3.2 reads
    conn-fields, 3.0 and 3.1 the hook's widgets); on 2.11 the Flask form class built from the
    hook's widgets.
    """
    if AIRFLOW_VERSION.major >= 3:
        # In a process of its own, as in the API server: on 3.0 and 3.1 the form is built while
        # Airflow loads the hooks, which a test process has done already.
        printed = subprocess.run([sys.executable, "-c", HOOK_META], **RUN).stdout.splitlines()
        (line,) = [line for line in printed if line.startswith("HOOK_META ")]
        meta = json.loads(line.removeprefix("HOOK_META "))
        standard, extra = meta["standard"], meta["extra"]
        assert standard["host"]["title"] == "Base URL"
        assert standard["password"]["title"] == "API key"
        assert standard["login"]["hidden"] is True
        labels = {name: field["schema"]["title"] for name, field in extra.items()}
        assert extra["auth_scheme"]["schema"]["enum"] == ["bearer", "raw"]
        assert extra["auth_scheme"]["value"] == "bearer"
        assert extra["timeout"]["value"] == 30
    else:
        from airflow.www.forms import create_connection_form_class

        form = create_connection_form_class()
        labels = {
            name.removeprefix("extra__altabots__"): str(getattr(form, name).args[0])
            for name in dir(form)
            if name.startswith("extra__altabots__")
        }
        behaviour = providers_manager.field_behaviours["altabots"]
        assert behaviour["relabeling"] == {"host": "Base URL", "password": "API key"}
        assert "login" in behaviour["hidden_fields"]
    assert labels == {field.name: field.label for field in connection_form.EXTRA_FIELDS}
    assert labels["auth_scheme"] == "Auth scheme"
    assert labels["timeout"] == "Request timeout (seconds)"


def test_providers_manager_sees_the_trigger(providers_manager):
    classes = {info.trigger_class_name for info in providers_manager.trigger}
    assert any(name.startswith("airflow_provider_altabots.triggers.altabots") for name in classes)
