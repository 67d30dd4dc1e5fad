"""bench/gpu_acceptance: the GPU lease's script. Its dry run goes end to end on CPU at tiny
shapes (doctor, the CUDA tier, throughput beside the planner, decoding per KV policy), so it
cannot rot between leases -- its ratios mean nothing here (a CPU against an H100's table);
and what keeps a short lease's results: budgets that fit, timeouts caught, rows kept."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import gpu_acceptance as acc
from tests.conftest import ROOT
from tests.distributed import child_env


@pytest.mark.multiproc
def test_the_acceptance_script_dry_run(tmp_path):
    """Also: a part past its budget is a row saying so, and the run goes on."""
    env = child_env(OUT=str(tmp_path), PYTHON=sys.executable)
    res = subprocess.run(["bash", str(ROOT / "bench/gpu_acceptance.sh"), "--dry-run",
                          "--budget", "case=600"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads((tmp_path / "gpu_acceptance.json").read_text())
    assert got["dry_run"] and got["planner_gpu"] == "H100 SXM"
    assert "verdict:" in got["doctor"]["text"] and got["cuda_tier"]["returncode"] == 0
    assert list(got["cases"]) == ["tiny ouro R=4", "tiny flt K=6"]
    for case in got["cases"].values():
        assert case["tokens_per_s"] > 0 and case["predicted_tokens_per_s"] > 0
        assert 0 < case["mfu"] and 0 < case["predicted_mfu"] < 1 and case["timed_steps"] >= 1
        assert set(case["decode_tokens_per_s"]) == {"full", "last", "average"}
    table = (tmp_path / "gpu_acceptance.txt").read_text()
    assert "decode tok/s full / last / average" in table and "tiny flt K=6" in table


def test_the_budgets_fit_a_short_lease():
    """15 minutes of device time, all tries together: the run must fit 8 (the shell's limit),
    so a rerun still fits; the parts' budgets add up to less, with room to start Python."""
    total = acc.BUDGETS["doctor"] + acc.BUDGETS["cuda tier"] + len(acc.CASES) * acc.BUDGETS["case"]
    assert total <= 450
    assert "timeout 480 " in (ROOT / "bench/gpu_acceptance.sh").read_text()


def test_a_part_past_its_budget_is_one_line_not_a_lost_run():
    row = acc.child([sys.executable, "-c", "import time; time.sleep(30)"], 0.5)
    assert row == {"error": "timed out after 0.5 s (its budget)"}
    row = acc.child([sys.executable, "-c", "raise SystemExit('out of memory')"], 30)
    assert row == {"error": "exit 1: out of memory"}


def test_each_part_is_written_as_it_finishes(tmp_path, monkeypatch):
    """A run cut short (the lease ends, a hang past the shell's limit) keeps every part that
    finished: the JSON is rewritten after each."""
    parts = iter([{"text": "verdict: ready", "status": 0}, {"returncode": 0, "summary": ["1 passed"]},
                  {"tokens_per_s": 1.0}])

    def fake_child(cmd, budget_s):
        row = next(parts, None)
        if row is None:
            raise KeyboardInterrupt  # the lease ends during the second case
        return row

    monkeypatch.setattr(acc, "child", fake_child)
    monkeypatch.setattr(acc, "_row_line", lambda name, r: name)
    out = tmp_path / "r.json"
    with pytest.raises(KeyboardInterrupt):
        acc.main(["--dry-run", "--out", str(out)])
    got = json.loads(out.read_text())
    assert got["doctor"]["status"] == 0 and got["cuda_tier"]["summary"] == ["1 passed"]
    assert got["cases"] == {"tiny ouro R=4": {"tokens_per_s": 1.0}}


def test_a_bad_budget_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        acc.main(["--dry-run", "--out", "x.json", "--budget", "cases=1"])
    assert exc.value.code == 2
    assert "PART=SECONDS" in capsys.readouterr().err
