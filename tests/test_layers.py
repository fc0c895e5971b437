"""The packages' dependencies point one way, checked on what a fresh interpreter really imports:
drip_llava.vision <- vision_pretrain <- drip_llava (model, data, train, eval, serve) <- drip_demo.

- drip_llava.vision imports nothing else of the project;
- vision_pretrain imports only drip_llava.vision, drip_llava.distributed (torch only) and drip_llava.jsonl
  (stdlib only);
- no library module (drip_llava.*, vision_pretrain.*) imports drip_demo, and eval does not import serve;
- no file edits sys.path; and the tree passes the ruff config in pyproject.toml.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("drip_llava", "vision_pretrain", "drip_demo")

_PROBE = """
import importlib, json, pkgutil, sys
for top in {tops!r}:
    pkg = importlib.import_module(top)
    if hasattr(pkg, "__path__"):
        for m in pkgutil.walk_packages(pkg.__path__, top + "."):
            if not m.name.endswith("__main__"):
                importlib.import_module(m.name)
print(json.dumps(sorted(n for n in sys.modules if n.split(".")[0] in {project!r})))
"""


def imported_by(*tops: str) -> set[str]:
    """Project modules in sys.modules after importing `tops` and every module below them, in a fresh process."""
    code = _PROBE.format(tops=tops, project=PROJECT)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def outside(mods: set[str], *allowed: str) -> set[str]:
    return {m for m in mods if not any(m == a or m.startswith(a + ".") for a in allowed)}


def test_vision_imports_nothing_else_of_the_project():
    mods = imported_by("drip_llava.vision")
    assert outside(mods, "drip_llava.vision") == {"drip_llava"}


def test_vision_pretrain_imports_only_the_vision_layer():
    mods = imported_by("vision_pretrain")
    allowed = ("vision_pretrain", "drip_llava.vision", "drip_llava.distributed", "drip_llava.jsonl")
    assert outside(mods, *allowed) == {"drip_llava"}


def test_library_never_imports_demo_code():
    mods = imported_by("drip_llava", "vision_pretrain")
    assert not {m for m in mods if m.split(".")[0] == "drip_demo"}
    eval_only = imported_by("drip_llava.eval")
    assert not {m for m in eval_only if m.startswith(("drip_llava.serve", "drip_llava.train"))}


def test_no_sys_path_edits():
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    needle = "sys.path" + ".insert"  # spelled apart so this file does not match itself
    hits = [f for f in files if (ROOT / f).is_file() and needle in (ROOT / f).read_text()
            or (ROOT / f).is_file() and ("sys.path" + ".append") in (ROOT / f).read_text()]
    assert not hits


def test_tree_passes_ruff():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    out = subprocess.run([ruff, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
