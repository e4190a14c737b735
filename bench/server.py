"""
The fan-out benchmark's server: the emulator, and a dbt-Cloud-shaped status route beside it.

It listens on loopback, over TLS, on one port per client under test, so that each client's
requests and new connections are counted apart:

* ``ours`` and ``bare``: the emulated AltaBots API (both ports serve the same emulator);
* ``dbt``: ``GET /api/v2/accounts/{account_id}/runs/{run_id}/``, answering
  ``{"data": {"status": ...}}`` with dbt Cloud's run status codes (3 running, 10 success),
  which is all ``DbtCloudRunJobTrigger`` reads.

A plain-HTTP ``admin`` port serves the emulator too (set-up invokes go there, so they count
against no client) and the bench's own routes:

* ``GET /_bench/stats[?reset_peak=PORT]``: per port, requests answered, connections opened so
  far and the most open at once (since the last reset of that port's peak);
* ``POST /_bench/dbt/runs`` ``{"seconds": [...]}``: start dbt runs now; answers their ids;
* ``GET /_bench/ends?api_key=K``: ``{run_id: end time}`` of the emulator's runs for key K;
* ``GET /_bench/dbt/ends``: the same for the dbt runs.

Usage: ``python bench/server.py --certfile C --keyfile K --run-seconds 30-120``. Prints one JSON
line with the ports when ready; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import sys
import time
from typing import Any
from urllib.parse import parse_qs

from altabots_emulator import Emulator
from altabots_emulator.cli import parse_run_seconds
from altabots_emulator.server import HttpServer, Request, Response, json_response

CLIENT_PORTS = ("ours", "bare", "dbt")
#: One API key per AltaBots client, so each one's runs can be told apart.
API_KEYS = {"ours": "bench-ours-key", "bare": "bench-bare-key"}
DBT_TOKEN = "bench-dbt-token"
_DBT_RUN = re.compile(r"^/api/v2/accounts/(\d+)/runs/(\d+)/?$")
_DBT_RUNNING, _DBT_SUCCESS = 3, 10


class BenchServer:
    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator
        self.requests = dict.fromkeys((*CLIENT_PORTS, "admin"), 0)
        self.dbt_ends: dict[int, float] = {}
        context = emulator.server.ssl_context
        self.servers = {
            "ours": emulator.server,
            "bare": HttpServer(self._counted("bare", emulator.app.handle), ssl_context=context),
            "dbt": HttpServer(self._counted("dbt", self._dbt), ssl_context=context),
            "admin": HttpServer(self._counted("admin", self._admin)),
        }
        emulator.server.handler = self._counted("ours", emulator.app.handle)

    def _counted(self, name: str, handler: Any) -> Any:
        def handle(request: Request) -> Any:
            self.requests[name] += 1
            return handler(request)

        return handle

    def _dbt(self, request: Request) -> Response:
        match = _DBT_RUN.match(request.path)
        if request.method != "GET" or match is None:
            return json_response(404, {"status": {"code": 404, "is_success": False}, "data": None})
        if request.headers.get("authorization") != f"Token {DBT_TOKEN}":
            return json_response(401, {"status": {"code": 401, "is_success": False}, "data": None})
        account_id, run_id = int(match[1]), int(match[2])
        ends = self.dbt_ends.get(run_id)
        if ends is None:
            return json_response(404, {"status": {"code": 404, "is_success": False}, "data": None})
        done = time.time() >= ends
        return json_response(
            200,
            {
                "status": {"code": 200, "is_success": True, "user_message": "Success!"},
                "data": {
                    "id": run_id,
                    "account_id": account_id,
                    "job_definition_id": 1,
                    "status": _DBT_SUCCESS if done else _DBT_RUNNING,
                    "status_humanized": "Success" if done else "Running",
                    "in_progress": not done,
                    "is_complete": done,
                    "href": f"https://127.0.0.1/deploy/{account_id}/runs/{run_id}/",
                },
            },
        )

    def _admin(self, request: Request) -> Any:
        if not request.path.startswith("/_bench/"):
            return self.emulator.app.handle(request)
        name = request.path[len("/_bench/") :].strip("/")
        query = {k: v[-1] for k, v in parse_qs(request.query).items()}
        if name == "stats":
            reset = self.servers.get(query.get("reset_peak", ""))
            if reset is not None:
                reset.connections_peak = len(reset.connections)
            return json_response(
                200,
                {
                    port: {
                        "requests": self.requests[port],
                        "connections_opened": server.connections_opened,
                        "connections_open": len(server.connections),
                        "connections_peak": server.connections_peak,
                    }
                    for port, server in self.servers.items()
                },
            )
        if name == "ends":
            key = query.get("api_key")
            ends = {run.run_id: run.ends_at for run in self.emulator.app.runs.values() if run.api_key == key}
            return json_response(200, ends)
        if name == "dbt/ends":
            return json_response(200, {str(k): v for k, v in self.dbt_ends.items()})
        if name == "dbt/runs" and request.method == "POST":
            seconds = json.loads(request.body)["seconds"]
            now, first = time.time(), len(self.dbt_ends) + 1
            ids = list(range(first, first + len(seconds)))
            self.dbt_ends.update({run_id: now + s for run_id, s in zip(ids, seconds, strict=True)})
            return json_response(200, {"ids": ids})
        return json_response(404, {"message": f"no bench route {request.path}"})

    async def serve(self) -> None:
        for server in self.servers.values():
            await server.start()
        print(json.dumps({name: server.port for name, server in self.servers.items()}), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        for server in self.servers.values():
            await server.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--certfile", required=True)
    parser.add_argument("--keyfile", required=True)
    parser.add_argument("--run-seconds", type=parse_run_seconds, default=(30.0, 120.0))
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    emulator = Emulator(
        api_keys=API_KEYS.values(),
        run_seconds=args.run_seconds,
        certfile=args.certfile,
        keyfile=args.keyfile,
        request_log_size=1000,
        seed=args.seed,
    )
    asyncio.run(BenchServer(emulator).serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
