"""The package reads as its architecture (CONTRIBUTING.md, "Layering" and "Module size"): `scripts/check_layout.py`
finds no import cycle, no function-level import of our modules or of a required dependency, no import up the layer
order, no import of another module's underscore name, no module over 400 lines (600 for a module that defines one
public class) and no function over 80 lines."""

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
    assert findings["private_imports"] == []
    assert layout.main([str(pkg)]) == 1


def test_the_checker_refuses_another_modules_underscore_names(tmp_path):
    pkg = tmp_path / "adainfer_hf"
    _write(pkg, {
        "__init__.py": "from .utils.a import __version__\n",  # a dunder is public
        "utils/__init__.py": "",
        "utils/a.py": "__version__ = '0'\n\n\ndef _helper():\n    pass\n\n\ndef helper():\n    _helper()\n",
        "utils/_hidden.py": "",
        "training/__init__.py": "",
        "training/b.py": ("from ..utils.a import _helper, helper\nfrom ..utils import a as util\n"
                          "from ..utils import _hidden\nimport adainfer_hf.utils._hidden\n\n\n"
                          "def f():\n    return util._helper, util.helper, helper._private_attr_of_a_function\n"),
    })
    findings = layout.analyse(pkg)
    assert findings["private_imports"] == [
        "adainfer_hf/training/b.py:1: imports _helper from adainfer_hf.utils.a",
        "adainfer_hf/training/b.py:3: imports _hidden from adainfer_hf.utils",
        "adainfer_hf/training/b.py:4: imports adainfer_hf.utils._hidden",
        "adainfer_hf/training/b.py:8: reads adainfer_hf.utils.a._helper",
    ]
    assert {kind: items for kind, items in findings.items() if items and kind != "private_imports"} == {}
    assert layout.main([str(pkg)]) == 1


def test_one_class_modules_have_the_relaxed_line_cap(tmp_path):
    pkg = tmp_path / "adainfer_hf"
    padding = "\n" * (layout.MAX_MODULE_LINES + 1)
    _write(pkg, {
        "__init__.py": "",
        "policy/__init__.py": "",
        "policy/one.py": "X = 1\n\n\nclass One:\n    pass\n\n\ndef _helper():\n    pass\n" + padding,
        "policy/two.py": "class One:\n    pass\n\n\ndef helper():\n    pass\n" + padding,
        "policy/big.py": "class One:\n    pass\n" + "\n" * (layout.MAX_CLASS_MODULE_LINES + 1),
    })
    long = sorted(f.split(":")[0] for f in layout.analyse(pkg)["long_modules"])
    assert long == ["adainfer_hf/policy/big.py", "adainfer_hf/policy/two.py"]
