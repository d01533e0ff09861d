"""The core (``qcompiler/``) never imports ``passes/``: passes build on the core, not the reverse.

The one way up is the pass registry (``qcompiler.pipeline`` loads pass modules by name and
``qcompiler.canonical`` runs ``canonicalize`` through it); command modules (``qcompiler/commands``) assemble pipelines and are exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "qcompiler"
EXEMPT = {"commands", "pipeline.py"}  # the command layer; the registry's loader


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def test_core_never_imports_passes() -> None:
    offenders = [f"{p.relative_to(ROOT)}: {m}" for p in sorted(ROOT.rglob("*.py"))
                 if p.relative_to(ROOT).parts[0] not in EXEMPT
                 for m in _imports(p) if m == "qcompiler.passes" or m.startswith("qcompiler.passes.")]
    assert offenders == []
