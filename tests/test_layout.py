"""The package reads as its architecture (STYLE.md 8 and 13): `scripts/check_layout.py` finds no import cycle, no
function-level import of our modules or of a required dependency, no import up the layer order, no module over 400
lines and no function over 80 lines."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "adainfer_hf"
_spec = importlib.util.spec_from_file_location("check_layout", ROOT / "scripts" / "check_layout.py")
layout = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layout)

def test_the_package_has_no_layout_findings():
    findings = layout.analyse(SRC)
    assert {kind: items for kind, items in findings.items() if items} == {}


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_the_checker_finds_each_kind_of_problem(tmp_path):
    pkg = tmp_path / "adainfer_hf"
    long_body = "".join(f"    x{i} = {i}\n" for i in range(layout.MAX_FUNCTION_LINES + 1))
    _write(pkg, {
        "__init__.py": "",
        "utils/__init__.py": "",
        "utils/a.py": "from ..training import b\n",  # up the layer order, and half of a cycle
        "training/__init__.py": "",
        "training/b.py": "from ..utils import a\n\n\ndef f():\n    from ..utils import a\n    import scipy\n",
        "training/c.py": "def long():\n" + long_body + "\n" * layout.MAX_MODULE_LINES,
    })
    findings = layout.analyse(pkg)
    assert findings["cycles"] == ["adainfer_hf.training.b -> adainfer_hf.utils.a -> adainfer_hf.training.b"]
    assert [f.split(": ", 1)[1] for f in findings["function_imports"]] == [
        "imports adainfer_hf.utils.a", "imports scipy"]
    assert findings["upward_imports"] == [
        "adainfer_hf/utils/a.py: utils imports adainfer_hf.training.b (layer training is above)"]
    assert [f.split(":")[0] for f in findings["long_modules"]] == ["adainfer_hf/training/c.py"]
    assert findings["long_functions"] == [f"adainfer_hf/training/c.py:1: long has {layout.MAX_FUNCTION_LINES + 1 + 1} lines"]
    assert layout.main([str(pkg)]) == 1
