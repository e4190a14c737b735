"""
:class:`Emulator`: the emulator as a Python object, for tests and scripts.

Run it in a background thread::

    with Emulator(api_keys=["my-key"], run_seconds=0.5) as emulator:
        base_url = emulator.url   # e.g. http://127.0.0.1:54321
        ...

or inside a running event loop with :meth:`Emulator.start_async` / :meth:`Emulator.stop_async`.
The helper methods (:meth:`set_workflow`, :meth:`set_faults`, :meth:`requests` ...) do the same
as the ``/_emulator/`` endpoints and may be called from any thread.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from typing import TYPE_CHECKING, Any, Final, TypeVar

from .app import EmulatorApp
from .server import HttpServer
from .workflows import WorkflowConfig

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from types import TracebackType

    from .workflows import RunSeconds

#: The API key the emulator accepts when it is given none.
DEFAULT_API_KEY: Final = "emulator-key"

_T = TypeVar("_T")


class Emulator:
    """A local emulator of the AltaBots/GPTBots workflow API.

    ``api_keys`` get a workflow built from ``run_seconds``, ``pending_seconds``, ``outcome`` and
    ``fail_rate``; ``workflows`` maps more keys to their own workflow (a :class:`WorkflowConfig`
    or a mapping of its fields). With neither, the one key is ``"emulator-key"``. ``port=0``
    picks a free port. ``certfile``/``keyfile`` serve HTTPS. ``seed`` makes drawn run times and
    failures repeatable.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        api_keys: Iterable[str] = (),
        *,
        workflows: Mapping[str, WorkflowConfig | Mapping[str, Any]] | None = None,
        run_seconds: RunSeconds | list[float] = 2.0,
        pending_seconds: float = 0.3,
        outcome: str = "succeed",
        fail_rate: float = 0.0,
        error_style: str = "gptbots",
        certfile: str | None = None,
        keyfile: str | None = None,
        access_log: bool = False,
        sync_timeout: float = 300.0,
        webhook_timeout: float = 5.0,
        request_log_size: int = 200_000,
        seed: int | None = None,
    ) -> None:
        if isinstance(run_seconds, list):
            run_seconds = (run_seconds[0], run_seconds[1])
        defaults = WorkflowConfig(
            run_seconds=run_seconds,
            pending_seconds=pending_seconds,
            outcome=outcome,
            fail_rate=fail_rate,
        )
        configs: dict[str, WorkflowConfig] = dict.fromkeys(api_keys, defaults)
        for key, config in (workflows or {}).items():
            configs[key] = config if isinstance(config, WorkflowConfig) else defaults.with_changes(config)
        if not configs:
            configs[DEFAULT_API_KEY] = defaults
        self.app = EmulatorApp(
            configs,
            defaults=defaults,
            error_style=error_style,
            sync_timeout=sync_timeout,
            webhook_timeout=webhook_timeout,
            request_log_size=request_log_size,
            seed=seed,
        )
        ssl_context = None
        if certfile or keyfile:
            if not (certfile and keyfile):
                raise ValueError("certfile and keyfile go together")
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(certfile, keyfile)
        self.server = HttpServer(
            self.app.handle,
            host=host,
            port=port,
            ssl_context=ssl_context,
            error_body=self.app.error_body,
            access_log=access_log,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop_event: asyncio.Event | None = None
        self._started = False

    @property
    def api_keys(self) -> list[str]:
        """The API keys the emulator accepts."""
        return list(self.app.workflows)

    @property
    def url(self) -> str:
        """The base URL to give a client, e.g. ``http://127.0.0.1:8765`` (valid once started)."""
        scheme = "https" if self.server.ssl_context is not None else "http"
        host = self.server.host
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{self.server.port}"

    # ------------------------------------------------------------------ in a running loop

    async def start_async(self) -> str:
        """Start serving in the running event loop; returns :attr:`url`."""
        await self.server.start()
        self._loop = asyncio.get_running_loop()
        self._started = True
        return self.url

    async def stop_async(self) -> None:
        """Stop serving: close the listener and every connection, cancel pending webhooks."""
        await self.app.webhooks.close()
        await self.server.close()
        self._started = False

    # ------------------------------------------------------------------ in a background thread

    def start(self, timeout: float = 10.0) -> str:
        """Start serving in a background thread; returns :attr:`url` once it accepts connections."""
        if self._thread is not None:
            return self.url
        ready = threading.Event()
        failure: list[BaseException] = []

        async def serve() -> None:
            self._stop_event = asyncio.Event()
            try:
                await self.start_async()
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            try:
                await self._stop_event.wait()
            finally:
                await self.stop_async()

        self._thread = threading.Thread(
            target=lambda: asyncio.run(serve()), name="altabots-emulator", daemon=True
        )
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError("the emulator did not start in time")
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        """Stop a :meth:`start`-ed emulator and wait for its thread to end."""
        thread, loop, event = self._thread, self._loop, self._stop_event
        if thread is None or loop is None or event is None:
            return
        if not loop.is_closed():
            loop.call_soon_threadsafe(event.set)
        thread.join(timeout)
        self._thread = None

    def __enter__(self) -> Emulator:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers (any thread)

    def _call(self, function: Callable[[], _T]) -> _T:
        loop = self._loop
        if loop is None or not self._started or self._thread is None:
            return function()

        async def run() -> _T:
            return function()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout=10)

    def set_workflow(self, api_key: str, **config: Any) -> dict[str, Any]:
        """Add or replace the workflow of ``api_key`` (like ``POST /_emulator/workflows``)."""
        return self._call(lambda: self.app.set_workflow(api_key, config))

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        """Merge faults in (like ``POST /_emulator/faults``); returns the faults in force."""

        def apply() -> dict[str, Any]:
            self.app.faults.configure(faults)
            return self.app.faults.describe()

        return self._call(apply)

    def clear_faults(self) -> None:
        """Remove every fault (like ``DELETE /_emulator/faults``)."""
        self._call(self.app.faults.clear)

    def reset(self) -> None:
        """Forget runs, logs and faults (like ``POST /_emulator/reset``)."""
        self._call(self.app.reset)

    def requests(self, path: str | None = None) -> list[dict[str, Any]]:
        """The API request log, oldest first (like ``GET /_emulator/requests``)."""
        return self._call(lambda: self.app.list_requests(path))

    def runs(self) -> list[dict[str, Any]]:
        """Every run's internal state (like ``GET /_emulator/runs``)."""
        return self._call(self.app.list_runs)

    def webhook_deliveries(self) -> list[dict[str, Any]]:
        """The webhook delivery log (like ``GET /_emulator/webhooks``)."""
        return self._call(self.app.webhooks.entries)

    def stats(self) -> dict[str, Any]:
        """Request and run counts (like ``GET /_emulator/stats``)."""
        return self._call(self.app.stats)
