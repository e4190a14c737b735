"""Provider metadata read by Airflow's ProvidersManager (registered as an entry point)."""

from __future__ import annotations

from typing import Any

from airflow_provider_altabots import __version__

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
                "conn-fields": {
                    "auth_scheme": {
                        "label": "Auth scheme",
                        "description": "bearer sends 'Authorization: Bearer <key>' (current hosts); "
                        "raw sends the bare key (older GPTBots pages).",
                        "schema": {
                            "type": ["string", "null"],
                            "enum": ["bearer", "raw"],
                            "default": "bearer",
                        },
                    },
                    "timeout": {
                        "label": "Request timeout (seconds)",
                        "description": "Seconds one API request may take in all: connect, send and "
                        "every read.",
                        "schema": {"type": ["number", "null"], "minimum": 1, "default": 30},
                    },
                    "max_answer_bytes": {
                        "label": "Largest answer (bytes)",
                        "description": "The largest answer read, after decompression; a run whose "
                        "record is larger fails with a message naming this field.",
                        "schema": {"type": ["integer", "null"], "minimum": 1, "default": 8388608},
                    },
                    "requests_per_minute": {
                        "label": "Plan's requests per minute",
                        "description": "The rate your plan allows this key, if you know it (GPTBots "
                        "free: 3). Empty: learnt from the API's rate-limit headers and 429 answers.",
                        "schema": {"type": ["number", "null"], "exclusiveMinimum": 0},
                    },
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "login", "port"],
                    "relabeling": {"host": "Base URL", "password": "API key"},
                    "placeholders": {
                        "host": "https://altatech.ai (GPTBots: https://api-sg.gptbots.ai, -th, -jp)",
                        "password": "the workflow's API key",
                    },
                },
            }
        ],
    }
