"""
Webhook calls made when an asynchronous run ends.

The vendor's pages say only that an asynchronous run's result "can be sent" to up to five
webhooks, each with a method, a URL and optional headers. Everything else here is the
emulator's own choice, not vendor fact:

* **Loopback only.** Only ``localhost``, ``127.0.0.0/8`` and ``::1`` are ever called; any other
  host is neither resolved nor contacted, and the delivery is logged as ``refused``. So an
  emulator can never be made to send requests out of the machine.
* The payload is the final run record (the same JSON as the query endpoint answers), sent as
  ``application/json`` with methods that carry a body (``POST``, ``PUT``, ``PATCH``); other
  methods (``GET`` ...) are sent with no body. The method is upper-cased.
* The configured headers are sent as given (with ``Host``, ``User-Agent: altabots-emulator``
  and, with a body, ``Content-Type: application/json`` added unless set), plus
  ``Content-Length`` and ``Connection: close``; given ``Content-Length``, ``Connection`` and
  ``Transfer-Encoding`` headers are left out.
* One attempt, with a short timeout (5 seconds by default) for the whole call, in the
  background: serving never waits for it. The answer's status is kept, its body not read.
  Redirects are not followed. There is no retry and no signature.
* The calls are made with one aiohttp ``ClientSession`` per emulator, opened at the first call
  and closed when the emulator stops; stopping also cancels the calls in flight.
* Webhooks of synchronous invokes are checked but not called (the pages tie them to
  asynchronous runs). A run that never ends never calls them.
* Each delivery is logged: run id, method, URL, time, and the HTTP status answered or the
  error, or ``refused``. The log keeps the last 10,000 deliveries; header values (which may
  hold tokens) are not logged.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

if TYPE_CHECKING:
    from .workflows import Run

log = logging.getLogger("altabots_emulator")

BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
_LEFT_OUT: Final = frozenset({"content-length", "connection", "transfer-encoding"})


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a URL's host name) is one the emulator may call."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv4Address):
        return address.is_loopback
    return address == ipaddress.IPv6Address("::1")


def _is_loopback_address(address: str) -> bool:
    try:
        return is_loopback_host(str(ipaddress.ip_address(address.split("%", 1)[0])))
    except ValueError:
        return False


class _Refused(Exception):
    """The webhook is not called (not loopback, or not a URL the emulator can call)."""


class _LoopbackResolver(AbstractResolver):
    """Resolves ``localhost`` (the one name let through) to its loopback addresses only."""

    def __init__(self) -> None:
        self._resolver = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._resolver.resolve(host, port, family)
        kept = [result for result in found if _is_loopback_address(result["host"])]
        if not kept:
            raise _Refused(f"{host} does not resolve to a loopback address")
        return kept

    async def close(self) -> None:
        await self._resolver.close()


class WebhookDeliveries:
    """Calls the webhooks of ended asynchronous runs and keeps the delivery log."""

    def __init__(self, timeout: float = 5.0, log_size: int = 10_000) -> None:
        self.timeout = timeout
        self.log: deque[dict[str, Any]] = deque(maxlen=log_size)
        self._timers: set[asyncio.TimerHandle] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    def schedule(self, run: Run) -> None:
        """Call the run's webhooks when it ends (nothing for a run that never ends)."""
        if run.ends_at is None or not run.webhooks:
            return
        self._arm(run)

    def _arm(self, run: Run) -> None:
        if run.ends_at is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, run.ends_at - time.time()) + 0.001
        handle: asyncio.TimerHandle | None = None

        def fire() -> None:
            if handle is not None:
                self._timers.discard(handle)
            self._fire(run)

        handle = loop.call_later(delay, fire)
        self._timers.add(handle)

    def _fire(self, run: Run) -> None:
        now = time.time()
        if not run.ended(now):
            self._arm(run)
            return
        body = json.dumps(run.record(now), separators=(",", ":"), ensure_ascii=False).encode()
        for webhook in run.webhooks:
            task = asyncio.get_running_loop().create_task(self._deliver(run.run_id, webhook, body))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, run_id: str, webhook: dict[str, Any], body: bytes) -> None:
        method = str(webhook.get("method", "")).upper()
        url = str(webhook.get("url", ""))
        entry: dict[str, Any] = {
            "run_id": run_id,
            "method": method,
            "url": url,
            "time": time.time(),
            "status": None,
            "error": None,
            "refused": False,
        }
        try:
            entry["status"] = await self._send(method, url, webhook.get("headers") or {}, body)
        except _Refused as exc:
            entry["refused"] = True
            entry["error"] = str(exc)
        except TimeoutError:
            entry["error"] = f"timed out after {self.timeout:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
        self.log.append(entry)

    async def _send(self, method: str, url: str, given: dict[str, Any], body: bytes) -> int:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.scheme not in ("http", "https") or not host:
            raise _Refused("only http and https URLs are called")
        if not is_loopback_host(host):
            raise _Refused("not a loopback host; the emulator calls only localhost, 127.0.0.0/8 and ::1")
        has_body = method in BODY_METHODS
        headers = {
            str(name): str(value) for name, value in given.items() if str(name).lower() not in _LEFT_OUT
        }
        present = {name.lower() for name in headers}
        defaults = {"User-Agent": "altabots-emulator", "Connection": "close"}
        if has_body:
            defaults["Content-Type"] = "application/json"
        headers.update((name, value) for name, value in defaults.items() if name.lower() not in present)
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=_LoopbackResolver(), force_close=True),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                skip_auto_headers=("User-Agent",),
            )
        async with self._session.request(
            method, url, data=body if has_body else None, headers=headers, allow_redirects=False
        ) as answer:
            return answer.status

    def cancel_all(self) -> None:
        """Forget pending deliveries (runs not yet ended, and calls in flight)."""
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()

    async def close(self) -> None:
        """Cancel pending deliveries and close the HTTP session (the emulator stops)."""
        self.cancel_all()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def entries(self) -> list[dict[str, Any]]:
        """The delivery log, oldest first."""
        return list(self.log)
