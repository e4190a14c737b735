"""
Resolve the pinned set of packages each older Airflow line is tested with (``make constraints``).

An unpinned install of an older Airflow resolves to dependencies released after it, which break
Airflow itself (a pydantic error on 3.2.2, SQLAlchemy 2.1 failing 3.1.8's ``db migrate``). So
each line is resolved as its users got it: pip considers only packages uploaded before a day
after the release (``--uploaded-prior-to``; the index must publish upload times). Then this
provider, the emulator and the ``test`` dependency group are added on top of that set without
moving any of its pins: the provider's own floor (``apache-airflow-providers-common-compat``) is
newer than some of these releases.

Writes ``constraints/airflow-<line>.txt``; each file is installed as it is
(``pip install -r``) by ``make test-compat``. Python 3.11, the interpreter ``make test`` prefers.

Usage: ``python scripts/constraints.py [LINE ...]`` (default: every line).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "constraints"

#: line -> (what a user of that line installs, packages uploaded before this instant).
#: Airflow 3.0 builds connection forms only where Flask-AppBuilder is installed (the FAB
#: provider, which 3.0 deployments use for their auth manager), so 3.0 includes it.
LINES: dict[str, tuple[str, str]] = {
    "2.11": ("apache-airflow==2.11.2", "2026-03-15T18:00:00Z"),
    "3.0": ("apache-airflow[fab]==3.0.6", "2025-08-30T16:00:00Z"),
    "3.1": ("apache-airflow==3.1.8", "2026-03-12T19:30:00Z"),
    "3.2": ("apache-airflow==3.2.2", "2026-05-30T05:30:00Z"),
}

#: Packages the provider pins above the release's own set (the common-compat floor).
REPINNED = ("apache-airflow-providers-common-compat",)


def run(*args: str | Path) -> str:
    print("+", " ".join(str(a) for a in args), flush=True)
    return subprocess.run([str(a) for a in args], check=True, text=True, stdout=subprocess.PIPE).stdout


def resolve(line: str, python: str) -> Path:
    requirement, cutoff = LINES[line]
    with tempfile.TemporaryDirectory(prefix=f"constraints-{line}-") as tmp:
        venv = Path(tmp, "venv")
        run(python, "-m", "venv", venv)
        pip = (venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check")
        run(*pip, "install", "--quiet", "pip>=25.3")  # the first pip with --uploaded-prior-to
        run(*pip, "install", "--quiet", "--uploaded-prior-to", cutoff, requirement)
        base = Path(tmp, "base.txt")
        frozen = run(*pip, "freeze").splitlines()
        base.write_text("\n".join(pin for pin in frozen if pin.split("==")[0].lower() not in REPINNED) + "\n")
        run(
            *pip,
            "install",
            "--quiet",
            "-c",
            base,
            REPO,
            REPO / "emulator",
            "--group",
            f"{REPO}/pyproject.toml:test",
        )
        pins = [
            pin
            for pin in run(*pip, "freeze", "--exclude-editable").splitlines()
            if not pin.lower().startswith(("airflow-provider-altabots", "altabots-emulator", "-e "))
        ]
    OUT.mkdir(exist_ok=True)
    target = OUT / f"airflow-{line}.txt"
    target.write_text(
        f"# {requirement} with everything it needs, from packages uploaded before {cutoff}, plus\n"
        "# the requirements of this provider, of the emulator and of the test group. Python 3.11.\n"
        "# Installed by make test-compat; regenerate with: make constraints\n" + "\n".join(pins) + "\n"
    )
    print(f"wrote {target.relative_to(REPO)}: {len(pins)} pins")
    return target


def main() -> None:
    lines = sys.argv[1:] or list(LINES)
    unknown = [line for line in lines if line not in LINES]
    if unknown:
        sys.exit(f"unknown Airflow line(s) {', '.join(unknown)}; known: {', '.join(LINES)}")
    python = subprocess.run(
        [str(REPO / "scripts" / "find-python"), "3.11"], text=True, stdout=subprocess.PIPE, check=False
    ).stdout.strip()
    if not python:
        sys.exit("Python 3.11 was not found; the constraints are resolved with it.")
    for line in lines:
        resolve(line, python)


if __name__ == "__main__":
    main()
