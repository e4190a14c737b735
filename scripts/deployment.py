"""
A real Airflow deployment on loopback, for the end-to-end suite and for looking at by hand.

``Deployment`` starts, as separate OS processes, each in its own session (so a component can be
killed with everything it started):

* ``postgres``: a private PostgreSQL cluster (``initdb`` into ``<root>/postgres``, a free port on
  127.0.0.1, no Unix socket, durability switched off for speed). As root it runs as the
  ``postgres`` system user; when that user cannot reach ``<root>`` (pytest's temporary
  directories are private to their owner) the cluster lives in a fresh temporary directory,
  linked from ``<root>/postgres`` and removed by ``stop()``.
* ``emulator``: ``altabots-emulator`` on a free port; every connection points at it. A
  connection is given as its API key, or as ``{"password": <API key>, "extra": {...}}`` when it
  needs extras; either way it is an ``AIRFLOW_CONN_<ID>`` variable of JSON (``conn_type``
  ``altabots``).
* ``airflow db migrate``, then ``api-server``, ``scheduler`` (LocalExecutor), ``dag-processor``
  and a ``triggerer``, all from the given virtualenv's ``bin`` directory, with one environment
  (``Deployment.env``) and no ``airflow.cfg`` of the user's.

``start()`` returns when every component is healthy (the API server answers its health check;
the scheduler, DAG processor and triggerer have each written a job row and heartbeated at least
once) and every DAG file in the DAGs folder is parsed and serialized. Each process writes its
stdout and stderr to ``<root>/logs/<component>.log``; every wait has a timeout and its error names
the component and quotes the end of its log. Task logs are under ``<airflow_home>/logs``.

The settings (``AIRFLOW_SETTINGS`` below) make failures show in seconds: triggerers heartbeat
every second and one silent for 5 s is taken over; a task whose supervisor stopped
heartbeating for 10 s is failed (and retried) by the scheduler; files are re-parsed every 10 s.

SQLite (``backend="sqlite"``, or ``"auto"`` when PostgreSQL cannot be started, with the reason in
``backend_reason``): Airflow 3.3 accepts the LocalExecutor on SQLite (Airflow 2 refused it), so
the same processes run. Checked on SQLite with Airflow 3.3.2: deferred runs, killing and
restarting any component, a second triggerer taking over the triggers of a killed one, and a
200-task deferrable fan-out (about as fast as on PostgreSQL, no "database is locked" errors).
What SQLite cannot give: more than one writer at a time and row locks (Airflow drops
``FOR UPDATE``), so what triggerers or schedulers racing each other do is only meaningful on
PostgreSQL, and Airflow does not support two schedulers on SQLite at all.

Linux only (process sessions and titles are read from ``/proc``). Run as a script,
``python scripts/deployment.py``, it starts a deployment of ``tests/e2e/dags`` and waits for
Ctrl-C.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import importlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

import httpx

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence
    from types import TracebackType
    from typing import Self

REPO: Final = Path(__file__).resolve().parent.parent

LOOPBACK: Final = "127.0.0.1"
PG_USER: Final = "airflow"
PG_DATABASE: Final = "airflow"
API_USER: Final = "admin"
LOG_TAIL_LINES: Final = 40
REAPER_COMMAND: Final = "reap-when-orphaned"

# Airflow settings that do not depend on ports or paths. Why each is set:
AIRFLOW_SETTINGS: Final[dict[str, dict[str, str]]] = {
    "core": {
        "executor": "LocalExecutor",
        "load_examples": "False",
        "dags_are_paused_at_creation": "False",
        # DAG-level max_active_tasks counts queued and running tasks, not deferred ones; the
        # default pool does not count deferred tasks either. Both are set high so that only
        # [core] parallelism (the LocalExecutor's worker processes) limits a 200-task fan-out.
        "max_active_tasks_per_dag": "512",
        "default_pool_task_slot_count": "512",
        "simple_auth_manager_users": f"{API_USER}:admin",
    },
    "api": {
        # One uvicorn worker, in the api-server process itself: 2 cores, and one process to kill.
        "workers": "1",
    },
    "scheduler": {
        "scheduler_heartbeat_sec": "2",
        # Heartbeat rate of the DAG processor's job (and other non-scheduler, non-triggerer jobs).
        "job_heartbeat_sec": "2",
        # A killed worker: its task stops heartbeating; failed (and retried) after 10 s, looked
        # for every second. Workers heartbeat every 2 s ([workers] min_heartbeat_interval).
        "task_instance_heartbeat_timeout": "10",
        "task_instance_heartbeat_timeout_detection_interval": "1",
        # Airflow's default. No scenario kills the scheduler, and a scheduler starved of CPU for
        # more than this (seen: 11-17 s beside a CPU-burning neighbour) marks itself failed and
        # resets its own running tasks, failing tasks that did nothing wrong.
        "scheduler_health_check_threshold": "30",
        "orphaned_tasks_check_interval": "10",
        # A worker killed after it took a task but before the task started leaves it queued:
        # requeued after 60 s (default 600 s, looked for every 120 s). The LocalExecutor has a
        # worker process per slot of [core] parallelism, so a healthy task is queued for seconds.
        "task_queued_timeout": "60",
        "task_queued_timeout_check_interval": "5",
        "scheduler_idle_sleep_time": "0.5",
        # Examine up to [core] parallelism task instances per loop instead of 16.
        "max_tis_per_query": "0",
        "trigger_timeout_check_interval": "5",
    },
    "workers": {
        "min_heartbeat_interval": "2",
    },
    "triggerer": {
        "job_heartbeat_sec": "1",
        # Read with getint: whole seconds. A triggerer whose heartbeat is older than this is
        # dead to the others, which take its triggers at their next loop (about a second).
        "triggerer_health_check_threshold": "5",
    },
    "dag_processor": {
        # Look for new files every 5 s, re-parse each file every 10 s; both default to minutes.
        "refresh_interval": "5",
        "bundle_refresh_check_interval": "1",
        "min_file_process_interval": "10",
        "parsing_processes": "2",
        "print_stats_interval": "0",
        "stale_dag_threshold": "30",
    },
    "logging": {
        "colored_console_log": "False",
        "logging_level": "INFO",
    },
}

# Job types of the components that report their health through a job row.
JOB_TYPES: Final = {
    "scheduler": "SchedulerJob",
    "dag-processor": "DagProcessorJob",
    "triggerer": "TriggererJob",
}


class DeploymentError(RuntimeError):
    """A component did not start, died, or did not reach the state waited for."""


class DeploymentTimeout(DeploymentError, TimeoutError):
    """A wait ran out of time."""


@dataclass(eq=False)
class _Component:
    """One OS process of the deployment, restartable under the same name."""

    name: str
    kind: str  # postgres, emulator, api-server, scheduler, dag-processor, triggerer
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    cwd: Path | None = None
    user: int | None = None
    group: int | None = None
    popen: subprocess.Popen[bytes] | None = None
    sessions: list[int] = field(default_factory=list)
    log_offset: int = 0
    job_id: int | None = None
    job_baseline: int = 0

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


def connection_fields(conn_id: str, value: str | Mapping[str, Any]) -> dict[str, Any]:
    """
    The fields of an ``altabots`` connection to the emulator besides its type and host: from an
    API key alone, or from ``{"password": <API key>, "extra": {...}}``.
    """
    if isinstance(value, str):
        return {"password": value}
    unknown = sorted(set(value) - {"password", "extra"})
    if unknown:
        raise ValueError(f"connection {conn_id}: unknown field(s) {', '.join(unknown)}; give password, extra")
    password, extra = value.get("password"), value.get("extra", {})
    if not isinstance(password, str) or not password:
        raise ValueError(f"connection {conn_id}: password (the API key) must be a non-empty string")
    if not isinstance(extra, dict):
        raise ValueError(f"connection {conn_id}: extra must be a dict")
    return {"password": password, "extra": dict(extra)}


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = LOG_TAIL_LINES, offset: int = 0) -> str:
    """The last lines of a log file (from ``offset`` on), for error messages."""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            start = max(offset, size - 64 * 1024)
            handle.seek(start)
            data = handle.read()
    except OSError as exc:
        return f"(no log: {exc})"
    text = data.decode("utf-8", errors="replace").splitlines()[-lines:]
    return "\n".join(text) if text else "(log is empty)"


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """State letter and session id of a process, from /proc; None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    return fields[0].decode(), int(fields[3])


