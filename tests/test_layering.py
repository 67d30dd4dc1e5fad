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


# code that drives any loop family and so must name none (issue 35): a family is one module
FAMILY_BLIND = ("core", "parallelism", "pretrain/step_engine.py", "pretrain/model/generate.py",
                "pretrain/planning/planner.py", "pretrain/formats/hf.py")
# the registry and the interface: generic code finds a family by name through them
REGISTRY = ("pretrain.model.families", "pretrain.model.families.base")


def family_mentions(root: Path, names: set[str], modules: set[str]) -> list[str]:
    """'file:line what' for each import of a family module, string constant (docstrings aside:
    they cite papers) equal to a family's name or naming one of its modules' weights, and
    identifier equal to a family's name or module."""
    found = []
    for where in FAMILY_BLIND:
        path = root / where
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            tree = ast.parse(file.read_text())
            docs = {id(n.body[0].value) for n in ast.walk(tree)
                    if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                    and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
            for node in ast.walk(tree):
                what = None
                if (isinstance(node, ast.ImportFrom) and "families" in (node.module or "")
                        and node.module not in REGISTRY):
                    what = f"imports {node.module}"
                elif isinstance(node, ast.Import) and any("families" in a.name and a.name not in REGISTRY
                                                          for a in node.names):
                    what = "imports a family module"
                elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
                      and id(node) not in docs
                      and (node.value in names or node.value.split(".")[0] in modules)):
                    what = f"names {node.value!r}"
                elif isinstance(node, ast.Attribute) and node.attr in names | modules:
                    what = f"names .{node.attr}"
                elif isinstance(node, ast.Name) and node.id in names | modules:
                    what = f"names {node.id}"
                if what:
                    found.append(f"{file.relative_to(root)}:{node.lineno} {what}")
    return found


def _family_words() -> tuple[set[str], set[str]]:
    from pretrain.model.config import ModelConfig
    from pretrain.model.families import family_class, family_names

    names = set(family_names())
    modules = {m for n in names for m in family_class(n)(ModelConfig(loop_mode=n)).modules()}
    return names, modules


def test_the_parallel_code_names_no_loop_family():
    names, modules = _family_words()
    assert {"ouro", "flt", "huginn"} <= names and "adapter" in modules
    assert family_mentions(ROOT, names, modules) == []


def test_a_family_mention_is_caught(tmp_path):
    for where in FAMILY_BLIND:
        (tmp_path / where).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "core").mkdir(exist_ok=True)
    (tmp_path / "parallelism").mkdir(exist_ok=True)
    (tmp_path / "core/a.py").write_text('"""huginn is cited here."""\nMODES = ("lt", "x")\n')
    (tmp_path / "parallelism/b.py").write_text(
        "from pretrain.model.families.huginn import Huginn\n"
        "def f(model):\n    return model.adapter, 'adapter.weight'\n")
    for where in FAMILY_BLIND:
        if where.endswith(".py"):
            (tmp_path / where).write_text("x = 1\n")
    (tmp_path / "pretrain/planning/planner.py").write_text("def f(cfg):\n    return cfg.loop_mode == 'flt'\n")
    (tmp_path / "pretrain/formats/hf.py").write_text(  # the registry may be imported, not named
        "from pretrain.model.families import family_class\nFORMATS = {'huginn': 1}\n")
    assert family_mentions(tmp_path, {"lt", "flt", "huginn"}, {"adapter"}) == [
        "core/a.py:2 names 'lt'",
        "parallelism/b.py:1 imports pretrain.model.families.huginn",
        "parallelism/b.py:3 names .adapter", "parallelism/b.py:3 names 'adapter.weight'",
        "pretrain/planning/planner.py:2 names 'flt'", "pretrain/formats/hf.py:2 names 'huginn'"]
