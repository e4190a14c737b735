"""
The sdist and the wheel a release would upload, and the README as a package index renders it.

The distributions are built here, from the working tree, the way ``make dist`` builds them (about
two seconds), so these tests never read a stale ``dist/``.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from email.message import Message
from email.parser import Parser
from pathlib import Path
from urllib.parse import urlsplit

import altabots_emulator
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import airflow_provider_altabots
from tests.conftest import REPO

PACKAGE = "airflow_provider_altabots"
VERSION = airflow_provider_altabots.__version__
EMULATOR = REPO / "emulator"
EMULATOR_PACKAGE = "altabots_emulator"
EMULATOR_VERSION = altabots_emulator.__version__
REPOSITORY = "https://github.com/airflow-provider-altabots/airflow-provider-altabots"

# What only the test suite needs, and what only the developers need.
TEST_ONLY = {"pytest", "pytest-mock", "jsonschema", "hypothesis"}
DEV_ONLY = {"ruff", "mypy", "types-requests", "build", "twine"}

CLASSIFIERS = {
    "Framework :: Apache Airflow",
    "Framework :: Apache Airflow :: Provider",
    "Programming Language :: Python :: 3 :: Only",
    "Programming Language :: Python :: 3.11",
    "Programming Language :: Python :: 3.12",
    "Programming Language :: Python :: 3.13",
    "Development Status :: 4 - Beta",
    "Typing :: Typed",
}
PROJECT_URLS = {
    "Source": REPOSITORY,
    "Changelog": f"{REPOSITORY}/blob/main/CHANGELOG.md",
    "Issues": f"{REPOSITORY}/issues",
    "Documentation": f"{REPOSITORY}#readme",
}


# --- the distributions ---------------------------------------------------------------------------


class Dists:
    def __init__(self, directory: Path, package: str = PACKAGE, version: str = VERSION):
        (self.sdist,) = directory.glob("*.tar.gz")
        (self.wheel,) = directory.glob("*.whl")
        with tarfile.open(self.sdist) as tar:
            self.sdist_names = tar.getnames()
            self.sdist_files = {
                name: tar.extractfile(name).read()
                for name in self.sdist_names
                if tar.getmember(name).isfile()
            }
        with zipfile.ZipFile(self.wheel) as whl:
            self.wheel_names = whl.namelist()
            self.wheel_files = {name: whl.read(name) for name in self.wheel_names}
        self.dist_info = f"{package}-{version}.dist-info"
        self.sdist_root = f"{package}-{version}"

    def metadata(self, kind: str) -> Message:
        raw = (
            self.wheel_files[f"{self.dist_info}/METADATA"]
            if kind == "wheel"
            else self.sdist_files[f"{self.sdist_root}/PKG-INFO"]
        )
        return Parser().parsestr(raw.decode())


def build(source: Path, out: Path) -> Path:
    if importlib.util.find_spec("build") is None:
        pytest.skip("building the distributions needs the dev dependency group (pip install --group dev)")
    # Without isolation: the setuptools installed beside the tests, as make dist does. The build
    # frontend still refuses to build when pyproject's build requirements are not met.
    done = subprocess.run(
        [sys.executable, "-m", "build", "--quiet", "--no-isolation", "--outdir", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"python -m build failed:\n{done.stdout}\n{done.stderr}"
    return out


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    return Dists(build(REPO, tmp_path_factory.mktemp("dist")))


@pytest.fixture(scope="module")
def emulator_dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    return Dists(
        build(EMULATOR, tmp_path_factory.mktemp("dist-emulator")), EMULATOR_PACKAGE, EMULATOR_VERSION
    )


def test_distributions_are_named_for_the_version(dists: Dists):
    assert dists.sdist.name == f"{PACKAGE}-{VERSION}.tar.gz"
    assert dists.wheel.name == f"{PACKAGE}-{VERSION}-py3-none-any.whl"


def test_license_and_notice_are_in_both_distributions(dists: Dists):
    for name in ("LICENSE", "NOTICE"):
        text = (REPO / name).read_bytes()
        assert dists.sdist_files.get(f"{dists.sdist_root}/{name}") == text, f"{name} missing from the sdist"
        assert dists.wheel_files.get(f"{dists.dist_info}/licenses/{name}") == text, (
            f"{name} missing from the wheel's .dist-info/licenses/"
        )


def test_license_is_the_apache_license():
    text = (REPO / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n")
    assert "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert text.rstrip().endswith("limitations under the License.")
    notice = (REPO / "NOTICE").read_text()
    assert notice.startswith(
        "airflow-provider-altabots\nCopyright 2026 The airflow-provider-altabots contributors"
    )


def test_wheel_holds_only_the_package_and_its_metadata(dists: Dists):
    outside = [
        name for name in dists.wheel_names if not name.startswith((f"{PACKAGE}/", f"{dists.dist_info}/"))
    ]
    assert outside == []
    source = {
        path.relative_to(REPO).as_posix()
        for path in (REPO / PACKAGE).rglob("*")
        if path.is_file() and (path.suffix == ".py" or path.name == "py.typed")
    }
    in_wheel = {name for name in dists.wheel_names if name.startswith(f"{PACKAGE}/")}
    assert in_wheel == source
    assert not [name for name in in_wheel if "emulator" in name], "the emulator is a distribution of its own"
    # Airflow's provider entry point, and no command: the emulator's is in its own distribution.
    entry_points = dists.wheel_files[f"{dists.dist_info}/entry_points.txt"].decode()
    assert entry_points.split() == [
        "[apache_airflow_provider]",
        "provider_info",
        "=",
        f"{PACKAGE}.get_provider_info:get_provider_info",
    ]


def test_sdist_holds_the_package_and_the_project_files(dists: Dists):
    top = {name.removeprefix(f"{dists.sdist_root}/").split("/")[0] for name in dists.sdist_names}
    top.discard(dists.sdist_root)
    assert top == {
        PACKAGE,
        f"{PACKAGE}.egg-info",
        "CHANGELOG.md",
        "LICENSE",
        "MANIFEST.in",
        "NOTICE",
        "PKG-INFO",
        "README.md",
        "pyproject.toml",
        "setup.cfg",
    }


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_metadata_declares_license_version_classifiers_and_urls(dists: Dists, kind: str):
    meta = dists.metadata(kind)
    assert meta["Version"] == VERSION
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE", "NOTICE"]
    assert meta["License"] is None
    classifiers = set(meta.get_all("Classifier") or [])
    assert not [c for c in classifiers if c.startswith("License ::")], "a license expression stands alone"
    assert classifiers >= CLASSIFIERS, sorted(CLASSIFIERS - classifiers)
    urls = dict(url.split(", ", 1) for url in meta.get_all("Project-URL") or [])
    assert urls == PROJECT_URLS
    assert meta["Description-Content-Type"] == "text/markdown"
    assert meta.get_payload() == (REPO / "README.md").read_text()


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_requirements_keep_test_and_dev_tools_out_of_the_runtime(dists: Dists, kind: str):
    meta = dists.metadata(kind)
    requirements = [Requirement(line) for line in meta.get_all("Requires-Dist") or []]
    runtime = {
        canonicalize_name(req.name)
        for req in requirements
        if req.marker is None or req.marker.evaluate({"extra": ""})
    }
    test_extra = {
        canonicalize_name(req.name)
        for req in requirements
        if req.marker is not None and req.marker.evaluate({"extra": "test"})
    } - runtime
    everything = {canonicalize_name(req.name) for req in requirements}
    assert "apache-airflow" in runtime
    assert not runtime & (TEST_ONLY | DEV_ONLY), "test or developer tools among the runtime requirements"
    assert sorted(meta.get_all("Provides-Extra") or []) == ["openlineage"]
    openlineage_extra = {
        canonicalize_name(req.name)
        for req in requirements
        if req.marker is not None and req.marker.evaluate({"extra": "openlineage"})
    } - runtime
    assert openlineage_extra == {"apache-airflow-providers-openlineage"}
    assert test_extra == set()
    assert not everything & (TEST_ONLY | DEV_ONLY | {"altabots-emulator"}), (
        "test and developer tools belong to the test and dev dependency groups"
    )


# --- the emulator's distribution -----------------------------------------------------------------


def test_emulator_wheel_holds_the_emulator_its_command_and_its_pytest_plugin(emulator_dists: Dists):
    d = emulator_dists
    assert d.wheel.name == f"{EMULATOR_PACKAGE}-{EMULATOR_VERSION}-py3-none-any.whl"
    source = {
        path.relative_to(EMULATOR).as_posix()
        for path in (EMULATOR / EMULATOR_PACKAGE).rglob("*")
        if path.is_file() and (path.suffix == ".py" or path.name == "py.typed")
    }
    assert {name for name in d.wheel_names if not name.startswith(f"{d.dist_info}/")} == source
    entry_points = d.wheel_files[f"{d.dist_info}/entry_points.txt"].decode()
    assert "[console_scripts]\naltabots-emulator = altabots_emulator.cli:main" in entry_points
    assert "[pytest11]\naltabots_emulator = altabots_emulator.pytest_plugin" in entry_points
    assert d.wheel_files[f"{d.dist_info}/licenses/LICENSE"] == (REPO / "LICENSE").read_bytes()
    meta = d.metadata("wheel")
    requirements = {canonicalize_name(Requirement(line).name) for line in meta.get_all("Requires-Dist") or []}
    assert requirements == {"aiohttp", "httpx"}, "the emulator needs neither the provider nor Airflow"
    assert meta.get_payload() == (EMULATOR / "README.md").read_text()


def imported_modules(package: Path) -> set[str]:
    """Every module a package's source imports, at any level of its code."""
    found = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
    return found


