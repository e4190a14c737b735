"""
The pytest plugin: test DAGs that call the AltaBots workflow API against the emulator.

Installed with ``altabots-emulator``, pytest loads it by itself. It gives a test:

* ``altabots_emulator``: the emulator, reset for this test, with the Airflow connection
  ``altabots_default`` pointing at it (through ``AIRFLOW_CONN_ALTABOTS_DEFAULT``, removed after
  the test). It is an :class:`~altabots_emulator.client.EmulatorClient` (set workflows, inject
  faults, end runs, read the request log) with ``url``, ``api_key`` and :meth:`EmulatorFixture.use`.
* ``altabots_dag_test``: run a DAG (or a DAG id of the DAGs folder) with Airflow's
  ``dag.test()``; returns a :class:`DagTestResult` with the task states, XComs and everything
  printed. ``altabots_airflow_db`` (session, used by it) runs ``airflow db migrate`` first: point
  ``AIRFLOW_HOME`` at a scratch folder for tests. Under pytest-xdist (``-n``) the workers that
  share one ``AIRFLOW_HOME`` migrate it one at a time, under a lock file there, and only the
  first of them in a run migrates when they share their Airflow settings too.
* ``altabots_emulator_process`` (session): the one emulator process behind both (an
  :class:`~altabots_emulator.process.EmulatorProcess`: it ends with the session, or with the
  pytest process should that be killed).

Settings, in the ``[tool.pytest.ini_options]`` of a ``pyproject.toml`` (or any pytest ini):

* ``altabots_emulator_api_key``: the API key the emulator accepts and the connection carries
  (default ``emulator-key``);
* ``altabots_emulator_args``: more ``altabots-emulator`` options, e.g.
  ``--run-seconds 0.5 --pending-seconds 0.1``;
* ``altabots_emulator_conn_id``: the connection to point at the emulator (default
  ``altabots_default``).

This module imports neither Airflow nor anything heavy: pytest loads it in every test session
of an environment where the emulator is installed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pytest

from .client import EmulatorClient

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from .process import EmulatorProcess

DEFAULT_KEY = "emulator-key"
DEFAULT_CONN_ID = "altabots_default"
CONN_TYPE = "altabots"
#: The file in AIRFLOW_HOME that ``altabots_airflow_db`` locks while it migrates.
MIGRATION_LOCK = ".altabots_airflow_db.lock"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "altabots_emulator_api_key",
        "API key the emulator accepts and the connection carries",
        default=DEFAULT_KEY,
    )
    parser.addini("altabots_emulator_args", "more altabots-emulator options", type="args", default=[])
    parser.addini(
        "altabots_emulator_conn_id", "Airflow connection pointed at the emulator", default=DEFAULT_CONN_ID
    )


def connection_env(conn_id: str, url: str, api_key: str, **extra: Any) -> tuple[str, str]:
    """The environment variable (name, value) that defines Airflow connection ``conn_id``."""
    fields: dict[str, Any] = {"conn_type": CONN_TYPE, "host": url, "password": api_key}
    if extra:
        fields["extra"] = extra
    return f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(fields)


class EmulatorFixture(EmulatorClient):
    """The emulator, as one test sees it: the admin client plus the connection it points.

    ``api_key`` is the key the connection carries; ``conn_id`` the connection's id.
    """

    def __init__(self, url: str, api_key: str, conn_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(url)
        self.api_key = api_key
        self.conn_id = conn_id
        self._monkeypatch = monkeypatch

    def use(self, api_key: str | None = None, *, conn_id: str | None = None, **extra: Any) -> None:
        """Point connection ``conn_id`` (default: this fixture's) at the emulator with ``api_key``
        (default: this fixture's) and the connection extras ``extra`` (e.g. ``timeout=5``), for
        the rest of the test. A key the emulator does not know yet needs :meth:`set_workflow`.
        """
        name, value = connection_env(conn_id or self.conn_id, self.url, api_key or self.api_key, **extra)
        self._monkeypatch.setenv(name, value)


@dataclass
class DagTestResult:
    """What ``dag.test()`` left: the DAG run, each task's state and everything printed."""

    dag_run: Any
    printed: str
    states: dict[tuple[str, int], str | None] = field(default_factory=dict)

    @property
    def plain(self) -> str:
        """:attr:`printed` without colours, box drawing and line wrapping (rich tracebacks)."""
        return " ".join(re.sub(r"\x1b\[[0-9;]*m|[│╭╮╰╯─]", " ", self.printed).split())

    def state(self, task_id: str, map_index: int = -1) -> str | None:
        """The final state of a task (of one mapped instance with ``map_index``)."""
        return self.states[(task_id, map_index)]

    def ti(self, task_id: str, map_index: int = -1) -> Any:
        """The task instance of ``task_id`` in this run."""
        return self.dag_run.get_task_instance(task_id, map_index=map_index)

    def xcom(self, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
        """What ``task_id`` pushed to XCom under ``key`` (its return value by default)."""
        return self.ti(task_id, map_index).xcom_pull(task_ids=task_id, key=key, map_indexes=map_index)


def load_dag(dag_id: str, path: str | os.PathLike[str] | None = None) -> Any:
    """DAG ``dag_id``, freshly parsed from ``path`` (a file or folder; default: the DAGs folder).

    Fails the test when any file parsed there has an import error.
    """
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow before 3.2
        from airflow.models.dagbag import DagBag  # type: ignore[no-redef,unused-ignore]

    bag = DagBag(str(path) if path is not None else None)
    if bag.import_errors:
        pytest.fail(f"DAG files failed to import: {bag.import_errors}")
    dag = bag.get_dag(dag_id)
    if dag is None:
        pytest.fail(f"no DAG {dag_id!r} in {path or 'the DAGs folder'} (found: {sorted(bag.dag_ids)})")
    return dag


@pytest.fixture(scope="session")
def altabots_emulator_process(pytestconfig: pytest.Config) -> Iterator[EmulatorProcess]:
    """The emulator in a process of its own, for the whole session (it also stops when this
    process dies without ending the session, SIGKILL included: see ``EmulatorProcess``)."""
    from .process import EmulatorProcess

    args = ["--host", "127.0.0.1", "--api-key", pytestconfig.getini("altabots_emulator_api_key")]
    with EmulatorProcess([*args, *pytestconfig.getini("altabots_emulator_args")]) as process:
        yield process


@pytest.fixture
def altabots_emulator(
    altabots_emulator_process: EmulatorProcess, pytestconfig: pytest.Config, monkeypatch: pytest.MonkeyPatch
) -> Iterator[EmulatorFixture]:
    """The emulator, reset, with the connection pointing at it for this test."""
    emulator = EmulatorFixture(
        altabots_emulator_process.url,
        pytestconfig.getini("altabots_emulator_api_key"),
        pytestconfig.getini("altabots_emulator_conn_id"),
        monkeypatch,
    )
    emulator.reset()
    emulator.use()
    yield emulator
    emulator.close()


def _airflow_home() -> Path:
    """The ``AIRFLOW_HOME`` Airflow uses in this environment (``~/airflow`` when it is not set)."""
    return Path(os.path.expanduser(os.path.expandvars(os.environ.get("AIRFLOW_HOME", "~/airflow"))))


def _migration_key() -> str | None:
    """What makes two migrations of one home the same: this pytest-xdist run, this interpreter
    and every ``AIRFLOW*`` environment variable (the files they read are the home's own). None
    outside pytest-xdist, where each session migrates."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run:
        return None
    settings = sorted((name, value) for name, value in os.environ.items() if name.startswith("AIRFLOW"))
    return hashlib.sha256(json.dumps([run, sys.executable, settings]).encode()).hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[IO[str]]:
    """``path`` (created if need be), open for reading and writing, under an exclusive lock.

    The lock is ``fcntl.flock``'s: the system drops it when the process holding it ends, however
    it ends, so a worker killed while migrating never blocks the others. Where ``fcntl`` is
    missing (Windows, where Airflow itself does not run) nothing is locked.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as file:
        try:
            import fcntl
        except ImportError:
            yield file
            return
        fcntl.flock(file.fileno(), fcntl.LOCK_EX)
        try:
            yield file
        finally:
            fcntl.flock(file.fileno(), fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def altabots_airflow_db() -> None:
    """Airflow's metadata database, migrated once per session (``airflow db migrate``).

    The migration holds an exclusive lock on ``.altabots_airflow_db.lock`` in ``AIRFLOW_HOME``,
    so that the pytest-xdist workers (``-n``) of one home migrate it one after another, never at
    once (two migrations of one SQLite file at once fail). Under pytest-xdist the lock file also
    keeps what the last successful migration ran with: a worker that finds it migrated in this
    run with the same interpreter and ``AIRFLOW*`` environment variables as its own does not
    migrate again. A database shared by workers of different homes is not covered: give them one
    home, or each its own database.
    """
    key = _migration_key()
    with _locked(_airflow_home() / MIGRATION_LOCK) as lock:
        lock.seek(0)
        if key is not None and lock.read().strip() == key:
            return  # another worker of this run migrated this home and database
        done = subprocess.run(
            [sys.executable, "-m", "airflow", "db", "migrate"], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"airflow db migrate failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
            )
        if key is not None:
            lock.truncate(0)  # opened to append: the key is then the file's only line
            lock.write(key + "\n")
            lock.flush()


@pytest.fixture
def altabots_dag_test(
    altabots_airflow_db: None, capfd: pytest.CaptureFixture[str]
) -> Callable[..., DagTestResult]:
    """``run(dag, **kwargs)``: ``dag.test(**kwargs)``, returning a :class:`DagTestResult`.

    ``dag`` is a DAG, or the id of a DAG in the DAGs folder (parsed afresh by :func:`load_dag`).
    """

    def run(dag: Any, **kwargs: Any) -> DagTestResult:
        if isinstance(dag, str):
            dag = load_dag(dag)
        dag_run = dag.test(**kwargs)
        out, err = capfd.readouterr()
        sys.stdout.write(out)  # kept for pytest's report of a failure
        states = {(ti.task_id, ti.map_index): ti.state for ti in dag_run.get_task_instances()}
        return DagTestResult(dag_run, out + err, states)

    return run
