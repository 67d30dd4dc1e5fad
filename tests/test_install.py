"""Installing into a PyTorch that is already there (a cluster's, an NGC container's): the
package declares a tested torch range, not a pin, and pip leaves an in-range torch alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from packaging.specifiers import SpecifierSet

from pretrain.planning import doctor
from pretrain.planning.doctor import TORCH_RANGE
from tests.conftest import ROOT


def test_the_declared_torch_range_admits_the_tested_releases_and_ngc_builds():
    spec = SpecifierSet(TORCH_RANGE)
    for admitted in ("2.9.0a0+145a3a7bda.nv25.10", "2.9.1", "2.11.0+cu130", "2.13.0+cpu",
                     "2.14.1+cu130", "2.15.0"):
        assert spec.contains(admitted, prereleases=True), admitted
    for refused in ("2.8.0", "2.8.0a0+5228986c39.nv25.06", "2.16.0", "3.0.0"):
        assert not spec.contains(refused, prereleases=True), refused


def test_setup_cfg_declares_the_range_the_doctor_checks():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    reqs = [r.strip() for r in cfg["options"]["install_requires"].splitlines()]
    assert f"torch{TORCH_RANGE}" in reqs


@pytest.mark.parametrize("version, level", [("2.8.0", "blocked"), ("2.16.0", "blocked"),
                                            ("2.9.1", "ok"), ("2.15.0+cu130", "ok")])
def test_doctor_blocks_a_torch_outside_the_range(monkeypatch, version, level):
    monkeypatch.setattr(doctor.torch, "__version__", version)
    [finding] = doctor._torch()
    assert finding.level == level
    assert (TORCH_RANGE in finding.why) == (level == "blocked")


@pytest.mark.slow
def test_installing_the_package_leaves_an_in_range_torch_alone(tmp_path):
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report",
                    str(report), "-e", str(ROOT)], check=True, timeout=300)
    would = [i["metadata"]["name"] for i in json.loads(report.read_text())["install"]]
    assert "torch" not in would and "looped-pretrain" in would, would
