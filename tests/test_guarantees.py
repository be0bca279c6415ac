"""README "Guarantees": no file is unpickled. A static scan of memobench/, plugins/ and benchmarks/: every
``torch.load`` passes ``weights_only=True``, every ``np.load`` ``allow_pickle=False``, nothing calls ``pickle``/
``joblib``/``dill`` loaders, diffusers pipelines load with ``use_safetensors=True``, and TorchScript is loaded only by the
SSCD module (Meta's official file, sha256 recorded and pinnable)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIRS = ("memobench", "plugins", "benchmarks")


def _calls():
    for d in DIRS:
        for f in sorted((ROOT / d).rglob("*.py")):
            tree = ast.parse(f.read_text(), filename=str(f))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    yield f.relative_to(ROOT), node


def _name(func) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _kw(node, name):
    for k in node.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_const(v, value) -> bool:
    return isinstance(v, ast.Constant) and v.value is value


def test_no_unpickling_anywhere():
    bad = []
    for path, node in _calls():
        n = _name(node.func)
        where = f"{path}:{node.lineno} {n}"
        if n.endswith("torch.load") and not _is_const(_kw(node, "weights_only"), True):
            bad.append(where + " without weights_only=True")
        elif n in ("np.load", "numpy.load") and not _is_const(_kw(node, "allow_pickle"), False):
            bad.append(where + " without allow_pickle=False")
        elif n.split(".")[0] in ("pickle", "joblib", "dill", "cloudpickle") and n.split(".")[-1] in ("load", "loads"):
            bad.append(where)
        elif n.endswith("jit.load") and str(path) != "memobench/sscd.py":
            bad.append(where + " (TorchScript outside the SSCD module)")
        elif n.endswith("Pipeline.from_pretrained") and not _is_const(_kw(node, "use_safetensors"), True):
            bad.append(where + " without use_safetensors=True")
    assert not bad, "\n".join(bad)


def test_the_scan_finds_an_unsafe_load(tmp_path, monkeypatch):
    """The scan above can fail: a planted ``torch.load(path)`` is reported."""
    planted = ROOT / "plugins" / "_planted_unsafe_load_test.py"
    planted.write_text("import torch\n\ndef f(p):\n    return torch.load(p)\n")
    try:
        try:
            test_no_unpickling_anywhere()
        except AssertionError as e:
            assert "_planted_unsafe_load_test.py:4 torch.load without weights_only=True" in str(e)
        else:
            raise AssertionError("the scan missed a torch.load without weights_only=True")
    finally:
        planted.unlink()
