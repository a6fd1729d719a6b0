"""The one-direction rule: the engine (akvvm_ext) knows nothing of waagent (handler)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = sorted((ROOT / "akvvm_ext").glob("*.py"))
WAAGENT_WORDS = re.compile(r"\bseq\b|status file|HandlerEnvironment", re.IGNORECASE)


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_scan_covers_the_engine() -> None:
    """The scans below read the modules that make up the engine (not an empty or moved tree)."""
    names = {path.stem for path in ENGINE}
    assert {"settings", "chain", "store", "sync", "service", "keyvault", "identity"} <= names


def test_engine_never_imports_handler() -> None:
    """No module of akvvm_ext imports handler (or tests)."""
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in _imported_modules(path)
                                            if m.split(".")[0] in {"handler", "tests"})
        for path in ENGINE
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_engine_does_not_speak_waagent() -> None:
    """The engine's code never says seq, status file or HandlerEnvironment."""
    hits = []
    for path in ENGINE:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if WAAGENT_WORDS.search(code):
                hits.append(f"{path.name}:{number}: {line.strip()}")
    assert hits == []
