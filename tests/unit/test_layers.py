"""Lower floors import nothing above them: ``shared`` <- ``gateway``, ``worker`` <-
``tokenfleet`` (CLI, supervisor); ``bench`` uses gateway, worker and tokenfleet; the webhook
dispatcher (``webhooks``) stands on ``shared`` alone.

Parsed from the source (every ``import`` and ``from ... import``, at any depth, lazy ones
included), so a function-level import cannot sneak past.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "shared": {"gateway", "worker", "bench", "tokenfleet", "tests"},
    "gateway": {"bench", "tokenfleet", "tests"},
    "worker": {"bench", "tokenfleet", "tests"},
    "webhooks": {"gateway", "worker", "batches", "bench", "tokenfleet", "tests"},
    "tokenfleet": {"tests"},
}


def imported_packages(path: Path) -> set[tuple[int, str]]:
    """(line, top-level package) of every absolute import in ``path``."""
    found: set[tuple[int, str]] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {(node.lineno, alias.name.split(".")[0]) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.lineno, node.module.split(".")[0]))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_nothing_above_it(package: str) -> None:
    files = sorted((REPO_ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    bad = [f"{path.relative_to(REPO_ROOT)}:{line} imports {name}"
           for path in files for line, name in sorted(imported_packages(path))
           if name in FORBIDDEN[package]]
    assert bad == []


def test_the_checker_sees_lazy_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from worker.main import run\n    import bench.cli\n")
    assert imported_packages(module) == {(2, "worker"), (3, "bench")}
