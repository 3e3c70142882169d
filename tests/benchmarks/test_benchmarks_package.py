"""benchmarks/ is a package organised by question: every script imports as `benchmarks.<question>.<name>` (no
`sys.path` edits), answers `--help`, and benchmarks/README.md lists each one."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = ("common", "cost", "speed", "quality", "paper", "peers")
SCRIPTS = sorted(p for q in QUESTIONS for p in (ROOT / "benchmarks" / q).glob("*.py")
                 if p.name != "__init__.py" and "def main(argv" in p.read_text())


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def test_the_package_is_organised_by_question():
    top = {p.name for p in (ROOT / "benchmarks").iterdir() if not p.name.startswith((".", "__"))}
    assert {*QUESTIONS, "README.md"} <= top <= {*QUESTIONS, "README.md", "data"}, sorted(top)
    assert not [p for p in (ROOT / "benchmarks").rglob("*.py") if "sys.path" in p.read_text()]


@pytest.mark.parametrize("path", SCRIPTS, ids=_module)
def test_each_script_answers_help(path, capsys):
    module = importlib.import_module(_module(path))
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_the_index_lists_every_script():
    index = (ROOT / "benchmarks" / "README.md").read_text()
    missing = [_module(p) for p in SCRIPTS if _module(p) not in index]
    assert not missing, f"benchmarks/README.md does not list {missing}"
