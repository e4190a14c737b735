"""Airflow finds the provider through its entry point, and the metadata is what Airflow's schemas allow."""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from pathlib import Path

import airflow
import jsonschema
import pytest

from airflow_provider_altabots.get_provider_info import get_provider_info

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


def test_task_runtime_sees_hook_and_connection_type():
    from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

    hook = ProvidersManagerTaskRuntime().hooks["altabots"]
    assert hook is not None
    assert hook.hook_class_name == "airflow_provider_altabots.hooks.altabots.AltaBotsHook"
    assert hook.connection_id_attribute_name == "altabots_conn_id"
    assert hook.hook_name == "AltaBots"


def test_providers_manager_sees_the_connection_form(providers_manager):
    widgets = providers_manager.connection_form_widgets
    assert "extra__altabots__auth_scheme" in widgets
    assert "extra__altabots__timeout" in widgets
    behaviour = providers_manager.field_behaviours["altabots"]
    assert behaviour["relabeling"] == {"host": "Base URL", "password": "API key"}
    assert "login" in behaviour["hidden_fields"]


def test_providers_manager_sees_the_trigger(providers_manager):
    classes = {info.trigger_class_name for info in providers_manager.trigger}
    assert any(name.startswith("airflow_provider_altabots.triggers.altabots") for name in classes)
