"""The fuzz tier (`pytest -m fuzz`; in CI with Hypothesis's fixed seed, a few minutes on 2
cores): mutated checkpoint directories (records, configs, DCP metadata fields and storage
paths, links, sizes), configs and overrides, sweep specs, results CSVs, Hugging Face import
directories and CLI arguments, fed to every command that reads them. The property and its
bounds: tests/fuzz_harness.py. Each issue-33 reproduction is an explicit example."""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil

import matplotlib.pyplot  # noqa: F401 -- its first import (a font cache) is no case's time
import pytest
import torch
import yaml
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from pretrain.checkpoint.metadata import read_metadata
from pretrain.checkpoint.store import describe
from tests.conftest import ROOT, tiny_train_args
from tests.fuzz_harness import check, mutate_bytes, mutate_tree

pytestmark = pytest.mark.fuzz
# FUZZ_EXAMPLES / FUZZ_RANDOM: more cases, or a fresh seed, for a search beyond CI's
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 400)), deadline=None,
                derandomize=not os.environ.get("FUZZ_RANDOM"), database=None,
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
                suppress_health_check=list(HealthCheck))
CKPT = "checkpoints/step_0000002"


@pytest.fixture
def fresh(tmp_path_factory, monkeypatch):
    """A new directory per example, made the working directory (Hypothesis reuses a
    function's tmp_path)."""
    def make():
        root = tmp_path_factory.mktemp("ex")
        monkeypatch.chdir(root)
        return root
    return make


def _setup(tiny_run, root):
    """root/in: a copy of the 2-step run; root/victim*: what planted links point at."""
    shutil.copytree(tiny_run, root / "in")
    (root / "victim.txt").write_text("the user's file\n")
    (root / "victim_dir").mkdir()
    (root / "victim_dir/notes.txt").write_text("keep\n")
    return root / "in"


def _mutate_checkpoint(data, ckpt, root) -> str:
    """One mutation of the newest checkpoint (or of the run's metrics log); what it was (for
    the failure message)."""
    what = data.draw(st.sampled_from(["meta", "config", "metadata", "bytes", "link", "remove",
                                      "metrics"]))
    if what == "metrics":
        log = ckpt.parent.parent / "metrics.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines()]
        records[-1] = mutate_tree(data, records[-1])
        log.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif what == "meta":
        meta = json.loads((ckpt / "meta.json").read_text())
        (ckpt / "meta.json").write_text(json.dumps(mutate_tree(data, meta)))
    elif what == "config":
        tree = yaml.safe_load((ckpt / "config.yaml").read_text())
        (ckpt / "config.yaml").write_text(yaml.safe_dump(mutate_tree(data, tree)))
    elif what == "metadata":
        _mutate_metadata(data, ckpt)
    elif what == "bytes":
        name = data.draw(st.sampled_from(sorted(p.name for p in ckpt.iterdir())))
        (ckpt / name).write_bytes(mutate_bytes(data, (ckpt / name).read_bytes()))
        what += f" {name}"
    else:
        name = data.draw(st.sampled_from(sorted(p.name for p in ckpt.iterdir())))
        (ckpt / name).unlink()
        if what == "link":
            (ckpt / name).symlink_to(root / data.draw(st.sampled_from(["victim.txt",
                                                                         "victim_dir"])))
        what += f" {name}"
    return what


def _mutate_metadata(data, ckpt) -> None:
    """A field of DCP's metadata: a tensor's size or dtype, a chunk, a storage path or span --
    then, half the time, meta.json's CRC made to match (past the integrity check)."""
    md = read_metadata(ckpt / ".metadata")
    names = sorted(md.state_dict_metadata)
    entry = md.state_dict_metadata[data.draw(st.sampled_from(names))]
    numbers = st.integers(-5, 2**62) | st.sampled_from([0, 1, 10**13])
    field = data.draw(st.sampled_from(["size", "chunk", "path", "span", "dtype"]))
    if field == "size" and hasattr(entry, "size"):
        entry.size = torch.Size(data.draw(st.lists(numbers, min_size=0, max_size=3)))
    elif field == "chunk" and getattr(entry, "chunks", None):
        chunk = entry.chunks[0]
        chunk.offsets = torch.Size([data.draw(numbers) for _ in chunk.offsets])
        chunk.sizes = torch.Size([data.draw(numbers) for _ in chunk.sizes])
    elif field == "dtype" and hasattr(entry, "properties"):
        entry.properties.dtype = data.draw(st.sampled_from([torch.int8, torch.bool,
                                                             torch.float64, torch.complex64]))
    elif md.storage_data:
        key = data.draw(st.sampled_from(sorted(md.storage_data, key=str)))
        info = md.storage_data[key]
        if field == "path":
            info.relative_path = data.draw(st.sampled_from(
                ["../../victim.txt", "/etc/hostname", "__9_0.distcp", "", "meta.json"])
                | st.text(max_size=10))
        else:
            info.offset, info.length = data.draw(numbers), data.draw(numbers)
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    if data.draw(st.booleans()):
        meta = json.loads((ckpt / "meta.json").read_text())
        meta["files"][".metadata"] = describe(ckpt / ".metadata")
        (ckpt / "meta.json").write_text(json.dumps(meta))


