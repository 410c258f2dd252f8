"""The package metadata: an SPDX license, dependency floors that load untrusted model folders safely, and source
that parses under the oldest Python the package supports."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def test_license_is_an_spdx_string_and_floors_are_safe():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    floors = {}
    for line in project["dependencies"]:
        requirement = Requirement(line)
        floors[requirement.name] = min((Version(s.version) for s in requirement.specifier if s.operator == ">="),
                                       default=None)
    assert floors["diffusers"] >= Version("0.38")  # refuses a model folder's custom code without trust_remote_code
    assert floors["transformers"] >= Version("4.52")  # torch files only with a torch whose weights_only is safe
    assert floors["torch"] >= Version("2.10")


def oldest_python() -> tuple[int, int]:
    """(major, minor) of pyproject's `requires-python = ">=X.Y"` (read without tomllib, which 3.10 lacks)."""
    found = re.search(r'^requires-python\s*=\s*">=\s*(\d+)\.(\d+)', (ROOT / "pyproject.toml").read_text(), re.M)
    assert found, "pyproject.toml names no requires-python floor"
    return int(found[1]), int(found[2])


def tracked_python_files() -> list[Path]:
    """Every .py file git tracks here; outside a git checkout, every .py file outside hidden and virtual-env folders."""
    try:
        listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--", "*.py"], capture_output=True,
                                check=True, timeout=60).stdout.decode().split("\0")
        return [ROOT / name for name in listed if name]
    except (OSError, subprocess.SubprocessError):
        skip = lambda path: any(part.startswith(".") or part in {"venv", "build", "dist"}  # noqa: E731
                                for part in path.relative_to(ROOT).parts[:-1])
        return [path for path in ROOT.rglob("*.py") if not skip(path)]


def test_every_python_file_parses_under_the_oldest_supported_python():
    floor = oldest_python()
    assert floor >= (3, 8)  # ast's feature_version reaches back to 3.7 only
    files = tracked_python_files()
    assert any(path.name == "pipeline.py" for path in files) and any(path.parent.name == "benchmarks" for path in files)
    failures = []
    for path in files:
        try:
            ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=floor)
        except SyntaxError as error:
            failures.append(f"{path.relative_to(ROOT)}:{error.lineno}: {error.msg}")
    assert not failures, f"syntax newer than Python {floor[0]}.{floor[1]}:\n" + "\n".join(failures)
