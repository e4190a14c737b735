"""
Triggerer fan-out: N waiting runs in one event loop, for this provider and two references.

Each (client, N) is a fresh process that runs N triggers on one event loop through Airflow's
own trigger runner (``TriggerRunner.run_trigger``, see ``bench/runner.py``), against
``bench/server.py`` over TLS. The clients, all three run as triggers by that runner:

* ``ours``: :class:`AltaBotsWorkflowRunTrigger` with its default policy;
* ``bare``: the floor, a trigger whose ``run()`` is a bare loop over one ``httpx.AsyncClient``
  (pooled and gated as ours is) making the same requests on the same schedule, with no error
  handling, logging or policy;
* ``dbt``: ``DbtCloudRunJobTrigger`` (its default 60 s interval) against a dbt-Cloud-shaped
  status route.

Per client: CPU seconds per status request (the process's user + system time over the wait,
divided by the requests the server answered), peak memory per trigger (the rise of the
resident set over N), TCP connections the server accepted, event-loop lag (a task that sleeps
0.1 s and measures how late it wakes, as the triggerer's watchdog does; the triggerer warns
above 0.2 s) and completion delay (event time minus the run's end time).

Usage: ``python bench/fanout.py [--sizes 100,1000,5000] [--run-seconds 30-120] [--out F]``.
Sizes up to ``--together-up-to`` run all clients at once; larger ones run ``ours`` beside
``bare``, then ``dbt`` alone, so our loop lag is measured with no heavier neighbour than the
floor. Prints a JSON document (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from runner import log_as_triggerer, run_triggers  # noqa: E402
from server import API_KEYS, DBT_TOKEN  # noqa: E402

CLIENTS = ("ours", "bare", "dbt")
CONN_ID = "altabots_bench"
DBT_CONN_ID = "dbt_bench"
LAG_TICK = 0.1


# --------------------------------------------------------------------------- in a client process


def _admin(url: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method="GET" if data is None else "POST")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def _invoke_all(admin_url: str, api_key: str, n: int) -> list[str]:
    """Start ``n`` asynchronous runs through the admin port (set-up, not measured)."""
    import httpx

    limit = asyncio.Semaphore(32)
    headers = {"Authorization": f"Bearer {api_key}"}

    async def invoke(client: httpx.AsyncClient, i: int) -> str:
        async with limit:
            answer = await client.post(
                admin_url + "/v1/workflow/invoke",
                json={"input": {"item": i}, "isAsync": True},
                headers=headers,
            )
            return str(answer.json()["workflowRunId"])

    async with httpx.AsyncClient(timeout=60) as client:
        return list(await asyncio.gather(*(invoke(client, i) for i in range(n))))


def _bare_triggers(url: str, api_key: str, run_ids: list[str]) -> tuple[list[Any], Any]:
    """The floor: the fewest lines that make the same requests on the same schedule, as triggers."""
    import httpx
    from airflow.triggers.base import BaseTrigger, TriggerEvent

    from airflow_provider_altabots.transport import ASYNC_GATE_WIDTH

    # The same pool as ours, and a gate as wide in front of it: without the gate a burst of
    # checks queues inside httpx's pool, whose cost grows with the queue, until its pool timeout
    # fails requests; a floor that falls over is no floor.
    width = ASYNC_GATE_WIDTH
    client = httpx.AsyncClient(
        limits=httpx.Limits(max_connections=width, max_keepalive_connections=width), timeout=30
    )
    gate = asyncio.Semaphore(width)
    headers = {"Authorization": f"Bearer {api_key}"}
    endpoint = url + "/v1/workflow/query/result"

    class BareTrigger(BaseTrigger):
        def __init__(self, run_id: str) -> None:
            super().__init__()
            self.run_id = run_id

        def serialize(self) -> tuple[str, dict[str, Any]]:
            return "fanout.BareTrigger", {"run_id": self.run_id}

        async def run(self) -> Any:
            # The default schedule, written out: checks at 2, 4, 7, 11.5, ... s, waits of at most 60 s.
            delay, interval = 2.0, 2.0
            while True:
                await asyncio.sleep(delay)
                async with gate:
                    answer = await client.post(endpoint, json={"workflowRunId": self.run_id}, headers=headers)
                status = answer.json().get("status")
                if status in ("SUCCEED", "FAILED"):
                    outcome = "success" if status == "SUCCEED" else "error"
                    yield TriggerEvent({"status": outcome, "run_id": self.run_id})
                    return
                delay, interval = interval, min(interval * 1.5, 60.0)

    return [BareTrigger(run_id) for run_id in run_ids], client.aclose


async def _measure(client_name: str, n: int, ports: dict[str, int]) -> dict[str, Any]:
    admin_url = f"http://127.0.0.1:{ports['admin']}"
    url = f"https://127.0.0.1:{ports[client_name]}"
    # Import what the client runs before the runs start and before CPU is counted, so neither a
    # run's end nor the figures wait on an import.
    if client_name == "dbt":
        try:
            from airflow.providers.dbt.cloud.triggers.dbt import DbtCloudRunJobTrigger
        except ImportError as error:
            return {
                "client": client_name,
                "n": n,
                "skipped": f"apache-airflow-providers-dbt-cloud is not installed ({error})",
            }
    else:
        import httpx  # noqa: F401

        import airflow_provider_altabots.transport  # noqa: F401 - the pool width bare copies
        from airflow_provider_altabots.triggers.altabots import AltaBotsWorkflowRunTrigger
    import airflow.jobs.triggerer_job_runner  # noqa: F401 - the runner every client runs in

    if client_name == "dbt":
        seconds = [random.uniform(*_RUN_SECONDS) for _ in range(n)]
        ids = _admin(admin_url, "/_bench/dbt/runs", {"seconds": seconds})["ids"]
        far = time.time() + 3600
        ends_path = "/_bench/dbt/ends"

        def make() -> list[Any]:
            return [
                DbtCloudRunJobTrigger(
                    conn_id=DBT_CONN_ID, run_id=i, end_time=far, poll_interval=_DBT_POLL, account_id=1
                )
                for i in ids
            ]
    else:
        run_ids = await _invoke_all(admin_url, API_KEYS[client_name], n)
        ends_path = f"/_bench/ends?api_key={API_KEYS[client_name]}"

        def make() -> list[Any]:
            if client_name == "ours":
                return [AltaBotsWorkflowRunTrigger(run_id, CONN_ID) for run_id in run_ids]
            triggers, close = _bare_triggers(url, API_KEYS["bare"], run_ids)
            closers.append(close)
            return triggers

    closers: list[Any] = []
    gc.collect()
    rss_before = _rss_bytes()
    stats_before = _admin(admin_url, f"/_bench/stats?reset_peak={client_name}")[client_name]
    loop = asyncio.get_running_loop()
    lags: list[float] = []
    peak_rss = rss_before
    done = False

    async def watchdog() -> None:
        nonlocal peak_rss
        while not done:
            start = loop.time()
            await asyncio.sleep(LAG_TICK)
            lags.append(loop.time() - start - LAG_TICK)
            peak_rss = max(peak_rss, _rss_bytes())

    cpu_start, wall_start = time.process_time(), time.time()
    watcher = asyncio.create_task(watchdog())
    finished = await run_triggers(make())
    cpu = time.process_time() - cpu_start
    wall = time.time() - wall_start
    done = True
    await watcher
    for close in closers:
        await close()
    stats_after = _admin(admin_url, "/_bench/stats")[client_name]
    ends = {str(k): v for k, v in _admin(admin_url, ends_path).items()}
    delays = sorted(at - ends[str(p["run_id"])] for at, p in finished)
    requests = stats_after["requests"] - stats_before["requests"]
    lags.sort()
    return {
        "client": client_name,
        "n": n,
        "wall_s": wall,
        "cpu_s": cpu,
        "requests": requests,
        "requests_per_run": requests / n,
        "cpu_ms_per_request": 1000 * cpu / max(requests, 1),
        "peak_kib_per_trigger": max(peak_rss - rss_before, 0) / 1024 / n,
        "connections_opened": stats_after["connections_opened"] - stats_before["connections_opened"],
        "connections_peak": stats_after["connections_peak"],
        "lag_p99_s": _quantile(lags, 0.99),
        "lag_max_s": lags[-1] if lags else 0.0,
        "lag_over_0_2s": sum(lag > 0.2 for lag in lags),
        "lag_ticks": len(lags),
        "delay_p50_s": _quantile(delays, 0.5),
        "delay_p99_s": _quantile(delays, 0.99),
        "not_success": sum(p.get("status") != "success" for _, p in finished),
        "example_failure": next((p for _, p in finished if p.get("status") != "success"), None),
    }


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


_RUN_SECONDS = (30.0, 120.0)
#: dbt Cloud's default: ``DbtCloudRunJobOperator(check_interval=60)`` hands it to the trigger.
_DBT_POLL = 60.0


def client_main(args: argparse.Namespace) -> int:
    log_as_triggerer()
    global _RUN_SECONDS, _DBT_POLL
    _RUN_SECONDS, _DBT_POLL = args.run_seconds, args.dbt_poll_interval
    random.seed(args.n)
    result = asyncio.run(_measure(args.client, args.n, json.loads(args.ports)))
    print(json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------- the orchestrator


def _start_server(cert: Path, key: Path, run_seconds: str) -> tuple[subprocess.Popen[str], dict[str, int]]:
    server = subprocess.Popen(
        [
            sys.executable,
            str(BENCH / "server.py"),
            "--certfile",
            str(cert),
            "--keyfile",
            str(key),
            "--run-seconds",
            run_seconds,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    line = server.stdout.readline()
    if not line:
        server.wait(10)
        raise SystemExit(f"bench server did not start (exit {server.returncode})")
    return server, json.loads(line)


def _client_env(cert: Path, ports: dict[str, int], home: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SSL_CERT_FILE=str(cert),
        AIRFLOW_HOME=home,
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__LOGGING__LOGGING_LEVEL="INFO",
    )
    env[f"AIRFLOW_CONN_{CONN_ID.upper()}"] = json.dumps(
        {"conn_type": "altabots", "host": f"https://127.0.0.1:{ports['ours']}", "password": API_KEYS["ours"]}
    )
    env[f"AIRFLOW_CONN_{DBT_CONN_ID.upper()}"] = json.dumps(
        {"conn_type": "dbt_cloud", "host": f"127.0.0.1:{ports['dbt']}", "login": "1", "password": DBT_TOKEN}
    )
    return env


def _run_clients(
    names: list[str],
    n: int,
    ports: dict[str, int],
    env: dict[str, str],
    run_seconds: str,
    timeout: float,
    dbt_poll_interval: float,
) -> list[dict[str, Any]]:
    # Output goes to files, not pipes: a client whose pipe filled while another was being read
    # would block on its next log line, stalling its event loop and spoiling its figures.
    with tempfile.TemporaryDirectory(prefix="altabots-fanout-") as tmp:
        outputs = {name: (Path(tmp) / f"{name}.out", Path(tmp) / f"{name}.err") for name in names}
        processes = {}
        for name in names:
            out_path, err_path = outputs[name]
            with out_path.open("w") as out, err_path.open("w") as err:
                processes[name] = subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "client",
                        "--client",
                        name,
                        "--n",
                        str(n),
                        "--ports",
                        json.dumps(ports),
                        "--run-seconds",
                        run_seconds,
                        "--dbt-poll-interval",
                        str(dbt_poll_interval),
                    ],
                    env=env,
                    stdout=out,
                    stderr=err,
                )
        results = []
        for name, process in processes.items():
            process.wait(timeout=timeout)
            out_path, err_path = outputs[name]
            lines = out_path.read_text().strip().splitlines()
            if process.returncode != 0 or not lines:
                raise SystemExit(
                    f"fan-out client {name} (N={n}) failed with exit {process.returncode}:\n"
                    f"{err_path.read_text()[-3000:]}"
                )
            together = [other for other in names if other != name]
            results.append(json.loads(lines[-1]) | {"together_with": together})
    return results


def _parse_range(text: str) -> tuple[float, float]:
    low, _, high = text.partition("-")
    return float(low), float(high or low)


def orchestrate(args: argparse.Namespace) -> int:
    from tls import make_certificate

    sizes = [int(size) for size in args.sizes.split(",")]
    clients = [name for name in args.clients.split(",") if name]
    longest = _parse_range(args.run_seconds)[1]
    with tempfile.TemporaryDirectory(prefix="altabots-bench-") as tmp:
        cert, key = make_certificate(Path(tmp) / "tls")
        server, ports = _start_server(cert, key, args.run_seconds)
        env = _client_env(cert, ports, str(Path(tmp) / "airflow"))
        results: list[dict[str, Any]] = []
        try:
            for n in sizes:
                timeout = longest * 2 + 120 + n / 20
                if n <= args.together_up_to:
                    groups = [clients]
                else:
                    groups = [[c for c in clients if c != "dbt"], [c for c in clients if c == "dbt"]]
                for group in groups:
                    if not group:
                        continue
                    print(f"fan-out: N={n}: {' + '.join(group)} ...", file=sys.stderr, flush=True)
                    results.extend(
                        _run_clients(group, n, ports, env, args.run_seconds, timeout, args.dbt_poll_interval)
                    )
        finally:
            server.terminate()
            server.wait(30)
    document = {
        "run_seconds": args.run_seconds,
        "dbt_poll_interval": args.dbt_poll_interval,
        "results": results,
    }
    text = json.dumps(document, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    for result in results:
        if "skipped" in result:
            print(f"fan-out: SKIPPED {result.get('client')}: {result['skipped']}", file=sys.stderr)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    client = sub.add_parser("client", help="(internal) one measured client process")
    client.add_argument("--client", choices=CLIENTS, required=True)
    client.add_argument("--n", type=int, required=True)
    client.add_argument("--ports", required=True)
    client.add_argument("--run-seconds", type=_parse_range, default=(30.0, 120.0))
    client.add_argument("--dbt-poll-interval", type=float, default=60.0)
    parser.add_argument("--sizes", default="100,1000,5000")
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--run-seconds", default="30-120", help="run length range, LOW-HIGH seconds")
    parser.add_argument(
        "--dbt-poll-interval",
        type=float,
        default=60.0,
        help="DbtCloudRunJobTrigger's interval (its default 60)",
    )
    parser.add_argument("--together-up-to", type=int, default=1000)
    parser.add_argument("--out", help="also write the JSON document here")
    args = parser.parse_args()
    if args.command == "client":
        return client_main(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
