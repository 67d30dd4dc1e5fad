"""Installing into a PyTorch that is already there (a cluster's, an NGC container's): the
package declares a tested torch range, not a pin, and pip leaves an in-range torch alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from packaging.specifiers import SpecifierSet

from pretrain.doctor import tested_torch
from tests.conftest import ROOT


def test_the_declared_torch_range_admits_the_tested_release_and_ngc_builds():
    spec = SpecifierSet(tested_torch())
    for admitted in ("2.13.0", "2.13.0+cpu", "2.14.1+cu130", "2.13.0a0+5228986c39.nv25.10"):
        assert spec.contains(admitted, prereleases=True), admitted
    for refused in ("2.12.1", "2.15.0", "3.0.0"):
        assert not spec.contains(refused, prereleases=True), refused


@pytest.mark.slow
def test_installing_the_package_leaves_an_in_range_torch_alone(tmp_path):
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report",
                    str(report), "-e", str(ROOT)], check=True, timeout=300)
    would = [i["metadata"]["name"] for i in json.loads(report.read_text())["install"]]
    assert "torch" not in would and "looped-pretrain" in would, would
