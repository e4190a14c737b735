"""
``Deployment``: a real Airflow deployment on loopback, for the end-to-end suite and for looking
at by hand (``python -m tests.e2e.harness``).

It starts, as separate OS processes, each in its own session (so a component can be killed with
everything it started; see ``processes``):

* ``postgres``: a private PostgreSQL cluster, or SQLite instead (see ``postgres``);
* ``emulator``: ``altabots-emulator`` on a free port, run by this interpreter; every connection
  points at it, and ``Deployment.emulator`` is its admin client. A connection is given as its
  API key, or as ``{"password": <API key>, "extra": {...}}`` when it needs extras;
* ``airflow db migrate``, then ``api-server``, ``scheduler`` (LocalExecutor), ``dag-processor``
  and a ``triggerer``, from the given virtualenv's ``bin`` directory, with one environment and
  no ``airflow.cfg`` of the user's (see ``airflow``).

``start()`` returns when every component is ready (``READINESS``: the API server answers its
health check; the scheduler, DAG processor and triggerer have each written a job row and
heartbeated at least once) and every DAG file in the DAGs folder is parsed and serialized. Each
process writes its stdout and stderr to ``<root>/logs/<component>.log``; every wait has a timeout
and its error names the component and quotes the end of its log. Task logs are under
``<airflow_home>/logs``.

The settings (``airflow.AIRFLOW_SETTINGS``) make failures show in seconds: triggerers heartbeat
every second and one silent for 5 s is taken over; a task whose supervisor stopped heartbeating
for 10 s is failed (and retried) by the scheduler; files are re-parsed every 10 s.

Linux only (process sessions and the ``postgres`` user's view of directories).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from altabots_emulator.client import EmulatorClient
from altabots_emulator.process import READY_PREFIX

from tests.e2e.harness.airflow import JOB_TYPES, Airflow, connection_fields
from tests.e2e.harness.postgres import MetadataDatabase
from tests.e2e.harness.processes import (
    LOOPBACK,
    DeploymentError,
    DeploymentTimeout,
    Process,
    Processes,
    process_title,
    session_members,
    wait_for,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence
    from typing import Self


@dataclass(frozen=True)
class Readiness:
    """
    When a component of one kind is ready: ``what`` names it in messages ("no <what> within
    60 s"); ``check(deployment, process)`` makes the check that is true once it is.
    """

    what: str
    check: Callable[[Deployment, Process], Callable[[], bool]]


#: Every component kind's readiness.
READINESS: Final[dict[str, Readiness]] = {
    "postgres": Readiness("accepting connections", lambda d, p: d.database.accepts_connections),
    "emulator": Readiness(
        "its 'listening on' line and health check", lambda d, p: lambda: d._emulator_listening(p)
    ),
    "api-server": Readiness("GET /api/v2/monitor/health answering 200", lambda d, p: d.airflow.api_healthy),
    **{
        kind: Readiness("a heartbeat of its job", lambda d, p: d._job_heartbeat(p))
        for kind in ("scheduler", "dag-processor", "triggerer")
    },
}


class Deployment:
    """PostgreSQL, the emulator and Airflow's components as OS processes on loopback."""

    database: MetadataDatabase
    airflow: Airflow

    #: Seconds allowed for each start-up step (a component to become ready, the migration...).
    startup_timeout: float = 180.0
    #: Seconds a component is given to exit after SIGTERM in ``stop()`` before it is killed.
    stop_grace: float = 8.0

    def __init__(
        self,
        root: Path,
        *,
        airflow_bin: Path,
        dags_folder: Path,
        connections: Mapping[str, str | Mapping[str, Any]],
        variables: Mapping[str, str] | None = None,
        emulator_args: Sequence[str] = (),
        parallelism: int = 16,
        backend: str = "auto",
    ) -> None:
        if parallelism < 1:
            raise ValueError("parallelism must be at least 1")
        self.root = Path(root).resolve()
        self.airflow_bin = Path(airflow_bin).absolute()
        self.dags_folder = Path(dags_folder).resolve()
        self.connections = {
            conn_id: connection_fields(conn_id, value) for conn_id, value in connections.items()
        }
        self.variables = dict(variables or {})
        self.emulator_args = list(emulator_args)
        self.parallelism = parallelism
        self.airflow_home = self.root / "airflow"
        self.logs_dir = self.root / "logs"
        #: The metadata database (``backend``, ``sql()``).
        self.database = MetadataDatabase(self.root, self.airflow_home / "airflow.db", backend)
        #: Airflow's CLI, REST API and state (``airflow.cli(...)``, ``airflow.api(...)``).
        self.airflow = Airflow(self.airflow_bin, self.airflow_home, self.dags_folder, self.database.sql)
        self.emulator_url = ""
        #: Seconds each start-up step took, and "total".
        self.timings: dict[str, float] = {}

        self._processes = Processes(self.logs_dir)
        self._emulator: EmulatorClient | None = None
        self._emulator_port = 0
        # Per component name: the job id it runs as, and the highest job id before its latest start.
        self._job_ids: dict[str, int | None] = {}
        self._job_baselines: dict[str, int] = {}
        self._started = False
        self._stopped = False

    # ------------------------------------------------------------------ what tests read

    @property
    def emulator(self) -> EmulatorClient:
        """The emulator's admin client (faults, workflows, what the provider asked)."""
        if self._emulator is None:
            raise DeploymentError("the emulator is not started yet: call start() first")
        return self._emulator

    @property
    def backend(self) -> str:
        """``postgresql`` or ``sqlite``, once started."""
        return self.database.backend

    @property
    def backend_reason(self) -> str:
        """Why SQLite, when it is SQLite."""
        return self.database.reason

    @property
    def env(self) -> dict[str, str]:
        """The environment of every Airflow process."""
        return self.airflow.env

    @property
    def api_url(self) -> str:
        """The API server's (and UI's) address."""
        return self.airflow.api_url

    @property
    def components(self) -> list[str]:
        """Names of the components, in start order."""
        return list(self._processes.by_name)

    def sql(self, query: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run a query on the metadata database; ``%s`` placeholders on both backends."""
        return self.database.sql(query, params)

    def trigger_dag(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        """Start a manual run of ``dag_id`` through the REST API; its run id."""
        return self.airflow.trigger_dag(dag_id, conf)

    def set_pool(self, name: str, slots: int, description: str = "") -> None:
        """Create the pool, or give an existing one these slots; deferred tasks take no slot."""
        self.airflow.set_pool(name, slots, description)

    def wait_for_dag_run(self, dag_id: str, run_id: str, timeout: float) -> str:
        """Wait until the run is ``success`` or ``failed``; its state (``diagnostics`` on timeout)."""
        return self.airflow.wait_for_dag_run(
            dag_id, run_id, timeout, lambda: self.diagnostics(dag_id, run_id)
        )

    def task_logs(self, dag_id: str, run_id: str, task_id: str) -> dict[str, str]:
        """The task's log files by name (``Airflow.task_logs``)."""
        return self.airflow.task_logs(dag_id, run_id, task_id)

    def diagnostics(self, dag_id: str | None = None, run_id: str | None = None) -> str:
        """What to look at when something hangs: task states, dead components, log tails."""
        lines: list[str] = []
        if dag_id and run_id:
            with contextlib.suppress(Exception):
                lines += self.airflow.task_states(dag_id, run_id)
        for process in self._processes.by_name.values():
            if process.popen is not None and process.popen.poll() is not None:
                lines.append(f"--- {process.name} is not running (exit code {process.popen.returncode})")
        for name in ("scheduler", "triggerer"):
            if name in self._processes.by_name:
                lines.append(self._processes.by_name[name].tail_text().lstrip("\n"))
        return "\n" + "\n".join(lines)

    def worker_processes(self) -> list[tuple[int, str]]:
        """(pid, title) of the deployment's processes titled ``airflow worker -- ...``."""
        sessions = [s for p in self._processes.by_name.values() if p.kind == "scheduler" for s in p.sessions]
        found = []
        for pid in sorted(session_members(sessions)):
            title = process_title(pid)
            if title is not None and title.startswith("airflow worker --"):
                found.append((pid, title))
        return found

    # ------------------------------------------------------------------ life cycle

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start every component; return when all are ready and the DAGs are parsed."""
        if self._started:
            raise DeploymentError("this deployment was already started; make a new one")
        self._started = True
        atexit.register(self.stop)
        self._processes.start_reaper()
        began = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.timings["total"] = round(time.monotonic() - began, 2)

    def _start(self) -> None:
        for path in (self.root, self.airflow_home, self.logs_dir, self.airflow_home / "logs"):
            path.mkdir(parents=True, exist_ok=True)
        if not (self.airflow_bin / "airflow").is_file():
            raise DeploymentError(f"no airflow executable in {self.airflow_bin}")
        if not self.dags_folder.is_dir():
            raise DeploymentError(f"the DAGs folder {self.dags_folder} does not exist")

        # The emulator starts while PostgreSQL initializes its cluster.
        emulator = self._processes.add("emulator", "emulator", self.emulator_argv(0), self._base_env())
        self._processes.launch(emulator)
        with self._step("database"):
            self.database.start(self._processes, self._wait_ready)
        with self._step("emulator"):
            self._wait_ready(emulator)

        self.airflow_env()
        self.airflow.write_password_file()
        with self._step("db migrate"):
            self.airflow.migrate(self.logs_dir / "db-migrate.log", self.startup_timeout)

        api_port = self.api_url.rsplit(":", 1)[1]
        with self._step("airflow components"):
            launched = [
                self._add("api-server", "api-server", "api-server", "--host", LOOPBACK, "--port", api_port),
                self._add("scheduler", "scheduler", "scheduler", "--skip-serve-logs"),
                self._add("dag-processor", "dag-processor", "dag-processor"),
                self._add("triggerer", "triggerer", "triggerer", "--skip-serve-logs"),
            ]
            for component in launched:
                self._launch(component)
            for component in launched:
                self._wait_ready(component)
        with self._step("dags parsed"):
            missing: set[Path] = set()
            try:
                wait_for(
                    self._processes.by_name["dag-processor"],
                    "parse of every DAG file",
                    self.airflow.dags_parsed(missing),
                    self.startup_timeout,
                )
            except DeploymentTimeout as exc:
                names = ", ".join(str(path) for path in sorted(missing))
                raise DeploymentTimeout(f"{exc}\n--- DAG files not parsed yet: {names}") from None

    def stop(self) -> None:
        """Stop everything, PostgreSQL last; safe to call again; leaves no process behind."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        if self._emulator is not None:
            self._emulator.close()
        self._processes.stop_all(self.stop_grace, last_kind="postgres")
        self.database.close()

    @contextlib.contextmanager
    def _step(self, name: str) -> Iterator[None]:
        began = time.monotonic()
        yield
        self.timings[name] = round(time.monotonic() - began, 2)

    # ------------------------------------------------------------------ environments and commands

    def _base_env(self) -> dict[str, str]:
        """The caller's environment without anything that configures Airflow or Python."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("AIRFLOW", "_AIRFLOW", "PYTEST", "PYTHON"))
            and key not in ("VIRTUAL_ENV", "CONDA_PREFIX")
        }
        env["PATH"] = os.pathsep.join([str(self.airflow_bin), os.environ.get("PATH", os.defpath)])
        env["PYTHONUNBUFFERED"] = "1"
        loopback = "127.0.0.1,localhost"
        env["NO_PROXY"] = env["no_proxy"] = ",".join(
            filter(None, [os.environ.get("NO_PROXY") or os.environ.get("no_proxy"), loopback])
        )
        return env

    def airflow_env(self) -> dict[str, str]:
        """Make (and return) the environment of every Airflow process; the emulator's URL must be known."""
        return self.airflow.configure(
            self._base_env(),
            database_url=self.database.url,
            parallelism=self.parallelism,
            emulator_url=self.emulator_url,
            connections=self.connections,
            variables=self.variables,
        )

    def emulator_argv(self, port: int) -> list[str]:
        """The emulator's command: this interpreter, on ``port`` (0: any), with every connection's key."""
        keys = list(dict.fromkeys(str(fields["password"]) for fields in self.connections.values()))
        argv = [sys.executable, "-m", "altabots_emulator", "--host", LOOPBACK, "--port", str(port)]
        for key in keys:
            argv += ["--api-key", key]
        return argv + self.emulator_args

    # ------------------------------------------------------------------ components

    def _add(self, name: str, kind: str, *args: str) -> Process:
        """Register an Airflow component running ``airflow <args>``."""
        return self._processes.add(name, kind, self.airflow.command(*args), self.env, cwd=self.airflow_home)

    def _launch(self, process: Process) -> None:
        if process.kind in JOB_TYPES:
            self._job_baselines[process.name] = self.airflow.latest_job(process.kind)
            self._job_ids[process.name] = None
        self._processes.launch(process)

    def _wait_ready(self, process: Process, timeout: float | None = None) -> None:
        readiness = READINESS[process.kind]
        timeout = self.startup_timeout if timeout is None else timeout
        wait_for(process, readiness.what, readiness.check(self, process), timeout)

    def _job_heartbeat(self, process: Process) -> Callable[[], bool]:
        def found(job_id: int) -> None:
            self._job_ids[process.name] = job_id

        return self.airflow.job_heartbeat(process.kind, self._job_baselines[process.name], found)

    def _emulator_listening(self, process: Process) -> bool:
        for line in process.new_output().splitlines():
            if line.startswith(READY_PREFIX):
                url = line[len(READY_PREFIX) :].strip()
                client = EmulatorClient(url)
                try:
                    client.health()
                except BaseException:
                    client.close()
                    raise
                if self._emulator is not None:
                    self._emulator.close()
                self._emulator, self.emulator_url = client, url
                self._emulator_port = int(url.rsplit(":", 1)[1])
                return True
        return False

    def start_triggerer(self, name: str, capacity: int | None = None) -> None:
        """
        Start another triggerer process; return once it has heartbeated.

        :param capacity: the most triggers it runs at once (``airflow triggerer --capacity``);
            Airflow's default when ``None``.
        """
        self._require_running()
        args = ["triggerer", "--skip-serve-logs"]
        if capacity is not None:
            args += ["--capacity", str(capacity)]
        component = self._add(name, "triggerer", *args)
        self._launch(component)
        self._wait_ready(component)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """
        Send ``sig`` to the component's process group.

        With SIGKILL, everything else the component started is killed too (task processes put
        themselves in process groups of their own), and this returns once all of it is gone;
        other signals reach the process group only and return at once.
        """
        self._processes.kill(name, sig)

    def wait_stopped(self, name: str, timeout: float = 60.0) -> int:
        """Wait until the component's process has exited (after ``kill`` with SIGTERM); its code."""
        return self._processes.wait_stopped(name, timeout)

    def restart(self, name: str) -> None:
        """Start a stopped or killed component again under the same name; wait until ready."""
        self._require_running()
        component = self._processes.get(name)
        if component.running:
            raise DeploymentError(f"{name} is still running (pid {self.pid(name)}); kill it first")
        if component.kind == "emulator":
            component.argv = self.emulator_argv(self._emulator_port)
        self._launch(component)
        self._wait_ready(component)

    def pid(self, name: str) -> int:
        """The pid of the component's (latest) process: also its process group and session id."""
        component = self._processes.get(name)
        if component.popen is None:
            raise DeploymentError(f"{name} was never started")
        return component.popen.pid

    def job_id(self, name: str) -> int:
        """The id of the job row of a scheduler, DAG processor or triggerer (``trigger.triggerer_id``)."""
        self._processes.get(name)
        job_id = self._job_ids.get(name)
        if job_id is None:
            raise DeploymentError(f"{name} has no job (yet)")
        return job_id

    def running(self, name: str) -> bool:
        """Whether the component's process is alive."""
        return self._processes.get(name).running

    def _require_running(self) -> None:
        if not self._started or self._stopped:
            raise DeploymentError("the deployment is not running")
