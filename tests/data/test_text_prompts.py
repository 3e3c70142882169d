"""Plain-text prompt files (`data.text_prompts`) and the shipped drafting prompt set."""

import json

import pytest

from adainfer_hf.data.text_prompts import default_drafting_prompts, load_text_prompts


def test_lines_and_jsonl(tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("first prompt\n\nsecond one\n", encoding="utf-8")
    assert [(p.text, p.index) for p in load_text_prompts(plain)] == [("first prompt", 1), ("second one", 3)]
    rows = tmp_path / "p.jsonl"
    rows.write_text(json.dumps({"text": "a\nb", "kind": "code"}) + "\n" + json.dumps({"text": "c"}) + "\n")
    got = load_text_prompts(rows)
    assert [(p.text, p.task) for p in got] == [("a\nb", "code"), ("c", "text")]


@pytest.mark.parametrize("body, match", [
    ('{"text": "ok"}\nnot json\n', "line 2"),
    ('{"text": "ok"}\n{"text": ""}\n', "line 2"),
    ('{"text": "ok"}\n[1, 2]\n', "line 2"),
    ('\n\n', "no prompt"),
])
def test_bad_files_name_the_line(tmp_path, body, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        load_text_prompts(path)


def test_shipped_set_is_mixed_and_distinct():
    prompts = default_drafting_prompts()
    assert 64 <= len(prompts) <= 200 and len({p.text for p in prompts}) == len(prompts)
    assert {"prose", "code", "qa", "chat"} <= {p.task for p in prompts}
