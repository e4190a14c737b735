"""
:class:`EmulatorProcess`: the ``altabots-emulator`` command in a process of its own.

For tests and scripts that want the emulator outside their own process (as the pytest plugin
does, so that a DAG's task, its trigger and the emulator never share an event loop)::

    with EmulatorProcess(["--api-key", "my-key", "--run-seconds", "0.5"]) as emulator:
        emulator.url       # http://127.0.0.1:PORT, a free port
        emulator.client    # an EmulatorClient for it

:meth:`EmulatorProcess.stop` (or leaving the ``with``) ends it with SIGTERM. It ends with the
process that started it all the same, however that one ends (SIGKILL included): the command runs
with ``--stop-on-stdin-eof`` and a pipe as its stdin, whose write end this process holds, and the
system closes that end when this process is gone. A child forked from this process without
``exec`` inherits the write end, and keeps the emulator up until that child ends too.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from typing import IO, TYPE_CHECKING, Final

from .client import EmulatorClient

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType

READY_PREFIX: Final = "altabots-emulator listening on "


class EmulatorProcess:
    """Start ``python -m altabots_emulator --port 0 --stop-on-stdin-eof ARGS`` and wait until it listens.

    ``args`` are the command's options (``altabots-emulator --help``); ``host`` and ``port``
    default to 127.0.0.1 and a free port. ``python`` is the interpreter to run it with (this
    one by default). ``stderr`` is where its own messages go (a file object; discarded by
    default). Raises :class:`RuntimeError` when it has not said it listens within
    ``start_timeout`` seconds, with its exit status if it ended.
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        python: str = sys.executable,
        stderr: int | IO[str] = subprocess.DEVNULL,
        start_timeout: float = 60.0,
    ) -> None:
        argv = [python, "-m", "altabots_emulator", *args]
        if "--port" not in args:
            argv += ["--port", "0"]
        if "--stop-on-stdin-eof" not in args:
            argv.append("--stop-on-stdin-eof")
        self.argv = argv
        # The emulator's own command, with the caller's options as separate arguments (no shell).
        # Its stdin is a pipe whose write end (self.process.stdin) is never written: the pipe
        # closes when this process ends, and the emulator stops then.
        self.process = subprocess.Popen(  # noqa: S603
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
        self.url = self._wait_listening(start_timeout)
        self.client = EmulatorClient(self.url)

    def _wait_listening(self, timeout: float) -> str:
        lines: list[str] = []
        stdout = self.process.stdout
        assert stdout is not None
        reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        line = lines[0].strip() if lines else ""
        if not line.startswith(READY_PREFIX):
            self.stop()
            raise RuntimeError(
                f"altabots-emulator did not start within {timeout:g} s "
                f"(exit status {self.process.returncode}, said {line!r}): {' '.join(self.argv)}"
            )
        return line[len(READY_PREFIX) :]

    def stop(self, timeout: float = 10.0) -> None:
        """Stop it (SIGTERM, then SIGKILL after ``timeout`` seconds) and close the client and pipes."""
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> EmulatorProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