def session_members(sessions: Sequence[int] | set[int]) -> list[int]:
    """Live (non-zombie) processes whose session id is one of ``sessions``."""
    wanted = set(sessions)
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        stat = _proc_stat(int(entry))
        if stat is not None and stat[0] != "Z" and stat[1] in wanted:
            found.append(int(entry))
    return found


def process_title(pid: int) -> str | None:
    """A process's title (its command line, as setproctitle leaves it); None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", errors="replace")


def kill_sessions(sessions: Sequence[int], timeout: float = 10.0) -> None:
    """SIGKILL every process of these sessions until none is left (or ``timeout`` passes)."""
    if not sessions:
        return
    deadline = time.monotonic() + timeout
    while members := session_members(sessions):
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)


def reap_when_orphaned(commands: IO[str]) -> int:
    """
    The reaper: a process of its own that outlives a deployment whose owner was killed.

    It reads ``session <pid>`` and ``remove <path>`` lines from its stdin, a pipe from the
    process that owns the deployment. The pipe ends when that process stops the deployment or
    dies, however abruptly (SIGKILL included); the reaper then kills whatever is left in those
    sessions, removes those paths, and exits.
    """
    sessions: list[int] = []
    paths: list[Path] = []
    for line in commands:
        word, _, value = line.strip().partition(" ")
        if word == "session":
            sessions.append(int(value))
        elif word == "remove":
            paths.append(Path(value))
    kill_sessions(sessions)
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    return 0


def find_postgres_bin() -> Path | None:
    """The directory with PostgreSQL's ``initdb`` and ``postgres``: PATH first, then Debian's."""
    candidates: list[Path] = []
    on_path = shutil.which("postgres")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in path.parent.name.split(".") if part.isdigit())

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "postgres").is_file():
            return candidate
    return None


class Deployment:
    """PostgreSQL, the emulator and Airflow's components as OS processes on loopback."""

    #: Seconds allowed for each start-up step (a component to become healthy, the migration...).
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
        if backend == "postgres":
            backend = "postgresql"
        if backend not in ("auto", "postgresql", "sqlite"):
            raise ValueError(f"backend must be 'auto', 'postgresql' or 'sqlite', not {backend!r}")
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
        self.requested_backend = backend

        self.backend = ""
        self.backend_reason = ""
        self.airflow_home = self.root / "airflow"
        self.logs_dir = self.root / "logs"
        self.emulator_url = ""
        self.api_url = ""
        self.env: dict[str, str] = {}
        #: Seconds each start-up step took, and "total".
        self.timings: dict[str, float] = {}
        self.api_password = secrets.token_urlsafe(16)

        self._components: dict[str, _Component] = {}
        self._sessions: set[int] = set()
        self._pg_bin: Path | None = None
        self._pg_port = 0
        self._pg_owner: tuple[int, int] | None = None
        self._pg_outside_root: Path | None = None
        self._sqlite_path = self.airflow_home / "airflow.db"
        self._api_port = 0
        self._emulator_port = 0
        self._token: str | None = None
        self._reaper: subprocess.Popen[str] | None = None
        self._started = False
        self._stopped = False

    # ------------------------------------------------------------------ life cycle

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start every component; return when all are healthy and the DAGs are parsed."""
        if self._started:
            raise DeploymentError("this deployment was already started; make a new one")
        self._started = True
        atexit.register(self.stop)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        with (self.logs_dir / "reaper.log").open("ab") as log:
            self._reaper = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), REAPER_COMMAND],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
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
        emulator = self._add("emulator", "emulator", self._emulator_argv(0), env=self._base_env())
        self._launch(emulator)
        with self._step("database"):
            self._choose_backend()
        with self._step("emulator"):
            self._wait_ready(emulator)

        self.env = self._airflow_env()
        password_file = self.airflow_home / "simple_auth_manager_passwords.json"
        password_file.write_text(json.dumps({API_USER: self.api_password}))
        password_file.chmod(0o600)

        with self._step("db migrate"):
            self._migrate()

        airflow = str(self.airflow_bin / "airflow")
        with self._step("airflow components"):
            launched = [
                self._add(
                    "api-server",
                    "api-server",
                    [airflow, "api-server", "--host", LOOPBACK, "--port", str(self._api_port)],
                ),
                self._add("scheduler", "scheduler", [airflow, "scheduler", "--skip-serve-logs"]),
                self._add("dag-processor", "dag-processor", [airflow, "dag-processor"]),
                self._add("triggerer", "triggerer", [airflow, "triggerer", "--skip-serve-logs"]),
            ]
            for component in launched:
                self._launch(component)
            for component in launched:
                self._wait_ready(component)
        with self._step("dags parsed"):
            self._wait_for_dags()

    def stop(self) -> None:
        """Stop everything, PostgreSQL last; safe to call again; leaves no process behind."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        others = [c for c in reversed(self._components.values()) if c.kind != "postgres"]
        postgres = [c for c in self._components.values() if c.kind == "postgres"]
        for group, first_signal in ((others, signal.SIGTERM), (postgres, signal.SIGINT)):
            for component in group:
                if component.running:
                    assert component.popen is not None
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(component.popen.pid, first_signal)
            deadline = time.monotonic() + self.stop_grace
            for component in group:
                if component.popen is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        component.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            for component in group:
                kill_sessions(component.sessions)
                if component.popen is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        component.popen.wait(timeout=10)
        kill_sessions(sorted(self._sessions))
        if self._pg_outside_root is not None:
            shutil.rmtree(self._pg_outside_root, ignore_errors=True)
        if self._reaper is not None:
            # Its pipe closes: it finds nothing left to kill, and exits.
            with contextlib.suppress(OSError):
                if self._reaper.stdin is not None:
                    self._reaper.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._reaper.wait(timeout=15)

    @contextlib.contextmanager
    def _step(self, name: str) -> Iterator[None]:
        began = time.monotonic()
        yield
        self.timings[name] = round(time.monotonic() - began, 2)

    # ------------------------------------------------------------------ components

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

    def _airflow_env(self) -> dict[str, str]:
        env = self._base_env()
        for section, options in AIRFLOW_SETTINGS.items():
            for key, value in options.items():
                env[f"AIRFLOW__{section.upper()}__{key.upper()}"] = value
        if self.backend == "postgresql":
            conn = f"postgresql+psycopg2://{PG_USER}@{LOOPBACK}:{self._pg_port}/{PG_DATABASE}"
        else:
            conn = f"sqlite:///{self._sqlite_path}"
        self._api_port = free_port()
        self.api_url = f"http://{LOOPBACK}:{self._api_port}"
        home = self.airflow_home
        dynamic = {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": conn,
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
            "AIRFLOW__CORE__FERNET_KEY": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(
                home / "simple_auth_manager_passwords.json"
            ),
            "AIRFLOW__API__BASE_URL": self.api_url,
            "AIRFLOW__API__HOST": LOOPBACK,
            "AIRFLOW__API__PORT": str(self._api_port),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(24),
            # 64 bytes or more: PyJWT warns about shorter HMAC keys.
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
            "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_STORAGE_PATH": str(home / "dag_bundles"),
        }
        env.update(dynamic)
        for conn_id, fields in self.connections.items():
            env[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(
                {"conn_type": "altabots", "host": self.emulator_url, **fields}
            )
        for name, value in self.variables.items():
            env[f"AIRFLOW_VAR_{name.upper()}"] = value
        return env

    def _add(
        self,
        name: str,
        kind: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        owner: tuple[int, int] | None = None,
    ) -> _Component:
        if name in self._components:
            raise DeploymentError(f"there is already a component named {name!r}")
        component = _Component(
            name=name,
            kind=kind,
            argv=argv,
            log_path=self.logs_dir / f"{name}.log",
            env=env if env is not None else self.env,
            cwd=cwd or self.airflow_home,
            user=owner[0] if owner else None,
            group=owner[1] if owner else None,
        )
        self._components[name] = component
        return component

    def _launch(self, component: _Component) -> None:
        """Start the component's process in a new session; its output goes to its log."""
        if component.kind in JOB_TYPES:
            job_type = JOB_TYPES[component.kind]
            rows = self.sql("SELECT COALESCE(MAX(id), 0) FROM job WHERE job_type = %s", (job_type,))
            component.job_baseline = int(rows[0][0])
            component.job_id = None
        extra: dict[str, Any] = {}
        if component.user is not None:
            extra = {"user": component.user, "group": component.group, "extra_groups": []}
        with component.log_path.open("ab") as log:
            component.log_offset = log.tell()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"==== {stamp} deployment: starting {shlex.join(component.argv)}\n".encode())
            log.flush()
            component.popen = subprocess.Popen(
                component.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=component.env,
                cwd=component.cwd,
                start_new_session=True,
                **extra,
            )
        component.sessions.append(component.popen.pid)
        self._sessions.add(component.popen.pid)
        self._tell_reaper(f"session {component.popen.pid}")

    def _tell_reaper(self, line: str) -> None:
        if self._reaper is not None and self._reaper.stdin is not None:
            with contextlib.suppress(OSError):
                self._reaper.stdin.write(line + "\n")
                self._reaper.stdin.flush()

    def _wait_ready(self, component: _Component, timeout: float | None = None) -> None:
        timeout = self.startup_timeout if timeout is None else timeout
        if component.kind == "postgres":
            self._wait(component, "accepting connections", self._pg_accepts, timeout)
        elif component.kind == "emulator":
            self._wait(
                component, "its 'listening on' line", lambda: self._emulator_listening(component), timeout
            )
        elif component.kind == "api-server":
            self._wait(component, "GET /api/v2/monitor/health answering 200", self._api_healthy, timeout)
        else:
            self._wait(component, "a heartbeat of its job", self._job_heartbeat(component), timeout)

    def _wait(
        self,
        component: _Component | None,
        what: str,
        check: Callable[[], bool],
        timeout: float,
        interval: float = 0.2,
    ) -> None:
        """Call ``check`` until it is true; fail early when the component's process exits."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            if component is not None and component.popen is not None:
                code = component.popen.poll()
                if code is not None:
                    raise DeploymentError(
                        f"{component.name} exited with code {code} while waiting for {what}"
                        + self._tail_text(component)
                    )
            try:
                if check():
                    return
                last_error = None
            except DeploymentError:
                raise
            except Exception as exc:
                last_error = exc
            if time.monotonic() > deadline:
                name = component.name if component is not None else "deployment"
                detail = f" (last error: {last_error!r})" if last_error else ""
                tail = self._tail_text(component) if component is not None else ""
                raise DeploymentTimeout(f"{name}: no {what} within {timeout:.0f} s{detail}{tail}")
            time.sleep(interval)

    def _tail_text(self, component: _Component) -> str:
        return f"\n--- last lines of {component.log_path}:\n{log_tail(component.log_path)}"

    def _component(self, name: str) -> _Component:
        try:
            return self._components[name]
        except KeyError:
            known = ", ".join(self._components)
            raise DeploymentError(f"no component named {name!r} (known: {known})") from None

    @property
    def components(self) -> list[str]:
        """Names of the components, in start order."""
        return list(self._components)

    def start_triggerer(self, name: str, capacity: int | None = None) -> None:
        """
        Start another triggerer process; return once it has heartbeated.

        :param capacity: the most triggers it runs at once (``airflow triggerer --capacity``);
            Airflow's default when ``None``.
        """
        self._require_running()
        argv = [str(self.airflow_bin / "airflow"), "triggerer", "--skip-serve-logs"]
        if capacity is not None:
            argv += ["--capacity", str(capacity)]
        component = self._add(name, "triggerer", argv)
        self._launch(component)
        self._wait_ready(component)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """
        Send ``sig`` to the component's process group.

        With SIGKILL, everything else the component started is killed too (task processes put
        themselves in process groups of their own), and this returns once all of it is gone;
        other signals reach the process group only and return at once.
        """
        component = self._component(name)
        if not component.running:
            raise DeploymentError(f"{name} is not running")
        assert component.popen is not None
        pid = component.popen.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        if sig == signal.SIGKILL:
            kill_sessions([pid])
            component.popen.wait(timeout=10)

    def wait_stopped(self, name: str, timeout: float = 60.0) -> int:
        """Wait until the component's process has exited (after ``kill`` with SIGTERM); its code."""
        component = self._component(name)
        if component.popen is None:
            raise DeploymentError(f"{name} was never started")
        try:
            return component.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeploymentTimeout(
                f"{name} still running {timeout:.0f} s after it was told to stop" + self._tail_text(component)
            ) from None

    def restart(self, name: str) -> None:
        """Start a stopped or killed component again under the same name; wait until healthy."""
        self._require_running()
        component = self._component(name)
        if component.running:
            raise DeploymentError(f"{name} is still running (pid {self.pid(name)}); kill it first")
        if component.kind == "emulator":
            component.argv = self._emulator_argv(self._emulator_port)
        self._launch(component)
        self._wait_ready(component)

    def pid(self, name: str) -> int:
        """The pid of the component's (latest) process: also its process group and session id."""
        component = self._component(name)
        if component.popen is None:
            raise DeploymentError(f"{name} was never started")
        return component.popen.pid

    def job_id(self, name: str) -> int:
        """The id of the job row of a scheduler, DAG processor or triggerer (``trigger.triggerer_id``)."""
        component = self._component(name)
        if component.job_id is None:
            raise DeploymentError(f"{name} has no job (yet)")
        return component.job_id

    def running(self, name: str) -> bool:
        """Whether the component's process is alive."""
        return self._component(name).running

    def _require_running(self) -> None:
        if not self._started or self._stopped:
            raise DeploymentError("the deployment is not running")

    # ------------------------------------------------------------------ PostgreSQL

    def _choose_backend(self) -> None:
        if self.requested_backend == "sqlite":
            self.backend, self.backend_reason = "sqlite", "SQLite was asked for"
            return
        try:
            self._start_postgres()
        except Exception as exc:  # whatever it was, "auto" means: then SQLite, saying why
            if self.requested_backend == "postgresql":
                raise
            if "postgres" in self._components:
                kill_sessions(self._components["postgres"].sessions)
                del self._components["postgres"]
            self.backend = "sqlite"
            self.backend_reason = f"PostgreSQL could not be started: {exc}"
            return
        self.backend = "postgresql"

    def _start_postgres(self) -> None:
        self._pg_bin = find_postgres_bin()
        if self._pg_bin is None:
            raise DeploymentError(
                "no PostgreSQL server (initdb, postgres) on PATH or under /usr/lib/postgresql/*/bin; "
                "`make postgres` installs Debian's"
            )
        owner: tuple[int, int] | None = None
        if os.geteuid() == 0:
            import pwd

            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                raise DeploymentError(
                    "running as root, and PostgreSQL refuses root, but there is no 'postgres' user"
                ) from None
            owner = (entry.pw_uid, entry.pw_gid)
        self._pg_owner = owner
        data = self._postgres_data_dir(owner)
        env = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C", "LANG": "C"}
        initdb = [
            str(self._pg_bin / "initdb"),
            "--pgdata",
            str(data),
            "--username",
            PG_USER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--locale",
            "C",
            "--no-sync",
        ]
        extra: dict[str, Any] = {}
        if owner is not None:
            extra = {"user": owner[0], "group": owner[1], "extra_groups": []}
        result = subprocess.run(
            initdb, cwd=data, env=env, capture_output=True, text=True, timeout=120, check=False, **extra
        )
        (self.logs_dir / "initdb.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-LOG_TAIL_LINES:])
            raise DeploymentError(f"initdb failed with code {result.returncode}:\n{tail}")

        for attempt in range(3):
            self._pg_port = free_port()
            argv = [str(self._pg_bin / "postgres"), "-D", str(data), "-p", str(self._pg_port)]
            for setting in (
                f"listen_addresses={LOOPBACK}",
                "unix_socket_directories=",
                "max_connections=300",
                # A throw-away cluster: no durability, much faster DDL (the migration) and commits.
                "fsync=off",
                "synchronous_commit=off",
                "full_page_writes=off",
            ):
                argv += ["-c", setting]
            if "postgres" in self._components:
                component = self._components["postgres"]
                component.argv = argv
            else:
                component = self._add("postgres", "postgres", argv, env=env, cwd=data, owner=owner)
            self._launch(component)
            try:
                self._wait_ready(component, timeout=60)
                break
            except DeploymentError:
                in_use = "already in use" in log_tail(component.log_path, offset=component.log_offset)
                if attempt == 2 or not in_use:
                    raise
        self._pg_execute_autocommit(f"CREATE DATABASE {PG_DATABASE}")

    def _postgres_data_dir(self, owner: tuple[int, int] | None) -> Path:
        """An empty directory for the cluster that the server's user owns and can reach."""
        data = self.root / "postgres"
        data.mkdir(mode=0o700)
        if owner is None:
            return data
        os.chown(data, *owner)
        probe = subprocess.run(
            ["test", "-w", str(data)], user=owner[0], group=owner[1], extra_groups=[], check=False
        )
        if probe.returncode == 0:
            return data
        # The postgres user cannot reach root (say, under pytest's private temporary directory).
        data.rmdir()
        outside = Path(tempfile.mkdtemp(prefix="altabots-e2e-postgres-"))
        os.chown(outside, *owner)
        data.symlink_to(outside, target_is_directory=True)
        self._pg_outside_root = outside
        self._tell_reaper(f"remove {outside}")
        return outside

    def _pg_connect(self, database: str) -> Any:
        psycopg2 = importlib.import_module("psycopg2")  # imported when used: SQLite needs none
        return psycopg2.connect(
            host=LOOPBACK, port=self._pg_port, user=PG_USER, dbname=database, connect_timeout=5
        )

    def _pg_accepts(self) -> bool:
        self._pg_connect("postgres").close()
        return True

    def _pg_execute_autocommit(self, statement: str) -> None:
        connection = self._pg_connect("postgres")
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(statement)
        finally:
            connection.close()

    # ------------------------------------------------------------------ emulator

    def _emulator_argv(self, port: int) -> list[str]:
        keys = list(dict.fromkeys(str(fields["password"]) for fields in self.connections.values()))
        argv = [sys.executable, "-m", "altabots_emulator", "--host", LOOPBACK, "--port", str(port)]
        for key in keys:
            argv += ["--api-key", key]
        return argv + self.emulator_args

    def _emulator_listening(self, component: _Component) -> bool:
        marker = "altabots-emulator listening on "
        text = component.log_path.read_bytes()[component.log_offset :].decode("utf-8", errors="replace")
        for line in text.splitlines():
            if line.startswith(marker):
                url = line[len(marker) :].strip()
                httpx.get(f"{url}/_emulator/health", timeout=5, trust_env=False).raise_for_status()
                self.emulator_url = url
                self._emulator_port = int(url.rsplit(":", 1)[1])
                return True
        return False

    def _emulator(
        self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
    ) -> Any:
        response = httpx.request(
            method,
            f"{self.emulator_url}/_emulator/{path}",
            json=body,
            params=params,
            timeout=30,
            trust_env=False,
        )
        if response.status_code >= 400:
            raise DeploymentError(
                f"emulator: {method} /_emulator/{path} answered {response.status_code}: {response.text[:500]}"
            )
        return response.json()

    def set_workflow(self, api_key: str, **config: Any) -> None:
        """Add or replace the workflow of ``api_key`` (name, run_seconds, outcome, ...)."""
        self._emulator("POST", "workflows", {"api_key": api_key, **config})

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        """
        Set faults by name (rate_limit, server_errors, delay, error_in_200, drop); None removes one.

        Returns the faults in force afterwards, as the emulator shows them.
        """
        return dict(self._emulator("POST", "faults", faults)["faults"])

    def emulator_faults(self) -> dict[str, Any]:
        """The faults in force, with their counters (a rate limit's windows by key)."""
        return dict(self._emulator("GET", "faults")["faults"])

    def clear_faults(self) -> None:
        """Remove every fault."""
        self._emulator("DELETE", "faults")

    def emulator_requests(self, path: str | None = None) -> list[dict[str, Any]]:
        """The API requests the emulator received, oldest first; only those to ``path`` if given."""
        data = self._emulator("GET", "requests", params={"path": path} if path else None)
        return list(data["requests"])

    def emulator_runs(self) -> list[dict[str, Any]]:
        """The emulator's runs."""
        return list(self._emulator("GET", "runs")["runs"])

    def emulator_run(self, run_id: str) -> dict[str, Any]:
        """One run: the emulator's view of it, and under ``record`` what the API answers for it."""
        return dict(self._emulator("GET", f"runs/{run_id}"))

    def emulator_stats(self) -> dict[str, Any]:
        """Request and run counters."""
        return dict(self._emulator("GET", "stats"))

    def emulator_reset(self) -> None:
        """Forget runs, logs, counters and faults; workflows go back to the start-up config."""
        self._emulator("POST", "reset")

    # ------------------------------------------------------------------ Airflow

    def _migrate(self) -> None:
        argv = [str(self.airflow_bin / "airflow"), "db", "migrate"]
        log_path = self.logs_dir / "db-migrate.log"
        with log_path.open("ab") as log:
            try:
                result = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    cwd=self.airflow_home,
                    timeout=self.startup_timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise DeploymentTimeout(
                    f"airflow db migrate: not done within {self.startup_timeout:.0f} s"
                    f"\n--- last lines of {log_path}:\n{log_tail(log_path)}"
                ) from None
        if result.returncode != 0:
            raise DeploymentError(
                f"airflow db migrate failed with code {result.returncode}"
                f"\n--- last lines of {log_path}:\n{log_tail(log_path)}"
            )

    def _api_healthy(self) -> bool:
        response = httpx.get(f"{self.api_url}/api/v2/monitor/health", timeout=5, trust_env=False)
        return response.status_code == 200

    def _job_heartbeat(self, component: _Component) -> Callable[[], bool]:
        """A check that is true once the component's new job row has heartbeated after its first."""
        job_type = JOB_TYPES[component.kind]
        first: dict[int, Any] = {}

        def check() -> bool:
            rows = self.sql(
                "SELECT id, state, latest_heartbeat FROM job WHERE job_type = %s AND id > %s ORDER BY id",
                (job_type, component.job_baseline),
            )
            for job_id, state, heartbeat in rows:
                if state != "running":
                    continue
                if job_id not in first:
                    first[job_id] = heartbeat
                elif heartbeat != first[job_id]:
                    component.job_id = int(job_id)
                    return True
            return False

        return check

    def _dag_files(self) -> list[Path]:
        """Python files of the DAGs folder that Airflow's safe-mode heuristic would parse."""
        found = []
        for path in sorted(self.dags_folder.rglob("*.py")):
            parts = path.relative_to(self.dags_folder).parts
            if any(part.startswith((".", "__")) for part in parts):
                continue
            content = path.read_bytes().lower()
            if b"airflow" in content and (b"dag" in content or b"asset" in content):
                found.append(path.resolve())
        return found

    def _wait_for_dags(self) -> None:
        expected = set(self._dag_files())
        missing: set[Path] = set(expected)

        def check() -> bool:
            errors = self.sql("SELECT filename, stacktrace FROM import_error")
            if errors:
                text = "\n".join(f"{name}:\n{trace}" for name, trace in errors)
                raise DeploymentError(f"dag-processor: import errors in the DAGs folder:\n{text}")
            rows = self.sql(
                "SELECT d.fileloc FROM dag d JOIN serialized_dag s ON s.dag_id = d.dag_id "
                "WHERE d.is_stale = %s",
                (False,),
            )
            seen = {Path(row[0]).resolve() for row in rows if row[0]}
            missing.clear()
            missing.update(expected - seen)
            return not missing

        try:
            self._wait(
                self._components["dag-processor"], "parse of every DAG file", check, self.startup_timeout
            )
        except DeploymentTimeout as exc:
            names = ", ".join(str(path) for path in sorted(missing))
            raise DeploymentTimeout(f"{exc}\n--- DAG files not parsed yet: {names}") from None

    def airflow(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``airflow <args>`` with the deployment's environment."""
        argv = [str(self.airflow_bin / "airflow"), *args]
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.airflow_home,
            timeout=600,
            check=False,
        )
        if check and result.returncode != 0:
            output = "\n".join((result.stdout + result.stderr).splitlines()[-LOG_TAIL_LINES:])
            raise DeploymentError(f"{shlex.join(argv)} failed with code {result.returncode}:\n{output}")
        return result

    def api(self, method: str, path: str, body: Any = None, params: Mapping[str, Any] | None = None) -> Any:
        """Call the public REST API (``path`` from ``/api/v2/...``) as the admin user; the JSON answer."""
        for attempt in range(2):
            response = httpx.request(
                method,
                f"{self.api_url}{path}",
                json=body,
                params=params,
                headers={"Authorization": f"Bearer {self._api_token(renew=attempt > 0)}"},
                timeout=30,
                trust_env=False,
            )
            if response.status_code != 401:
                break
        if response.status_code >= 400:
            raise DeploymentError(
                f"api-server: {method} {path} answered {response.status_code}: {response.text[:1000]}"
            )
        return response.json() if response.content else None

    def _api_token(self, *, renew: bool = False) -> str:
        if self._token is None or renew:
            response = httpx.post(
                f"{self.api_url}/auth/token",
                json={"username": API_USER, "password": self.api_password},
                timeout=30,
                trust_env=False,
            )
            if response.status_code >= 400:
                raise DeploymentError(f"api-server: no token ({response.status_code}): {response.text[:500]}")
            self._token = str(response.json()["access_token"])
        return self._token

    def set_pool(self, name: str, slots: int, description: str = "") -> None:
        """Create the pool, or give an existing one these slots; deferred tasks take no slot."""
        fields = {"slots": slots, "description": description, "include_deferred": False}
        if self.sql("SELECT 1 FROM slot_pool WHERE pool = %s", (name,)):
            self.api("PATCH", f"/api/v2/pools/{name}", fields)
        else:
            self.api("POST", "/api/v2/pools", {"name": name, **fields})

    def trigger_dag(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        """Start a manual run of ``dag_id`` through the REST API; its run id."""
        answer = self.api(
            "POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf or {}}
        )
        return str(answer["dag_run_id"])

    def wait_for_dag_run(self, dag_id: str, run_id: str, timeout: float) -> str:
        """Wait until the run is ``success`` or ``failed``; its state. Fails with context on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.sql("SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s", (dag_id, run_id))
            state = rows[0][0] if rows else None
            if state in ("success", "failed"):
                return str(state)
            if time.monotonic() > deadline:
                raise DeploymentTimeout(
                    f"DAG run {dag_id}/{run_id} still {state or 'missing'} after {timeout:.0f} s"
                    + self.diagnostics(dag_id, run_id)
                )
            time.sleep(0.5)

    def diagnostics(self, dag_id: str | None = None, run_id: str | None = None) -> str:
        """What to look at when something hangs: task states, dead components, log tails."""
        lines: list[str] = []
        if dag_id and run_id:
            with contextlib.suppress(Exception):
                rows = self.sql(
                    "SELECT task_id, map_index, state, try_number FROM task_instance "
                    "WHERE dag_id = %s AND run_id = %s ORDER BY task_id, map_index",
                    (dag_id, run_id),
                )
                counts: dict[str, int] = {}
                for _task, _index, ti_state, _try in rows:
                    counts[str(ti_state)] = counts.get(str(ti_state), 0) + 1
                lines.append(f"--- task instances by state: {counts}")
                for task_id, index, ti_state, try_number in rows[:10]:
                    lines.append(f"    {task_id}[{index}] {ti_state} try {try_number}")
        for component in self._components.values():
            if component.popen is not None and component.popen.poll() is not None:
                lines.append(f"--- {component.name} is not running (exit code {component.popen.returncode})")
        for name in ("scheduler", "triggerer"):
            if name in self._components:
                lines.append(self._tail_text(self._components[name]).lstrip("\n"))
        return "\n" + "\n".join(lines)

    # ------------------------------------------------------------------ inspection

    def sql(self, query: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run a query on the metadata database; ``%s`` placeholders on both backends."""
        if self.backend == "postgresql":
            connection = self._pg_connect(PG_DATABASE)
            try:
                connection.autocommit = True
                with connection.cursor() as cursor:
                    cursor.execute(query, tuple(params) if params is not None else None)
                    return [tuple(row) for row in cursor.fetchall()] if cursor.description else []
            finally:
                connection.close()
        if self.backend == "sqlite":
            if params is not None:
                query = query.replace("%s", "?").replace("%%", "%")
            connection_sqlite = sqlite3.connect(f"{self._sqlite_path.as_uri()}?mode=ro", uri=True, timeout=30)
            try:
                cursor_sqlite = connection_sqlite.execute(query, tuple(params) if params is not None else ())
                return [tuple(row) for row in cursor_sqlite.fetchall()]
            finally:
                connection_sqlite.close()
        raise DeploymentError("the metadata database is not chosen yet: call start() first")

    def task_logs(self, dag_id: str, run_id: str, task_id: str) -> dict[str, str]:
        """
        The task's log files, by path relative to its task folder, e.g. ``attempt=1.log``.

        A trigger's log is a file of its own next to the attempt's log, named after the job id of
        the triggerer that ran it: ``attempt=1.log.trigger.<job id>.log``. The triggerer's own
        stdout (``logs_dir/triggerer.log``) does not carry trigger messages.
        """
        folder = self.airflow_home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        if not folder.is_dir():
            return {}
        return {
            str(path.relative_to(folder)): path.read_text(errors="replace")
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        }

    def worker_processes(self) -> list[tuple[int, str]]:
        """(pid, title) of the deployment's processes titled ``airflow worker -- ...``."""
        sessions: list[int] = []
        for component in self._components.values():
            if component.kind == "scheduler":
                sessions += component.sessions
        found = []
        for pid in sorted(session_members(sessions)):
            title = process_title(pid)
            if title is not None and title.startswith("airflow worker --"):
                found.append((pid, title))
        return found


def main(argv: Sequence[str] | None = None) -> int:
    """Start a deployment and keep it until Ctrl-C (or SIGTERM, SIGHUP)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == [REAPER_COMMAND]:
        return reap_when_orphaned(sys.stdin)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--root", type=Path, help="where to keep everything (default: a new temporary directory)"
    )
    parser.add_argument("--airflow-bin", type=Path, default=REPO / ".venv-e2e" / "bin")
    parser.add_argument("--dags-folder", type=Path, default=REPO / "tests" / "e2e" / "dags")
    parser.add_argument("--backend", choices=("auto", "postgresql", "sqlite"), default="auto")
    parser.add_argument("--parallelism", type=int, default=16)
    parser.add_argument(
        "--connection",
        action="append",
        metavar="CONN_ID=API_KEY",
        help="a connection to the emulator (repeatable; default altabots_default=emulator-key)",
    )
    parser.add_argument("--emulator-args", default="", help="extra arguments for altabots-emulator, quoted")
    args = parser.parse_args(argv)

    connections = dict(item.split("=", 1) for item in args.connection or ["altabots_default=emulator-key"])
    root = args.root or Path(tempfile.mkdtemp(prefix="altabots-deployment-"))
    deployment = Deployment(
        root,
        airflow_bin=args.airflow_bin,
        dags_folder=args.dags_folder,
        connections=connections,
        emulator_args=shlex.split(args.emulator_args),
        parallelism=args.parallelism,
        backend=args.backend,
    )

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Set explicitly: a shell that starts this in the background would have SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    print(f"starting in {deployment.root} ...", flush=True)
    try:
        deployment.start()
        backend = deployment.backend
        if deployment.backend == "sqlite":
            backend += f" ({deployment.backend_reason})"
        print(
            f"ready in {deployment.timings['total']} s on {backend}\n"
            f"  Airflow UI and API: {deployment.api_url}"
            f"  (user {API_USER}, password {deployment.api_password})\n"
            f"  emulator:           {deployment.emulator_url}\n"
            f"  AIRFLOW_HOME:       {deployment.airflow_home}\n"
            f"  component logs:     {deployment.logs_dir}\n"
            f"  pids:               "
            + ", ".join(f"{name} {deployment.pid(name)}" for name in deployment.components)
            + "\nCtrl-C stops everything.",
            flush=True,
        )
        reported: set[str] = set()
        while True:
            time.sleep(1)
            for name in deployment.components:
                if not deployment.running(name) and name not in reported:
                    reported.add(name)
                    print(f"{name} exited; see {deployment.logs_dir / (name + '.log')}", flush=True)
    except DeploymentError as exc:
        print(f"deployment failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
    finally:
        deployment.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
