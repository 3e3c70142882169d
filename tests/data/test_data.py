"""Task loading, the paper's prompt template, disjoint demonstration sampling and gold-token extraction."""

import json
import sys
import types
import warnings
from pathlib import Path

import pytest

from adainfer_hf.data import prompts as data
from adainfer_hf.data import task_files
from adainfer_hf.data.prompts import (
    Example,
    Task,
    build_prompts,
    format_prompt,
    gold_first_token,
    load_task,
    split_examples,
    split_task,
)

FV_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "function_vectors"
needs_fv = pytest.mark.skipif(not FV_DIR.is_dir(), reason=f"function-vectors data not found at {FV_DIR}")


def _task(n=30, name="toy", repeat_inputs=False):
    inputs = [f"w{i // 2 if repeat_inputs else i}" for i in range(n)]
    return Task(name=name, examples=[Example(x, f"out{i}") for i, x in enumerate(inputs)])


def _blocks(text):
    """Parse a prompt back into ([(q, a), ...] demonstrations, query input)."""
    *demos, query = text.split("\n\n")
    parsed = []
    for block in demos:
        q, a = block.split("\n")
        assert q.startswith("Q: ") and a.startswith("A: ")
        parsed.append((q[3:], a[3:]))
    assert query.startswith("Q: ") and query.endswith("\nA:")
    return parsed, query[3 : -len("\nA:")]


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


@needs_fv
def test_function_vectors_json():
    task = load_task(FV_DIR / "abstractive" / "country-capital.json")
    assert task.name == "country-capital"
    assert len(task) == 197
    assert task.examples[0] == Example("Afghanistan", "Kabul")
    assert all(isinstance(e.input, str) and isinstance(e.output, str) for e in task.examples)


@needs_fv
def test_function_vectors_values_are_stripped():
    raw = json.loads((FV_DIR / "abstractive" / "english-german.json").read_text(encoding="utf-8"))
    assert any(row["output"].endswith("\n") for row in raw)  # the file does carry stray newlines
    task = load_task(FV_DIR / "abstractive" / "english-german.json", name="en-de")
    assert task.name == "en-de"
    assert all(e.output == e.output.strip() and e.input == e.input.strip() for e in task.examples)


@needs_fv
@pytest.mark.parametrize(
    "path", sorted(FV_DIR.glob("*/*.json")) if FV_DIR.is_dir() else [], ids=lambda p: p.stem
)
def test_every_function_vectors_task_builds_prompts(path):
    task = load_task(path)
    prompts = build_prompts(task, shots=5, limit=3)
    assert len(prompts) == 3 and all(p.text.endswith("\nA:") for p in prompts)


def test_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"q": "a", "a": 1}\n\n{"q": "b ", "a": 2.5}\n', encoding="utf-8")
    task = load_task(jsonl, input_column="q", output_column="a")
    assert task.name == "t" and task.examples == [Example("a", "1"), Example("b", "2.5")]

    path = tmp_path / "t.csv"
    path.write_text('question,answer,extra\n"x, y",Z,0\nw,"multi\nline",1\n', encoding="utf-8")
    task = load_task(path, input_column="question", output_column="answer")
    assert task.examples == [Example("x, y", "Z"), Example("w", "multi\nline")]


@pytest.mark.parametrize(
    "filename, content, match",
    [
        ("e.json", "", "is empty"),
        ("e.json", "  \n", "is empty"),
        ("o.json", '{"input": "a", "output": "b"}', "JSON dict; expected a JSON list"),
        ("b.json", "[1, 2", "not valid JSON"),
        ("n.json", "[]", "contains no examples"),
        ("s.json", '["a"]', "example 0: got a str"),
        (
            "m.json",
            '[{"input": "a", "output": "b"}, {"input": "c"}]',
            r"example 1: missing 'output'.*\['input'\]",
        ),
        ("x.json", '[{"input": "a", "output": null}]', "missing 'output'"),
        ("l.jsonl", '{"input": "a", "output": "b"}\nnot json\n', "line 2: not valid JSON"),
        ("c.csv", "", "expected a CSV header"),
        ("c.csv", "input,answer\na,b\n", r"no column\(s\) \['output'\]; its header is \['input', 'answer'\]"),
        ("t.txt", "input,output\n", r"unknown extension '.txt'"),
    ],
)
def test_bad_files(tmp_path, filename, content, match):
    path = tmp_path / filename
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match) as info:
        load_task(path)
    assert str(path) in str(info.value)


