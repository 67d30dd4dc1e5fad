"""Issue 25 item 9: slurm/local_cluster.sh on a shared machine. Its directory must be the
caller's own (another user's could hand it a munge key and a list of PIDs to kill), and `stop`
kills only this user's munged/slurmctld/slurmd, whatever the PID list says. No SLURM needed:
these are the checks that run before any daemon starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = str(ROOT / "slurm/local_cluster.sh")


def _stop(d) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT, "stop", str(d)], capture_output=True, text=True,
                          timeout=60)


def test_stop_kills_only_the_daemons_it_started(tmp_path):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        d = tmp_path / "cluster"
        d.mkdir()
        (d / "pids").write_text(f"{bystander.pid}\n")  # a stale list: the PID was reused
        assert _stop(d).returncode == 0
        assert bystander.poll() is None and not (d / "pids").exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_a_directory_that_is_a_symlink_is_refused(tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    (tmp_path / "cluster").symlink_to(real)
    res = _stop(tmp_path / "cluster")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "is not a directory owned by" in res.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory another user owns needs root")
def test_another_users_directory_is_refused(tmp_path):
    d = tmp_path / "cluster"
    d.mkdir()
    os.chown(d, 65534, 65534)  # nobody
    res = _stop(d)
    assert res.returncode == 2 and "is not a directory owned by" in res.stderr, res.stderr
