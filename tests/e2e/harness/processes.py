"""
OS processes of a deployment: each in a session of its own, logged to a file, killed with
everything it started, and reaped even when the process that owns them is killed.

``Process`` is one restartable command (a *component*); ``Processes`` starts, stops and kills
them and keeps the reaper informed. The reaper is a small process of its own (this file run as a
script, ``reap-when-orphaned``) that outlives an owner killed by SIGKILL and then kills what the
owner left behind.

This module needs only the standard library and psutil (a dependency of Airflow), so the reaper
can run it as a file without the rest of the harness.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

import psutil  # type: ignore[import-untyped]  # no stubs installed

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

LOOPBACK: Final = "127.0.0.1"
#: Lines of a log quoted in an error message.
LOG_TAIL_LINES: Final = 40
#: The reaper's command-line argument (this file run as a script).
REAPER_COMMAND: Final = "reap-when-orphaned"


class DeploymentError(RuntimeError):
    """A component did not start, died, or did not reach the state waited for."""


class DeploymentTimeout(DeploymentError, TimeoutError):
    """A wait ran out of time."""


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
            handle.seek(max(offset, size - 64 * 1024))
            data = handle.read()
    except OSError as exc:
        return f"(no log: {exc})"
    text = data.decode("utf-8", errors="replace").splitlines()[-lines:]
    return "\n".join(text) if text else "(log is empty)"


def output_tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a command's captured output, for error messages."""
    return "\n".join(text.splitlines()[-lines:])


def session_members(sessions: Iterable[int]) -> list[int]:
    """Live (non-zombie) processes, other than this one, whose session id is one of ``sessions``."""
    wanted = set(sessions)
    found = []
    for proc in psutil.process_iter(["status"]):
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        with contextlib.suppress(OSError):  # gone meanwhile
            if os.getsid(proc.pid) in wanted:
                found.append(proc.pid)
    return found


def process_title(pid: int) -> str | None:
    """
    A process's title (its command line, as setproctitle leaves it); None when it is gone.

    setproctitle pads the title with NULs, which psutil hands back as empty arguments: dropped.
    """
    try:
        return " ".join(arg for arg in psutil.Process(pid).cmdline() if arg)
    except psutil.Error:
        return None


def kill_sessions(sessions: Iterable[int], timeout: float = 10.0) -> None:
    """SIGKILL every process of these sessions until none is left (or ``timeout`` passes)."""
    sessions = list(sessions)
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
    The reaper's loop: read ``session <pid>`` and ``remove <path>`` lines until the pipe ends.

    The pipe comes from the process that owns the deployment and ends when that process stops
    the deployment or dies, however abruptly (SIGKILL included); then whatever is left in those
    sessions is killed and those paths removed.
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


@dataclass(eq=False)
class Process:
    """
    One component: a command run in a session of its own, restartable under the same name.

    ``kind`` says what it is (postgres, emulator, api-server, scheduler, dag-processor,
    triggerer) and so how its readiness is checked. ``owner`` is the (uid, gid) to run it as,
    or None for this user. ``sessions`` holds the session id of every process started under
    this name (the pid of each start); ``log_offset`` is where the latest start's output begins
    in ``log_path``.
    """

    name: str
    kind: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    cwd: Path | None = None
    owner: tuple[int, int] | None = None
    popen: subprocess.Popen[bytes] | None = None
    sessions: list[int] = field(default_factory=list)
    log_offset: int = 0

    @property
    def running(self) -> bool:
        """Whether the latest start is alive."""
        return self.popen is not None and self.popen.poll() is None

    def new_output(self) -> str:
        """What the latest start has written to the log so far."""
        return self.log_path.read_bytes()[self.log_offset :].decode("utf-8", errors="replace")

    def tail_text(self) -> str:
        """The end of its log, as a paragraph to append to an error message."""
        return f"\n--- last lines of {self.log_path}:\n{log_tail(self.log_path)}"


