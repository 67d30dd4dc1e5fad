"""Issue 33: no pickle reaches an unrestricted unpickler anywhere in the package. The one
allow-listed reader is pretrain/checkpoint/metadata.py (DCP's `.metadata` through an
allow-list, bytes entries through `torch.load(weights_only=True)`); every DCP load goes through
its reader and planner."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("core", "parallelism", "data_pipeline", "slurm", "pretrain", "bench")
ALLOW_LISTED = "pretrain/checkpoint/metadata.py"
UNPICKLERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
UNSAFE_YAML = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def unpickling_sites(root: Path) -> list[str]:
    """'file:line what' for each way a file could unpickle untrusted bytes."""
    bad = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = str(path.relative_to(root))
            for node in ast.walk(ast.parse(path.read_text())):
                where = f"{rel}:{getattr(node, 'lineno', 0)}"
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                    hit = {n.split(".")[0] for n in names} & UNPICKLERS
                    if hit and rel != ALLOW_LISTED:
                        bad.append(f"{where} imports {sorted(hit)[0]}")
                if not isinstance(node, ast.Call):
                    continue
                name = _dotted(node.func)
                if _keyword(node, "weights_only") is False:
                    bad.append(f"{where} passes weights_only=False")
                if name.endswith("torch.load") and _keyword(node, "weights_only") is not True:
                    bad.append(f"{where} calls torch.load without weights_only=True")
                if name in ("np.load", "numpy.load") and _keyword(node, "allow_pickle") is True:
                    bad.append(f"{where} calls {name} with allow_pickle")
                if name.startswith("yaml.") and name.split(".")[-1] in UNSAFE_YAML:
                    bad.append(f"{where} calls {name} (not safe_load)")
                if name.endswith(("dcp.load", "checkpoint.load")) and not (
                        _dotted(getattr(_keyword(node, "storage_reader"), "func", None)
                                ).endswith("SafeReader")
                        and _dotted(getattr(_keyword(node, "planner"), "func", None)
                                    ).endswith("SafeLoadPlanner")):
                    bad.append(f"{where} calls {name} without SafeReader and SafeLoadPlanner")
                if name.endswith("load_checkpoint"):  # DeepSpeed's: torch.load of whole pickles
                    bad.append(f"{where} calls {name}")
    return bad


def test_nothing_unpickles_outside_the_allow_listed_reader():
    assert unpickling_sites(ROOT) == []


def test_the_scan_finds_each_way_in(tmp_path):
    (tmp_path / "pretrain/checkpoint").mkdir(parents=True)
    for package in PACKAGES[:-1]:
        (tmp_path / package).mkdir(exist_ok=True)
    (tmp_path / "bench").mkdir()
    (tmp_path / ALLOW_LISTED).write_text("import pickle\n")  # the reader itself: allowed
    (tmp_path / "pretrain/bad.py").write_text(
        "import torch, yaml\nimport numpy as np\nfrom pickle import loads\n"
        "import torch.distributed.checkpoint as dcp\n"
        "torch.load(f)\ntorch.load(f, weights_only=False)\ntorch.load(f, weights_only=True)\n"
        "yaml.load(s)\nyaml.safe_load(s)\nnp.load(f, allow_pickle=True)\n"
        "dcp.load(sd, storage_reader=dcp.FileSystemReader(p))\n"
        "dcp.load(sd, storage_reader=SafeReader(p), planner=SafeLoadPlanner())\n"
        "engine.load_checkpoint(d)\n")
    found = unpickling_sites(tmp_path)
    assert found == ["pretrain/bad.py:3 imports pickle",
                     "pretrain/bad.py:5 calls torch.load without weights_only=True",
                     "pretrain/bad.py:6 passes weights_only=False",
                     "pretrain/bad.py:6 calls torch.load without weights_only=True",
                     "pretrain/bad.py:8 calls yaml.load (not safe_load)",
                     "pretrain/bad.py:10 calls np.load with allow_pickle",
                     "pretrain/bad.py:11 calls dcp.load without SafeReader and SafeLoadPlanner",
                     "pretrain/bad.py:13 calls engine.load_checkpoint"], found
