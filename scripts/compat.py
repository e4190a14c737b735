"""
``make test-compat``: the provider on the other Airflow lines and Pythons it supports.

Each target gets a virtualenv of its own under ``.venv-compat/``, built from committed pins, and
runs part of the test suite there, against the provider's built wheel:

- Airflow 2.11, 3.0, 3.1 and 3.2 on Python 3.11: ``constraints/airflow-<line>.txt`` installed as
  it is (that line's Airflow as its users got it, see ``scripts/constraints.py``); then a check
  that ``pip install <wheel>`` next to it keeps that Airflow; then the registration tests, the
  connection form, and every example DAG against the emulator (a FAILED run and a mapped run
  included).
- Airflow 3.3 on Python 3.12, 3.13 and 3.14, from ``constraints.txt``: every example DAG. An
  interpreter that is not found is skipped, and the summary says so loudly.
- Airflow 2.10, below the provider's floor: pip must refuse to install the wheel beside it, with
  a message naming the floor (a dry run, no virtualenv).

A virtualenv is rebuilt only when its pins, the provider's requirements or the interpreter
change; the wheel is installed anew each time, and the tests run from a copy of ``tests/``
without the provider's source beside it, so that they import the wheel. Targets run two
at a time; each one's output is kept in ``.venv-compat/<target>.log``.

Usage: ``python scripts/compat.py PROVIDER_WHEEL EMULATOR_WHEEL [TARGET ...]`` (``make dist`` builds
both into ``dist/``; the emulator is installed as a user's tests would install it, for its pytest
plugin).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOME = REPO / ".venv-compat"
PIP_FLAGS = ("--quiet", "--disable-pip-version-check")

REGISTRATION = ("tests/test_registration.py",)
EXAMPLE_DAGS = ("tests/integration/test_example_dags.py", "tests/integration/test_readme_snippets.py")
#: The distributions that make up "the user's Airflow": installing the provider must not move them.
AIRFLOW_DISTRIBUTIONS = {"apache-airflow", "apache-airflow-core", "apache-airflow-task-sdk"}


@dataclass(frozen=True)
class Target:
    """One virtualenv: an Airflow line on one Python, and the tests it runs."""

    name: str
    python: str
    #: Installed as it is (``-r``): the line's whole pinned set.
    pins: Path | None
    #: Or: these constraints, with Airflow and the wheel resolved under them.
    constraints: Path | None
    tests: tuple[str, ...]

    @property
    def venv(self) -> Path:
        return HOME / self.name

    @property
    def log(self) -> Path:
        return HOME / f"{self.name}.log"


TARGETS = [
    *(
        Target(
            f"airflow-{line}",
            "3.11",
            REPO / "constraints" / f"airflow-{line}.txt",
            None,
            REGISTRATION + EXAMPLE_DAGS,
        )
        for line in ("2.11", "3.0", "3.1", "3.2")
    ),
    *(
        Target(f"airflow-3.3-py{python}", python, None, REPO / "constraints.txt", EXAMPLE_DAGS)
        for python in ("3.12", "3.13", "3.14")
    ),
]


@dataclass
class Outcome:
    target: Target
    status: str  # "passed", "failed", "skipped"
    detail: str = ""
    airflow: str = ""
    install_seconds: float = 0.0
    test_seconds: float = 0.0


def find_python(version: str) -> str:
    found = subprocess.run(
        [str(REPO / "scripts" / "find-python"), version], text=True, stdout=subprocess.PIPE, check=False
    )
    return found.stdout.strip()


def fingerprint(target: Target, python: str) -> str:
    """What a virtualenv is built from: the interpreter, its pins and the provider's requirements."""
    digest = hashlib.sha256(python.encode())
    for path in (
        target.pins,
        target.constraints,
        REPO / "pyproject.toml",
        REPO / "emulator" / "pyproject.toml",
    ):
        if path is not None:
            digest.update(path.read_bytes())
    return digest.hexdigest()