class Processes:
    """The components of one deployment, by name in start order, and their reaper."""

    def __init__(self, logs_dir: Path) -> None:
        self.logs_dir = logs_dir
        self.by_name: dict[str, Process] = {}
        self._reaper: subprocess.Popen[str] | None = None

    def start_reaper(self) -> None:
        """Start the reaper (this file as a script, isolated from the caller's paths)."""
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        with (self.logs_dir / "reaper.log").open("ab") as log:
            self._reaper = subprocess.Popen(
                [sys.executable, "-I", str(Path(__file__).resolve()), REAPER_COMMAND],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )

    def tell_reaper(self, line: str) -> None:
        """Hand the reaper a ``session <pid>`` or ``remove <path>`` line."""
        if self._reaper is not None and self._reaper.stdin is not None:
            with contextlib.suppress(OSError):
                self._reaper.stdin.write(line + "\n")
                self._reaper.stdin.flush()

    def add(
        self,
        name: str,
        kind: str,
        argv: list[str],
        env: dict[str, str],
        *,
        cwd: Path | None = None,
        owner: tuple[int, int] | None = None,
    ) -> Process:
        """Register a component (not started yet); its log is ``<logs_dir>/<name>.log``."""
        if name in self.by_name:
            raise DeploymentError(f"there is already a component named {name!r}")
        process = Process(name, kind, argv, self.logs_dir / f"{name}.log", env, cwd, owner)
        self.by_name[name] = process
        return process

    def forget(self, name: str) -> None:
        """Kill what is left of a component and drop its name."""
        kill_sessions(self.by_name.pop(name).sessions)

    def get(self, name: str) -> Process:
        """The component named ``name``."""
        try:
            return self.by_name[name]
        except KeyError:
            known = ", ".join(self.by_name)
            raise DeploymentError(f"no component named {name!r} (known: {known})") from None

    def launch(self, process: Process) -> None:
        """Start the component's command in a new session; its output goes to its log."""
        extra: dict[str, Any] = {}
        if process.owner is not None:
            extra = {"user": process.owner[0], "group": process.owner[1], "extra_groups": []}
        with process.log_path.open("ab") as log:
            process.log_offset = log.tell()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"==== {stamp} deployment: starting {shlex.join(process.argv)}\n".encode())
            log.flush()
            process.popen = subprocess.Popen(
                process.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=process.env,
                cwd=process.cwd,
                start_new_session=True,
                **extra,
            )
        process.sessions.append(process.popen.pid)
        self.tell_reaper(f"session {process.popen.pid}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """
        Send ``sig`` to the component's process group.

        With SIGKILL, everything else the component started is killed too (task processes put
        themselves in process groups of their own), and this returns once all of it is gone;
        other signals reach the process group only and return at once.
        """
        process = self.get(name)
        if not process.running:
            raise DeploymentError(f"{name} is not running")
        assert process.popen is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.popen.pid, sig)
        if sig == signal.SIGKILL:
            kill_sessions([process.popen.pid])
            process.popen.wait(timeout=10)

    def wait_stopped(self, name: str, timeout: float) -> int:
        """Wait until the component's process has exited; its exit code."""
        process = self.get(name)
        if process.popen is None:
            raise DeploymentError(f"{name} was never started")
        try:
            return process.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeploymentTimeout(
                f"{name} still running {timeout:.0f} s after it was told to stop" + process.tail_text()
            ) from None

    def stop_all(self, grace: float, last_kind: str) -> None:
        """
        Stop every component: SIGTERM to all but those of ``last_kind``, in reverse start order,
        then SIGINT (PostgreSQL's fast shutdown) to those; SIGKILL to whatever is left of each
        after ``grace`` seconds. Then the reaper's pipe is closed and it exits.
        """
        others = [p for p in reversed(self.by_name.values()) if p.kind != last_kind]
        last = [p for p in self.by_name.values() if p.kind == last_kind]
        for group, first_signal in ((others, signal.SIGTERM), (last, signal.SIGINT)):
            for process in group:
                if process.running:
                    assert process.popen is not None
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(process.popen.pid, first_signal)
            deadline = time.monotonic() + grace
            for process in group:
                if process.popen is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            for process in group:
                kill_sessions(process.sessions)
                if process.popen is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.popen.wait(timeout=10)
        if self._reaper is not None:
            # Its pipe closes: it finds nothing left to kill, and exits.
            with contextlib.suppress(OSError):
                if self._reaper.stdin is not None:
                    self._reaper.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._reaper.wait(timeout=15)


def wait_for(
    process: Process | None,
    what: str,
    check: Callable[[], bool],
    timeout: float,
    interval: float = 0.2,
) -> None:
    """
    Call ``check`` until it is true; fail early when the process exits, and after ``timeout``
    seconds. An exception from ``check`` counts as "not yet" (and is quoted on timeout), except
    a ``DeploymentError``, which ends the wait.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        if process is not None and process.popen is not None:
            code = process.popen.poll()
            if code is not None:
                raise DeploymentError(
                    f"{process.name} exited with code {code} while waiting for {what}" + process.tail_text()
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
            name = process.name if process is not None else "deployment"
            detail = f" (last error: {last_error!r})" if last_error else ""
            tail = process.tail_text() if process is not None else ""
            raise DeploymentTimeout(f"{name}: no {what} within {timeout:.0f} s{detail}{tail}")
        time.sleep(interval)


if __name__ == "__main__":
    if sys.argv[1:] != [REAPER_COMMAND]:
        sys.exit(f"usage: {sys.argv[0]} {REAPER_COMMAND}  (commands on stdin)")
    sys.exit(reap_when_orphaned(sys.stdin))
