"""The package metadata: an SPDX license and dependency floors that load untrusted model folders safely."""

from __future__ import annotations

import pytest
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
ROOT = Path(__file__).resolve().parents[1]


def test_license_is_an_spdx_string_and_floors_are_safe():
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
