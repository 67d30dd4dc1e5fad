"""Downstream evaluation through lm-eval (pretrain/downstream): local tasks offline, numbers
recomputed by hand from the model's own log-probabilities, DP=2 equal to one process, early-exit
generation equal to `pretrain generate`, the Pareto plot, the exported model through lm-eval's
own `hf` model type, and bad task input."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from pretrain.checkpoint.offline import load_model
from pretrain.cli import main
from pretrain.text import TextCodec
from pretrain.train import Trainer
from tests.conftest import ROOT, tiny_config
from tests.distributed import torchrun

lm_eval = pytest.importorskip("lm_eval")

RULES = ["all", "gate:0.5", "fixed:2", "delta:2"]


def _task_files(root):
    """A 20-item multiple-choice task (continue a line of the sample text, against pieces of
    another line and the right continuation's case swapped) and a 3-prompt
    generation task, as lm-eval YAML over local JSON-lines files."""
    lines = [ln.strip() for ln in (ROOT / "data/sample.txt").read_text().splitlines()
             if len(ln.strip()) > 60]
    mc = []
    for i in range(20):
        line, other = lines[i % len(lines)], lines[(i + 5) % len(lines)]
        cut = 30 + (i * 7) % 20
        right = line[cut:cut + 12].strip()
        wrong = [other[cut:cut + 12].strip(), other[cut + 13:cut + 25].strip(), right.swapcase()]
        choices = wrong[:i % 4] + [right] + wrong[i % 4:]
        mc.append({"question": line[:cut].rstrip(), "choices": choices, "label": i % 4})
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    gen = [{"prompt": lines[i][:40], "answer": lines[i][40:48]} for i in range(3)]
    (root / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in gen))
    common = "dataset_path: json\ntest_split: test\n"
    (root / "mc.yaml").write_text(
        f"task: local_mc\n{common}dataset_kwargs: {{data_files: {{test: {root / 'mc.jsonl'}}}}}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list: [{metric: acc}]\n")
    (root / "gen.yaml").write_text(
        f"task: local_gen\n{common}dataset_kwargs: {{data_files: {{test: {root / 'gen.jsonl'}}}}}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs: {until: ['\\n'], max_gen_toks: 6}\n"
        "metric_list: [{metric: exact_match}]\n")
    texts = [lines[0][:60], " ".join(lines[:8])]  # the second is longer than the model's context
    (root / "ppl.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (root / "ppl.yaml").write_text(
        f"task: local_ppl\n{common}dataset_kwargs: {{data_files: {{test: {root / 'ppl.jsonl'}}}}}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list: [{metric: word_perplexity}, {metric: bits_per_byte}]\n")
    return mc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny BPE model trained on shards of the sample text, and the local tasks."""
    root = tmp_path_factory.mktemp("downstream")
    sample = str(ROOT / "data/sample.txt")
    tok = root / "data/tokenizer.json"
    assert main(["data", "train-tokenizer", "--input", sample, "--vocab-size", "512",
                 "--output", str(tok)]) == 0
    for text, out in ((sample, "shards"), (str(ROOT / "data/validation.txt"), "val")):
        assert main(["data", "tokenize", "--input", text, "--tokenizer", str(tok), "--output",
                     str(root / "data" / out), "--shard-tokens", "2048", "--chunk-tokens", "256"]) == 0
    cfg = tiny_config("train.max_steps=40", "optim.warmup_steps=4", "data.source=shards",
                      f"data.sources=[{{path: {root / 'data/shards'}}}]", f"data.tokenizer={tok}",
                      f"data.validation=[{{path: {root / 'data/val'}}}]", "train.eval_every=40",
                      "train.eval_tokens=1024", "model.vocab_size=512", out_dir=root / "run")
    Trainer(cfg, log=None, tensorboard=False).fit()
    return {"root": root, "ckpt": root / "run/checkpoints/step_0000040", "mc": _task_files(root),
            "cfg": cfg}


def _eval(run, out, *args):
    return ["eval", "--checkpoint", str(run["ckpt"]), "--bootstrap-iters", "0",
            "--output", str(run["root"] / out), *args]


def _results(run, out, setting):
    return json.loads((run["root"] / out / f"results_{setting}.json").read_text())


def _exit_steps_by_hand(rule: str, gates: torch.Tensor, hs: list[torch.Tensor], loops: int):
    """Each token's 0-based exit step, restated from the rules (model/generate.py docstring):
    gate:q the first step whose cumulative exit probability reaches q; fixed:n step n;
    delta:e the first step t >= 2 with ||h_t - h_t-1|| < e; the last loop always stops."""
    kind, _, value = rule.partition(":")
    n = gates.shape[1]
    steps = []
    for i in range(n):
        stop = loops - 1
        survive, cdf = 1.0, 0.0
        for t in range(loops):
            lam = torch.sigmoid(gates[t, i].double()).item()
            cdf += lam * survive
            survive *= 1 - lam
            if (kind == "gate" and cdf >= float(value)) or (kind == "fixed" and t + 1 >= float(value)) \
                    or (kind == "delta" and t > 0 and (hs[t][i] - hs[t - 1][i]).norm() < float(value)):
                stop = t
                break
        steps.append(stop)
    return steps


def _hand_scores(model, codec, context: str, continuation: str, loops: int, rule: str):
    """log P(continuation | context) read at each token's exit step, from a plain forward of
    the model that records every step's logits, gate and hidden state."""
    ctx = codec.encode(context)
    whole = codec.encode(context + continuation)
    cont = whole[len(ctx):]
    ids = torch.tensor([whole[:-1]])
    records = []
    hooks = [model.gate.register_forward_hook(lambda m, i, o: records.append((i[0], o)))]
    with torch.no_grad():
        out = model(ids)
    for h in hooks:
        h.remove()
    logp = [F.log_softmax(out.logits[t][:, 0].float(), -1) for t in range(loops)]  # [S, V]
    gates = torch.stack([o[..., 0][:, 0] for _, o in records[:loops]])  # [R, S]
    hs = [i[:, 0].float() for i, _ in records[:loops]]
    span = range(len(whole) - 1 - len(cont), len(whole) - 1)
    steps = _exit_steps_by_hand(rule, gates[:, span], [h[span] for h in hs], loops)
    return sum(logp[s][p, whole[p + 1]].item() for s, p in zip(steps, span, strict=True)), steps


def test_multiple_choice_accuracy_is_the_hand_computed_one(run):
    from lm_eval.api.instance import Instance

    from pretrain.downstream.harness_lm import LoopedHarnessLM
    from pretrain.model.generate import ExitRule

    assert main(_eval(run, "mc", "--tasks", str(run["root"] / "mc.yaml"), "--loops", "1", "3",
                      "--exit", *RULES)) == 0
    for loops in (1, 3):
        cfg, model = load_model(run["ckpt"], [f"model.loops={loops}"] if loops != 3 else [])
        codec = TextCodec.of(cfg.data.tokenizer)
        model.eval()
        wrapper = LoopedHarnessLM(model, codec, loops, batch_size=5)
        pairs = [(doc["question"], " " + c) for doc in run["mc"] for c in doc["choices"]]
        for rule in RULES:
            hand = [_hand_scores(model, codec, q, c, loops, rule) for q, c in pairs]
            wrapper.use(loops, ExitRule.parse(rule))
            got = wrapper.loglikelihood([Instance("loglikelihood", {}, p, i, metadata=("t", i, 1))
                                         for i, p in enumerate(pairs)])
            # log-probabilities summed over a few tokens, the hand path at another batch
            # shape: fp32 rounding of log_softmax over the vocabulary, ~1e-6 per token
            assert [g[0] for g in got] == pytest.approx([h[0] for h in hand], abs=1e-4)
            correct = sum(max(range(4), key=lambda k: hand[4 * i + k][0]) == doc["label"]
                          for i, doc in enumerate(run["mc"]))
            steps = [s for _, st in hand for s in st]
            name = f"loops{loops}" + ("" if rule == "all" else f"_{rule.replace(':', '-')}")
            res = _results(run, "mc", name)
            assert res["results"]["local_mc"]["acc,none"] == pytest.approx(correct / 20, abs=1e-12)
            assert res["looped"]["mean_loops"]["local_mc"] == pytest.approx(
                sum(s + 1 for s in steps) / len(steps))
    assert 0.3 <= _results(run, "mc", "loops3")["results"]["local_mc"]["acc,none"]  # it learned
    table = (run["root"] / "mc/table.txt").read_text()
    assert re.search(r"^gate:0.5 +local_mc +[\d.]+ \([\d.]+\) +[\d.]+ \([\d.]+\)$", table, re.M)


@pytest.mark.multiproc
def test_data_parallel_evaluation_equals_one_process(run):
    tasks = f"{run['root'] / 'mc.yaml'},{run['root'] / 'gen.yaml'}"
    assert main(_eval(run, "one", "--tasks", tasks, "--loops", "2", "3", "--exit", "all",
                      "gate:0.5", "--batch-size", "3")) == 0
    torchrun(2, "-m", "pretrain.cli", *_eval(run, "dp2", "--tasks", tasks, "--loops", "2", "3",
                                             "--exit", "all", "gate:0.5", "--batch-size", "3"))
    for name in ("loops2", "loops3", "loops2_gate-0.5", "loops3_gate-0.5"):
        one, dp = _results(run, "one", name), _results(run, "dp2", name)
        assert one["results"] == dp["results"] and one["looped"] == dp["looped"]


@pytest.mark.parametrize("kv", ["full", "last", "average"])
def test_generation_task_decodes_as_pretrain_generate(run, kv, capsys):
    """generate_until: each exit rule and KV policy; the mean loops per decoded token of a
    one-prompt task is `pretrain generate`'s on that prompt with the same budget and stop."""
    out = f"gen_{kv}"
    assert main(_eval(run, out, "--tasks", str(run["root"] / "gen.yaml"), "--limit", "1",
                      "--exit", *RULES, "--kv-cache", kv)) == 0
    prompt = json.loads((run["root"] / "gen.jsonl").read_text().splitlines()[0])["prompt"]
    for rule in RULES:
        capsys.readouterr()
        assert main(["generate", "--checkpoint", str(run["ckpt"]), "--prompt", prompt, "--exit",
                     rule, "--kv-cache", kv, "--max-new-tokens", "6", "--stop", "\n"]) == 0
        said = capsys.readouterr().out
        used = float(re.search(r"per decoded token \(\S+\): ([\d.]+) of 3", said).group(1))
        name = "loops3" + ("" if rule == "all" else f"_{rule.replace(':', '-')}")
        got = _results(run, out, name)["looped"]["mean_loops"]["local_gen"]
        assert round(got, 2) == used, (rule, kv)
        text = said.splitlines()[0][len(prompt):].split("\n")[0]
        assert _results(run, out, name)["results"]["local_gen"]["exact_match,none"] == float(
            text.strip() == json.loads((run["root"] / "gen.jsonl").read_text().splitlines()[0])[
                "answer"].strip())


def test_pareto_plot_has_one_curve_per_criterion(run):
    import matplotlib.image

    assert main(_eval(run, "pareto", "--tasks", str(run["root"] / "mc.yaml"), "--loops", "1", "2",
                      "3", "--exit", "all", "gate:0.3", "gate:0.7", "fixed:1", "--limit", "5")) == 0
    curves = json.loads((run["root"] / "pareto/pareto.json").read_text())
    assert sorted(curves) == ["all", "fixed", "gate"]
    assert [round(p[0], 6) for p in curves["all"]] == [1, 2, 3]  # mean loops of each loop count
    assert [len(curves[k]) for k in ("all", "fixed", "gate")] == [3, 3, 6]
    img = matplotlib.image.imread(run["root"] / "pareto/pareto.png")[..., :3]
    assert img.shape[0] > 100 and img.shape[1] > 100
    from matplotlib.colors import to_rgb

    from pretrain.downstream.report import CURVE_COLORS
    for kind in curves:  # each curve's colour is drawn
        hit = ((img - torch.tensor(to_rgb(CURVE_COLORS[kind])).numpy()) ** 2).sum(-1) < 1e-3
        assert hit.sum() > 50, kind
    unused = ((img - torch.tensor(to_rgb(CURVE_COLORS["delta"])).numpy()) ** 2).sum(-1) < 1e-3
    assert unused.sum() == 0


def test_exported_model_through_lm_evals_hf_type_scores_as_our_wrapper(run, monkeypatch):
    """lm-eval's own `hf` model (trust_remote_code) on the export, against our wrapper at the
    export's loop count: the same loglikelihood for every request, the same accuracy."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT"):  # one process: accelerate must not look for a launcher
        monkeypatch.delenv(var, raising=False)
    from pretrain.downstream.harness_lm import LoopedHarnessLM
    from pretrain.downstream.tasks import load_tasks
    from pretrain.formats.hf import export

    hf_dir = export(run["ckpt"], run["root"] / "hf")
    tasks = load_tasks([str(run["root"] / "mc.yaml"), str(run["root"] / "ppl.yaml")])
    theirs = lm_eval.evaluator.simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},trust_remote_code=True,dtype=float32",
        tasks=list(tasks.task_dict["tasks"].values()), device="cpu", batch_size=4,
        bootstrap_iters=0, log_samples=True)
    cfg, model = load_model(run["ckpt"])
    ours = lm_eval.evaluator.evaluate(
        LoopedHarnessLM(model, TextCodec.of(cfg.data.tokenizer), cfg.model.loops, batch_size=4),
        tasks.task_dict, bootstrap_iters=0, log_samples=True)
    assert ours["results"]["local_mc"]["acc,none"] == theirs["results"]["local_mc"]["acc,none"]
    a = [s["filtered_resps"] for s in ours["samples"]["local_mc"]]
    b = [s["filtered_resps"] for s in theirs["samples"]["local_mc"]]
    assert len(a) == 20
    for x, y in zip(a, b, strict=True):
        # transformers runs the exported model (another module structure, same fp32 math)
        assert [float(v[0]) for v in x] == pytest.approx([float(v[0]) for v in y], abs=1e-4)
    # loglikelihood_rolling, one text longer than the context (several windows)
    a = [float(s["filtered_resps"][0]) for s in ours["samples"]["local_ppl"]]
    b = [float(s["filtered_resps"][0]) for s in theirs["samples"]["local_ppl"]]
    assert a == pytest.approx(b, abs=1e-3) and len(a) == 2  # sums over ~100s of tokens
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["local_ppl"][metric] == pytest.approx(
            theirs["results"]["local_ppl"][metric], rel=1e-5)


@pytest.mark.parametrize("kv", ["full", "last"])
def test_batched_generation_equals_one_request_at_a_time(run, kv):
    """Contexts of different lengths in one batch (left-padded) give the texts and loop tallies
    of batches of one: each request stops at its own stop string and counts its own tokens.
    (An untrained model: the trained tiny one answers every prompt with ' the the ...'.)"""
    from lm_eval.api.instance import Instance

    from pretrain.downstream.harness_lm import LoopedHarnessLM
    from pretrain.model.generate import ExitRule
    from pretrain.model.looped import LoopedLM

    cfg, _ = load_model(run["ckpt"])
    torch.manual_seed(0)
    model = LoopedLM(cfg.model)
    codec = TextCodec.of(cfg.data.tokenizer)
    lines = [json.loads(ln)["prompt"] for ln in (run["root"] / "gen.jsonl").read_text().splitlines()]
    contexts = [line[:n] for line in lines for n in (40, 23)]
    assert len({len(codec.encode(c)) for c in contexts}) > 2

    def generate(batch, until):
        lm = LoopedHarnessLM(model, codec, cfg.model.loops, batch_size=batch, kv_cache=kv)
        lm.use(cfg.model.loops, ExitRule.parse("gate:0.7"))
        reqs = [Instance("generate_until", {}, (c, {"until": until, "max_gen_toks": 10}), i,
                         metadata=("t", i, 1)) for i, c in enumerate(contexts)]
        return lm.generate_until(reqs), list(lm.loops_used["t"])

    texts, _ = generate(1, [])
    until = [texts[0][3:5]]  # a stop some requests meet early, others late or never
    alone, batched = generate(1, until), generate(8, until)
    assert batched == alone
    assert len(set(alone[0])) > 2 and 0 < alone[1][1] < len(contexts) * 9


def test_rolling_loglikelihood_is_the_sum_over_the_text(run):
    """A text within the context: log P(text | EOS), every token at the last loop."""
    from lm_eval.api.instance import Instance

    from pretrain.downstream.harness_lm import LoopedHarnessLM

    cfg, model = load_model(run["ckpt"])
    codec = TextCodec.of(cfg.data.tokenizer)
    text = json.loads((run["root"] / "ppl.jsonl").read_text().splitlines()[0])["text"]
    ids = [codec.eos_id, *codec.encode(text)]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids[:-1]])).logits[-1][:, 0].float(), -1)
    want = sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1))
    lm = LoopedHarnessLM(model, codec, cfg.model.loops)
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0,
                                                metadata=("t", 0, 1))])
    assert got == pytest.approx(want, abs=1e-4)  # one forward vs the harness's batches: rounding
    assert lm.loops_used["t"] == [3.0 * (len(ids) - 1), len(ids) - 1]


def test_every_setting_reads_one_scoring_of_each_request(run, monkeypatch):
    """Six settings (3 loop counts x 2 rules) over 20 items x 4 choices: 80 continuations run
    through the model once, in batches."""
    from pretrain.downstream.harness_lm import LoopedHarnessLM
    from pretrain.downstream.run import evaluate_model
    from pretrain.downstream.tasks import load_tasks
    from pretrain.model.generate import ExitRule

    batches = []
    real = LoopedHarnessLM._score_batch
    monkeypatch.setattr(LoopedHarnessLM, "_score_batch",
                        lambda self, pairs: batches.append(len(pairs)) or real(self, pairs))
    cfg, model = load_model(run["ckpt"])
    results = evaluate_model(cfg, model, load_tasks([str(run["root"] / "mc.yaml")]), [1, 2, 3],
                             [ExitRule("all"), ExitRule.parse("gate:0.5")], batch_size=16,
                             bootstrap_iters=0)
    assert len(results) == 6 and batches == [16] * 5


@pytest.mark.parametrize("spec", ["no_such_task_xyz", "broken.yaml"])
def test_bad_task_is_one_line_exit_2_before_the_model(tmp_path, spec, capsys):
    (tmp_path / "broken.yaml").write_text("task: broken\n  dataset_path: [json\n")
    task = spec if spec.startswith("no_") else str(tmp_path / spec)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "no_checkpoint_here"), "--tasks",
                 task]) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("pretrain: error:")]
    assert len(errors) == 1 and "--tasks" in errors[0], err[-2000:]
    assert ("no_such_task_xyz" in errors[0]) if spec.startswith("no_") else ("broken.yaml" in errors[0])
    assert "no_checkpoint_here" not in err  # the checkpoint was never looked at


@pytest.mark.parametrize("budget, needle", [("128", "max_gen_toks 128 must be a count from 1 to "
                                                     "below the model's max_seq_len 128"),
                                            ("0", "max_gen_toks 0"), ("'6'", "max_gen_toks '6'")])
def test_a_generation_budget_that_leaves_no_context_is_one_line(run, tmp_path, budget, needle,
                                                                capsys):
    """Issue 33: max_gen_toks reaching the context sliced the prompt to nothing (a traceback)."""
    text = (run["root"] / "gen.yaml").read_text().replace("max_gen_toks: 6", f"max_gen_toks: {budget}")
    (tmp_path / "gen.yaml").write_text(text.replace("task: local_gen", "task: local_gen_long"))
    capsys.readouterr()
    assert main(_eval(run, "gen_long", "--tasks", str(tmp_path / "gen.yaml"), "--limit", "1")) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("pretrain: error:")]
    assert len(err) == 1 and "task local_gen_long: " + needle in err[0], err