class Step:
    """Runs commands for one target, appending their output to its log (opened per command)."""

    def __init__(self, target: Target) -> None:
        self.target = target

    def note(self, text: str) -> None:
        with self.target.log.open("a") as log:
            log.write(text + "\n")

    def __call__(self, *args: str | Path, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        command = [str(arg) for arg in args]
        self.note(f"\n$ {' '.join(command)}")
        with self.target.log.open("a") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False, **kwargs)
        if check and done.returncode:
            raise RuntimeError(f"{command[0]} {' '.join(command[1:4])} ... exited with {done.returncode}")
        return done


def keeps_airflow(step: Step, python: Path, wheel: Path) -> str:
    """Ask pip what installing the wheel would change; fail if it would move Airflow."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp, "report.json")
        step(python, "-m", "pip", "install", *PIP_FLAGS, "--dry-run", "--report", report, wheel)
        planned = [item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]]
    moved = sorted(AIRFLOW_DISTRIBUTIONS.intersection(planned))
    if moved:
        raise RuntimeError(f"pip install of the provider would change the user's Airflow: {moved}")
    if "airflow-provider-altabots" not in planned:
        raise RuntimeError(f"pip's dry run did not plan the provider itself: {planned}")
    return ", ".join(planned)


#: The newest release below the provider's floor: installing beside it must fail in pip, clearly.
BELOW_FLOOR = "apache-airflow==2.10.5"


def refuses_below_floor(wheel: Path) -> Outcome:
    """``pip install "apache-airflow==2.10.5" <wheel>``: pip must refuse, naming the floor."""
    target = Target("airflow-2.10-refused", "", None, None, ())
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--dry-run",
            BELOW_FLOOR,
            str(wheel),
        ],
        text=True,
        capture_output=True,
        check=False,
    )
    said = done.stdout + done.stderr
    target.log.write_text(said)
    expected = "depends on apache-airflow>=2.11.0"
    ok = done.returncode != 0 and expected in said and "ResolutionImpossible" in said
    detail = (
        f"pip refuses: {expected!r}" if ok else f"pip did not refuse as expected (exit {done.returncode})"
    )
    return Outcome(target, "passed" if ok else "failed", detail, "2.10.5", time.monotonic() - started)


def build(target: Target, python: str, wheel: Path, emulator: Path) -> None:
    """The target's virtualenv, rebuilt when its inputs change; the wheels installed anew each time."""
    step = Step(target)
    stamp = target.venv / ".installed"
    wanted = fingerprint(target, python)
    venv_python = target.venv / "bin" / "python"
    if not (stamp.exists() and stamp.read_text() == wanted):
        shutil.rmtree(target.venv, ignore_errors=True)
        step(python, "-m", "venv", target.venv)
        step(venv_python, "-m", "pip", "install", *PIP_FLAGS, "pip>=25.1")  # for --group
        if target.pins is not None:
            step(venv_python, "-m", "pip", "install", *PIP_FLAGS, "-r", target.pins)
        else:
            assert target.constraints is not None
            step(
                venv_python,
                "-m",
                "pip",
                "install",
                *PIP_FLAGS,
                "-c",
                target.constraints,
                "apache-airflow",
                wheel,
                emulator,
                "--group",
                f"{REPO / 'pyproject.toml'}:test",
            )
        stamp.write_text(wanted)
    else:
        step.note("virtualenv up to date")
    step(
        venv_python,
        "-m",
        "pip",
        "uninstall",
        *PIP_FLAGS,
        "--yes",
        "airflow-provider-altabots",
        "altabots-emulator",
    )
    if target.pins is not None:
        planned = keeps_airflow(step, venv_python, wheel)
        step.note(f"pip install of the wheel would install only: {planned}")
    step(venv_python, "-m", "pip", "install", *PIP_FLAGS, "--no-deps", wheel, emulator)
    step(venv_python, "-m", "pip", "check")