def test_the_provider_and_the_emulator_import_nothing_of_each_other():
    emulator_imports = imported_modules(EMULATOR / EMULATOR_PACKAGE)
    provider_imports = imported_modules(REPO / PACKAGE)
    assert emulator_imports
    assert provider_imports
    assert not [m for m in emulator_imports if m.split(".")[0] == PACKAGE]
    assert not [m for m in provider_imports if m.split(".")[0] == EMULATOR_PACKAGE]


def test_distributions_pass_twine_check_strict(dists: Dists):
    if importlib.util.find_spec("twine") is None:
        pytest.skip("twine comes with the dev dependency group (pip install --group dev)")
    done = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(dists.sdist), str(dists.wheel)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- the version, written once -------------------------------------------------------------------


def test_version_is_written_once():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": f"{PACKAGE}.__version__"}
    init = (REPO / PACKAGE / "__init__.py").read_text()
    assert re.findall(r"^__version__ = \"([^\"]+)\"$", init, re.MULTILINE) == [VERSION]


def test_changelog_starts_with_this_version():
    headings = re.findall(r"^## (\S+)", (REPO / "CHANGELOG.md").read_text(), re.MULTILINE)
    assert headings, "CHANGELOG.md lists no version"
    assert headings[0] == VERSION


# --- README links --------------------------------------------------------------------------------

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.DOTALL)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_USE = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\[([^\[\]]*)\]")
DEFINITION = re.compile(r"^ {0,3}\[([^\[\]]+)\]:[ \t]*<?([^\s>]+)>?(?:[ \t]+.*)?$", re.MULTILINE)
AUTOLINK = re.compile(r"<((?:https?|mailto):[^>\s]+)>")
HTML_LINK = re.compile(r"\b(?:href|src)\s*=\s*[\"']([^\"']*)[\"']", re.IGNORECASE)
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", re.MULTILINE)


