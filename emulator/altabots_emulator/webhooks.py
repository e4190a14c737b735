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
  ``Content-Length`` and ``Connection: close``.
* One attempt, with a short timeout (5 seconds by default), in the background: serving never
  waits for it. There is no retry and no signature.
* Webhooks of synchronous invokes are checked but not called (the pages tie them to
  asynchronous runs). A run that never ends never calls them.
* Each delivery is logged: run id, method, URL, time, and the HTTP status answered or the
  error, or ``refused``. The log keeps the last 10,000 deliveries; header values (which may
  hold tokens) are not logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
import socket
import ssl
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from .workflows import Run

log = logging.getLogger("altabots_emulator")

BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


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


class WebhookDeliveries:
    """Calls the webhooks of ended asynchronous runs and keeps the delivery log."""

    def __init__(self, timeout: float = 5.0, log_size: int = 10_000) -> None:
        self.timeout = timeout
        self.log: deque[dict[str, Any]] = deque(maxlen=log_size)
        self._timers: set[asyncio.TimerHandle] = set()
        self._tasks: set[asyncio.Task[None]] = set()

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
            entry["status"] = await asyncio.wait_for(self._send(method, url, webhook, body), self.timeout)
        except _Refused as exc:
            entry["refused"] = True
            entry["error"] = str(exc)
        except TimeoutError:
            entry["error"] = f"timed out after {self.timeout:g} s"
        except (OSError, ValueError, ssl.SSLError) as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
        self.log.append(entry)

    async def _send(self, method: str, url: str, webhook: dict[str, Any], body: bytes) -> int:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.scheme not in ("http", "https") or not host:
            raise _Refused("only http and https URLs are called")
        if not is_loopback_host(host):
            raise _Refused("not a loopback host; the emulator calls only localhost, 127.0.0.0/8 and ::1")
        if not _TOKEN.match(method):
            raise ValueError(f"invalid webhook method {method!r}")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        loop = asyncio.get_running_loop()
        if host.lower() == "localhost":
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            addresses = [str(info[4][0]) for info in infos if _is_loopback_address(str(info[4][0]))]
            if not addresses:
                raise _Refused("localhost does not resolve to a loopback address")
            address = addresses[0]
        else:
            address = host
        request = self._request_bytes(method, parts, host, port, tls, webhook.get("headers") or {}, body)
        reader, writer = await asyncio.open_connection(
            address,
            port,
            ssl=ssl.create_default_context() if tls else None,
            server_hostname=host if tls else None,
        )
        try:
            writer.write(request)
            await writer.drain()
            status_line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
        fields = status_line.split(b" ", 2)
        if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
            raise ValueError("the webhook receiver did not answer HTTP")
        return int(fields[1])

    @staticmethod
    def _request_bytes(
        method: str,
        parts: Any,
        host: str,
        port: int,
        tls: bool,
        headers: dict[str, Any],
        body: bytes,
    ) -> bytes:
        target = parts.path or "/"
        if parts.query:
            target = f"{target}?{parts.query}"
        host_field = f"[{host}]" if ":" in host else host
        if port != (443 if tls else 80):
            host_field = f"{host_field}:{port}"
        has_body = method in BODY_METHODS
        lines = [f"{method} {target} HTTP/1.1"]
        given: set[str] = set()
        for name, value in headers.items():
            text = str(value)
            lower = str(name).lower()
            if not _TOKEN.match(str(name)) or "\r" in text or "\n" in text:
                raise ValueError(f"invalid webhook header {name!r}")
            if lower in ("content-length", "connection", "transfer-encoding"):
                continue
            given.add(lower)
            lines.append(f"{name}: {text}")
        defaults = [("Host", host_field), ("User-Agent", "altabots-emulator")]
        if has_body:
            defaults.append(("Content-Type", "application/json"))
        lines += [f"{name}: {value}" for name, value in defaults if name.lower() not in given]
        if has_body:
            lines.append(f"Content-Length: {len(body)}")
        lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
        return head + body if has_body else head

    def cancel_all(self) -> None:
        """Forget pending deliveries (runs not yet ended, and calls in flight)."""
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()

    def entries(self) -> list[dict[str, Any]]:
        """The delivery log, oldest first."""
        return list(self.log)