def test_missing_sources(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_task(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="is a directory"):
        load_task(tmp_path)
    (tmp_path / "ok.json").write_text('[{"input": "a", "output": "b"}]', encoding="utf-8")
    with pytest.raises(ValueError, match="only applies to Hugging Face datasets"):
        load_task(tmp_path / "ok.json", split="train")

    monkeypatch.setitem(sys.modules, "datasets", None)  # make `import datasets` fail
    monkeypatch.setattr(task_files, "_datasets_available", lambda: False)
    with pytest.raises(ImportError, match=r"pip install adainfer-hf\[datasets\]"):
        load_task("hf:org/name")
    with pytest.raises(FileNotFoundError, match="pass 'hf:org/name'"):
        load_task("org/name")


class _FakeDataset(list):
    def __init__(self, rows):
        super().__init__(rows)
        self.column_names = list(rows[0])


class _FakeDatasetDict(dict):
    pass


def test_hf_datasets_through_a_stub(monkeypatch):
    """`load_dataset` is called with the id and split; rows become examples; splits and columns are checked."""
    calls = []
    splits = _FakeDatasetDict(
        train=_FakeDataset([{"text": "a", "label": 0}, {"text": "b", "label": 1}]),
        test=_FakeDataset([{"text": "c", "label": 1}]),
    )

    def load_dataset(path, split=None):
        calls.append((path, split))
        return splits if split is None else splits[split]

    stub = types.SimpleNamespace(load_dataset=load_dataset, DatasetDict=_FakeDatasetDict)
    monkeypatch.setitem(sys.modules, "datasets", stub)

    task = load_task("hf:org/sst", input_column="text", output_column="label", split="test")
    assert (task.name, task.source, task.examples) == ("org/sst", "hf:org/sst", [Example("c", "1")])
    # A string that is not a path goes to `datasets` when it is installed.
    monkeypatch.setattr(task_files, "_datasets_available", lambda: True)
    task = load_task("org/sst", input_column="text", output_column="label", split="train", name="sst")
    assert task.name == "sst" and len(task) == 2
    assert calls == [("org/sst", "test"), ("org/sst", "train")]

    with pytest.raises(ValueError, match=r"splits \['test', 'train'\]; pass `split=`"):
        load_task("hf:org/sst", input_column="text", output_column="label")
    with pytest.raises(
        ValueError, match=r"no column\(s\) \['input', 'output'\]; its columns are \['text', 'label'\]"
    ):
        load_task("hf:org/sst", split="train")


# ----------------------------------------------------------------------------------------------------------------
# Template and prompts
# ----------------------------------------------------------------------------------------------------------------


def test_template_is_exact():
    demos = [Example("France", "Paris"), Example("Italy", "Rome")]
    assert format_prompt(demos, "Spain") == "Q: France\nA: Paris\n\nQ: Italy\nA: Rome\n\nQ: Spain\nA:"
    assert format_prompt([], "Spain") == "Q: Spain\nA:"


def test_zero_shot_prompt_is_the_bare_query():
    task = _task()
    for prompt in build_prompts(task, shots=0):
        assert prompt.text == f"Q: {task.examples[prompt.index].input}\nA:"
        assert prompt.answer == task.examples[prompt.index].output
        assert (prompt.task, prompt.shots) == ("toy", 0)


@pytest.mark.parametrize("repeat_inputs", [False, True])
def test_demonstrations_come_from_a_disjoint_pool(repeat_inputs):
    task = _task(n=40, repeat_inputs=repeat_inputs)
    demo_pool, eval_pool = split_task(task, seed=3)
    assert len(demo_pool) + len(eval_pool) == len(task)
    demo_inputs = {e.input for e in demo_pool}
    assert demo_inputs.isdisjoint(e.input for e in eval_pool)  # by content, even with repeated inputs

    prompts = build_prompts(task, shots=5, seed=3)
    assert [task.examples[p.index] for p in prompts] == eval_pool
    for prompt in prompts:
        demos, query = _blocks(prompt.text)
        assert len(demos) == len(set(demos)) == 5  # distinct examples (outputs are unique)
        assert query == task.examples[prompt.index].input
        assert all(Example(q, a) in demo_pool for q, a in demos)
        assert query not in {q for q, _ in demos}
        assert prompt.text == format_prompt([Example(q, a) for q, a in demos], query)


@needs_fv
def test_disjoint_on_a_real_task_with_repeated_inputs():
    task = load_task(FV_DIR / "abstractive" / "national_parks.json")  # 31 repeated inputs
    demo_pool, eval_pool = split_task(task)
    assert {e.input for e in demo_pool}.isdisjoint(e.input for e in eval_pool)
    assert len(demo_pool) / len(task) == pytest.approx(0.3, abs=0.05)


def test_prompts_are_deterministic_and_stable():
    task = _task(n=50)
    first = build_prompts(task, shots=10, seed=7)
    assert first == build_prompts(task, shots=10, seed=7)
    assert first != build_prompts(task, shots=10, seed=8)
    # `limit` takes a prefix and does not change any prompt.
    assert build_prompts(task, shots=10, seed=7, limit=4) == first[:4]
    # The same examples are evaluated for every `shots`, and fewer shots are a prefix of more shots.
    fewer = build_prompts(task, shots=5, seed=7)
    assert [p.index for p in fewer] == [p.index for p in first]
    for small, large in zip(fewer, first, strict=True):
        assert _blocks(small.text)[0] == _blocks(large.text)[0][:5]


def test_prompt_argument_errors():
    task = _task(n=20)
    demo_pool, _ = split_task(task)
    with pytest.raises(ValueError, match=rf"`shots=7` exceeds the {len(demo_pool)} examples.*'toy'"):
        build_prompts(task, shots=7)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="`shots` must be an integer >= 0"):
            build_prompts(task, shots=bad)
    with pytest.raises(ValueError, match="`limit`"):
        build_prompts(task, shots=1, limit=-1)
    with pytest.raises(ValueError, match="`seed`"):
        build_prompts(task, shots=1, seed=-1)
    with pytest.raises(ValueError, match="`demo_fraction`"):
        split_task(task, demo_fraction=1.0)
    with pytest.raises(ValueError, match=r"has 1 distinct input\(s\); at least 2"):
        split_task(Task("one", [Example("a", "b"), Example("a", "c")]))