COMMANDS = ["generate", "convert", "export", "status", "resume", "grow", "eval"]


@FUZZ
@given(data=st.data(), command=st.sampled_from(COMMANDS))
def test_mutated_checkpoints(tiny_run, fresh, data, command):
    root = fresh()
    run = _setup(tiny_run, root)
    ckpt = run / CKPT
    what = _mutate_checkpoint(data, ckpt, root)
    out = root / "out"
    argv = {"generate": ["generate", "--checkpoint", str(ckpt), "--prompt", "ab",
                         "--max-new-tokens", "2"],
            "convert": ["checkpoint", "convert", str(ckpt), "--out", str(out)],
            "export": ["export", "--checkpoint", str(ckpt), "--out", str(out)],
            "status": ["status", str(run)],
            "resume": [*tiny_train_args(run, "train.max_steps=3"), "--resume", "auto"],
            "grow": ["checkpoint", "grow", "--from", str(ckpt), "--layers", "4", "--out", str(out)],
            "eval": ["eval", "--checkpoint", str(ckpt), "--batches", "1", "--exit", "all"]}[command]
    check(argv, root, (run, out), what)


def _config_overrides():
    tree = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    return [f"{section}.{key}" for section, fields in tree.items() if isinstance(fields, dict)
            for key in fields]


KEYS = _config_overrides()


@FUZZ
@given(data=st.data())
@example(data=None)  # the billion-laughs config of issue 33 (below)
def test_mutated_configs_and_overrides(fresh, data):
    root = fresh()
    config = root / "in/config.yaml"
    config.parent.mkdir()
    if data is None:
        levels = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
            f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
        config.write_text("\n".join(levels) + "\nmodel: {num_layers: *i}\n")
        overrides = ["model.num_layers=" + "[" * 50000 + "]" * 50000]
    else:
        tree = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
        text = yaml.safe_dump(mutate_tree(data, tree))
        if data.draw(st.booleans()):
            text = mutate_bytes(data, text.encode()).decode("utf-8", "replace")
        config.write_text(text)
        values = st.text(max_size=16) | st.sampled_from(["[", "{a: *b}", "!!python/object:os.system []"])
        overrides = [f"{data.draw(st.sampled_from(KEYS) | st.text(max_size=12))}={data.draw(values)}"
                     for _ in range(data.draw(st.integers(0, 2)))]
    command = ["submit", "--config", str(config), *overrides, "--dry-run"]
    check(command, root, (root / "in",), "config")


def _base_spec():
    return {"base": str(ROOT / "configs/tiny.yaml"), "out_dir": "sweep",
            "overrides": ["train.max_steps=2"], "grid": {"model.loops": [1, 2]},
            "eval_batches": 1, "slurm": {"time": "00:10:00", "concurrent": 1}}


@FUZZ
@given(data=st.data())
@example(data=None)  # issue 33: `time: 4:00:00`, read by YAML as 14400
def test_mutated_sweep_specs(fresh, data, monkeypatch):
    import slurm.submit

    root = fresh()
    monkeypatch.setattr(slurm.submit, "sbatch", lambda *a, **k: "123")
    (root / "in").mkdir()
    if data is None:
        text = yaml.safe_dump(_base_spec()).replace("00:10:00", "4:00:00").replace("'", "")
    else:
        spec = mutate_tree(data, _base_spec())
        if isinstance(spec, dict) and isinstance(spec.get("out_dir"), str):
            # where points are written is the spec's to say; here, inside the test's directory
            spec["out_dir"] = "sweep/" + "".join(c for c in spec["out_dir"] if c.isalnum())
        text = yaml.safe_dump(spec)
    (root / "in/spec.yaml").write_text(text)
    check(["sweep", "--spec", str(root / "in/spec.yaml"), "--submit"], root,
          (root / "in", root / "sweep"), "spec")


