"""
The deployment's metadata database: a private PostgreSQL cluster, or SQLite when asked for or
when PostgreSQL cannot be started.

The cluster is ``initdb`` into ``<root>/postgres``, served by ``postgres`` on a free port of
127.0.0.1 with no Unix socket and durability switched off for speed. As root it runs as the
``postgres`` system user; when that user cannot reach ``<root>`` (pytest's temporary directories
are private to their owner) the cluster lives in a fresh temporary directory, linked from
``<root>/postgres``, removed by ``close()`` or else by the reaper.

SQLite: Airflow 3.3 accepts the LocalExecutor on SQLite (Airflow 2 refused it), so the same
processes run. Checked on SQLite with Airflow 3.3.2: deferred runs, killing and restarting any
component, a second triggerer taking over the triggers of a killed one, and a 200-task
deferrable fan-out (about as fast as on PostgreSQL, no "database is locked" errors). What SQLite
cannot give: more than one writer at a time and row locks (Airflow drops ``FOR UPDATE``), so
what triggerers or schedulers racing each other do is only meaningful on PostgreSQL, and
Airflow does not support two schedulers on SQLite at all.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sqlite3
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from tests.e2e.harness.processes import (
    LOOPBACK,
    DeploymentError,
    Process,
    Processes,
    free_port,
    log_tail,
    output_tail,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

PG_USER: Final = "airflow"
PG_DATABASE: Final = "airflow"
#: The backends a deployment can be asked for; "auto" is PostgreSQL, else SQLite saying why.
BACKENDS: Final = ("auto", "postgresql", "sqlite")
#: Server settings of the throw-away cluster.
SERVER_SETTINGS: Final = (
    f"listen_addresses={LOOPBACK}",
    "unix_socket_directories=",
    "max_connections=300",
    # No durability: much faster DDL (the migration) and commits.
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
)


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


def server_owner() -> tuple[int, int] | None:
    """(uid, gid) to run the server as: the ``postgres`` user when this is root, else None."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise DeploymentError(
            "running as root, and PostgreSQL refuses root, but there is no 'postgres' user"
        ) from None
    return entry.pw_uid, entry.pw_gid


class MetadataDatabase:
    """
    Airflow's metadata database for one deployment.

    ``backend`` is "postgresql" or "sqlite" once ``start()`` has chosen, and ``reason`` says
    why SQLite when it is SQLite. ``sql()`` queries it from the test's side.
    """

    def __init__(self, root: Path, sqlite_path: Path, requested: str) -> None:
        if requested == "postgres":
            requested = "postgresql"
        if requested not in BACKENDS:
            raise ValueError(f"backend must be 'auto', 'postgresql' or 'sqlite', not {requested!r}")
        self.root = root
        self.sqlite_path = sqlite_path
        self.requested = requested
        self.backend = ""
        self.reason = ""
        self.port = 0
        self._outside_root: Path | None = None

    @property
    def url(self) -> str:
        """The SQLAlchemy URL Airflow connects with."""
        if self.backend == "postgresql":
            return f"postgresql+psycopg2://{PG_USER}@{LOOPBACK}:{self.port}/{PG_DATABASE}"
        return f"sqlite:///{self.sqlite_path}"

    def start(self, processes: Processes, wait_ready: Callable[[Process, float], None]) -> None:
        """Start PostgreSQL as component ``postgres``, or choose SQLite (see the module's doc)."""
        if self.requested == "sqlite":
            self.backend, self.reason = "sqlite", "SQLite was asked for"
            return
        try:
            self._start_postgres(processes, wait_ready)
        except Exception as exc:  # whatever it was, "auto" means: then SQLite, saying why
            if self.requested == "postgresql":
                raise
            if "postgres" in processes.by_name:
                processes.forget("postgres")
            self.backend, self.reason = "sqlite", f"PostgreSQL could not be started: {exc}"
            return
        self.backend = "postgresql"

    def _start_postgres(self, processes: Processes, wait_ready: Callable[[Process, float], None]) -> None:
        pg_bin = find_postgres_bin()
        if pg_bin is None:
            raise DeploymentError(
                "no PostgreSQL server (initdb, postgres) on PATH or under /usr/lib/postgresql/*/bin; "
                "`make postgres` installs Debian's"
            )
        owner = server_owner()
        data = self._data_dir(owner, processes)
        env = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C", "LANG": "C"}
        initdb = [str(pg_bin / "initdb"), "--pgdata", str(data), "--username", PG_USER, "--auth", "trust"]
        initdb += ["--encoding", "UTF8", "--locale", "C", "--no-sync"]
        as_owner: dict[str, Any] = {}
        if owner is not None:
            as_owner = {"user": owner[0], "group": owner[1], "extra_groups": []}
        result = subprocess.run(
            initdb, cwd=data, env=env, capture_output=True, text=True, timeout=120, check=False, **as_owner
        )
        (processes.logs_dir / "initdb.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            tail = output_tail(result.stdout + result.stderr)
            raise DeploymentError(f"initdb failed with code {result.returncode}:\n{tail}")

        # A free port may be taken between choosing and binding it: try another.
        for attempt in range(3):
            self.port = free_port()
            argv = [str(pg_bin / "postgres"), "-D", str(data), "-p", str(self.port)]
            for setting in SERVER_SETTINGS:
                argv += ["-c", setting]
            if "postgres" in processes.by_name:
                server = processes.by_name["postgres"]
                server.argv = argv
            else:
                server = processes.add("postgres", "postgres", argv, env, cwd=data, owner=owner)
            processes.launch(server)
            try:
                wait_ready(server, 60)
                break
            except DeploymentError:
                in_use = "already in use" in log_tail(server.log_path, offset=server.log_offset)
                if attempt == 2 or not in_use:
                    raise
        connection = self._connect("postgres")
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE {PG_DATABASE}")
        finally:
            connection.close()

    def _data_dir(self, owner: tuple[int, int] | None, processes: Processes) -> Path:
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
        self._outside_root = outside
        processes.tell_reaper(f"remove {outside}")
        return outside

    def close(self) -> None:
        """Remove the cluster's directory if it lives outside the root (the server has stopped)."""
        if self._outside_root is not None:
            shutil.rmtree(self._outside_root, ignore_errors=True)

    def _connect(self, database: str) -> Any:
        psycopg2 = importlib.import_module("psycopg2")  # imported when used: SQLite needs none
        return psycopg2.connect(
            host=LOOPBACK, port=self.port, user=PG_USER, dbname=database, connect_timeout=5
        )

    def accepts_connections(self) -> bool:
        """True once the server answers (a refused connection raises)."""
        self._connect("postgres").close()
        return True

    def sql(self, query: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run a query on the metadata database; ``%s`` placeholders on both backends."""
        args = tuple(params) if params is not None else None
        if self.backend == "postgresql":
            connection = self._connect(PG_DATABASE)
            try:
                connection.autocommit = True
                with connection.cursor() as cursor:
                    cursor.execute(query, args)
                    return [tuple(row) for row in cursor.fetchall()] if cursor.description else []
            finally:
                connection.close()
        if self.backend == "sqlite":
            if args is not None:
                query = query.replace("%s", "?").replace("%%", "%")
            lite = sqlite3.connect(f"{self.sqlite_path.as_uri()}?mode=ro", uri=True, timeout=30)
            try:
                return [tuple(row) for row in lite.execute(query, args or ()).fetchall()]
            finally:
                lite.close()
        raise DeploymentError("the metadata database is not chosen yet: call start() first")
