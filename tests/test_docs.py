"""Documentation that cannot rot: every Python code block of README.md and docs/ runs as written.

A page's blocks run in order in one namespace (as a reader pastes them into one session), in a temporary working
directory. A block may be marked by an HTML comment on the line before its fence:

- `<!-- docs: embedded -->`: it uses the embedded SmolLM2 (skipped where it cannot be converted);
- `<!-- docs: hub ID=model ID=classifier ... -->`: it names Hub repositories. They are served by the test suite's
  fake Hub: `model` a tiny random Llama with the embedded model's tokenizer (so a "7B" snippet runs in a second),
  `classifier` an exit classifier bound to that model. Nothing reaches the real Hub.

Blocks in other languages (bash, text) are not run here; the commands they show have their own tests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_BLOCK = re.compile(r"(?:<!-- docs: (?P<marker>[^>]*?) -->\n)?^```python\n(?P<code>.*?)^```", re.S | re.M)


def python_blocks(page: Path) -> list[tuple[int, str, str]]:
    """`(line, marker, code)` of each Python block of `page`, in order."""
    text = page.read_text()
    return [(text.count("\n", 0, m.start("code")) + 1, (m.group("marker") or "").strip(), m.group("code"))
            for m in _BLOCK.finditer(text)]


def _serve(repos: dict[str, str], tokenizer_dir) -> None:
    """Puts a tiny Llama (the embedded tokenizer's vocabulary) and exit classifiers on the fake Hub."""
    from transformers import AutoTokenizer

    from adainfer_hf import AdaInferLlamaForCausalLM, ExitClassifier, GapThresholdRule
    from adainfer_hf.tiny_models import llama_config

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = llama_config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          bos_token_id=tok.bos_token_id, num_hidden_layers=4)
    model = AdaInferLlamaForCausalLM(config).eval()
    for repo, kind in repos.items():
        if kind == "model":
            model.push_to_hub(repo, token="hf_test")
            tok.push_to_hub(repo, token="hf_test")
        elif kind == "classifier":
            ExitClassifier(GapThresholdRule(threshold=0.0).fit(np.zeros((1, 2))), min_layer=2).bind(model).push_to_hub(repo, token="hf_test")
        else:
            raise ValueError(f"docs marker: unknown Hub repository kind {kind!r} for {repo} (model, classifier)")


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_runs_as_written(page, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    from huggingface_hub import constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # an unmarked block never reaches a Hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": "__docs__"}
    for line, marker, code in python_blocks(page):
        words = marker.split()
        if words[:1] == ["embedded"] or words[:1] == ["hub"]:
            embedded = request.getfixturevalue("smollm2_dir")
        if words[:1] == ["hub"]:
            request.getfixturevalue("local_hub")  # the client now talks to the fake Hub
            _serve(dict(w.split("=", 1) for w in words[1:]), embedded)
            monkeypatch.setenv("HF_TOKEN", "hf_test")
        elif words and words[0] != "embedded":
            raise ValueError(f"{page.name}:{line}: unknown docs marker {marker!r} (embedded, hub ...)")
        with torch.no_grad():
            exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)  # noqa: S102


def test_the_block_reader_finds_marked_and_unmarked_blocks(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("text\n```python\nx = 1\n```\n\n<!-- docs: embedded -->\n```python\ny = 2\n```\n"
                    "```bash\nls\n```\n")
    assert python_blocks(page) == [(3, "", "x = 1\n"), (8, "embedded", "y = 2\n")]


def _docs_tables():
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "scripts" / "docs_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_tables_are_what_the_result_files_say():
    stale = [str(path.relative_to(ROOT)) for path, text in _docs_tables().pages().items() if path.read_text() != text]
    assert not stale, f"{stale}: run python scripts/docs_tables.py"


def test_a_changed_result_file_makes_the_tables_stale(tmp_path):
    import shutil

    for part in ("README.md", "docs", "benchmarks"):
        (shutil.copytree if (ROOT / part).is_dir() else shutil.copy)(ROOT / part, tmp_path / part)
    tables = _docs_tables()
    eval_file = sorted(p for p in (tmp_path / "docs/results/gemma3-270m/eval").glob("*/results.json")
                       if not p.parent.name.endswith("-0.95"))[-1]
    data = json.loads(eval_file.read_text())
    for row in data["summary"]:
        if row["method"] == "oracle" and row["task"] == "all":
            row["pruning_ratio"] = 0.5
    eval_file.write_text(json.dumps(data))
    wanted = tables.pages(tmp_path)
    assert wanted[tmp_path / "README.md"] != (tmp_path / "README.md").read_text()
    assert "| 50% |" in wanted[tmp_path / "README.md"]


_MACHINE_PATH = re.compile(r"(?<![\w$.])/(?:root|tmp|home|work|Users)/")


def test_no_machine_paths_in_the_documentation():
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in [ROOT / "README.md", *(ROOT / "docs").rglob("*")]
             if p.is_file() and p.suffix in (".md", ".json", ".log")
             for m in [_MACHINE_PATH.search(p.read_text())] if m]
    assert not found, found


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not re.match(r"[a-z]+:", target) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    first = lines.index("```")
    assert lines[first + 1:first + 4] == ["bash scripts/demo.sh", "bash scripts/test.sh", "```"]
    links = {link for line in lines for link in re.findall(r"\]\((docs/[^)#]+)", line)}
    assert links and all((ROOT / link).is_file() for link in links), sorted(links)