def _results_rows():
    from pretrain.sweep.collect import COLUMNS

    return COLUMNS, [{c: "1" for c in COLUMNS} | {
        "point": str(i), "params": str(1e6 * (i + 1)), "tokens": str(2e7 * (i + 1)),
        "flops": str(1.2e14 * (i + 1)), "eval_loss": str(3 - 0.3 * i), "loops": str(1 + i % 2),
        "num_layers": str(4 // (1 + i % 2)), "run_dir": "r", "eval_data": "validation",
        "loops_sampler": "fixed"} for i in range(6)]


@settings(FUZZ, max_examples=FUZZ.max_examples * 3 // 8)  # each case fits a law and plots
@given(data=st.data(), law=st.sampled_from(["chinchilla", "iso-depth"]))
@example(data=None, law="chinchilla")  # issue 33: eval_loss nan
def test_mutated_results_csvs(fresh, data, law):
    root = fresh()
    (root / "in").mkdir()
    columns, rows = _results_rows()
    if data is None:
        rows[0]["eval_loss"] = "nan"
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            row = data.draw(st.sampled_from(rows))
            row[data.draw(st.sampled_from(columns))] = data.draw(
                st.sampled_from(["", "nan", "-inf", "0", "-1", "1e308", "x"]) | st.text(max_size=6))
        rows = rows[:data.draw(st.integers(0, len(rows)))]
    with open(root / "in/results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    if data is not None and data.draw(st.booleans()):
        raw = (root / "in/results.csv").read_bytes()
        (root / "in/results.csv").write_bytes(mutate_bytes(data, raw))
    check(["sweep", "fit", str(root / "in"), "--law", law], root, (root / "in",), "results")


@pytest.fixture(scope="module")
def hf_export(tiny_run, tmp_path_factory):
    from pretrain.cli import main

    out = tmp_path_factory.mktemp("hf") / "export"
    assert main(["export", "--checkpoint", str(tiny_run / CKPT), "--out", str(out)]) == 0
    return out


@FUZZ
@given(data=st.data())
def test_mutated_import_directories(hf_export, fresh, data):
    from safetensors.torch import load_file, save_file

    root = fresh()
    src = root / "in"
    shutil.copytree(hf_export, src)
    if data.draw(st.booleans()):
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps(mutate_tree(data, config)))
    else:
        tensors = load_file(src / "model.safetensors")
        name = data.draw(st.sampled_from(sorted(tensors)))
        change = data.draw(st.sampled_from(["drop", "dtype", "shape", "nan", "rename"]))
        t = tensors.pop(name)
        if change == "dtype":
            t = t.to(data.draw(st.sampled_from([torch.int32, torch.bool, torch.float16,
                                                torch.float8_e5m2, torch.uint8])))
        elif change == "shape":
            t = t.reshape(-1)[:data.draw(st.integers(0, t.numel()))]
        elif change == "nan":
            t = t.clone().fill_(float("nan"))
        if change != "drop":
            tensors[name + ("x" if change == "rename" else "")] = t.contiguous()
        save_file(tensors, src / "model.safetensors")
    check(["import", "--hf", str(src), "--out", str(root / "out")], root, (src, root / "out"),
          "import")


FLAGS = {"generate": ["--prompt", "--max-new-tokens", "--exit", "--loops", "--temperature",
                      "--top-p", "--stop", "--kv-cache"],
         "eval": ["--batches", "--loops", "--exit", "--prefill", "--kv-cache", "--data"],
         "export": ["--out"], "status": [], "sweep fit": ["--law", "--budget"]}
ARG_VALUES = st.sampled_from(["0", "-1", "nan", "inf", "1e400", "", "gate:0.5", "gate:nan",
                              "delta:-1", "kl:x", "full", "x" * 300, "3", "..", "/"]) | st.text(max_size=8)


@FUZZ
@given(data=st.data(), command=st.sampled_from(sorted(FLAGS)))
@example(data=None, command="generate")  # issue 33: --temperature nan and an empty prompt
def test_fuzzed_command_lines(tiny_run, fresh, data, command):
    root = fresh()
    run = _setup(tiny_run, root)
    target = {"generate": ["--checkpoint", str(run / CKPT)],
              "eval": ["--checkpoint", str(run / CKPT)], "export": ["--checkpoint", str(run / CKPT)],
              "status": [str(run)], "sweep fit": [str(root / "in")]}[command]
    if data is None:
        args = ["--prompt", "", "--temperature", "nan"]
    else:
        args = [a for _ in range(data.draw(st.integers(0, 4)))
                for a in (data.draw(st.sampled_from(FLAGS[command] or ["--x"])), data.draw(ARG_VALUES))]
        if command == "generate" and "--prompt" not in args:
            args += ["--prompt", "a", "--max-new-tokens", "2"]
        if command == "export":  # where to write is the user's to say: here, the test's
            args = [str(root / "out") if a == "--out" else a for a in args]  # directory
            args = [a for a in args if a != str(root / "out")] + ["--out", str(root / "out")]
    check([*command.split(), *target, *args], root, (run, root / "out"), "argv")
