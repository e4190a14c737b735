"""
Airflow, from the outside: its settings and environment, its CLI, its REST API as the admin
user, its metadata database read through SQL, DAG runs, task logs and component jobs.

Everything here talks to a deployment's Airflow; nothing here starts or stops processes.
"""

from __future__ import annotations

import base64
import json
import secrets
import shlex
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import httpx

from tests.e2e.harness.processes import (
    LOOPBACK,
    DeploymentError,
    DeploymentTimeout,
    free_port,
    log_tail,
    output_tail,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    #: What reads the metadata database: ``sql(query, params)`` with ``%s`` placeholders; the rows.
    Sql = Callable[..., list[tuple[Any, ...]]]

API_USER: Final = "admin"

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

#: Job types of the components that report their health through a job row, by component kind.
JOB_TYPES: Final = {
    "scheduler": "SchedulerJob",
    "dag-processor": "DagProcessorJob",
    "triggerer": "TriggererJob",
}


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


def dag_files(dags_folder: Path) -> list[Path]:
    """Python files of the DAGs folder that Airflow's safe-mode heuristic would parse."""
    found = []
    for path in sorted(dags_folder.rglob("*.py")):
        parts = path.relative_to(dags_folder).parts
        if any(part.startswith((".", "__")) for part in parts):
            continue
        content = path.read_bytes().lower()
        if b"airflow" in content and (b"dag" in content or b"asset" in content):
            found.append(path.resolve())
    return found


class Airflow:
    """
    One deployment's Airflow: ``bin_dir`` holds its ``airflow`` command, ``home`` is its
    AIRFLOW_HOME, ``sql`` reads its metadata database. ``env`` (from ``configure()``) is the
    environment of every Airflow process; ``api_url`` is the API server's address.
    """

    def __init__(self, bin_dir: Path, home: Path, dags_folder: Path, sql: Sql) -> None:
        self.bin_dir = bin_dir
        self.home = home
        self.dags_folder = dags_folder
        self.sql = sql
        self.env: dict[str, str] = {}
        self.api_url = ""
        self.api_password = secrets.token_urlsafe(16)
        self._token: str | None = None

    @property
    def password_file(self) -> Path:
        """The simple auth manager's passwords file (the admin's only)."""
        return self.home / "simple_auth_manager_passwords.json"

    def write_password_file(self) -> None:
        """Write the admin's password where the API server reads it, readable by this user only."""
        self.password_file.write_text(json.dumps({API_USER: self.api_password}))
        self.password_file.chmod(0o600)

    def command(self, *args: str) -> list[str]:
        """``airflow <args>`` as an argv."""
        return [str(self.bin_dir / "airflow"), *args]

    def configure(
        self,
        base_env: Mapping[str, str],
        *,
        database_url: str,
        parallelism: int,
        emulator_url: str,
        connections: Mapping[str, Mapping[str, Any]],
        variables: Mapping[str, str],
    ) -> dict[str, str]:
        """
        Choose the API server's port and set ``env``: the
        settings above, paths, fresh secrets, each connection as ``AIRFLOW_CONN_<ID>`` (JSON, an
        ``altabots`` connection to the emulator) and each variable as ``AIRFLOW_VAR_<NAME>``.
        """
        port = free_port()
        self.api_url = f"http://{LOOPBACK}:{port}"
        home = self.home
        env = dict(base_env)
        for section, options in AIRFLOW_SETTINGS.items():
            for key, value in options.items():
                env[f"AIRFLOW__{section.upper()}__{key.upper()}"] = value
        env |= {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database_url,
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),
            "AIRFLOW__CORE__FERNET_KEY": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.password_file),
            "AIRFLOW__API__BASE_URL": self.api_url,
            "AIRFLOW__API__HOST": LOOPBACK,
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(24),
            # 64 bytes or more: PyJWT warns about shorter HMAC keys.
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
            "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_STORAGE_PATH": str(home / "dag_bundles"),
        }
        for conn_id, fields in connections.items():
            env[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(
                {"conn_type": "altabots", "host": emulator_url, **fields}
            )
        for name, value in variables.items():
            env[f"AIRFLOW_VAR_{name.upper()}"] = value
        self.env = env
        return env

    # ------------------------------------------------------------------ CLI

    def cli(self, *args: str, check: bool = True, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
        """
        Run ``airflow <args>`` with the deployment's environment; its output captured. Raises
        ``DeploymentTimeout`` after ``timeout`` seconds, and ``DeploymentError`` (quoting the end
        of its output) when it fails and ``check`` is true.
        """
        argv = self.command(*args)
        try:
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                env=self.env,
                cwd=self.home,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise DeploymentTimeout(f"{shlex.join(argv)}: not done within {timeout:.0f} s") from None
        if check and result.returncode != 0:
            output = output_tail(result.stdout + result.stderr)
            raise DeploymentError(f"{shlex.join(argv)} failed with code {result.returncode}:\n{output}")
        return result

    def migrate(self, log_path: Path, timeout: float) -> None:
        """``airflow db migrate``; its output written to ``log_path``."""
        result = self.cli("db", "migrate", check=False, timeout=timeout)
        log_path.write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise DeploymentError(
                f"airflow db migrate failed with code {result.returncode}"
                f"\n--- last lines of {log_path}:\n{log_tail(log_path)}"
            )

    # ------------------------------------------------------------------ REST API

    def api_healthy(self) -> bool:
        """Whether the API server answers its health check with 200."""
        response = httpx.get(f"{self.api_url}/api/v2/monitor/health", timeout=5, trust_env=False)
        return response.status_code == 200

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

    # ------------------------------------------------------------------ state, through SQL

    def wait_for_dag_run(self, dag_id: str, run_id: str, timeout: float, context: Callable[[], str]) -> str:
        """Wait until the run is ``success`` or ``failed``; its state. On timeout, fail with ``context()``."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.sql("SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s", (dag_id, run_id))
            state = rows[0][0] if rows else None
            if state in ("success", "failed"):
                return str(state)
            if time.monotonic() > deadline:
                raise DeploymentTimeout(
                    f"DAG run {dag_id}/{run_id} still {state or 'missing'} after {timeout:.0f} s" + context()
                )
            time.sleep(0.5)

    def task_states(self, dag_id: str, run_id: str) -> list[str]:
        """Lines for a diagnosis: the run's task instances counted by state, and the first ten."""
        rows = self.sql(
            "SELECT task_id, map_index, state, try_number FROM task_instance "
            "WHERE dag_id = %s AND run_id = %s ORDER BY task_id, map_index",
            (dag_id, run_id),
        )
        counts: dict[str, int] = {}
        for _task, _index, state, _try in rows:
            counts[str(state)] = counts.get(str(state), 0) + 1
        lines = [f"--- task instances by state: {counts}"]
        lines += [
            f"    {task_id}[{index}] {state} try {number}" for task_id, index, state, number in rows[:10]
        ]
        return lines

    def task_logs(self, dag_id: str, run_id: str, task_id: str) -> dict[str, str]:
        """
        The task's log files, by path relative to its task folder, e.g. ``attempt=1.log``.

        A trigger's log is a file of its own next to the attempt's log, named after the job id of
        the triggerer that ran it: ``attempt=1.log.trigger.<job id>.log``. The triggerer's own
        stdout (``logs_dir/triggerer.log``) does not carry trigger messages.
        """
        folder = self.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        if not folder.is_dir():
            return {}
        return {
            str(path.relative_to(folder)): path.read_text(errors="replace")
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        }

    def latest_job(self, kind: str) -> int:
        """The highest job id of this component kind so far (0 when none)."""
        rows = self.sql("SELECT COALESCE(MAX(id), 0) FROM job WHERE job_type = %s", (JOB_TYPES[kind],))
        return int(rows[0][0])

    def job_heartbeat(self, kind: str, after: int, found: Callable[[int], None]) -> Callable[[], bool]:
        """
        A check that is true once a running job of this kind with an id above ``after`` has
        heartbeated after its first heartbeat; it hands that job's id to ``found``.
        """
        first: dict[int, Any] = {}

        def check() -> bool:
            rows = self.sql(
                "SELECT id, state, latest_heartbeat FROM job WHERE job_type = %s AND id > %s ORDER BY id",
                (JOB_TYPES[kind], after),
            )
            for job_id, state, heartbeat in rows:
                if state != "running":
                    continue
                if job_id not in first:
                    first[job_id] = heartbeat
                elif heartbeat != first[job_id]:
                    found(int(job_id))
                    return True
            return False

        return check

    def dags_parsed(self, missing: set[Path]) -> Callable[[], bool]:
        """
        A check that is true once every DAG file of the folder is parsed and serialized; it
        keeps ``missing`` up to date, and raises on an import error.
        """
        expected = set(dag_files(self.dags_folder))
        missing |= expected

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

        return check
