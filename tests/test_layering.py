"""Imports run one way: the ground floor (core/) imports nothing of ours; the lower floors
(parallelism/, data_pipeline/, slurm/) import only core/ and each other, never pretrain/."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

OURS = ("core", "parallelism", "data_pipeline", "slurm", "pretrain")
ALLOWED = {"core": {"core"}, "parallelism": {"core", "parallelism"},
           "data_pipeline": {"core", "data_pipeline"}, "slurm": {"core", "slurm"}}


def back_imports(root: Path) -> list[str]:
    """'file:line imports module' for every import that runs up a floor."""
    bad = []
    for package, allowed in ALLOWED.items():
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                for name in names:
                    top = name.split(".")[0]
                    if top in OURS and top not in allowed:
                        bad.append(f"{path.relative_to(root)}:{node.lineno} imports {name}")
    return bad


def test_imports_run_one_way():
    assert back_imports(ROOT) == []


def test_a_back_import_is_caught(tmp_path):
    for package in ALLOWED:
        (tmp_path / package).mkdir()
    (tmp_path / "parallelism/pipeline.py").write_text(
        "import torch\n\ndef f():\n    from pretrain.model.looped import LoopedLM\n")
    (tmp_path / "core/ok.py").write_text("import yaml\n")
    assert back_imports(tmp_path) == ["parallelism/pipeline.py:4 imports pretrain.model.looped"]