def without_code(markdown: str) -> str:
    """The text outside fenced code blocks and code spans, where links are links."""
    return CODE_SPAN.sub("", FENCE.sub("", markdown))


def heading_anchors(markdown: str) -> set[str]:
    """The ids GitHub gives a document's headings: lowercased, punctuation but '-' and '_' dropped,
    spaces made hyphens, and a repeated one suffixed -1, -2..."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for title in HEADING.findall(FENCE.sub("", markdown)):
        text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", title).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def readme_links(markdown: str) -> list[str]:
    text = without_code(markdown)
    definitions = {label.lower(): url for label, url in DEFINITION.findall(text)}
    links = list(INLINE_LINK.findall(text))
    for label, ref in REFERENCE_USE.findall(DEFINITION.sub("", text)):
        key = (ref or label).lower()
        assert key in definitions, f"README link [{label}][{ref}] has no definition"
        links.append(definitions[key])
    links += definitions.values()
    links += AUTOLINK.findall(text) + HTML_LINK.findall(text)
    return links


def test_link_parser_sees_every_kind_of_link():
    sample = (
        "[a](one.md) ![b](img.png) [c][ref] [d][] <https://example.org/x>\n"
        '<a href="page.html">e</a> `[not](a-link.md)`\n'
        "```\n[not](inside-a-fence.md)\n```\n"
        "[ref]: https://example.org/ref\n[d]: #section\n"
    )
    assert sorted(readme_links(sample)) == sorted(
        [
            "one.md",
            "img.png",
            "https://example.org/ref",
            "#section",
            "https://example.org/ref",
            "#section",
            "https://example.org/x",
            "page.html",
        ]
    )
    headings = "# Waiting, retries and resuming\n## `AltaBotsHook` and x\n## 1. A-b\n## A-b\n"
    assert heading_anchors(headings) == {
        "waiting-retries-and-resuming",
        "altabotshook-and-x",
        "1-a-b",
        "a-b",
    }


def test_readme_links_resolve_on_a_package_index():
    readme = (REPO / "README.md").read_text()
    anchors = heading_anchors(readme)
    links = readme_links(readme)
    assert links, "no link found in README.md: the parser is broken"
    problems = []
    for link in links:
        if link.startswith("#"):
            if link[1:] not in anchors:
                problems.append(f"{link}: no such heading in README.md")
            continue
        parts = urlsplit(link)
        if not parts.scheme:
            problems.append(f"{link}: a relative link does not resolve on a package index")
            continue
        if link != REPOSITORY and not link.startswith((f"{REPOSITORY}/", f"{REPOSITORY}#")):
            continue  # another site
        path = parts.path.removeprefix(urlsplit(REPOSITORY).path).strip("/")
        if not path:
            continue  # the repository's front page
        kind, _, relative = path.partition("/main/")
        if kind not in ("blob", "tree") or not relative:
            problems.append(f"{link}: a repository link is /blob/main/<file> or /tree/main/<folder>")
            continue
        target = REPO / relative
        if kind == "blob" and not target.is_file():
            problems.append(f"{link}: {relative} is not a file of the repository")
        elif kind == "tree" and not target.is_dir():
            problems.append(f"{link}: {relative} is not a folder of the repository")
        elif (
            parts.fragment
            and target.suffix == ".md"
            and parts.fragment not in heading_anchors(target.read_text())
        ):
            problems.append(f"{link}: no such heading in {relative}")
    assert not problems, "README.md links that break on a package index:\n" + "\n".join(problems)
