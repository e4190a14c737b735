"""
Load generator for the emulator (not a test): prints how many requests a second it answers.

It starts the emulator in its own process (``python -m altabots_emulator
--port 0``) unless given ``--url``, then has ``--clients`` concurrent keep-alive connections send
requests for ``--seconds`` seconds, one at a time each, over raw asyncio sockets (so the client
itself costs little). ``--processes`` spreads the clients over that many processes. Modes:

* ``query`` (default): ``POST /v1/workflow/query/result`` for a few runs made beforehand;
* ``invoke-async``: ``POST /v1/workflow/invoke`` with ``isAsync: true`` (each makes a run);
* ``invoke-sync``: synchronous invokes, each held open until its run ends (``--run-seconds``).

Example::

    python emulator/tests/load.py --clients 300 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple
from urllib.parse import urlsplit

API_KEY = "emulator-key"
INVOKE = "/v1/workflow/invoke"
QUERY = "/v1/workflow/query/result"


class Result(NamedTuple):
    ok: int
    failed: int
    elapsed: float
    latencies: list[float]


def _request(path: str, body: dict[str, object], host: str) -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bytes]:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return status, await reader.readexactly(length)


async def _make_runs(host: str, port: int, count: int) -> list[str]:
    reader, writer = await asyncio.open_connection(host, port)
    run_ids = []
    for index in range(count):
        body = {"input": {"question": f"load {index}"}, "isAsync": True}
        status, answer = await _exchange(reader, writer, _request(INVOKE, body, host))
        if status != 200:
            raise RuntimeError(f"invoke answered {status}: {answer!r}")
        run_ids.append(json.loads(answer)["workflowRunId"])
    writer.close()
    return run_ids


def _requests_for(mode: str, run_ids: list[str], host: str) -> list[bytes]:
    if mode == "query":
        return [_request(QUERY, {"workflowRunId": run_id}, host) for run_id in run_ids]
    is_async = mode == "invoke-async"
    return [_request(INVOKE, {"input": {"question": "load"}, "isAsync": is_async}, host)]


async def _client(
    host: str, port: int, requests: list[bytes], offset: int, stop_at: float, latencies: list[float]
) -> tuple[int, int]:
    reader, writer = await asyncio.open_connection(host, port)
    ok = failed = 0
    index = offset
    while time.perf_counter() < stop_at:
        began = time.perf_counter()
        status, _ = await _exchange(reader, writer, requests[index % len(requests)])
        latencies.append(time.perf_counter() - began)
        index += 1
        if status == 200:
            ok += 1
        else:
            failed += 1
    writer.close()
    return ok, failed


async def _drive(host: str, port: int, requests: list[bytes], clients: int, seconds: float) -> Result:
    latencies: list[float] = []
    began = time.perf_counter()
    stop_at = began + seconds
    counts = await asyncio.gather(
        *(_client(host, port, requests, i, stop_at, latencies) for i in range(clients))
    )
    elapsed = time.perf_counter() - began
    return Result(sum(c[0] for c in counts), sum(c[1] for c in counts), elapsed, latencies)


def _process_main(host: str, port: int, requests: list[bytes], clients: int, seconds: float) -> Result:
    return asyncio.run(_drive(host, port, requests, clients, seconds))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=300, help="concurrent keep-alive connections")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to drive load")
    parser.add_argument("--processes", type=int, default=1, help="client processes to spread over")
    parser.add_argument("--mode", choices=("query", "invoke-async", "invoke-sync"), default="query")
    parser.add_argument("--runs", type=int, default=50, help="runs to make and query in query mode")
    parser.add_argument("--run-seconds", default="0.2", help="run time of the emulator started here")
    parser.add_argument("--url", help="an emulator already running (default: start one)")
    args = parser.parse_args()

    server = None
    if args.url:
        url = args.url
    else:
        command = [
            sys.executable, "-m", "altabots_emulator", "--port", "0", "--quiet",
            "--run-seconds", args.run_seconds, "--pending-seconds", "0",
        ]  # fmt: skip
        server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        if server.stdout is None:
            raise RuntimeError("no stdout from the emulator")
        url = server.stdout.readline().strip().rsplit(" ", 1)[-1]
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    try:
        run_ids = asyncio.run(_make_runs(host, port, args.runs)) if args.mode == "query" else []
        requests = _requests_for(args.mode, run_ids, host)
        per_process = max(1, args.clients // args.processes)
        print(
            f"{args.mode}: {per_process * args.processes} keep-alive clients in {args.processes} "
            f"process(es) for {args.seconds:g} s against {url}"
        )
        with ProcessPoolExecutor(args.processes) as pool:
            futures = [
                pool.submit(_process_main, host, port, requests, per_process, args.seconds)
                for _ in range(args.processes)
            ]
            results = [future.result() for future in futures]
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
    ok = sum(r.ok for r in results)
    failed = sum(r.failed for r in results)
    elapsed = max(r.elapsed for r in results)
    latencies = sorted(x for r in results for x in r.latencies)
    print(f"answered 200: {ok}, other: {failed}, in {elapsed:.2f} s")
    print(f"throughput: {ok / elapsed:,.0f} requests/s")
    if latencies:

        def ms(fraction: float) -> float:
            return latencies[min(len(latencies) - 1, int(fraction * len(latencies)))] * 1000

        median = statistics.median(latencies) * 1000
        print(f"latency ms: median {median:.1f}, p90 {ms(0.9):.1f}, p99 {ms(0.99):.1f}, max {ms(1):.1f}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
