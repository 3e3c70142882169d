"""lm-evaluation-harness integration (`--model adainfer`), offline on a tiny random Llama and local tasks.

References are independent of our code path: the harness's own `--model hf` on the stock model, and on the stock
model cut to k layers (the logit lens at k equals the truncated model's logits).
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-eval (the 'eval' extra) is installed only in the 'newest' CI environment: its dependency "
    "datasets needs tqdm >= 4.62.1 and pyarrow NumPy >= 2, above the 'lowest' pins")

from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from adainfer_hf import AdaInferLlamaForCausalLM, ExitClassifier, GapThresholdRule, ScriptedExit  # noqa: E402
from adainfer_hf.integrations import lm_eval as harness  # noqa: E402
from adainfer_hf.integrations.lm_eval import model as harness_model  # noqa: E402
from adainfer_hf.integrations.lm_eval import stats as harness_stats  # noqa: E402

LAYERS = 4
WORDS = [f"w{i}" for i in range(5, 120)]
CHOICES = ["w10 w11", "w12", "w13 w14 w15"]  # multi-token choices: scored from every continuation position

MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{input}}}} A:"
doc_to_choice: {choices}
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{input}}}} A:"
doc_to_target: "{{{{output}}}}"
generation_kwargs:
  until: ["</s>"]
  max_gen_toks: 5
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def _tiny_tokenizer():
    """A word-level tokenizer ("Q:", "A:", w5..w119; 0 = pad, 1 = bos, 2 = eos), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "Q:": 3, "A:": 4, **{w: i + 5 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<pad>")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny random Llama + tokenizer saved to disk, and a multiple-choice and a generation task on local JSONL."""
    root = tmp_path_factory.mktemp("lm_eval")
    config = LlamaConfig(vocab_size=len(WORDS) + 5, hidden_size=32, intermediate_size=37, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, initializer_range=0.3)  # peaked logits: varied exits
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    _tiny_tokenizer().save_pretrained(root / "model")
    rng = random.Random(0)
    docs = {
        "mc": [{"input": " ".join(rng.choices(WORDS, k=rng.randint(2, 9))), "label": rng.randrange(3)}
               for _ in range(12)],
        "gen": [{"input": " ".join(rng.choices(WORDS, k=rng.randint(2, 7))), "output": rng.choice(WORDS)}
                for _ in range(6)],
    }
    for name, rows in docs.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = root / "tasks"
    tasks.mkdir()
    cache = root / "datasets_cache"
    (tasks / "tiny_mc.yaml").write_text(MC_YAML.format(data=root / "mc.jsonl", cache=cache, choices=CHOICES))
    (tasks / "tiny_gen.yaml").write_text(GEN_YAML.format(data=root / "gen.jsonl", cache=cache))
    return {"root": root, "model": str(root / "model"), "tasks": str(tasks),
            "task_manager": TaskManager(include_path=str(tasks), include_defaults=False)}


def _evaluate(workspace, model, tasks=("tiny_mc", "tiny_gen"), **kwargs):
    return lm_eval.simple_evaluate(model=model, tasks=list(tasks), task_manager=workspace["task_manager"],
                                   log_samples=True, **kwargs)


def _metrics(results: dict) -> dict:
    return {task: {k: v for k, v in d.items() if not (isinstance(v, float) and math.isnan(v))}
            for task, d in results["results"].items()}


def _responses(results: dict, task: str) -> list:
    return [sample["resps"] for sample in results["samples"][task]]


def _loglikelihoods(results: dict, task: str = "tiny_mc") -> np.ndarray:
    return np.array([[choice[0][0] for choice in resps] for resps in _responses(results, task)])


def _truncated_stock(path: str, k: int) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(path).eval()
    model.model.layers = model.model.layers[:k]
    model.config.num_hidden_layers = k
    return model


def test_registered_beside_the_harness_models():
    from lm_eval.api.registry import get_model

    assert get_model("adainfer") is harness.AdaInferLM
    assert issubclass(harness.AdaInferLM, HFLM) and get_model("hf") is HFLM


def test_logits_at_every_position_come_from_the_exit_layer(workspace):
    """The semantics loglikelihood scoring relies on: an exited row's logits, at every position, are the layer-k
    logit lens, with the exit decided on the last real token of a right-padded row."""
    model = AdaInferLlamaForCausalLM.from_pretrained(workspace["model"], exit_classifier=None).eval()
    ids = torch.randint(5, 120, (3, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding, as HFLM's scoring batches
    ids[1, 5:] = 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, exit_policy=ScriptedExit([1, 2, LAYERS]), use_cache=False)
        assert out.exit_layers.tolist() == [1, 2, LAYERS]
        for row, k in enumerate([1, 2, LAYERS]):
            n = int(mask[row].sum())
            ref = _truncated_stock(workspace["model"], k)(ids[row:row + 1, :n]).logits[0]
            torch.testing.assert_close(out.logits[row, :n], ref, atol=1e-5, rtol=1e-5)


def test_no_classifier_equals_hf(workspace):
    """(a) `--model adainfer` without a classifier gives `--model hf`'s metrics and per-request outputs exactly."""
    args = {"pretrained": workspace["model"], "device": "cpu", "dtype": "float32"}
    ref = _evaluate(workspace, "hf", model_args=args, batch_size=4)
    ours = _evaluate(workspace, "adainfer", model_args={**args, "exit_classifier": "none"}, batch_size=4)
    assert _metrics(ours) == _metrics(ref)
    for task in ("tiny_mc", "tiny_gen"):
        assert _responses(ours, task) == _responses(ref, task)
    stats = ours["config"][harness.STATS_KEY]
    assert stats["tasks"]["tiny_mc"]["requests"] == 12 * len(CHOICES)
    assert stats["tasks"]["tiny_gen"]["requests"] == 6
    for entry in (*stats["tasks"].values(), stats["all"]):
        assert entry["mean_exit_layer"] == LAYERS and entry["pruning_ratio"] == 0.0
        assert entry["flops_ratio"] == pytest.approx(1.0)


def test_every_supported_family_loads_by_path(workspace, tmp_path):
    """`pretrained=DIR` goes through `AutoAdaInferForCausalLM`: a Mistral checkpoint (not Llama/OPT) runs, without a
    classifier exactly as `--model hf`, and with `exit_layer` at that depth."""
    from transformers import MistralConfig, MistralForCausalLM

    from adainfer_hf import AdaInferMistralForCausalLM

    config = MistralConfig(vocab_size=len(WORDS) + 5, hidden_size=32, intermediate_size=37, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(tmp_path / "mistral")
    _tiny_tokenizer().save_pretrained(tmp_path / "mistral")
    args = {"pretrained": str(tmp_path / "mistral"), "device": "cpu", "dtype": "float32"}
    ref = _evaluate(workspace, "hf", tasks=["tiny_mc"], model_args=args, batch_size=4)
    lm = harness.AdaInferLM(**args, exit_classifier="none", batch_size=4)
    assert isinstance(lm.model, AdaInferMistralForCausalLM)
    ours = _evaluate(workspace, lm, tasks=["tiny_mc"])
    assert _metrics(ours) == _metrics(ref) and _responses(ours, "tiny_mc") == _responses(ref, "tiny_mc")
    cut = _evaluate(workspace, "adainfer", tasks=["tiny_mc"], model_args={**args, "exit_layer": 1}, batch_size=4)
    assert cut["config"][harness.STATS_KEY]["all"]["mean_exit_layer"] == 1


def test_scripted_exit_equals_truncated_model(workspace):
    """(b) exit at layer k everywhere (a loaded model + a policy) gives the metrics of the stock model cut to k."""
    k = 2
    tokenizer = AutoTokenizer.from_pretrained(workspace["model"])
    ref_lm = HFLM(pretrained=_truncated_stock(workspace["model"], k), tokenizer=tokenizer, batch_size=4,
                  device="cpu")
    ref = _evaluate(workspace, ref_lm)
    model = AdaInferLlamaForCausalLM.from_pretrained(workspace["model"], exit_classifier=None).eval()
    ours_lm = harness.AdaInferLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(workspace["model"]),
                                 exit_classifier=ScriptedExit(k), batch_size=4)
    ours = _evaluate(workspace, ours_lm)
    assert _metrics(ours)["tiny_mc"]["acc,none"] == _metrics(ref)["tiny_mc"]["acc,none"]
    np.testing.assert_allclose(_loglikelihoods(ours), _loglikelihoods(ref), atol=1e-4, rtol=1e-5)
    assert _responses(ours, "tiny_gen") == _responses(ref, "tiny_gen")
    # (c) the statistics: every decision at layer k
    stats = ours["config"][harness.STATS_KEY]
    for task in ("tiny_mc", "tiny_gen"):
        entry = stats["tasks"][task]
        assert entry["mean_exit_layer"] == k and entry["pruning_ratio"] == pytest.approx(1 - k / LAYERS)
        assert k / LAYERS < entry["flops_ratio"] < 1 and entry["model_seconds"] > 0
        assert entry["exit_histogram"] == {str(k): entry["decisions"]}
    assert stats["tasks"]["tiny_mc"]["decisions"] == 12 * len(CHOICES)  # one row per request (no shared rows)
    assert stats["tasks"]["tiny_gen"]["decisions"] >= 6  # one per row and generated token


def test_a_shortlisted_policy_warns_that_loglikelihoods_outside_it_are_impossible(workspace):
    model = AdaInferLlamaForCausalLM.from_pretrained(workspace["model"], exit_classifier=None).eval()
    tokenizer = AutoTokenizer.from_pretrained(workspace["model"])
    with pytest.warns(UserWarning, match="shortlist of 3 token ids"):
        harness.AdaInferLM(pretrained=model, tokenizer=tokenizer, batch_size=4,
                           exit_classifier=ScriptedExit(1, check_vocabulary=[3, 4, 5]))


def test_exit_is_decided_on_the_last_real_token(workspace):
    """Right-padded batches (rows of different lengths) score exactly as unpadded batch-1 calls, with a rule
    whose exits vary from row to row: each row decides on its last real token, never on padding."""
    model = AdaInferLlamaForCausalLM.from_pretrained(workspace["model"], exit_classifier=None)
    clf_dir = workspace["root"] / "gap_rule"
    ExitClassifier(GapThresholdRule(threshold=0.1).fit(np.zeros((1, 2)))).bind(model).save_pretrained(clf_dir)
    args = {"pretrained": workspace["model"], "device": "cpu", "exit_classifier": str(clf_dir)}
    runs = {bs: _evaluate(workspace, "adainfer", tasks=["tiny_mc"], model_args=args, batch_size=bs)
            for bs in (1, 5)}
    histogram = runs[5]["config"][harness.STATS_KEY]["tasks"]["tiny_mc"]["exit_histogram"]
    assert len(histogram) >= 3, histogram  # exits vary between rows
    assert histogram == runs[1]["config"][harness.STATS_KEY]["tasks"]["tiny_mc"]["exit_histogram"]
    np.testing.assert_allclose(_loglikelihoods(runs[5]), _loglikelihoods(runs[1]), atol=1e-4, rtol=1e-5)


def test_row_lengths_resolve_zero_ending_inputs():
    """An input that is another one followed by token 0 (the pad value) is matched longest first, once each."""
    lengths = harness_model._RowLengths([(5, 7, 0), (5, 7), (9,)])
    rows = torch.tensor([[5, 7, 0, 0], [5, 7, 0, 0], [9, 0, 0, 0], [1, 1, 1, 1]])
    assert lengths.resolve(rows) == [3, 2, 1, None]


def test_cli_main_writes_sidecar(workspace, tmp_path, capsys):
    """The wrapper CLI hands argv to the harness's own CLI, then writes the statistics beside its results."""
    out_dir = tmp_path / "out"
    assert harness.main([
        "--model", "adainfer", "--model_args", f"pretrained={workspace['model']},exit_layer=2", "--device", "cpu",
        "--tasks", "tiny_mc,tiny_gen", "--include_path", workspace["tasks"], "--batch_size", "4",
        "--output_path", str(out_dir),
    ]) == 0
    printed = capsys.readouterr().out
    assert "acc" in printed and "AdaInfer exit statistics" in printed
    (results_file,) = out_dir.glob("*/results_*.json")
    (sidecar,) = results_file.parent.glob(f"{harness.SIDECAR_PREFIX}_*.json")
    assert sidecar.name == results_file.name.replace("results", harness.SIDECAR_PREFIX, 1)
    stats = json.loads(sidecar.read_text())
    assert stats["results_file"] == results_file.name
    assert {t: s["mean_exit_layer"] for t, s in stats["tasks"].items()} == {"tiny_gen": 2.0, "tiny_mc": 2.0}
    embedded = json.loads(results_file.read_text())["config"][harness.STATS_KEY]
    assert embedded["tasks"] == stats["tasks"]


def test_sidecar_paths_follow_the_harness_output_file(tmp_path):
    """`--output_path out.json` makes the harness write `out_<date>.json`: the sidecar goes beside it."""
    target = tmp_path / "out.json"
    assert harness_stats.output_path(["--tasks", "x", "-o", str(target)]) == target
    assert harness_stats.output_path(["--tasks", "x"]) is None
    before = harness_stats.results_files(target)
    (tmp_path / "out_2026-01-01T00-00-00.000001.json").write_text("{}")
    new = harness_stats.results_files(target) - before
    (written,) = harness_stats.write_sidecars(target, new, {"all": {}})
    assert written == tmp_path / f"{harness.SIDECAR_PREFIX}_2026-01-01T00-00-00.000001.json"
    assert json.loads(written.read_text())["results_file"] == "out_2026-01-01T00-00-00.000001.json"


def test_bad_arguments_are_named(workspace):
    with pytest.raises(ValueError, match="exit_cache.*'bogus'"):
        harness.AdaInferLM(pretrained=workspace["model"], exit_cache="bogus")
    with pytest.raises(ValueError, match="exit_layer or exit_classifier"):
        harness.AdaInferLM(pretrained=workspace["model"], exit_layer=2, exit_classifier="some/dir")
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        harness.AdaInferLM(pretrained=LlamaForCausalLM.from_pretrained(workspace["model"]))


def test_python_dash_m_runs_the_harness_cli():
    proc = subprocess.run([sys.executable, "-m", "adainfer_hf.integrations.lm_eval", "--help"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "--model_args" in proc.stdout


def test_core_package_does_not_import_lm_eval():
    code = "import sys, adainfer_hf, adainfer_hf.integrations; assert 'lm_eval' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_smollm2_adainfer_matches_hf_and_reports_exits(smollm2_dir, tmp_path):
    """The real default model on a few requests: no classifier = `--model hf`; the gap rule exits early."""
    rows = [("A delight from start to finish.", 0), ("Dull, slow and far too long.", 1),
            ("One of the best films this year.", 0), ("I want those two hours back.", 1)]
    data = tmp_path / "sentiment.jsonl"
    data.write_text("".join(json.dumps({"input": x, "label": y}) + "\n" for x, y in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "smol_sentiment.yaml").write_text(
        "task: smol_sentiment\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\n  cache_dir: {tmp_path / 'cache'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Q: {{input}}\\nA:"\ndoc_to_choice: ["positive", "negative"]\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    workspace = {"task_manager": TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)}
    args = {"pretrained": str(smollm2_dir), "device": "cpu", "dtype": "float32"}
    run = {name: _evaluate(workspace, model, tasks=["smol_sentiment"], model_args=margs, batch_size=4, limit=4)
           for name, model, margs in (("hf", "hf", args), ("none", "adainfer", {**args, "exit_classifier": "none"}))}
    assert _responses(run["none"], "smol_sentiment") == _responses(run["hf"], "smol_sentiment")
    model = AdaInferLlamaForCausalLM.from_pretrained(smollm2_dir, exit_classifier=None)
    clf_dir = tmp_path / "gap_rule"
    ExitClassifier(GapThresholdRule(threshold=0.8).fit(np.zeros((1, 2)))).bind(model).save_pretrained(clf_dir)
    gap = _evaluate(workspace, "adainfer", tasks=["smol_sentiment"], batch_size=4, limit=4,
                    model_args={**args, "exit_classifier": str(clf_dir)})
    entry = gap["config"][harness.STATS_KEY]["tasks"]["smol_sentiment"]
    assert entry["requests"] == 8 and entry["num_layers"] == 30 and entry["mean_exit_layer"] < 30
