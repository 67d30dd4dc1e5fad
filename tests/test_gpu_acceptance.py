"""bench/gpu_acceptance.sh --dry-run: the GPU lease's script runs end to end on CPU at tiny
shapes (doctor, the CUDA tier, throughput beside the planner, decoding per KV policy), so it
cannot rot between leases. Its ratios mean nothing here (a CPU against an H100's table)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.distributed import child_env


@pytest.mark.multiproc
def test_the_acceptance_script_dry_run(tmp_path):
    env = child_env(OUT=str(tmp_path), PYTHON=sys.executable)
    res = subprocess.run(["bash", str(ROOT / "bench/gpu_acceptance.sh"), "--dry-run"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads((tmp_path / "gpu_acceptance.json").read_text())
    assert got["dry_run"] and got["planner_gpu"] == "H100 SXM"
    assert "verdict:" in got["doctor"] and got["cuda_tier"]["returncode"] == 0
    assert [c["case"] for c in got["cases"]] == ["tiny ouro R=4", "tiny flt K=6"]
    for case in got["cases"]:
        assert case["tokens_per_s"] > 0 and case["predicted_tokens_per_s"] > 0
        assert 0 < case["mfu"] and 0 < case["predicted_mfu"] < 1
        assert set(case["decode_tokens_per_s"]) == {"full", "last", "average"}
    table = (tmp_path / "gpu_acceptance.txt").read_text()
    assert "decode tok/s full / last / average" in table and "tiny flt K=6" in table
