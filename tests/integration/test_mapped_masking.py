"""Webhook header values are masked in the rendered fields of mapped tasks too."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tests.integration.conftest import TEST_DAGS, airflow_home

pytestmark = pytest.mark.integration

TOKEN = "mapped-hook-code-8e41f0"


def test_mapped_tasks_mask_webhook_header_values(emulator, run_dag, monkeypatch):
    # A mapped task renders its fields through another path than a plain one.
    monkeypatch.setenv("AIRFLOW_VAR_ALTABOTS_HOOK_HEADER", TOKEN)
    result = run_dag("test_mapped_webhook_masking", folder=TEST_DAGS, file="mapped_webhook_masking")
    assert result.dag_run.state == "success"
    assert [i["body"]["webhook"][0]["headers"]["X-Callback-Code"] for i in emulator.invokes()] == [TOKEN] * 2
    with sqlite3.connect(Path(airflow_home(), "airflow.db")) as db:
        rows = db.execute(
            "SELECT map_index, rendered_fields FROM rendered_task_instance_fields WHERE dag_id = ?",
            ("test_mapped_webhook_masking",),
        ).fetchall()
    assert sorted(index for index, _ in rows) == [0, 1]
    for _, rendered in rows:
        assert json.loads(rendered)["webhooks"][0]["headers"] == {"X-Callback-Code": "***"}
    assert TOKEN not in result.printed
