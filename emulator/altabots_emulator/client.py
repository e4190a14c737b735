"""
:class:`EmulatorClient`: the ``/_emulator/`` endpoints of a running emulator, from any process.

The one client for a test, a script or the pytest plugin to set workflows, inject faults, end
runs and read what a client under test did::

    with EmulatorClient("http://127.0.0.1:8765") as emulator:
        emulator.set_faults(rate_limit={"requests": 3, "per_seconds": 60})
        ...
        assert len(emulator.invokes()) == 1

Every method is one request; an answer of 400 or more raises :class:`EmulatorError` with the
emulator's own explanation. Proxies are never used (the emulator is on this machine).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Final

import httpx

if TYPE_CHECKING:
    from types import TracebackType

INVOKE_PATH: Final = "/v1/workflow/invoke"
QUERY_PATH: Final = "/v1/workflow/query/result"


class EmulatorError(RuntimeError):
    """The emulator refused an admin request (a wrong fault or workflow field, an unknown run)."""


class EmulatorClient:
    """The admin endpoints of the emulator at ``url`` (e.g. ``http://127.0.0.1:8765``).

    ``timeout`` bounds each request in seconds. ``verify`` is passed to httpx for an emulator
    serving HTTPS with a self-signed certificate (a CA file path, or ``False``).
    """

    def __init__(self, url: str, *, timeout: float = 30.0, verify: str | bool = True) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=f"{self.url}/_emulator", timeout=timeout, trust_env=False, verify=verify
        )

    def close(self) -> None:
        """Close the pooled connections."""
        self._http.close()

    def __enter__(self) -> EmulatorClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None) -> Any:
        response = self._http.request(method, path, json=body, params=params)
        if response.status_code >= 400:
            raise EmulatorError(
                f"the emulator at {self.url} answered {method} /_emulator{path} with "
                f"{response.status_code}: {response.text[:500]}"
            )
        return response.json()

    # ------------------------------------------------------------------ set-up

    def health(self) -> dict[str, Any]:
        """``{"status": "ok", ...}`` once the emulator serves."""
        return dict(self._call("GET", "/health"))

    def set_workflow(self, api_key: str, **config: Any) -> dict[str, Any]:
        """Add or replace the workflow of ``api_key``: ``name``, ``run_seconds``, ``outcome``, ...

        Fields left out take the emulator's start-up defaults.
        """
        return dict(self._call("POST", "/workflows", {"api_key": api_key, **config}))

    def workflows(self) -> list[dict[str, Any]]:
        """Every API key's workflow."""
        return list(self._call("GET", "/workflows")["workflows"])

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        """Merge faults in by name (``rate_limit``, ``server_errors``, ``delay``, ``error_in_200``,
        ``drop``); ``None`` removes one. Returns the faults in force afterwards.
        """
        return dict(self._call("POST", "/faults", faults)["faults"])

    def faults(self) -> dict[str, Any]:
        """The faults in force, with their counters (a rate limit's windows by key)."""
        return dict(self._call("GET", "/faults")["faults"])

    def clear_faults(self) -> None:
        """Remove every fault."""
        self._call("DELETE", "/faults")

    def reset(self) -> None:
        """Forget runs, logs, counters and faults; workflows go back to the start-up config."""
        self._call("POST", "/reset")

    # ------------------------------------------------------------------ what a client did

    def requests(self, path: str | None = None) -> list[dict[str, Any]]:
        """The API requests received, oldest first; only those to ``path`` if given."""
        return list(self._call("GET", "/requests", params={"path": path} if path else None)["requests"])

    def invokes(self) -> list[dict[str, Any]]:
        """The invoke requests received, oldest first: each one may have started a billed run."""
        return self.requests(INVOKE_PATH)

    def queries(self) -> list[dict[str, Any]]:
        """The status queries received, oldest first."""
        return self.requests(QUERY_PATH)

    def runs(self, status: str | None = None) -> list[dict[str, Any]]:
        """The emulator's runs (only those in ``status`` if given)."""
        return list(self._call("GET", "/runs", params={"status": status} if status else None)["runs"])

    def run(self, run_id: str) -> dict[str, Any]:
        """One run: the emulator's view of it, and under ``record`` what the API answers for it."""
        return dict(self._call("GET", f"/runs/{run_id}"))

    def end_run(self, run_id: str, outcome: str = "succeed") -> dict[str, Any]:
        """End a run that is still going, now, with ``outcome`` (``succeed`` or ``fail``)."""
        return dict(self._call("POST", f"/runs/{run_id}/end", {"outcome": outcome}))

    def webhooks(self) -> list[dict[str, Any]]:
        """The webhook delivery log, oldest first."""
        return list(self._call("GET", "/webhooks")["deliveries"])

    def stats(self) -> dict[str, Any]:
        """Request and run counters."""
        return dict(self._call("GET", "/stats"))

    # ------------------------------------------------------------------ for tests

    def end_run_after_queries(self, queries: int, *, bound: float = 180.0) -> threading.Thread:
        """In the background, once the only run has been queried ``queries`` times, end it (succeed).

        The run's length then depends on what the waiter did, not on the clock. Returns the
        watching thread; it gives up after ``bound`` seconds.
        """

        def watch() -> None:
            with EmulatorClient(self.url) as client:
                give_up = time.monotonic() + bound
                while time.monotonic() < give_up:
                    seen = client.queries()
                    run_ids = {entry["body"]["workflowRunId"] for entry in seen}
                    if len(seen) >= queries and len(run_ids) == 1:
                        client.end_run(run_ids.pop())
                        return
                    time.sleep(0.1)

        thread = threading.Thread(target=watch, name="altabots-emulator-ender", daemon=True)
        thread.start()
        return thread
