"""
Test set-up shared by every test: a private AIRFLOW_HOME with a SQLite metadata database.

The environment is set before anything imports Airflow, so no test touches the user's own
Airflow installation.
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib.metadata import version
from pathlib import Path

from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent

#: The Airflow under test: make test-compat runs parts of the suite on the older lines.
AIRFLOW_VERSION = Version(version("apache-airflow"))
#: The task state store (resuming a run across tries) arrived in Airflow 3.3.
HAS_TASK_STATE_STORE = AIRFLOW_VERSION.release >= (3, 3)

_home = Path(tempfile.mkdtemp(prefix="altabots-tests-"))
#: Where tests write the README's DAG snippets to run them.
README_DAGS = _home / "readme_dags"
README_DAGS.mkdir()
os.environ["AIRFLOW_HOME"] = str(_home)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "example_dags")
# dag.test() re-parses a DAG from its bundle: the examples, and DAGs written for the tests.
os.environ["AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST"] = json.dumps(
    [
        {
            "name": name,
            "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
            "kwargs": {"path": str(path), "refresh_interval": 0},
        }
        for name, path in (
            ("provider_examples", REPO / "example_dags"),
            ("test_dags", REPO / "tests/integration/dags"),
            ("readme_dags", README_DAGS),
        )
    ]
)
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_home / 'airflow.db'}"
os.environ["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] = "http://127.0.0.1:8080/execution/"
os.environ.pop("AIRFLOW_CONN_ALTABOTS_DEFAULT", None)


import pytest  # noqa: E402 - after the environment above is set


@pytest.fixture(autouse=True)
def _fresh_connection_reads():
    """
    Each test reads its own connections and CA bundle, and starts with fresh request budgets:
    forget what hooks shared in earlier tests.
    """
    from airflow_provider_altabots.budget import BUDGETS
    from airflow_provider_altabots.hooks import altabots

    altabots._SETTINGS.clear()
    altabots._SHARED_CLIENTS.forget_tls()
    altabots._WARNED.clear()
    BUDGETS.clear()
    yield
    altabots._SETTINGS.clear()
    altabots._SHARED_CLIENTS.forget_tls()
    BUDGETS.clear()
