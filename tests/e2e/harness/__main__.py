"""
``python -m tests.e2e.harness``: start a deployment of ``tests/e2e/dags`` and keep it until
Ctrl-C (or SIGTERM, SIGHUP), printing where everything is. ``make deployment`` runs it.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

from tests.e2e.harness.airflow import API_USER
from tests.e2e.harness.deployment import Deployment
from tests.e2e.harness.processes import DeploymentError

if TYPE_CHECKING:
    from collections.abc import Sequence

REPO: Final = Path(__file__).resolve().parents[3]


def main(argv: Sequence[str] | None = None) -> int:
    """Start a deployment and keep it until Ctrl-C (or SIGTERM, SIGHUP); the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.e2e.harness", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "--root", type=Path, help="where to keep everything (default: a new temporary directory)"
    )
    parser.add_argument("--airflow-bin", type=Path, default=REPO / ".venv-e2e" / "bin")
    parser.add_argument("--dags-folder", type=Path, default=REPO / "tests" / "e2e" / "dags")
    parser.add_argument("--backend", choices=("auto", "postgresql", "sqlite"), default="auto")
    parser.add_argument("--parallelism", type=int, default=16)
    parser.add_argument(
        "--connection",
        action="append",
        metavar="CONN_ID=API_KEY",
        help="a connection to the emulator (repeatable; default altabots_default=emulator-key)",
    )
    parser.add_argument("--emulator-args", default="", help="extra arguments for altabots-emulator, quoted")
    args = parser.parse_args(argv)

    connections = dict(item.split("=", 1) for item in args.connection or ["altabots_default=emulator-key"])
    root = args.root or Path(tempfile.mkdtemp(prefix="altabots-deployment-"))
    deployment = Deployment(
        root,
        airflow_bin=args.airflow_bin,
        dags_folder=args.dags_folder,
        connections=connections,
        emulator_args=shlex.split(args.emulator_args),
        parallelism=args.parallelism,
        backend=args.backend,
    )

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Set explicitly: a shell that starts this in the background would have SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    print(f"starting in {deployment.root} ...", flush=True)
    try:
        deployment.start()
        backend = deployment.backend
        if deployment.backend == "sqlite":
            backend += f" ({deployment.backend_reason})"
        print(
            f"ready in {deployment.timings['total']} s on {backend}\n"
            f"  Airflow UI and API: {deployment.api_url}"
            f"  (user {API_USER}, password {deployment.airflow.api_password})\n"
            f"  emulator:           {deployment.emulator_url}\n"
            f"  AIRFLOW_HOME:       {deployment.airflow_home}\n"
            f"  component logs:     {deployment.logs_dir}\n"
            f"  pids:               "
            + ", ".join(f"{name} {deployment.pid(name)}" for name in deployment.components)
            + "\nCtrl-C stops everything.",
            flush=True,
        )
        reported: set[str] = set()
        while True:
            time.sleep(1)
            for name in deployment.components:
                if not deployment.running(name) and name not in reported:
                    reported.add(name)
                    print(f"{name} exited; see {deployment.logs_dir / (name + '.log')}", flush=True)
    except DeploymentError as exc:
        print(f"deployment failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
    finally:
        deployment.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
