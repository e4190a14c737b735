from __future__ import annotations

import json
from typing import Any

import pytest

from tests.fake_api import API_KEY, BASE_URL, FakeAPI


def connect_fake_api(monkeypatch, **extra: Any) -> None:
    """Point ``altabots_default`` at the fake API, with these connection extras."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_ALTABOTS_DEFAULT",
        json.dumps({"conn_type": "altabots", "host": BASE_URL, "password": API_KEY, "extra": extra}),
    )


@pytest.fixture
def api(mocker, monkeypatch) -> FakeAPI:
    """The fake API, and an ``altabots_default`` connection pointing at it."""
    connect_fake_api(monkeypatch)
    fake = FakeAPI()
    fake.install(mocker)
    mocker.patch("time.sleep")  # waits are asserted on, never slept
    return fake


class FakeTI:
    """The parts of a running task instance the operator touches."""

    def __init__(self) -> None:
        self.xcom: dict[str, Any] = {}
        self.stats_tags: dict[str, str] = {}
        self.try_number = 1

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


class FakeStateStore:
    """``context["task_state_store"]`` of Airflow 3.3, backed by a dict."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def set(self, key: str, value: Any, *, retention: Any = None) -> None:
        self.data[key] = value

    def delete(self, key: str) -> None:
        self.data.pop(key, None)


@pytest.fixture
def context() -> dict[str, Any]:
    return {"ti": FakeTI(), "task_state_store": FakeStateStore()}
