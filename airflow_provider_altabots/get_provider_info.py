"""Provider metadata read by Airflow's ProvidersManager (registered as an entry point)."""

from __future__ import annotations

from typing import Any

from airflow_provider_altabots import __version__, connection_form

INTEGRATION = "AltaBots"


def get_provider_info() -> dict[str, Any]:
    """Describe the provider: its modules, and the ``altabots`` connection form."""
    return {
        "package-name": "airflow-provider-altabots",
        "name": "AltaBots",
        "description": "Run AltaBots and GPTBots AI workflows as Airflow tasks: "
        "invoke, wait on the triggerer, hand the output downstream.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": INTEGRATION,
                "external-doc-url": "https://altatech.ai",
                "tags": ["software"],
            }
        ],
        "operators": [
            {
                "integration-name": INTEGRATION,
                "python-modules": ["airflow_provider_altabots.operators.altabots"],
            }
        ],
        "sensors": [
            {
                "integration-name": INTEGRATION,
                "python-modules": ["airflow_provider_altabots.sensors.altabots"],
            }
        ],
        "hooks": [
            {"integration-name": INTEGRATION, "python-modules": ["airflow_provider_altabots.hooks.altabots"]}
        ],
        "triggers": [
            {
                "integration-name": INTEGRATION,
                "python-modules": ["airflow_provider_altabots.triggers.altabots"],
            }
        ],
        "connection-types": [
            {
                "connection-type": "altabots",
                "hook-class-name": "airflow_provider_altabots.hooks.altabots.AltaBotsHook",
                "hook-name": "AltaBots",
                "conn-fields": connection_form.conn_fields(),
                "ui-field-behaviour": connection_form.ui_field_behaviour(),
            }
        ],
    }
