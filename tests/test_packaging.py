"""Packaging metadata that installs without setuptools' deprecation warnings."""

import tomllib
from pathlib import Path


def test_the_license_is_an_spdx_expression_with_a_setuptools_that_reads_it():
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"  # a table ({text = ...}) makes setuptools >= 77 print a page of warnings
    assert "setuptools>=77" in project["build-system"]["requires"]  # the first setuptools that reads SPDX license strings