def suite_copy(target: Target) -> Path:
    """
    The tests, example DAGs and README in a folder without the provider's source, so that the
    tests import the provider the wheel installed, as a user's tests would.
    """
    suite = target.venv / "suite"
    shutil.rmtree(suite, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("tests", "example_dags"):
        shutil.copytree(REPO / folder, suite / folder, ignore=ignore)
    for name in ("README.md", "pyproject.toml"):
        shutil.copy2(REPO / name, suite / name)
    return suite


def run_target(target: Target, wheel: Path, emulator: Path) -> Outcome:
    python = find_python(target.python)
    if not python:
        return Outcome(target, "skipped", f"no Python {target.python} interpreter was found")
    target.log.unlink(missing_ok=True)
    started = time.monotonic()
    try:
        build(target, python, wheel, emulator)
    except (RuntimeError, subprocess.SubprocessError, OSError) as error:
        return Outcome(target, "failed", f"install: {error}", install_seconds=time.monotonic() - started)
    installed = time.monotonic()
    venv_python = target.venv / "bin" / "python"
    airflow = subprocess.run(
        [str(venv_python), "-c", "from importlib.metadata import version; print(version('apache-airflow'))"],
        text=True,
        stdout=subprocess.PIPE,
        check=False,
    ).stdout.strip()
    step = Step(target)
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")}
    done = step(
        venv_python,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        *target.tests,
        check=False,
        cwd=suite_copy(target),
        env=env,
    )
    summary = target.log.read_text().rstrip().splitlines()[-1:] or [""]
    return Outcome(
        target,
        "passed" if done.returncode == 0 else "failed",
        summary[0].strip("= "),
        airflow,
        installed - started,
        time.monotonic() - installed,
    )


def main() -> int:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    wheel, emulator = (Path(arg).resolve() for arg in sys.argv[1:3])
    for path, name in ((wheel, "airflow_provider_altabots-"), (emulator, "altabots_emulator-")):
        if not (path.is_file() and path.name.startswith(name)):
            sys.exit(f"expected a wheel {name}*.whl, got {path}")
    chosen = sys.argv[3:]
    targets = [t for t in TARGETS if not chosen or t.name in chosen]
    HOME.mkdir(exist_ok=True)
    print(f"make test-compat: {len(targets)} targets, two at a time; logs in .venv-compat/", flush=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(lambda target: run_target(target, wheel, emulator), targets))
    if not chosen:
        outcomes.append(refuses_below_floor(wheel))
    print(f"\n{'target':<22} {'Airflow':<8} {'result':<8} {'install s':>9} {'tests s':>8}  detail")
    for o in outcomes:
        print(
            f"{o.target.name:<22} {o.airflow or '-':<8} {o.status.upper():<8} "
            f"{o.install_seconds:>9.0f} {o.test_seconds:>8.0f}  {o.detail}"
        )
    for o in outcomes:
        if o.target.log.exists() and o.status != "skipped":
            for line in o.target.log.read_text(errors="replace").splitlines():
                if line.startswith("SKIPPED "):
                    print(f"{o.target.name}: {line}")
    for o in outcomes:
        if o.status == "failed":
            print(f"\n---- {o.target.name}: failures in {o.target.log.relative_to(REPO)} ----")
            lines = o.target.log.read_text(errors="replace").splitlines()
            errors = [line for line in lines if line.startswith(("E ", "FAILED ", "ERROR "))]
            print("\n".join((errors or lines)[-60:]))
    skipped = [o for o in outcomes if o.status == "skipped"]
    if skipped:
        print("\n" + "!" * 78)
        for o in skipped:
            print(f"SKIPPED {o.target.name}: {o.detail}.")
            print("  Install that Python (pyenv, uv python, or the system's package) to test it:")
            print("  make test-compat looks on PATH and in pyenv's and uv's folders.")
        print("!" * 78)
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