def test_split_examples():
    items = list(range(100))
    calibration, evaluation = split_examples(items, [0.3, 0.7], seed=1)
    assert (len(calibration), len(evaluation)) == (30, 70)
    assert sorted(calibration + evaluation) == items
    assert split_examples(items, [0.3, 0.7], seed=1) == [calibration, evaluation]
    assert split_examples(items, [0.3, 0.7], seed=2) != [calibration, evaluation]
    (part,) = split_examples(items, [0.25], seed=1)
    assert len(part) == 25
    assert sum(map(len, split_examples(list(range(7)), [1 / 3, 1 / 3, 1 / 3]))) == 7
    for bad in ([], [0.0], [0.6, 0.6], [-0.1]):
        with pytest.raises(ValueError, match="`fractions`"):
            split_examples(items, bad)


# ----------------------------------------------------------------------------------------------------------------
# Gold first token
# ----------------------------------------------------------------------------------------------------------------


def _fast_tokenizer(model, pre_tokenizer=None):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(model)
    if pre_tokenizer is not None:
        backend.pre_tokenizer = pre_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_gold_first_token_tiny_word_level():
    """A tokenizer that drops whitespace: the gold token is the bare word."""
    from tokenizers import models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "Q", ":", "A", "France", "Paris", "Saint", "Denis"])}
    tokenizer = _fast_tokenizer(models.WordLevel(vocab, unk_token="[UNK]"), pre_tokenizers.Whitespace())
    prompt = "Q: France\nA:"
    assert gold_first_token(tokenizer, prompt, "Paris") == vocab["Paris"]
    assert gold_first_token(tokenizer, prompt, "Saint Denis") == vocab["Saint"]
    with pytest.raises(ValueError, match="empty"):
        gold_first_token(tokenizer, prompt, " ")


def test_gold_first_token_boundary_merge_warns_once(monkeypatch):
    """A vocabulary with a ': ' token merges the prompt's end into the answer; documented fallback + one warning."""
    from tokenizers import models

    vocab = {t: i for i, t in enumerate(["A", ":", " ", "P", ": "])}
    tokenizer = _fast_tokenizer(models.BPE(vocab, merges=[(":", " ")]))
    monkeypatch.setattr(data, "_warned_boundary_merge", False)
    with pytest.warns(UserWarning, match="merges the end of the prompt"):
        assert gold_first_token(tokenizer, "A:", "P") == vocab[": "]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gold_first_token(tokenizer, "A:", "P")


def test_gold_first_token_smollm2(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = format_prompt([Example("Germany", "Berlin")], "France")
    token = gold_first_token(tokenizer, prompt, "Paris")
    assert tokenizer.decode([token]) == " Paris"  # the space-prefixed token, not "Paris"
    assert token != tokenizer("Paris", add_special_tokens=False)["input_ids"][0]
    # In general: prompt tokens + gold token is a prefix of the tokenized prompt + answer.
    for answer in ["Andorra la Vella", "St. John's", "mäßig", "1234", '"quoted"']:
        token = gold_first_token(tokenizer, prompt, answer)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(prompt + " " + answer, add_special_tokens=False)["input_ids"]
        assert full_ids[: len(prompt_ids) + 1] == prompt_ids + [token]
