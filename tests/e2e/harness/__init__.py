"""
The end-to-end suite's deployment: PostgreSQL (or SQLite), the emulator and Airflow's
components as OS processes on loopback.

* ``processes``: launching commands in sessions of their own, logs, group kill, the reaper;
* ``postgres``: the metadata database, a private PostgreSQL cluster or SQLite;
* ``airflow``: Airflow's settings, CLI, REST API and state read through SQL;
* ``deployment``: ``Deployment``, which starts and composes them, with the emulator's admin
  client (``altabots_emulator.client.EmulatorClient``) as ``Deployment.emulator``.

``python -m tests.e2e.harness`` (``make deployment``) starts one to look at by hand.
"""

from tests.e2e.harness.airflow import connection_fields
from tests.e2e.harness.deployment import Deployment
from tests.e2e.harness.processes import DeploymentError, DeploymentTimeout, session_members

__all__ = ["Deployment", "DeploymentError", "DeploymentTimeout", "connection_fields", "session_members"]
